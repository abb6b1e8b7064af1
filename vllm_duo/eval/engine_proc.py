"""Run one vLLM engine job in a fresh process; the job's result comes back as JSON.

Each backend gets its own process so GPU memory, compile caches and vLLM's process-wide
state never leak between runs. The child's stdout/stderr (vLLM's logs, progress bars) are
copied live to a log file, and echoed unless asked not to. KV-cache capacity comes from vLLM's
API in the job (:func:`kv_capacity`); only the memory figures vLLM merely logs (model and
KV-cache GiB) are parsed from the log.

    python -m vllm_duo.eval.engine_proc MODULE:FUNCTION IN.json OUT.json
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001,
}
# The other two architectures duo serves, at their 7B shapes (no sliding window).
MISTRAL_7B_V02 = dict(LLAMA3_8B, architectures=["MistralForCausalLM"], model_type="mistral",
                      vocab_size=32000, max_position_embeddings=32768, rope_theta=1e6,
                      sliding_window=None, bos_token_id=1, eos_token_id=2)
QWEN2_7B = dict(LLAMA3_8B, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_theta=1e6, sliding_window=None, use_sliding_window=False,
                bos_token_id=151643, eos_token_id=151643)


def write_model(path: str, config: dict) -> str:
    """A model folder holding only ``config.json`` (use with ``load_format="dummy"``)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def memory_kwargs(gpu_memory_utilization: float, kv_cache_gib: float | None) -> dict[str, Any]:
    """An engine's memory options: a share of the GPU, or a fixed KV cache in bytes so the engine
    can share a GPU (vLLM then skips its free-memory profile, which other processes would upset;
    it still checks that the utilization's share is free, so ask for little)."""
    if kv_cache_gib is None:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    return {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30)), "gpu_memory_utilization": 0.08}


class EngineJobError(RuntimeError):
    """The child process failed or timed out; the message carries its log tail."""


def run_job(job: str, spec: dict[str, Any], *, log_path: str | None = None, echo: bool = False,
            timeout: float = 1500, header: str | None = None) -> dict[str, Any]:
    """Run ``job`` ("module:function", called with ``spec``) in a fresh Python process.

    Returns the function's dict plus the engine figures parsed from the child's log.
    ``log_path`` (appended to) keeps the full log; ``echo`` (or ``VLLM_DUO_ENGINE_ECHO=1``, for
    GPU test runs that need to show where an engine spends its time) also copies it to stderr live.
    """
    echo = echo or os.environ.get("VLLM_DUO_ENGINE_ECHO") == "1"
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.json"), os.path.join(d, "out.json")
        log_path = os.path.abspath(log_path or os.path.join(d, "engine.log"))
        with open(src, "w") as f:
            json.dump(spec, f)
        with open(log_path, "ab") as log:
            start = log.tell()
            if header:
                log.write(f"==== {header} ====\n".encode())
                log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
            proc = subprocess.Popen([sys.executable, "-m", "vllm_duo.eval.engine_proc", job, src, dst],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # own group: the engine core dies with it
            pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo), daemon=True)
            pump.start()
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # also reaps an engine core the child left behind, and stops on Ctrl-C
                _kill_group(proc)
            pump.join(timeout=30)
            proc.stdout.close()
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        if not os.path.exists(dst):  # written last, atomically: a job that got there succeeded
            why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
            raise EngineJobError(f"engine job {job} {why}; full log: {log_path}\n--- log tail ---\n"
                                 f"{text[-4000:]}")
        with open(dst) as f:
            result = json.load(f)
    result.update(parse_engine_log(text))
    return result


def _pump(stream, log, echo: bool) -> None:
    """Copy the child's output to the log (and stderr) as it comes, progress bars included."""
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        log.write(chunk)
        log.flush()
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()


def _kill_group(proc: subprocess.Popen, wait: float = 30.0) -> None:
    """SIGKILL the child's process group, then wait until it is gone (its GPU memory freed),
    so the next engine's memory profiling does not see it."""
    deadline = time.monotonic() + wait
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # reap the leader, or its zombie keeps the group alive
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has exited
    proc.wait()


_LOG_FIGURES = {  # memory figures vLLM only logs (capacity: kv_capacity)
    "kv_cache_gib": (r"Available KV cache memory: ([\d.]+) GiB", float),
    "model_load_gib": (r"Model loading took ([\d.]+) GiB", float),
}


def parse_engine_log(log: str) -> dict[str, float]:
    """vLLM's logged memory figures (the last of each in ``log``); absent ones are left out."""
    out: dict[str, float] = {}
    for key, (pattern, cast) in _LOG_FIGURES.items():
        if found := re.findall(pattern, log):
            out[key] = cast(found[-1].replace(",", ""))
    return out


def kv_capacity(llm: Any) -> dict[str, Any]:
    """Inside a job: the engine's KV-cache capacity through vLLM's API.

    vLLM's engine core sizes the pool and sends its block count, token capacity and maximum
    concurrency (``get_kv_cache_capacity``) back to the front process's ``cache_config``.
    """
    vc = llm.llm_engine.vllm_config
    cache = vc.cache_config
    return {"num_gpu_blocks": cache.num_gpu_blocks, "kv_cache_tokens": cache.kv_cache_size_tokens,
            "max_concurrency": cache.kv_cache_max_concurrency,
            "concurrency_request_tokens": vc.model_config.max_model_len}


def gpu_memory_used_gib() -> float | None:
    """Device-wide used memory via NVML (no CUDA context in this process); None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(first) if first.isdigit() else 0
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return round(info.used / 2**30, 2)
    finally:
        pynvml.nvmlShutdown()


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: greedy generation from token-id prompts.

    spec: model, prompts (token-id lists), max_tokens, engine (``LLM`` kwargs), and optional
    ignore_eos (default False), logprobs, use_tqdm (default False), warmup_prompts (generated
    first, e.g. to fill the prefix cache; the result then reports prefix-cache queries and hits).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                            ignore_eos=spec.get("ignore_eos", False), detokenize=False,
                            logprobs=spec.get("logprobs"))
    if spec.get("warmup_prompts"):
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["warmup_prompts"]], params,
                     use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
                        use_tqdm=spec.get("use_tqdm", False))
    result: dict[str, Any] = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "generate_seconds": round(time.perf_counter() - t0, 3),
        **kv_capacity(llm),
    }
    if spec.get("warmup_prompts"):
        # Per request, from the scheduler. Not vLLM's Prometheus prefix-cache counters: on the
        # H100 they held only the warm-up's queries, none of this batch's (cause not found).
        cached = [o.num_cached_tokens or 0 for o in outs]
        result["prefix_cache"] = {"queries": sum(len(p) for p in spec["prompts"]), "hits": sum(cached),
                                  "per_request": cached}
    if spec.get("logprobs"):
        result["logprobs"] = [[{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]
                              for o in outs]
    return result


def _main(job: str, src: str, dst: str) -> None:
    module, _, func = job.partition(":")
    fn = getattr(importlib.import_module(module), func)
    with open(src) as f:
        spec = json.load(f)
    result = fn(spec)
    with open(dst + ".part", "w") as f:
        json.dump(result, f)
    os.replace(dst + ".part", dst)


if __name__ == "__main__":
    _main(*sys.argv[1:4])

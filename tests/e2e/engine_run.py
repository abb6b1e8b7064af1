"""Run one vLLM engine in a fresh process and return greedy tokens (and its KV capacity).

Each backend gets its own process so GPU memory and compile caches never leak between runs.
Usage: python -m tests.e2e.engine_run IN.json OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def write_model(path: str, config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def run_engine(spec: dict[str, Any], timeout: int = 1500) -> dict[str, Any]:
    """spec: model, prompts (token-id lists), max_tokens, engine (LLM kwargs)."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.json"), os.path.join(d, "out.json")
        with open(src, "w") as f:
            json.dump(spec, f)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = subprocess.run([sys.executable, "-m", "tests.e2e.engine_run", src, dst], cwd=root,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        with open(dst) as f:
            result = json.load(f)
        result.update(_capacity_from_log(proc.stdout + proc.stderr))
        return result


def _capacity_from_log(log: str) -> dict[str, float]:
    """vLLM's own startup figures: KV-cache tokens and max concurrency."""
    import re

    out: dict[str, float] = {}
    if m := re.findall(r"GPU KV cache size: ([\d,]+) tokens", log):
        out["kv_cache_tokens"] = int(m[-1].replace(",", ""))
    if m := re.findall(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", log):
        out["max_concurrency"] = float(m[-1][1])
        out["concurrency_request_tokens"] = int(m[-1][0].replace(",", ""))
    return out


def _main(src: str, dst: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(src) as f:
        spec = json.load(f)
    engine = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, enforce_eager=False)
    engine.update(spec.get("engine", {}))
    llm = LLM(model=spec["model"], **engine)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            detokenize=False, logprobs=spec.get("logprobs"))
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
                        use_tqdm=False)
    core = llm.llm_engine
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }
    if spec.get("logprobs"):
        result["logprobs"] = [[{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]
                              for o in outs]
    del core
    with open(dst, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])

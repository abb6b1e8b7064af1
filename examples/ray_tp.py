"""Offline duo generation over Ray: tensor parallel 2 (or pipeline parallel) on one host.

    python examples/ray_tp.py [--model HF_FOLDER] [--pattern PATTERN_FOLDER] [--sparsity 0.5] [--tp 2] [--pp 1]
                              [--no-ar-fusion]

Without ``--model`` it writes a Llama-3-8B-shaped config.json and uses dummy weights (token-id
prompts, no tokenizer). The pattern defaults to the built-in Llama-3-8B-Instruct-Gradient-1048k. The front process
resolves the pattern into a mask inside the config, so Ray workers never read the file.
``--no-ar-fusion`` turns off vLLM's fused all-reduce + RMSNorm compile pass (on by default at
TP > 1 on Hopper), without which no backend starts on GPU pairs without NVLink multicast (seen on
an H200 pair). Run ``python -m ray.scripts.scripts stop --force`` (``ray stop --force``) before starting
another engine on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from vllm_duo.cli.needs import preflight
from vllm_duo.eval.engine_proc import LLAMA3_8B

DEFAULT_PATTERN = "Llama-3-8B-Instruct-Gradient-1048k"  # built-in


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: dummy Llama-3-8B shape)")
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="built-in pattern name, folder or TSV "
                    f"(default {DEFAULT_PATTERN})")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--tp", type=int, default=2, help="tensor_parallel_size")
    ap.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-ar-fusion", action="store_true",
                    help="turn off vLLM's fused all-reduce + RMSNorm pass (GPUs without NVLink multicast)")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    preflight("ray_tp.py", model_dir=args.model, gpus=args.tp * args.pp)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dummy = args.model is None
    model = args.model or tempfile.mkdtemp()
    if dummy:
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
    no_fusion = {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}} if args.no_ar_fusion else {}
    llm = LLM(model, attention_backend="duo",
              additional_config={"duo_attention": {"pattern": args.pattern,
                                                   "sparsity": args.sparsity}},
              tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
              distributed_executor_backend="ray", max_model_len=16384, seed=0,
              **no_fusion,
              **(dict(load_format="dummy", skip_tokenizer_init=True) if dummy else {}))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=dummy, detokenize=not dummy)
    rng = np.random.RandomState(0)
    lengths = (50, 500, 4000, 12000)
    prompts = ([TokensPrompt(prompt_token_ids=rng.randint(1000, 100000, n).tolist()) for n in lengths] if dummy
               else ["The capital of France is", "Write a haiku about the sea."])
    for o in llm.generate(prompts, params):
        print(len(o.prompt_token_ids), list(o.outputs[0].token_ids) if dummy else repr(o.outputs[0].text))


if __name__ == "__main__":
    main()

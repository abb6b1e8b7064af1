"""Offline generation with the duo backend on a small dummy-weight Llama, next to FLASH_ATTN.

    python examples/offline_dummy.py [--pattern full|streaming|mixed] [--eager]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from vllm_duo.cli.needs import preflight

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
    "intermediate_size": 1024, "num_attention_heads": 8, "num_hidden_layers": 4,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pattern", default="mixed", choices=["full", "streaming", "mixed"])
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    args = ap.parse_args()
    preflight("offline_dummy.py")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = tempfile.mkdtemp()
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(TINY_LLAMA, f)
    duo = {"pattern": args.pattern} if args.pattern != "mixed" else {
        "retrieval_mask": np.random.RandomState(0).randint(0, 2, (4, 4)).tolist()}
    duo.update(sink_size=16, recent_size=64)
    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, attention_backend="duo",
              additional_config={"duo_attention": duo}, enforce_eager=args.eager,
              max_model_len=4096, gpu_memory_utilization=0.3)
    rng = np.random.RandomState(1)
    prompts = [TokensPrompt(prompt_token_ids=rng.randint(100, 30000, n).tolist()) for n in (10, 100, 700, 2000)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, detokenize=False))
    for o in outs:
        print(len(o.prompt_token_ids), list(o.outputs[0].token_ids))


if __name__ == "__main__":
    main()

"""The NIAH prompt itself, checked with full attention in HF transformers (no vLLM, CPU is fine).

A grid where full attention fails says nothing about duo: this script scores ``vllm-duo niah``'s
exact prompts (same builder, pass keys and scoring) with the plain HF model, greedy, float32.

    python benchmarks/niah_hf.py --model /tmp/models/smollm2-135m-instruct [--chat-template on]

Writes benchmarks/results/niah_hf_<plain|chat>_<date>.json (no summary figure: it is a check of
the task, not of duo). On 2 CPU cores a 7K-token prompt takes about 23 s.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.summary import save_result  # noqa: E402
from vllm_duo.cli.niah_cmd import DEFAULT_MODEL, build_prompts  # noqa: E402
from vllm_duo.eval.niah import HFCodec, PromptBuilder, cell_record, grid_summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder (weights + tokenizer)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 7000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--chat-template", choices=["on", "off"], default="off")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="pass-key seed")
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"niah_hf: no model folder at {args.model}; pass --model PATH")

    from transformers import AutoModelForCausalLM

    codec = HFCodec(args.model)
    chat = codec.chat_wrap() if args.chat_template == "on" else None
    builder = PromptBuilder(codec, chat=chat, prefix=[] if chat else codec.special_prefix())
    prompts = build_prompts(builder, args.lengths, args.depths, args.samples, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    cells = []
    for sample, prompt in tqdm(prompts, desc="niah_hf prompts", unit="prompt"):
        ids = torch.tensor([prompt.ids], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 do_sample=False)
        cells.append(cell_record(prompt, sample, codec.decode(out[0, len(prompt.ids):].tolist())))
    summary = grid_summary(cells, args.lengths, args.depths)
    payload = dict(model=args.model, attention="full (HF transformers, float32, sdpa)",
                   chat_template=args.chat_template, lengths=args.lengths, depths=args.depths,
                   samples=args.samples, max_tokens=args.max_tokens, seed=args.seed,
                   grid_layout="grid[depth index][length index] = fraction correct", **summary, cells=cells)
    name = f"niah_hf_{'chat' if chat else 'plain'}"
    fname = save_result(name, payload, {})
    print(f"niah_hf: full attention {summary['correct']}/{summary['total']} "
          f"({summary['accuracy']:.1%}); wrote benchmarks/results/{fname}")


if __name__ == "__main__":
    main()

"""``vllm-duo niah``'s grid in HF transformers (no vLLM; CPU is fine): the task and a pattern,
checked apart from the engine.

A grid where full attention fails says nothing about duo, so this scores the exact prompts of
``vllm-duo niah`` (same builder, pass keys and scoring) with the plain HF model (``full``), and
with DuoAttention's semantics applied in HF (``duo`` at each --sparsity, ``streaming``; see
vllm_duo/eval/hf_duo.py), greedy, float32. The engine's grid should come out close to this one.

    python benchmarks/niah_hf.py --model /tmp/models/smollm2-135m-instruct [--chat-template on] \
        [--methods full duo streaming --pattern smollm2-135m-instruct]

Writes benchmarks/results/niah_hf_<plain|chat>[_<methods>]_<date>.json (no summary figure: engine
figures go there). On 2 CPU cores a 7K-token prompt takes about 23 s with full attention.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from vllm_duo.errors import DuoConfigError  # noqa: E402
from vllm_duo.eval.hf_duo import DuoSemantics  # noqa: E402
from vllm_duo.eval.methods import expand_methods, model_shape  # noqa: E402
from vllm_duo.eval.niah import DEFAULT_MODEL, HFCodec, cell_record, grid_prompts, grid_summary  # noqa: E402
from vllm_duo.eval.results import save_result  # noqa: E402
from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK, parse_options, resolve_options  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder (weights + tokenizer)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 7000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--chat-template", choices=["on", "off"], default="off")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="pass-key seed")
    ap.add_argument("--methods", nargs="+", default=["full"], choices=["full", "duo", "streaming"])
    ap.add_argument("--pattern", default=None, help="duo head pattern for this model (built-in name, folder or TSV)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--sink", type=int, default=DEFAULT_SINK)
    ap.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"niah_hf: no model folder at {args.model}; pass --model PATH")
    layers, kv_heads, _ = model_shape(args.model)
    try:  # each method's engine options -> its retrieval mask, as the engine resolves them (None: FLASH_ATTN)
        methods = expand_methods(args.methods, pattern=args.pattern, sparsities=args.sparsity, sink=args.sink,
                                 recent=args.recent)
        masks = {m.name: resolve_options(parse_options(m.duo), layers, kv_heads, args.model).mask() if m.duo
                 else None for m in methods}
    except DuoConfigError as e:
        sys.exit(f"niah_hf: {e}")

    from transformers import AutoModelForCausalLM

    codec = HFCodec(args.model)
    prompts = grid_prompts(codec, args.chat_template == "on", args.lengths, args.depths, args.samples, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for method in methods:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                     attn_implementation="sdpa").to(device).eval()
        if masks[method.name] is not None:
            DuoSemantics(masks[method.name], args.sink, args.recent).install(model)
        cells = []
        for sample, prompt in tqdm(prompts, desc=f"niah_hf {method.name}", unit="prompt"):
            ids = torch.tensor([prompt.ids], device=device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                     do_sample=False)
            cells.append(cell_record(prompt, sample, codec.decode(out[0, len(prompt.ids):].tolist())))
        summary = grid_summary(cells, args.lengths, args.depths)
        results[method.name] = dict(summary, duo=method.duo, cells=cells)
        print(f"niah_hf: {method.name} {summary['correct']}/{summary['total']} ({summary['accuracy']:.1%})",
              flush=True)
    payload = dict(model=args.model, attention="HF transformers, float32 (duo: vllm_duo/eval/hf_duo.py)",
                   chat_template=args.chat_template, lengths=args.lengths, depths=args.depths,
                   samples=args.samples, max_tokens=args.max_tokens, seed=args.seed, sink=args.sink,
                   recent=args.recent, pattern=args.pattern,
                   grid_layout="grid[depth index][length index] = fraction correct",
                   accuracy={k: v["accuracy"] for k, v in results.items()}, methods=results)
    name = f"niah_hf_{'chat' if args.chat_template == 'on' else 'plain'}"
    if args.methods != ["full"]:
        name += "_" + "_".join(args.methods)
    fname = save_result(name, payload, {})
    print(f"niah_hf: wrote benchmarks/results/{fname}")


if __name__ == "__main__":
    main()

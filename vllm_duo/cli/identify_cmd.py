"""``vllm-duo identify MODEL --out DIR``: train DuoAttention gates and write a head pattern.

One gate per KV head is trained with the model frozen (reference settings by default), then
written as ``DIR/full_attention_heads.tsv`` + ``config.json`` (the shipped patterns' format),
with ``identify_log.json`` (loss curve, gate statistics) and ``gates_heatmap.png``.
"""

from __future__ import annotations

import argparse
import time

from vllm_duo.options import DEFAULT_SPARSITY
from vllm_duo.patterns import binarize, load_gates


def add_parser(sub) -> None:
    p = sub.add_parser("identify", help="train retrieval/streaming gates for a HF model",
                       description=__doc__)
    p.add_argument("model", help="local Hugging Face model folder (config, weights, tokenizer)")
    p.add_argument("--out", required=True, help="output pattern folder (also holds the checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much time, saving a checkpoint (then rerun with --resume)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 (auto: bf16 on GPU)")
    g = p.add_argument_group("training (reference defaults)")
    g.add_argument("--steps", type=int, default=2000, help="optimisation steps (2000)")
    g.add_argument("--lr", type=float, default=0.02, help="AdamW peak learning rate (0.02)")
    g.add_argument("--reg-weight", type=float, default=0.05, help="weight of mean |gate| (0.05)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 5")
    g.add_argument("--decay-steps", type=int, default=None, help="default: steps // 5")
    g.add_argument("--batch", type=int, default=1, help="samples per step, all of one length (1)")
    g.add_argument("--sink", type=int, default=128, help="sink tokens of streaming heads in training (128)")
    g.add_argument("--recent", type=int, default=256, help="recent window of streaming heads in training (256)")
    g.add_argument("--dense-prompt", action="store_true",
                   help="window streaming heads on the answer's queries only, the prompt attending "
                        "densely: trains for engines whose prefill window covers the prompt "
                        "(prefill_recent_size, default 8192); the reference windows every query")
    g.add_argument("--seed", type=int, default=42, help="data seed (42)")
    g.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (50)")
    d = p.add_argument_group("data (synthetic multi-passkey retrieval)")
    d.add_argument("--min-length", type=int, default=None,
                   help="shortest sample in tokens (default: passkey overhead + 1000 filler tokens)")
    d.add_argument("--max-length", type=int, default=None,
                   help="longest sample in tokens (default: min(32000, model's max positions))")
    d.add_argument("--num-lengths", type=int, default=50, help="lengths spread over the range (50)")
    d.add_argument("--num-passkeys", type=int, default=10, help="passkeys per sample (10)")
    d.add_argument("--passkey-length", type=int, default=32, help="units (words, groups) per passkey (32)")
    d.add_argument("--passkey-kinds", default="words",
                   help="passkey alphabets, comma-separated, one drawn per sample: words (NATO words, the "
                        "reference), digits (3-digit groups), hex (4-digit hex groups) (words)")
    d.add_argument("--fillers", default="story",
                   help="haystacks, comma-separated, one drawn per sample: story (prose, the reference), "
                        "code (Python-like text) (story)")
    m = p.add_argument_group("memory")
    m.add_argument("--no-grad-ckpt", action="store_true",
                   help="keep all activations (faster for small models; more memory)")
    m.add_argument("--query-chunk", type=int, default=512, help="query chunk of streaming attention (512)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_duo.identify.train import IdentifySettings, check_out_dir, identify, load_model

    t0 = time.monotonic()
    settings = IdentifySettings(
        steps=args.steps, lr=args.lr, reg_weight=args.reg_weight, warmup_steps=args.warmup_steps,
        decay_steps=args.decay_steps, min_length=args.min_length, max_length=args.max_length,
        num_lengths=args.num_lengths, num_passkeys=args.num_passkeys, passkey_length=args.passkey_length,
        passkey_kinds=args.passkey_kinds, fillers=args.fillers,
        sink_size=args.sink, recent_size=args.recent, dense_prompt=args.dense_prompt,
        batch_size=args.batch, seed=args.seed,
        save_steps=args.save_steps, grad_ckpt=not args.no_grad_ckpt, query_chunk=args.query_chunk,
        dtype=args.dtype)
    settings.validate()
    check_out_dir(args.out, args.resume)
    model, tokenizer, dtype = load_model(args.model, args.dtype, args.device)
    print(f"identify: {args.model} on {next(model.parameters()).device} ({dtype}), "
          f"loaded in {time.monotonic() - t0:.1f} s")
    res = identify(model, tokenizer, settings, args.out, model_name=args.model, resume=args.resume,
                   max_minutes=args.max_minutes)
    gp = load_gates(args.out)  # the folder must load like a shipped pattern
    mask = binarize(gp.gates, sparsity=DEFAULT_SPARSITY)
    state = "done" if res.finished else "stopped early (rerun with --resume to continue)"
    print(f"identify: {state}: {res.steps_done}/{settings.steps} steps in {res.elapsed_s:.1f} s "
          f"({res.elapsed_s / max(1, res.steps_this_run):.2f} s/step in this run; "
          f"total {time.monotonic() - t0:.1f} s)")
    if res.log["loss"]:
        print(f"identify: loss {res.log['loss'][0]:.4f} -> {res.log['loss'][-1]:.4f}; gate mean "
              f"{gp.gates.mean():.3f}, {(gp.gates > 0.5).mean():.1%} above 0.5; at sparsity "
              f"{DEFAULT_SPARSITY}: {int(mask.sum())}/{mask.size} retrieval heads")
    print(f"identify: pattern {gp.source} (shape {gp.shape}, trained sink {gp.sink_size} / recent "
          f"{gp.recent_size}); log, heatmap and checkpoint in {args.out}")
    return 0

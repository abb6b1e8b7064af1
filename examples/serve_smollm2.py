"""Serve SmolLM2-135M-Instruct with the duo backend (OpenAI-compatible HTTP server).

    python examples/serve_smollm2.py [--model DIR] [--pattern NAME|PATH|full|streaming] [--sparsity 0.5] [--port 8000]
                                     [--retrieval-mask MASK.json] [--print-only] [-- more vllm serve args]

Pattern: ``--pattern``, else the built-in ``smollm2-135m-instruct`` (identified with ``vllm-duo
identify``). ``--retrieval-mask`` takes a JSON file holding [[0 or 1] * 3 KV heads] * 30 layers (1 = retrieval).

This is ``vllm serve MODEL --attention-backend duo --additional-config '{"duo_attention": {...}}'``
(run as ``python -m vllm.entrypoints.cli.main serve`` where there is no ``vllm`` script). Then:

    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "smollm2",
      "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"model": "smollm2",
      "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 32, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from vllm_duo.cli.needs import preflight

DEFAULT_PATTERN = "smollm2-135m-instruct"  # built-in


def duo_config(args: argparse.Namespace) -> dict:
    duo: dict = {"sink_size": args.sink_size, "recent_size": args.recent_size}
    if args.retrieval_mask:
        with open(args.retrieval_mask) as f:
            duo["retrieval_mask"] = json.load(f)
    else:
        duo.update(pattern=args.pattern or DEFAULT_PATTERN, sparsity=args.sparsity)
    return duo


def command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model,
            "--host", args.host, "--port", str(args.port), "--served-model-name", "smollm2",
            "--attention-backend", "duo", "--additional-config",
            json.dumps({"duo_attention": duo_config(args)})] + extra


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and what follows ``--`` (passed to vllm serve unchanged)."""
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/models/smollm2-135m-instruct")
    ap.add_argument("--pattern", help=f"built-in name, pattern folder or TSV, 'full' or 'streaming' "
                                      f"(default: built-in {DEFAULT_PATTERN})")
    ap.add_argument("--retrieval-mask", help="JSON file with a [layers][kv_heads] 0/1 mask")
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming heads")
    ap.add_argument("--sink-size", type=int, default=64)
    ap.add_argument("--recent-size", type=int, default=256)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--print-only", action="store_true", help="print the command, do not start")
    args = ap.parse_args(own)
    if args.pattern and args.retrieval_mask:
        ap.error("give --pattern or --retrieval-mask, not both")
    return args, extra


def main() -> None:
    args, extra = parse_args(sys.argv[1:])
    if not args.print_only:
        preflight("serve_smollm2.py", model_dir=args.model)
    cmd = command(args, extra)
    print(shlex.join(cmd), flush=True)
    if args.print_only:
        return
    print(f"when it logs 'Application startup complete', try:\n  curl -s {args.host}:{args.port}"
          f"/v1/completions -H 'Content-Type: application/json' -d '{{\"model\": \"smollm2\", "
          f"\"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}}'",
          flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()

"""The identification loop: train one gate per KV head with the model frozen (reference §2a).

loss = MSE(final hidden states of the full model, of the gated model) on the answer tokens
       + reg_weight * mean|gate|;
AdamW (no weight decay) with linear warm-up from 0.1x lr and linear decay back to 0.1x lr, each
over ``steps // 5`` steps by default (400 of 2000, as the reference). Gates are clamped to [0, 1]
after every step. A checkpoint (gates, optimizer, step, log) is written every ``save_steps``
steps; the data of step s is a pure function of (seed, s), so ``resume`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vllm_duo.errors import DuoConfigError
from vllm_duo.identify import export
from vllm_duo.identify.data import FILLERS, PASSKEY_UNITS, PasskeyData, Tokenizer, parse_kinds
from vllm_duo.identify.gating import DEFAULT_QUERY_CHUNK, HeadGates, gate_stats

CHECKPOINT_FILE = "identify_checkpoint.pt"
DEFAULT_MAX_LENGTH = 32000  # reference's cap
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Settings that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = ("save_steps", "grad_ckpt", "query_chunk")


@dataclass
class IdentifySettings:
    """Identification settings; defaults are the reference's (sink/recent 128/256 for training)."""

    steps: int = 2000
    lr: float = 0.02
    reg_weight: float = 0.05
    warmup_steps: int | None = None  # default steps // 5
    decay_steps: int | None = None  # default steps // 5
    min_length: int | None = None  # total tokens; default: passkey overhead + 1000 filler tokens
    max_length: int | None = None  # default min(32000, model's max_position_embeddings)
    num_lengths: int = 50
    num_passkeys: int = 10
    passkey_length: int = 32
    passkey_kinds: str = "words"  # comma-separated, of data.PASSKEY_UNITS (the reference: words)
    fillers: str = "story"  # comma-separated, of data.FILLERS (the reference: prose)
    depth_intervals: int = 1000
    min_depth: float = 0.05
    max_depth: float = 0.95
    sink_size: int = 128
    recent_size: int = 256
    dense_prompt: bool = False  # streaming windows on the answer's queries only (decode-only windows)
    batch_size: int = 1
    seed: int = 42
    save_steps: int = 50
    grad_ckpt: bool = True
    query_chunk: int = DEFAULT_QUERY_CHUNK
    dtype: str = "auto"  # recorded: replaced by the dtype the model runs in

    def validate(self) -> None:
        positive = ("steps", "batch_size", "save_steps", "query_chunk", "recent_size", "num_lengths")
        bad = [f"--{k.replace('_', '-')}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        bad += [f"--{k.replace('_', '-')}={getattr(self, k)}" for k in ("sink_size", "reg_weight")
                if getattr(self, k) < 0]
        if self.lr <= 0:
            bad.append(f"--lr={self.lr}")
        if bad:
            raise DuoConfigError(f"invalid identification settings: {', '.join(bad)}; lr, steps, batch, "
                                 f"recent and save steps must be positive, sink and reg >= 0")
        parse_kinds(self.passkey_kinds, tuple(PASSKEY_UNITS), "--passkey-kinds")
        parse_kinds(self.fillers, FILLERS, "--fillers")


@dataclass
class IdentifyResult:
    gates: np.ndarray  # [layers, kv_heads], in [0, 1]
    steps_done: int
    steps_this_run: int
    finished: bool
    elapsed_s: float  # this run
    out_dir: str
    log: dict[str, Any]


def load_model(path: str, dtype: str = "auto", device: str = "auto") -> tuple[nn.Module, Tokenizer, str]:
    """The base model (no LM head: the loss is on final hidden states) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=_DTYPES[dtype], attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise DuoConfigError(f"cannot load {path!r} as a Hugging Face model with a tokenizer ({e}); "
                             f"pass a local model folder (config.json, weights, tokenizer)") from None
    return model.to(dev), tokenizer, dtype


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in _DTYPES:
        raise DuoConfigError(f"--dtype {dtype!r} unknown; use one of auto, {', '.join(_DTYPES)}")
    return dtype


def model_shape(model: nn.Module) -> tuple[int, int, int | None]:
    """(layers, KV heads, max positions) from the model's (text) config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, kv, getattr(cfg, "max_position_embeddings", None)


def lr_factor(step: int, s: IdentifySettings) -> float:
    """Reference schedule: min(1, max((s+1)/warmup, 0.1), max((steps-s)/decay, 0.1))."""
    return min(1.0, max((step + 1) / s.warmup_steps, 0.1), max((s.steps - step) / s.decay_steps, 0.1))


def identify(model: nn.Module, tokenizer: Tokenizer, settings: IdentifySettings, out_dir: str, *,
             model_name: str, resume: bool = False, max_minutes: float | None = None,
             progress: bool = True) -> IdentifyResult:
    """Train the gates on ``model`` (frozen) and write the pattern folder ``out_dir``."""
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    settings = dataclasses.replace(settings)
    settings.validate()
    check_out_dir(out_dir, resume)
    base = model.base_model  # a *ForCausalLM's inner model; the model itself otherwise
    device = next(base.parameters()).device
    layers, kv_heads, max_pos = model_shape(base)
    settings.dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    if settings.max_length is None:
        settings.max_length = min(DEFAULT_MAX_LENGTH, max_pos or DEFAULT_MAX_LENGTH)
    if max_pos is not None and settings.max_length > max_pos:
        raise DuoConfigError(f"--max-length {settings.max_length} exceeds the model's "
                             f"max_position_embeddings ({max_pos}); lower it to <= {max_pos}")
    settings.warmup_steps = max(1, settings.warmup_steps or settings.steps // 5)
    settings.decay_steps = max(1, settings.decay_steps or settings.steps // 5)
    data = PasskeyData(tokenizer, min_length=settings.min_length, max_length=settings.max_length,
                       num_lengths=settings.num_lengths, num_passkeys=settings.num_passkeys,
                       passkey_length=settings.passkey_length, depth_intervals=settings.depth_intervals,
                       min_depth=settings.min_depth, max_depth=settings.max_depth, seed=settings.seed,
                       passkey_kinds=parse_kinds(settings.passkey_kinds, tuple(PASSKEY_UNITS), "--passkey-kinds"),
                       fillers=parse_kinds(settings.fillers, FILLERS, "--fillers"))
    settings.min_length = int(data.lengths[0])
    if progress:
        print(f"identify: {layers} layers x {kv_heads} KV heads; samples of {settings.min_length}.."
              f"{settings.max_length} tokens ({settings.num_lengths} lengths), {settings.num_passkeys} "
              f"passkeys of {settings.passkey_length} units ({settings.passkey_kinds}) in "
              f"{settings.fillers} filler; sink {settings.sink_size}, recent "
              f"{settings.recent_size}{' on answer queries only' if settings.dense_prompt else ''}; "
              f"{settings.steps} steps, batch {settings.batch_size}")

    gates = HeadGates(layers, kv_heads, settings.sink_size, settings.recent_size, settings.query_chunk,
                      dense_prompt=settings.dense_prompt).to(device)
    _prepare(base, gates, settings.grad_ckpt)
    opt = torch.optim.AdamW(gates.parameters(), lr=settings.lr, weight_decay=0.0)
    log: dict[str, Any] = {k: [] for k in ("step", "length", "loss", "distill", "reg", "lr",
                                           "gate_mean", "gate_frac_above_half")}
    start, elapsed_before = _load_checkpoint(out_dir, resume, settings, gates, opt, log)

    os.makedirs(out_dir, exist_ok=True)
    deadline = t0 + 60 * max_minutes if max_minutes else None
    steps_done = start
    bar = tqdm(total=settings.steps, initial=start, desc="identify", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, settings.steps):
            if deadline is not None and time.monotonic() > deadline:
                break
            batch = data.batch(step, settings.batch_size)
            lr = settings.lr * lr_factor(step, settings)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, distill, reg = _step(base, gates, opt, batch.input_ids.to(device),
                                       batch.answer_mask.to(device), settings.reg_weight)
            steps_done = step + 1
            stats = gate_stats(gates.gates)
            for k, v in (("step", steps_done), ("length", batch.input_ids.shape[1]), ("loss", loss),
                         ("distill", distill), ("reg", reg), ("lr", lr), ("gate_mean", stats["mean"]),
                         ("gate_frac_above_half", stats["frac_above_half"])):
                log[k].append(v)
            bar.update(1)
            bar.set_postfix(len=batch.input_ids.shape[1], loss=f"{loss:.4f}", distill=f"{distill:.4f}",
                            gate_mean=f"{stats['mean']:.3f}", above_half=f"{stats['frac_above_half']:.2f}")
            if steps_done % settings.save_steps == 0 and steps_done < settings.steps:
                _save(out_dir, model_name, settings, gates, opt, log, steps_done,
                      elapsed_before + time.monotonic() - t0)
    finally:
        bar.close()
    elapsed = time.monotonic() - t0
    _save(out_dir, model_name, settings, gates, opt, log, steps_done, elapsed_before + elapsed)
    g = gates.gates.detach().float().clamp(0, 1).cpu().numpy()
    export.write_heatmap(out_dir, g, title=f"{os.path.basename(os.path.normpath(model_name))}: "
                                           f"{steps_done}/{settings.steps} steps")
    return IdentifyResult(g, steps_done, steps_done - start, steps_done >= settings.steps, elapsed,
                          out_dir, log)


def _prepare(base: nn.Module, gates: HeadGates, grad_ckpt: bool) -> None:
    """Freeze the model, plug the gated attention in, and set up activation checkpointing."""
    base.requires_grad_(False)
    gates.install(base)
    for m in base.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # train() below is for checkpointing only (transformers checks .training)
    if grad_ckpt:
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.train()
    else:
        base.eval()


def _step(base: nn.Module, gates: HeadGates, opt: torch.optim.Optimizer, input_ids: torch.Tensor,
          answer: torch.Tensor, reg_weight: float) -> tuple[float, float, float]:
    """One optimisation step: teacher pass (no grad), gated pass, loss, AdamW, clamp."""
    gates.gate_queries(answer)
    with torch.no_grad(), gates.teacher_pass():
        target = base(input_ids=input_ids, use_cache=False).last_hidden_state[answer].float()
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state[answer].float()
    distill = (hidden - target).pow(2).mean(dim=-1).mean()  # = sum over answer tokens / count
    reg = gates.gates.abs().mean()
    loss = distill + reg_weight * reg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    gates.clamp_()
    values = torch.stack([loss.detach(), distill.detach(), reg.detach()]).tolist()
    return values[0], values[1], values[2]


def check_out_dir(out_dir: str, resume: bool) -> None:
    """Refuse to overwrite a run in progress (called before the model is loaded, too)."""
    if not resume and os.path.isfile(os.path.join(out_dir, CHECKPOINT_FILE)):
        raise DuoConfigError(f"{out_dir} already holds an identification checkpoint; pass --resume to "
                             f"continue it, or choose another --out")


def _compare(saved: dict[str, Any], now: IdentifySettings) -> list[str]:
    current, defaults = dataclasses.asdict(now), dataclasses.asdict(IdentifySettings())
    # A setting newer than the checkpoint had its default then.
    return [f"{k}: checkpoint {saved.get(k, defaults[k])!r}, now {v!r}" for k, v in current.items()
            if k not in _RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]


def _load_checkpoint(out_dir: str, resume: bool, settings: IdentifySettings, gates: HeadGates,
                     opt: torch.optim.Optimizer, log: dict[str, list]) -> tuple[int, float]:
    """(first step, elapsed seconds so far); refuses to overwrite or mix incompatible runs."""
    path = os.path.join(out_dir, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        if resume:
            print(f"identify: no checkpoint in {out_dir}, starting from step 0")
        return 0, 0.0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    diffs = _compare(ckpt["settings"], settings)
    if tuple(ckpt["gates"].shape) != tuple(gates.gates.shape):
        diffs.append(f"gates shape: checkpoint {tuple(ckpt['gates'].shape)}, model {tuple(gates.gates.shape)}")
    if diffs:
        raise DuoConfigError(f"cannot resume {path}: settings differ ({'; '.join(diffs)}); rerun with the "
                             f"checkpoint's settings or choose another --out")
    with torch.no_grad():
        gates.gates.copy_(ckpt["gates"])
    opt.load_state_dict(ckpt["optimizer"])
    for k in log:
        log[k].extend(ckpt["log"].get(k, []))
    print(f"identify: resuming {path} at step {ckpt['step']}/{settings.steps}")
    return int(ckpt["step"]), float(ckpt["elapsed_s"])


def _save(out_dir: str, model_name: str, settings: IdentifySettings, gates: HeadGates,
          opt: torch.optim.Optimizer, log: dict[str, list], steps_done: int, elapsed_s: float) -> None:
    """Checkpoint plus the current pattern folder, so an interrupted run still leaves a pattern."""
    g = gates.gates.detach().float().cpu()
    ckpt = {"gates": g, "optimizer": opt.state_dict(), "step": steps_done, "elapsed_s": elapsed_s,
            "settings": dataclasses.asdict(settings), "log": log}
    tmp = os.path.join(out_dir, CHECKPOINT_FILE + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, os.path.join(out_dir, CHECKPOINT_FILE))
    gn = g.clamp(0, 1).numpy()
    export.write_pattern(out_dir, gn, export.reference_config(
        dataclasses.asdict(settings), model=model_name, out_dir=out_dir, steps_done=steps_done))
    export.write_json(os.path.join(out_dir, export.LOG_FILE), {
        "model": model_name, "steps_done": steps_done, "steps": settings.steps, "elapsed_s": round(elapsed_s, 2),
        "device": torch.cuda.get_device_name() if gates.gates.is_cuda else "cpu",
        "settings": dataclasses.asdict(settings), "final_gates": gate_stats(g),
        "layer_mean_gate": [round(float(x), 4) for x in gn.mean(axis=1)], **log})

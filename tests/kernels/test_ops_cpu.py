"""CPU-only checks of ``vllm_duo.ops``: import without the build, the missing-build error, input
validation (fp8 scales too), partition planning, and the fake impls (shapes under FakeTensorMode)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vllm_duo
from vllm_duo.ops import DecodeSlots, _ext, decode_slots, paged_decode, plan_partitions, write_kv
from vllm_duo.ops import decode as decode_mod

needs_ext = pytest.mark.skipif(not _ext.available(), reason="vllm_duo._C not built")


def fake_slots(n: int, device: str = "cuda") -> DecodeSlots:
    return DecodeSlots(*(torch.zeros(n, dtype=t, device=device)
                         for t in (torch.int64,) * 3 + (torch.int32,) * 2))


def decode_kwargs(**over) -> dict:
    return dict(dict(max_seq_len=70_000, num_kv_heads=2, block_size=16, sink_size=64, window=256),
                **over)


def test_import_and_clear_error_without_extension(tmp_path) -> None:
    """A checkout with no _C*.so imports fine and says how to build on first use."""
    pkg = os.path.dirname(vllm_duo.__file__)
    shutil.copytree(pkg, tmp_path / "vllm_duo", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = ("import os, torch, vllm_duo.ops as o\n"
            "assert not o.extension_available() and o.__file__.startswith(os.getcwd())\n"
            "q = torch.zeros(1, 8, 128, dtype=torch.bfloat16)\n"
            "try:\n"
            "    o.paged_decode(q, *[torch.zeros(1)] * 6, max_seq_len=1, num_kv_heads=2,\n"
            "                   block_size=16, sink_size=0, window=1)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert res.returncode == 0, res.stderr
    assert "was not built" in res.stdout and "pip install -e ." in res.stdout
    assert "TORCH_CUDA_ARCH_LIST" in res.stdout


def test_missing_extension_error(monkeypatch) -> None:
    monkeypatch.setattr(_ext, "_ERROR", "no _C*.so in /x")
    with pytest.raises(RuntimeError, match=r"not built.*no _C\*\.so in /x.*pip install -e \."):
        write_kv(*[torch.zeros(1)] * 6)


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(3, 8, 128, dtype=torch.float32)), "bfloat16 or float16"),
    (dict(q=torch.zeros(3, 8, 96, dtype=torch.bfloat16)), "head_dim must be one of"),
    (dict(q=torch.zeros(3, 128, 8, dtype=torch.bfloat16).transpose(1, 2)), "contiguous last"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(q=torch.zeros(3, 32, 128, dtype=torch.bfloat16)), "at most 8 query heads"),
    (dict(block_size=24), "power of two"),
    (dict(window=0), "window >= 1"),
    (dict(seq_lens=torch.zeros(3, dtype=torch.int64)), "seq_lens must be int32"),
    (dict(seq_lens=torch.zeros(3, dtype=torch.int32, device="cpu")), "seq_lens must be int32"),
    (dict(slot_streaming=torch.zeros(3, dtype=torch.int32)), "slot_streaming must be"),
    (dict(slot_kv_head=torch.zeros(2, dtype=torch.int64)), "slot_kv_head must be torch.int32"),
])
def test_decode_validation(monkeypatch, bad: dict, match: str) -> None:
    monkeypatch.setattr(_ext, "_ERROR", None)  # validation runs before any kernel
    with FakeTensorMode(allow_non_fake_inputs=True):
        args = dict(q=torch.zeros(3, 8, 128, dtype=torch.bfloat16, device="cuda"),
                    **fake_slots(2)._asdict(), seq_lens=torch.zeros(3, dtype=torch.int32, device="cuda"))
        kw = decode_kwargs()
        for k, v in bad.items():
            (kw if k in kw else args)[k] = v.to("cuda") if k == "q" else v
        with pytest.raises(ValueError, match=match):
            paged_decode(**args, **kw)


def test_decode_rejects_cpu_tensors(monkeypatch) -> None:
    monkeypatch.setattr(_ext, "_ERROR", None)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        paged_decode(torch.zeros(1, 8, 128, dtype=torch.bfloat16), *fake_slots(2, "cpu"),
                     torch.zeros(1, dtype=torch.int32), **decode_kwargs())


def test_write_validation(monkeypatch) -> None:
    monkeypatch.setattr(_ext, "_ERROR", None)
    with FakeTensorMode():
        key = torch.zeros(5, 2, 128, dtype=torch.bfloat16, device="cuda")
        slots = [torch.zeros(3, dtype=torch.int64, device="cuda"),
                 torch.zeros(3, dtype=torch.int32, device="cuda"),
                 torch.zeros(3, dtype=torch.int32, device="cuda")]
        with pytest.raises(ValueError, match="value .* must match key"):
            write_kv(key, key.half(), *slots, torch.zeros(2, 5, dtype=torch.int64, device="cuda"))
        with pytest.raises(ValueError, match=r"slot_mappings must be int64 \[num_groups, >= 5\]"):
            write_kv(key, key, *slots, torch.zeros(2, 4, dtype=torch.int64, device="cuda"))
        with pytest.raises(ValueError, match="slot_group must be torch.int32"):
            write_kv(key, key, *slots[:2], slots[0], torch.zeros(2, 5, dtype=torch.int64, device="cuda"))


# fp8 scales as (dtype, shape, device) per argument; each case is one mistake.
F32 = torch.float32
SCALE_CASES = [
    (dict(k_scale=(F32, (), "cuda")), "given together"),
    (dict(v_scale=(F32, (1,), "cuda")), "given together"),
    (dict(k_scale=(torch.float64, (), "cuda"), v_scale=(F32, (), "cuda")), "float32 tensors of one"),
    (dict(k_scale=(F32, (), "cuda"), v_scale=(torch.bfloat16, (), "cuda")), "float32 tensors of one"),
    (dict(k_scale=(F32, (2,), "cuda"), v_scale=(F32, (), "cuda")), "float32 tensors of one"),
    (dict(k_scale=(F32, (), "cuda"), v_scale=(F32, (1, 0), "cuda")), "float32 tensors of one"),
    (dict(k_scale=(F32, (), "cpu"), v_scale=(F32, (), "cuda")), "of one element on cuda"),
]


def scale_args(spec: dict) -> dict[str, torch.Tensor]:
    return {name: torch.ones(shape, dtype=dtype, device=device)
            for name, (dtype, shape, device) in spec.items()}


@pytest.mark.parametrize("spec,match", SCALE_CASES)
@pytest.mark.parametrize("op", ["paged_decode", "write_kv"])
def test_kv_scale_validation(monkeypatch, op: str, spec: dict, match: str) -> None:
    """Both wrappers: fp8 scales come both or neither, float32, one element, on q's/key's device."""
    monkeypatch.setattr(_ext, "_ERROR", None)
    with FakeTensorMode():
        scales = scale_args(spec)
        x = torch.zeros(3, 8, 128, dtype=torch.bfloat16, device="cuda")
        s = fake_slots(2)
        with pytest.raises(ValueError, match=f"{op}: k_scale and v_scale must be .*{match}"):
            if op == "paged_decode":
                paged_decode(x, *s, torch.zeros(3, dtype=torch.int32, device="cuda"), **decode_kwargs(),
                             **scales)
            else:
                write_kv(x[:, :2], x[:, :2], s.kv_ptrs, s.slot_kv_head, s.slot_streaming,
                         torch.zeros(1, 3, dtype=torch.int64, device="cuda"), **scales)


@pytest.mark.parametrize("max_seq_len,num_seqs,num_slots", [
    (1, 1, 1), (4096, 1, 8), (4096, 16, 8), (65536, 16, 8), (131072, 1, 8), (1 << 20, 64, 8),
])
def test_plan_partitions(max_seq_len: int, num_seqs: int, num_slots: int) -> None:
    size, parts = plan_partitions(max_seq_len, num_seqs, num_slots, num_sms=132)
    assert size * parts >= max_seq_len and parts <= decode_mod.MAX_PARTITIONS
    assert decode_mod.MIN_PARTITION_SIZE <= size and size % decode_mod.MIN_PARTITION_SIZE == 0
    assert parts == max(1, -(-max_seq_len // size))


def test_plan_partitions_examples() -> None:
    assert plan_partitions(4096, 16, 8, 132) == (512, 8)
    assert plan_partitions(4096, 1, 8, 132) == (128, 32)  # small batch: shorter partitions
    assert plan_partitions(65536, 16, 8, 132) == (2048, 32)  # long rows: a 32nd of the row
    assert plan_partitions(32768, 16, 8, 132) == (1024, 32)
    assert plan_partitions(131072, 16, 8, 132) == (2048, 64)
    assert plan_partitions(65536, 1, 1, 132) == (512, 128)  # one row: split to fill the GPU
    assert plan_partitions(1 << 20, 16, 8, 132) == (8192, 128)  # capped partition count


def test_decode_slots_addresses() -> None:
    caches = [torch.zeros(4, 16, 256), None]
    tables = [torch.zeros(3, 10, dtype=torch.int32)[:, :7], None]
    s = decode_slots(caches, tables, [1, -1], [True, False], "cpu")
    assert s.kv_ptrs.tolist() == [caches[0].data_ptr(), 0]
    assert s.block_table_ptrs.tolist() == [tables[0].data_ptr(), 0]
    assert s.block_table_strides.tolist() == [10, 0]
    assert s.slot_kv_head.dtype == torch.int32 and s.slot_streaming.tolist() == [1, 0]
    with pytest.raises(ValueError, match="int32"):
        decode_slots(caches, [torch.zeros(3, 10, dtype=torch.int64), None], [1, -1], [1, 0], "cpu")


@needs_ext
def test_fake_impls_give_shapes() -> None:
    with FakeTensorMode():
        q = torch.empty(2, 64, 128, dtype=torch.bfloat16, device="cuda")[:, :32]
        out = paged_decode(q, *fake_slots(8), torch.empty(2, dtype=torch.int32, device="cuda"),
                           **decode_kwargs(num_kv_heads=8))
        assert out.shape == (2, 32, 128) and out.dtype == torch.bfloat16 and out.is_contiguous()
        key = torch.empty(7, 8, 128, dtype=torch.float16, device="cuda")
        s = fake_slots(8)
        assert write_kv(key, key, s.kv_ptrs, s.slot_kv_head, s.slot_streaming,
                        torch.empty(2, 7, dtype=torch.int64, device="cuda")) is None


@needs_ext
def test_fake_impls_take_fp8_scales() -> None:
    """The ops' schemas take the scales (0-dim as vLLM's layer._k_scale, or [1]); the fake impls
    check them like the wrappers."""
    with FakeTensorMode():
        q = torch.empty(2, 8, 128, dtype=torch.bfloat16, device="cuda")
        k_scale = torch.empty((), device="cuda")
        v_scale = torch.empty(1, device="cuda")
        out = paged_decode(q, *fake_slots(2), torch.empty(2, dtype=torch.int32, device="cuda"),
                           **decode_kwargs(), k_scale=k_scale, v_scale=v_scale)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        s = fake_slots(2)
        rows = torch.empty(1, 2, dtype=torch.int64, device="cuda")
        write_kv(q[:, :2], q[:, :2], s.kv_ptrs, s.slot_kv_head, s.slot_streaming, rows,
                 k_scale=k_scale, v_scale=v_scale)
        with pytest.raises(ValueError, match="write_kv: k_scale and v_scale must be given together"):
            torch.ops.vllm_duo.write_kv(q[:, :2], q[:, :2], s.kv_ptrs, s.slot_kv_head, s.slot_streaming,
                                        rows, k_scale)
        with pytest.raises(ValueError, match="paged_decode: k_scale and v_scale must be float32"):
            seq_lens = torch.empty(2, dtype=torch.int32, device="cuda")
            torch.ops.vllm_duo.paged_decode(q, q, *s, seq_lens, 2, 16, 64, 256, 0.1, 512,
                                            torch.empty(2, 8, 3, 128, device="cuda"),
                                            torch.empty(2, 8, 3, device="cuda"), k_scale,
                                            torch.empty(2, device="cuda"))


@needs_ext
def test_fake_impl_checks_workspace() -> None:
    with FakeTensorMode():
        q = torch.empty(2, 8, 128, dtype=torch.bfloat16, device="cuda")
        bad_tmp = torch.empty(2, 8, 3, 64, device="cuda")
        with pytest.raises(ValueError, match="tmp_out/tmp_lse"):
            seq_lens = torch.empty(2, dtype=torch.int32, device="cuda")
            torch.ops.vllm_duo.paged_decode(q, q, *fake_slots(2), seq_lens, 2, 16, 64, 256, 0.1, 512,
                                            bad_tmp, torch.empty(2, 8, 3, device="cuda"))

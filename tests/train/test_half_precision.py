"""The start of a run says when its precision is the slow one on this machine: on a CPU, half
precision without fast matmuls, or fp32 where bf16 matmuls are markedly faster; on a CUDA GPU,
fp32, which leaves the tensor cores idle."""

import math

import torch

from moelab.hardware import FAST_HALF_FACTOR, SLOW_HALF_FACTOR, cpu_matmul_slowdown
from moelab.train.host import bf16_speedup_note, half_precision_note, precision_note, tensor_core_note


def test_the_note_names_the_precision_the_slowdown_and_the_fix():
    note = half_precision_note("bf16", 61.2)
    assert note is not None and note.count("\n") == 0
    assert "bf16" in note and "61x slower than fp32" in note and "train.precision=fp32 will run faster here" in note
    assert half_precision_note("fp16", SLOW_HALF_FACTOR * 0.99) is None  # native or near it: quiet
    assert half_precision_note("bf16", 0.4) is None  # AMX: faster than fp32
    assert "--precision fp32 will run faster" in half_precision_note("bf16", 50, "--precision fp32")


def test_the_slowdown_is_measured_with_real_products():
    for dtype in (torch.bfloat16, torch.float16):
        s = cpu_matmul_slowdown(dtype, n=64, reps=2)
        assert math.isfinite(s) and s > 0


def test_only_half_precision_on_cpu_is_measured_and_noted():
    cpu = torch.device("cpu")
    assert precision_note(cpu, "fp32", None) is None
    assert precision_note(torch.device("cuda"), "bf16", torch.bfloat16) is None  # GPUs: native
    slowdown = cpu_matmul_slowdown(torch.bfloat16)  # cached: the same reading the note uses
    assert precision_note(cpu, "bf16", torch.bfloat16, "--precision fp32") == \
        half_precision_note("bf16", slowdown, "--precision fp32")


def test_an_fp32_run_is_told_when_bf16_is_markedly_faster():
    note = bf16_speedup_note(0.4)  # AVX512-BF16 / AMX: bf16 products in 40% of fp32's time
    assert note is not None and note.count("\n") == 0
    assert "2.5x faster than fp32" in note and "train.precision=bf16" in note
    assert bf16_speedup_note(1.01 / FAST_HALF_FACTOR) is None  # a little faster: quiet
    assert bf16_speedup_note(61.2) is None  # no native bf16 (AVX2): certainly quiet
    cpu = torch.device("cpu")
    slowdown = cpu_matmul_slowdown(torch.bfloat16)  # cached: the same reading the note uses
    assert precision_note(cpu, "fp32", None, faster="train.precision") == \
        bf16_speedup_note(slowdown, "train.precision=bf16")
    assert precision_note(cpu, "fp32", None) is None  # not asked to suggest (moelab eval)


def test_an_fp32_run_on_a_gpu_is_told_to_use_its_tensor_cores():
    for capability, fix in (((9, 0), "train.precision=bf16"), ((8, 0), "train.precision=bf16"),
                            ((7, 5), "train.precision=fp16"), ((7, 0), "train.precision=fp16")):
        note = tensor_core_note(capability)
        assert note is not None and note.count("\n") == 0, capability
        assert f"compute capability {capability[0]}.{capability[1]}" in note and "tensor cores" in note
        assert f"{fix} (autocast" in note, (capability, note)
    assert tensor_core_note((6, 1)) is None  # Pascal: no tensor cores to point to
    assert "--precision=bf16" in tensor_core_note((8, 6), "--precision")
    # half precision on a GPU is native: nothing to say, and the GPU is never queried for it
    assert precision_note(torch.device("cuda"), "bf16", torch.bfloat16, faster="train.precision") is None
    assert precision_note(torch.device("cuda"), "fp32", None) is None  # not asked to suggest (moelab eval)

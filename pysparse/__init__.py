"""pysparse: kernels that turn compressed neural networks into speed.

Public API: ``quantize_int8``, ``sparsify`` and ``compact`` (model conversion), ``prune``
(unstructured, block, 2:4 and filter pruning with masks; criteria; sensitivity analysis; gradual
schedules), ``recover`` (distillation fine-tuning, QAT for int8 students), ``compress`` (a recipe
of steps in one call, with a measured report), ``plan`` (per-layer formats from latency measured on
this machine and the accuracy budget), ``save`` / ``load`` (one safetensors file per compressed
model, rebuilt into a fresh instance of its architecture without pickle; ``pysparse.serve``),
``pysparse.nn`` (the layers),
``cpu_info`` (what this CPU has and which kernel each op uses), ``set_cpu_isa`` / ``cpu_isa``
and ``set_cpu_bf16`` / ``cpu_bf16`` (switch the CPU path at run time), and the ops in the
``torch.ops.pysparse`` namespace (see pysparse.ops), with pure-PyTorch references in
``pysparse.reference``.
"""
from __future__ import annotations

import torch

from . import ops, reference
from .ops import cpu_bf16, cpu_isa, set_cpu_bf16, set_cpu_isa
from . import nn
from . import prune
from .compact import compact
from .quantize import quantize_int8
from .sparsify import plan_report, sparsify
from .recover import distillation_loss, recalibrate_batchnorm, recover
from .plan import Plan, plan
from .compress import CompressReport, compress
from . import serve
from .serve import load, save

__version__ = "0.1.0"


def cpu_info() -> dict:
    """What the CPU offers and which kernel each op will run now.

    Returns a dict: ``features`` (AVX2, AVX-512 VNNI, AVX512-BF16, AMX and whether the OS
    granted AMX; ``bf16_dot_speedup``: VDPBF16PS's MAC rate over fp32 FMA's, measured once
    when pysparse loaded; ``bf16_dot``: whether bf16 blocks use VDPBF16PS; ``bf16_dot_choice``:
    "measured" (from that speedup), "forced" (set_cpu_bf16 / PYSPARSE_CPU_BF16) or
    "unavailable" (no AVX512-BF16 at the selected path); ``amx_min_rows`` /
    ``amx_bsr_min_rows``: the rows of x from which int8_linear / bsr_int8_linear take AMX on an
    AMX machine, below them the VNNI kernel (PYSPARSE_AMX_MIN_ROWS / PYSPARSE_AMX_BSR_MIN_ROWS);
    ``amx_gemm``, ``amx_prefetch``: the AMX GEMM variant and prefetch distance
    (PYSPARSE_AMX_GEMM, PYSPARSE_AMX_PREFETCH)), ``best_isa``, ``selected_isa``
    (after the cap), ``isa_cap`` (set_cpu_isa / PYSPARSE_CPU_ISA, None: none), ``bf16_mode``
    (set_cpu_bf16: True/False forced, None measured), ``threads`` (torch.get_num_threads(),
    which the kernels use) and ``ops``: each op's CPU kernel, from the same dispatch policy
    the ops use (``pysparse.ops.kernel_for``). Where the kernel depends on the call:
    ``bsr_linear_bf16`` is for blocks 32 deep (the default block (64, 32); 64 deep is the
    same), ``bsr_linear_bf16_other_bk`` for other depths (no AMX-BF16 there), and
    ``bsr_linear_grad_x_other_bk`` for depths other than 16/32/64.

    Reproducibility: bf16 blocks round differently under VDPBF16PS and the widening kernels,
    and the measured choice can differ between machines (and, near the 1.25x threshold,
    between runs). Set PYSPARSE_CPU_BF16=0 (or 1) before import, or call
    ``pysparse.set_cpu_bf16(False)`` (or True), for the same bf16 outputs in every process.
    """
    feats = dict(ops._C.cpu_features())
    bf16 = torch.bfloat16

    def k(op: str, **facts) -> str:
        return ops.kernel_for("cpu", op, **facts)

    return {
        "features": {n: v for n, v in feats.items() if n != "best_isa"},
        "best_isa": feats["best_isa"],
        "selected_isa": ops._C.selected_isa(),
        "isa_cap": ops._C.cpu_isa_cap(),
        "bf16_mode": ops._C.cpu_bf16_mode(),
        "threads": torch.get_num_threads(),
        "ops": {"int8_linear": k("int8_linear"), "int8_mm": k("int8_mm"),
                "bsr_linear": k("bsr_linear"),
                "compact_conv2d": k("compact_conv2d"), "int8_conv2d": k("int8_conv2d"),
                "bsr_linear_bf16": k("bsr_linear", dtype=bf16, block=(64, 32)),
                "bsr_linear_bf16_other_bk": k("bsr_linear", dtype=bf16, block=(64, 16)),
                "bsr_linear_grad_x": k("bsr_linear_grad_x"),
                "bsr_linear_grad_x_other_bk": k("bsr_linear_grad_x", block=(64, 8)),
                "bsr_linear_grad_values": k("bsr_linear_grad_values"),
                "bsr_int8_linear": k("bsr_int8_linear")},
    }


__all__ = ["quantize_int8", "sparsify", "compact", "plan_report", "prune", "cpu_info", "set_cpu_isa", "cpu_isa",
           "set_cpu_bf16", "cpu_bf16", "nn", "ops", "reference"]

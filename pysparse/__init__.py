"""pysparse: kernels that turn compressed neural networks into speed.

Public API: ``quantize_int8`` and ``sparsify`` (model conversion), ``prune``, ``pysparse.nn`` (the layers),
``cpu_info`` (what this CPU has and which kernel each op uses), and the ops in the
``torch.ops.pysparse`` namespace (see pysparse.ops), with pure-PyTorch references in
``pysparse.reference``.
"""
from __future__ import annotations

import os

import torch

from . import ops, reference
from . import nn
from . import prune
from .quantize import quantize_int8
from .sparsify import plan_report, sparsify

__version__ = "0.1.0"


def cpu_info() -> dict:
    """What the CPU offers and which kernel each op will use now.

    Returns a dict: the detected features (AVX2, AVX-512 VNNI, AVX512-BF16, AMX and whether
    the OS granted AMX; ``bf16_dot_speedup``: VDPBF16PS's measured MAC rate over fp32 FMA's),
    ``best_isa``, ``selected_isa`` (after the PYSPARSE_CPU_ISA cap),
    ``threads`` (torch.get_num_threads(), which the kernels use), and ``ops``: each op's
    kernel on the CPU.
    """
    feats = dict(ops._C.cpu_features())
    sel = ops._C.selected_isa()
    return {
        "features": {k: v for k, v in feats.items() if k != "best_isa"},
        "best_isa": feats["best_isa"],
        "selected_isa": sel,
        "env_cap": os.environ.get("PYSPARSE_CPU_ISA"),
        "threads": torch.get_num_threads(),
        "ops": {"int8_linear": f"cpu-{sel}", "int8_mm": f"cpu-{sel}",
                "bsr_linear": f"cpu-{'avx512' if sel == 'amx' else sel}",
                # bf16 blocks: AMX-BF16 (blocks 32 or 64 deep), else VDPBF16PS where it out-runs
                # fp32 FMA here, else the bf16 weights widened to fp32 in registers
                # (PYSPARSE_CPU_BF16=0 forces widening; =1 VDPBF16PS where AMX-BF16 is not used)
                "bsr_linear_bf16": ("cpu-amx" if sel == "amx" and feats["amx_bf16"]
                                    and os.environ.get("PYSPARSE_CPU_BF16") != "0" else
                                    "cpu-avx512bf16" if feats.get("bf16_dot") else
                                    f"cpu-{'avx512' if sel == 'amx' else sel}-widen"),
                # int8 blocks: AMX, the VNNI kernel, below AVX-512 the scalar one
                "bsr_int8_linear": f"cpu-{sel}" if sel in ("avx512", "amx") else "cpu-scalar"},
    }


__all__ = ["quantize_int8", "sparsify", "plan_report", "prune", "cpu_info", "nn", "ops", "reference"]

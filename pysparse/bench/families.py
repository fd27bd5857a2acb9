"""The kernel families ``pysparse bench kernels`` times: each one a registered entry (its
grid, its contenders, its weight). A new family is one more ``register_family`` here."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

from . import peers
from .registry import Case, Contender, KernelFamily, register_family

M_GRID = (1, 16, 128, 512)
INT8_SHAPES = ((4096, 4096), (11008, 4096))  # (N, K): a square layer and an LLM MLP up-projection
DENSITIES = (0.05, 0.1, 0.25, 0.5)
QUICK_SPARSE_M = 16  # --quick keeps one M for the sparse grid: small-batch inference, where
                     # sparsity is meant to pay by streaming fewer weight bytes


def base_weight(N: int, K: int) -> torch.Tensor:
    """The float32 weight [N, K] of a grid shape: N(0, 1/K), the scale of a trained layer's
    weights, seeded by shape so every contender and every run of a shape sees the same one."""
    g = torch.Generator().manual_seed(1_000_003 * N + K)
    return torch.randn(N, K, generator=g) / math.sqrt(K)


def block_prune(w: torch.Tensor, density: float, block: int = peers.PRUNE_BLOCK) -> torch.Tensor:
    """``w`` [N, K] pruned as users prune it: ``pysparse.prune``'s block magnitude selection (block
    RMS, edge blocks included), keeping the ``density`` fraction of block x block tiles."""
    from ..prune import block_masks

    if density >= 1.0:
        return w.clone()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return w * block_masks({"w": lin}, 1.0 - density, (block, block))["w"].to(w.dtype)


Shapes = Optional[Sequence[tuple[int, int, int]]]  # (M, N, K) triples from the hidden --shapes


def _int8_cases(quick: bool, shapes: Shapes) -> list[Case]:
    if shapes:
        return [Case(M, N, K) for M, N, K in shapes]
    nk = INT8_SHAPES[:1] if quick else INT8_SHAPES
    return [Case(M, N, K) for N, K in nk for M in M_GRID]


def _int8_contenders(device: str) -> list[Contender]:
    if device == "cuda":
        return [peers.pysparse_int8_cuda(), peers.dense("cublas-bf16", torch.bfloat16, "cuda"),
                peers.torchao_int8("cuda"), peers.int_mm("cuda")]
    return [*(peers.pysparse_int8(isa) for isa in peers.cpu_isas()), peers.dense("fp32"),
            peers.dense("bf16", torch.bfloat16), peers.quantize_dynamic(), peers.torchao_int8(), peers.onnxruntime_int8(),
            peers.int_mm()]


def _sparse_cases(quick: bool, shapes: Shapes) -> list[Case]:
    if shapes:
        return [Case(M, N, K, d) for M, N, K in shapes for d in DENSITIES]
    ms = (QUICK_SPARSE_M,) if quick else M_GRID
    return [Case(M, 4096, 4096, d) for d in DENSITIES for M in ms]


def _sparse_contenders(device: str) -> list[Contender]:
    best = peers.cpu_isas()[0]
    dense_int8 = dataclasses.replace(peers.pysparse_int8(best), name="dense-int8", env={})
    return [peers.pysparse_bsr(), peers.pysparse_bsr(torch.bfloat16), peers.pysparse_bsr(torch.int8),
            peers.torch_sparse("bsr"), peers.torch_sparse("csr"), peers.dense("dense-fp32"), dense_int8]


register_family(KernelFamily(
    name="int8_linear", title="int8 linear layer (dynamic per-row int8 activations)",
    cases=_int8_cases, contenders=_int8_contenders,
    make_weight=lambda c: base_weight(c.N, c.K), bandwidth_column=True, devices=("cpu", "cuda")))

register_family(KernelFamily(
    name="sparse_linear",
    title=f"block-sparse linear ({peers.PRUNE_BLOCK}x{peers.PRUNE_BLOCK} tiles magnitude-pruned; torch BSR "
          f"{peers.BSR_BLOCK}x{peers.BSR_BLOCK})",
    cases=_sparse_cases, contenders=_sparse_contenders,
    make_weight=lambda c: block_prune(base_weight(c.N, c.K), c.density),
    # Each sparse layer against the dense layer of its own dtype: the ideal is then 1/density.
    # bf16 blocks against dense fp32: torch's bf16 F.linear is slower than fp32 on CPUs
    # without AMX (26 vs 17 ms at M = 128 here), so fp32 is the dense layer to beat.
    speedup_for=("pysparse-bsr", "pysparse-bsr-bf16", "pysparse-bsr-int8", "torch-bsr", "torch-csr"),
    reference="dense-fp32",
    references={"pysparse-bsr-int8": "dense-int8"},
    x_axis="density", ideal=True))


def _train_cases(quick: bool, shapes: Shapes) -> list[Case]:
    if shapes:
        return [Case(M, N, K, d) for M, N, K in shapes for d in TRAIN_DENSITIES]
    ms = (128,) if quick else (128, 512)
    return [Case(M, 4096, 4096, d) for d in TRAIN_DENSITIES for M in ms]


TRAIN_DENSITIES = (0.1, 0.25, 0.5)

register_family(KernelFamily(
    name="sparse_train",
    title=f"block-sparse fine-tuning step: forward + backward (x, weights, bias), fp32, "
          f"{peers.PRUNE_BLOCK}x{peers.PRUNE_BLOCK} tiles magnitude-pruned",
    cases=_train_cases,
    contenders=lambda device: [peers.train_step("pysparse-bsr-train", sparse=True),
                               peers.train_step("dense-fp32-train", sparse=False)],
    make_weight=lambda c: block_prune(base_weight(c.N, c.K), c.density),
    speedup_for=("pysparse-bsr-train",), reference="dense-fp32-train", x_axis="density", ideal=True))

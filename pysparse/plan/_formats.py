"""The formats plan can give a layer: their names, which apply to which layer, and building
a layer in a format from the real one (its weights, never changed).

Names: "dense" (the layer as it is); "int8" (pysparse.quantize.quantize_int8 on that layer:
Int8Linear with per-row dynamic activations, or Int8Conv2d with one dynamic scale per image);
"bsr:<density>" / "bsr-int8:<density>" (Linear only: the lowest-norm blocks pruned to that
fraction of blocks kept, then pysparse.sparsify's BlockSparseLinear forced to the block kernel,
fp32 or int8 blocks); "2:4" (Linear only, a CUDA float16/bfloat16 layer: 2:4 magnitude pruning
and torch's semi-structured kernel).

Not offered: "compact" (filter pruning + compaction of a conv). Pruning a conv's output
channels changes its consumers' inputs too, and in a residual stage every member of the sum
shares one channel set, so its time and its accuracy cost are properties of a channel group,
not of a layer: a per-layer table would count them wrongly. Compaction stays a recipe step
(pysparse.compress) until plan chooses per channel group.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..nn.block_sparse_linear import BlockSparseLinear
from ..nn.config import BlockSparseConfig
from ..quantize import int8_conv_pays, quantize_int8
from ..sparsify import sparsify

FAMILIES = ("dense", "int8", "bsr", "bsr-int8", "2:4")
_LINEAR_ONLY = ("bsr", "bsr-int8", "2:4")
_HALF = (torch.float16, torch.bfloat16)


def kind_of(m: nn.Module) -> Optional[str]:
    """"linear", "conv2d" or None (not a layer plan chooses for)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    return None


def parse(fmt: str) -> tuple[str, Optional[float]]:
    """("bsr", 0.25) from "bsr:0.25"; ("int8", None) from "int8". Raises ValueError naming the
    known formats for anything else."""
    if not isinstance(fmt, str):
        raise ValueError(f"a format must be a string, got {fmt!r}; known: {describe_known()}")
    fam, sep, d = fmt.partition(":")
    if fam not in FAMILIES or (sep and fam not in ("bsr", "bsr-int8")):
        raise ValueError(f"unknown format {fmt!r}; known: {describe_known()}")
    if not sep:
        return fam, None
    try:
        density = float(d)
    except ValueError:
        raise ValueError(f"format {fmt!r}: the density after ':' must be a number in (0, 1), e.g. 'bsr:0.25'") \
            from None
    if not (0.0 < density < 1.0):
        raise ValueError(f"format {fmt!r}: the density must be in (0, 1), got {density}")
    return fam, density


def describe_known() -> str:
    return ("'dense', 'int8', 'bsr:<density>', 'bsr-int8:<density>' (or 'bsr' / 'bsr-int8' for every density "
            "in densities=), '2:4' (CUDA half-precision Linear)")


def name(fam: str, density: Optional[float]) -> str:
    return fam if density is None else f"{fam}:{density:g}"


def check_densities(densities: Sequence[float]) -> tuple[float, ...]:
    if isinstance(densities, (int, float)):
        densities = (densities,)
    try:
        out = tuple(float(d) for d in densities)
    except (TypeError, ValueError):
        raise ValueError(f"densities must be numbers in (0, 1), got {densities!r}") from None
    bad = [d for d in out if not (0.0 < d < 1.0) or math.isnan(d)]
    if bad or not out:
        raise ValueError(f"densities must be a non-empty sequence of numbers in (0, 1), got {densities!r}")
    return out


def expand(formats: Optional[Iterable[str]], densities: tuple[float, ...]) -> Optional[list[str]]:
    """The user's formats= as a checked list of format names ("bsr" -> one per density);
    None stays None (every format that applies)."""
    if formats is None:
        return None
    if isinstance(formats, str):
        formats = [formats]
    out: list[str] = []
    for f in formats:
        fam, d = parse(f)
        names = [name(fam, x) for x in densities] if fam in ("bsr", "bsr-int8") and d is None else [name(fam, d)]
        out += [n for n in names if n not in out]
    return out


def _two_four_ok(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and m.weight.is_cuda and m.weight.dtype in _HALF and m.in_features % 4 == 0


def candidates(m: nn.Module, densities: tuple[float, ...], wanted: Optional[list[str]]) -> list[str]:
    """The format names that apply to layer ``m`` on its device, "dense" first; restricted to
    ``wanted`` (plus "dense") when given."""
    kind = kind_of(m)
    out = ["dense"]
    if kind == "linear":
        out.append("int8")
        out += [name("bsr", d) for d in densities] + [name("bsr-int8", d) for d in densities]
        if wanted is not None:  # a density the user lists explicitly joins even if not in densities=
            out += [w for w in wanted if parse(w)[0] in ("bsr", "bsr-int8") and w not in out]
        if _two_four_ok(m):
            out.append("2:4")
    elif kind == "conv2d":
        # int8 offered where it pays (int8_conv_pays: not depthwise, not the scalar kernel), or
        # when asked for.
        cpu = m.weight.device.type == "cpu" and m.padding_mode == "zeros"
        if cpu and (int8_conv_pays(m) or (wanted is not None and "int8" in wanted)):
            out.append("int8")
    if wanted is not None:
        out = [f for f in out if f == "dense" or f in wanted]
    return out


@torch.no_grad()
def build(m: nn.Module, fmt: str) -> nn.Module:
    """Layer ``m`` in format ``fmt``, from its weights (read through any parametrization);
    ``m`` itself is never changed. "dense" returns ``m``."""
    fam, density = parse(fmt)
    if fam == "dense":
        return m
    if fam in _LINEAR_ONLY and not isinstance(m, nn.Linear):
        raise ValueError(f"format {fmt!r} applies to nn.Linear layers only, not {type(m).__name__}")
    if fam == "int8":
        # quantize_int8 on a bare layer returns its replacement and leaves the layer as it was
        return quantize_int8(m, convs=isinstance(m, nn.Conv2d))
    if fam == "2:4":
        return _two_four(m)
    dtype = torch.int8 if fam == "bsr-int8" else None
    return sparsify(m, 1.0 - density, dtype=dtype, dispatch="sparse")


def _two_four(lin: nn.Linear) -> nn.Module:
    # 2:4 magnitude pruning on a copy (the user's layer keeps its weights), then torch's
    # semi-structured layer (BlockSparseLinear format "2:4"; sm80+ kernels)
    if not _two_four_ok(lin):
        raise ValueError("format '2:4' needs a CUDA nn.Linear in float16 / bfloat16 with in_features % 4 == 0")
    w = lin.weight.detach().float()
    N, K = w.shape
    top = w.abs().reshape(N, K // 4, 4).topk(2, dim=-1).indices
    keep = torch.zeros(N, K // 4, 4, dtype=torch.bool, device=w.device).scatter_(-1, top, True).reshape(N, K)
    w = (w * keep).cpu()
    bias = None if lin.bias is None else lin.bias.detach().float().cpu()
    dt = "float16" if lin.weight.dtype == torch.float16 else "bfloat16"
    cfg = BlockSparseConfig("2:4", K, N, (64, 32), dt, bias is not None, None, 0)
    return BlockSparseLinear._by_format["2:4"]._from_weight(cfg, w, bias, lin.weight.device)


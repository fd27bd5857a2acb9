"""Pure-PyTorch references of every pysparse op: the test oracle, the benchmark baseline,
and the fallback the dispatcher names when no kernel fits.

Each reference does the same arithmetic as the kernels, in the same order, so integer
results match bit for bit and float results match to rounding of the final casts.
"""
from __future__ import annotations

from typing import Optional

import torch


def quantize_per_row(x: torch.Tensor, x_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x`` [M, K] -> (q int8 [M, K], scale float32 [M]).

    Dynamic (x_scale None): scale = amax / 127 per row, q = round(clamp(x * (127 / amax))).
    Static: one scale for all rows. A row holding NaN or Inf gets scale NaN (its output
    row is then NaN, as float math would give), and a row of zeros scale 1.
    """
    xf = x.float()
    if x_scale is None:
        amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
        pos = amax > 0
        scale = torch.where(pos, amax / 127.0, torch.ones_like(amax))
        # torch.div, not `127.0 / amax`: Tensor.__rtruediv__ computes reciprocal(amax) * 127,
        # rounding twice, which flips ties like x * inv = 63.5 against the kernels' 127 / amax.
        inv = torch.where(pos, torch.div(torch.full_like(amax, 127.0), amax), torch.ones_like(amax))
    else:
        s = x_scale.float().reshape(())
        scale = s.expand(xf.shape[:-1]).clone()
        inv = torch.div(torch.ones_like(s), s).expand(xf.shape[:-1])
    q = torch.round(torch.clamp(xf * inv.unsqueeze(-1), -128, 127))
    finite = torch.isfinite(xf).all(dim=-1)
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q).to(torch.int8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def quantize_weight(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights: w [N, K] -> (q int8 [N, K], scale float32 [N, G]).

    One scale per output channel (group_size=0) or per group of ``group_size`` along K
    (the last group may be short). scale = amax / 127 (1 where a channel is all zero).
    """
    w = w.detach().float()
    N, K = w.shape
    g = group_size or max(K, 1)
    G = max((K + g - 1) // g, 1)
    wp = torch.nn.functional.pad(w, (0, G * g - K)).reshape(N, G, g)
    amax = wp.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wp / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).reshape(N, G * g)[:, :K]
    return q.contiguous(), scale


def int8_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ w [N, K]^T -> int32, accumulated exactly in int64."""
    return (a.long() @ w.long().T).to(torch.int32)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                x_scale: Optional[torch.Tensor] = None, group_size: int = 0) -> torch.Tensor:
    """Reference of pysparse::int8_linear from unpacked weights.

    x [..., K] float; w_q int8 [N, K]; w_scale float32 [N, G]; bias float32 [N] or None.
    y = (sum_g float(acc_g) * w_scale[:, g]) * x_scale_row + bias, cast to x.dtype.
    """
    K = x.shape[-1]
    N = w_q.shape[0]
    x2 = x.reshape(-1, K)
    q, s = quantize_per_row(x2, x_scale)
    G = w_scale.shape[1]
    g = group_size or max(K, 1)
    f = None
    for gi in range(G):
        k0, k1 = gi * g, min((gi + 1) * g, K)
        # int64 sums are exact; .float() rounds them as the kernel rounds its int32 sums
        acc = (q[:, k0:k1].long() @ w_q[:, k0:k1].long().T).float()
        v = acc * w_scale[:, gi].float()
        f = v if f is None else f + v
    if f is None:
        f = torch.zeros(x2.shape[0], N)
    y = f * s.unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def bsr_linear(x: torch.Tensor, w_dense: torch.Tensor, bias: Optional[torch.Tensor], relu: bool = False) -> torch.Tensor:
    """Reference of pysparse::bsr_linear from the dense (masked) weight, in float64."""
    y = x.double() @ w_dense.double().T
    if bias is not None:
        y = y + bias.double()
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def bsr_int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    x_scale: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """Reference of pysparse::bsr_int8_linear: the int8 linear of the (masked) int8 weight.

    w_scale [N, 1]. Same float operation order as the kernel's epilogue:
    ((float(acc) * w_scale) * x_scale) + bias, then ReLU.
    """
    y = int8_linear(x.float(), w_q, w_scale, bias, x_scale)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def compact_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_idx: torch.Tensor,
                   out_idx: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], out_channels: int, residual: Optional[torch.Tensor] = None,
                   relu: bool = False) -> torch.Tensor:
    """Reference of pysparse::compact_conv2d from the unpacked weight [Cout_kept, Cin_kept, kh, kw]:
    gather (index_select) + F.conv2d + scatter (index_add into zeros or the residual), then ReLU
    on every channel. Computes in x's dtype (pass float64 for an oracle); channels_last output.
    """
    xg = x.index_select(1, in_idx.long())
    y = torch.nn.functional.conv2d(xg, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                   tuple(stride), tuple(padding), tuple(dilation))
    n, _, ho, wo = y.shape
    out = x.new_zeros(n, out_channels, ho, wo) if residual is None else residual.to(x.dtype).clone()
    out.index_add_(1, out_idx.long(), y)
    if relu:
        out = torch.relu(out)
    return out.contiguous(memory_format=torch.channels_last)
def int8_conv2d(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                x_scale: Optional[torch.Tensor], stride=1, padding=0, dilation=1, groups: int = 1,
                activation: Optional[str] = None, return_acc: bool = False,
                out_scale: Optional[float] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of pysparse::int8_conv2d from the unpacked weight.

    x float [N, C, H, W]; w_q int8 [Cout, C/groups, kh, kw]; w_scale float32 [Cout];
    x_scale: one-element static scale, or None for one scale per image (amax / 127 over the
    image's finite values; 1 for an all-zero image). q = round(clamp(x * (1 / s), -128, 127)),
    the integer convolution is exact in float64 (|sum| <= kh*kw*C*2^14 < 2^53), then
    y = ((float(acc) * w_scale) * s) + bias, then ReLU / ReLU6. An output pixel whose window
    reads an input pixel holding NaN/Inf is NaN. return_acc=True returns the int32 sums.
    An int8 x is taken as already quantized with x_scale. out_scale: the output requantized,
    int8 round(clamp(y * (1 / out_scale), -128, 127)), NaN -> 0. residual: float [N, Cout, Ho, Wo]
    added to y before the activation.
    """
    xf = x.float()
    n = xf.shape[0]
    if x.dtype == torch.int8:
        s = x_scale.float().reshape(1).expand(n)
    elif x_scale is None:
        a = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf)).reshape(n, xf[0].numel() if n else 0)
        amax = a.amax(dim=1) if a.numel() else a.new_zeros(n)
        s = amax / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = x_scale.float().reshape(1).expand(n)
    inv = torch.div(torch.ones_like(s), s).view(n, 1, 1, 1)
    q = xf if x.dtype == torch.int8 else torch.round(torch.clamp(xf * inv, -128, 127))
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    acc = torch.nn.functional.conv2d(q.double(), w_q.double(), None, stride, padding, dilation, groups)
    if return_acc:
        return acc.to(torch.int32)
    y = acc.float() * w_scale.float().view(1, -1, 1, 1)
    y = y * s.view(n, 1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    # NaN/Inf anywhere in an input pixel poisons every output pixel whose window reads it.
    bad = (~torch.isfinite(xf)).any(dim=1, keepdim=True).double()
    kh, kw = w_q.shape[2], w_q.shape[3]
    hit = torch.nn.functional.conv2d(bad, bad.new_ones(1, 1, kh, kw), None, stride, padding, dilation) > 0
    y = torch.where(hit, torch.full_like(y, float("nan")), y)
    if residual is not None:  # added before the activation
        y = y + residual.float()
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "relu6":
        y = torch.clamp(y, 0.0, 6.0)
    if out_scale is not None:
        o = torch.tensor(float(out_scale), dtype=torch.float32)
        t = y * torch.div(torch.ones_like(o), o)
        t = torch.round(torch.clamp(torch.where(torch.isnan(t), torch.zeros_like(t), t), -128, 127))
        y = t.to(torch.int8)
    return y.contiguous(memory_format=torch.channels_last)

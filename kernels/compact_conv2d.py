"""Triton compacted convolution: the CUDA path of pysparse::compact_conv2d.

An implicit GEMM over the kept channels of full-width activations: rows M = N * Ho * Wo
output pixels, columns the Cout_kept kept output channels, reduction K = kh * kw *
Cin_kept. One program computes a [BLOCK_M, BLOCK_N] tile: for each kernel tap (r, s) it
loads, for its BLOCK_M output pixels, the input pixel that tap reads (zero outside the
padded image) at the kept input channels ``in_idx[c]`` -- the gather is the A load's
addresses, no gathered copy of x exists -- and multiplies by the weight tile; the epilogue
adds bias and the residual, applies ReLU and stores at output channels ``out_idx[j]``
(the scatter is the store's addresses).

The weight is read in the CPU op's packed layout (pysparse.ops_conv.pack_compact_conv2d_weight):
float32 [P, kh, kw, Cin_kept, 16], panels of 16 output channels, K ordered (kh, kw, cin),
output channels fastest, zero past Cout_kept. A B tile [BLOCK_K, BLOCK_N] (BLOCK_N a
multiple of 16) is then BLOCK_K * BLOCK_N / 16 runs of 16 contiguous floats (64 bytes: two
full 32-byte sectors), so the GPU needs no layout of its own and a packed weight (and a
state_dict) moves between devices as it is.

The kernel also reads a K-major weight, float32 [Cout_kept, kh, kw, Cin_kept] (``kmajor_weight``
makes one from the panels): Hopper's TF32 wgmma takes its B operand K-major only, so from the
panels the B tile reaches shared memory in 4-byte copies (compiled for sm_90: cp.async of
4 bytes), and K-major in 16-byte ones where Cin_kept allows. The op and CompactConv2d keep
the portable panels; gpu-check times both (an unmeasured choice, made without a GPU).

Output channels the conv does not write are filled before the launch: 0, the residual, or
relu(residual) (one pass over the output; the kernel then overwrites the kept channels).

Under ``TRITON_INTERPRET=1`` (the CPU tests) the autotuner gets a single small config, as
in kernels/int8_linear.py; that choice is made when this module is imported.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["compact_conv2d_triton", "kmajor_weight", "conv_out_size", "PANEL", "PRECISIONS"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

PANEL = 16  # output channels per packed weight panel (pysparse.ops_conv.CONV_PANEL)
# "ieee": true fp32 products; "tf32": the tensor cores' 10-bit-mantissa inputs (what
# torch.backends.cudnn.allow_tf32, True by default, lets cuDNN's fp32 convs use).
PRECISIONS = ("ieee", "tf32")

_OP = "compact_conv2d"


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # One config: the autotuner then skips benchmarking (the interpreter runs every
        # program in numpy). 16 pixel rows and 16 input channels make the tests' odd shapes
        # cross tile edges; 32 output columns span two weight panels in one tile.
        return [_config(16, 32, 16, 4, 1)]
    return [
        # Few pixels (batch 1, late ResNet stages: 7x7 = 49 rows): narrow tiles so that
        # enough programs exist to fill the SMs.
        _config(32, 32, 32, 4, 3),
        _config(32, 64, 32, 4, 3),
        _config(64, 32, 32, 4, 3),
        _config(64, 64, 32, 4, 3),
        # Many pixels: each weight tile reused by 128 rows. fp32 stage = (BM + BN) * BK * 4
        # bytes: 128 x 128 x 32 is 32 KiB a stage, 3 stages fit any sm80+ part.
        _config(128, 64, 32, 4, 3),
        _config(64, 128, 32, 4, 3),
        _config(128, 128, 32, 8, 3),
        _config(128, 128, 16, 8, 4),
        _config(128, 32, 32, 4, 4),
    ]


def _prune(configs, named_args, **kwargs):
    """Tiles no wider than the kept channels need (a 128-column tile for 20 kept outputs is
    84% padding) and row blocks that suit M (128-row tiles for 49 pixels waste time)."""
    args = {**named_args, **kwargs}
    mb, cout, cin = args["M_BUCKET"], args["COUT"], args["CIN"]
    bn_max = max(32, triton.next_power_of_2(max(cout, 1)))
    bk_max = max(16, triton.next_power_of_2(max(cin, 1)))
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= bn_max and c.kwargs["BLOCK_K"] <= bk_max]
    if mb <= 256:
        keep = [c for c in keep if c.kwargs["BLOCK_M"] <= 64] or keep
    return keep or configs


def _m_bucket(M: int) -> int:
    """Autotuning key for M: powers of two from 16 on."""
    return max(16, min(triton.next_power_of_2(max(M, 1)), 1 << 20))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "COUT", "CIN", "KH", "KW", "PRECISION", "W_KMAJOR"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _compact_conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, in_idx_ptr, out_idx_ptr, res_ptr, out_ptr,
    M, H, W, HO, WO, C_IN_FULL, C_OUT_FULL, CIN, COUT, M_BUCKET,
    SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    stride_ii, stride_oi, stride_b,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
    W_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[pixel m, out_idx[j]] = relu?(sum_k A[m, k] W[k, j] + bias[j] + residual[m, out_idx[j]])."""
    # Grouped program order (as kernels/int8_linear.py): GROUP_M row blocks share each
    # weight column block while it is in L2. Builtins only (integer ceil-division, tl.full):
    # see kernels/int8_linear.py, so the kernel also runs interpreted in a process that
    # imported triton before setting TRITON_INTERPRET.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (COUT + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge are clamped onto the last valid one (never stored), so
    # the loads need masks for the padding taps and K only. Clamps, not `% M` / `% COUT`: a
    # remainder by a run-time value hides from Triton's axis analysis that the weight
    # columns come in runs of 16 contiguous floats (the vectorized loads of a panel).
    m = tl.minimum(rm, M - 1)
    rnw = tl.minimum(rn, COUT - 1)
    hw = HO * WO
    n_img = m // hw
    rem = m - n_img * hw
    ho = rem // WO
    wo = rem - ho * WO
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    # int64 offsets: a batch of activations can pass 2**31 elements.
    x_img = x_ptr + n_img.to(tl.int64) * stride_xn
    # Column j of the weight: panel j // 16, lane j % 16; row k = (r * KW + s) * CIN + c at
    # 16 floats a row. Columns of the last panel past COUT are its zero padding; tiles
    # past the last panel read it again (clamped panel index; those columns are not stored).
    # K-major ([Cout, kh, kw, Cin]): column j starts at j * KKC and k is contiguous.
    KKC = KH * KW * CIN
    if W_KMAJOR:
        w_col = w_ptr + rnw.to(tl.int64) * KKC
    else:
        panel = tl.minimum(rn // 16, (COUT - 1) // 16)
        w_col = w_ptr + panel.to(tl.int64) * KKC * 16 + (rn % 16)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    # One flat loop over (tap, channel block), not nested loops over r, s and c: the
    # software pipeliner overlaps the loads of the next step only within one loop, and a
    # pruned layer's channel loop is often one or two blocks long.
    n_cb = (CIN + BLOCK_K - 1) // BLOCK_K
    for kk in range(0, KH * KW * n_cb):
        tap = kk // n_cb
        c0 = (kk - tap * n_cb) * BLOCK_K
        r = tap // KW
        s = tap - r * KW
        h = h0 + r * DH
        w_ = w0 + s * DW
        ok = (h >= 0) & (h < H) & (w_ >= 0) & (w_ < W)
        pix = x_img + h.to(tl.int64) * stride_xh + w_.to(tl.int64) * stride_xw
        c = c0 + rk
        c_ok = c < CIN
        ci = tl.load(in_idx_ptr + c * stride_ii, mask=c_ok, other=0).to(tl.int64)
        # an index outside [0, C_in) (trusted on the device: the layers check theirs once,
        # at construction) reads 0, never out of bounds
        a_ok = c_ok & (ci >= 0) & (ci < C_IN_FULL)
        a = tl.load(pix[:, None] + ci[None, :] * stride_xc, mask=ok[:, None] & a_ok[None, :], other=0.0)
        if W_KMAJOR:
            b = tl.load(w_col[None, :] + (tap * CIN + c).to(tl.int64)[:, None], mask=c_ok[:, None], other=0.0)
        else:
            b = tl.load(w_col[None, :] + (tap * CIN + c).to(tl.int64)[:, None] * 16, mask=c_ok[:, None],
                        other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)

    mask_m = rm < M
    oc = tl.load(out_idx_ptr + rnw * stride_oi).to(tl.int64)
    # out_idx outside [0, out_channels) is dropped, never written out of bounds
    mask_n = (rn < COUT) & (oc >= 0) & (oc < C_OUT_FULL)
    mask = mask_m[:, None] & mask_n[None, :]
    y = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rnw * stride_b)
        y = y + bias[None, :]
    n64 = n_img.to(tl.int64)
    ho64 = ho.to(tl.int64)
    wo64 = wo.to(tl.int64)
    if HAS_RES:
        r_pix = n64 * stride_rn + ho64 * stride_rh + wo64 * stride_rw
        res = tl.load(res_ptr + r_pix[:, None] + oc[None, :] * stride_rc, mask=mask, other=0.0)
        y = y + res
    if RELU:
        # y > 0 ? y : 0, but NaN stays NaN (as torch.relu and the CPU kernels).
        y = tl.where((y > 0) | (y != y), y, 0.0)
    o_pix = n64 * stride_on + ho64 * stride_oh + wo64 * stride_ow
    tl.store(out_ptr + o_pix[:, None] + oc[None, :] * stride_oc, y, mask=mask)


# ------------------------------------------------------------------------------ checks
def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (as torch.nn.Conv2d)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pair(v, name: str, low: int) -> tuple[int, int]:
    try:
        t = tuple(int(i) for i in v)
    except TypeError:
        raise ValueError(f"{_OP}: {name} must have 2 values (h, w), got {v!r}") from None
    if len(t) != 2:
        raise ValueError(f"{_OP}: {name} must have 2 values (h, w), got {list(t)}")
    if min(t) < low:
        raise ValueError(f"{_OP}: {name} must be >= {low}, got {list(t)}")
    return t


def _index(idx, name: str, n: int, what: str, limit: int, limit_name: str, distinct: bool,
           dev: torch.device) -> torch.Tensor:
    """idx as a 1-D int32/int64 tensor of n values on dev. A CPU idx is checked (in range,
    distinct if asked: free on the host) and copied; one already on the device is trusted
    (a check there costs a device sync per call), and the kernel masks out-of-range values."""
    if (not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64)
            or idx.dim() != 1):
        raise ValueError(f"{_OP}: {name} must be a 1-D int32 or int64 tensor, got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    if idx.shape[0] != n:
        raise ValueError(f"{_OP}: {name} must hold {n} indices (the packed weight's {what}), "
                         f"got {idx.shape[0]}")
    if idx.device.type == "cpu":
        if n:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= limit:
                i = int(((idx < 0) | (idx >= limit)).nonzero()[0, 0])
                raise ValueError(f"{_OP}: {name}[{i}]={int(idx[i])} is outside [0, {limit}) "
                                 f"({limit_name}={limit})")
            if distinct and idx.unique().numel() != n:
                u, counts = idx.unique(return_counts=True)
                raise ValueError(f"{_OP}: {name} holds {int(u[counts > 1][0])} twice: each output "
                                 "channel is written once")
        if idx.device != dev:
            idx = idx.to(dev, non_blocking=True)
    elif idx.device != dev:
        raise ValueError(f"{_OP}: {name} is on {idx.device} but x is on {dev}")
    return idx


def _check_float(t, name: str, want: str, dev: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        raise ValueError(f"{_OP}: {name} must be a float32 tensor {want}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.device != dev:
        raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {dev}; all tensors must be on "
                         "the same device")


# ------------------------------------------------------------------------------ API
def compact_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          in_idx: torch.Tensor, out_idx: torch.Tensor, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], out_channels: int,
                          residual: Optional[torch.Tensor] = None, relu: bool = False, *,
                          precision: str = "ieee") -> torch.Tensor:
    """Compacted convolution (groups=1, float32) in one Triton kernel; pysparse::compact_conv2d's
    semantics (pysparse.reference.compact_conv2d is the oracle).

    Args:
        x: float32 [N, C_in_full, H, W], any strides (channels_last reads fastest: the
            channel gather is then one contiguous row per pixel).
        weight: float32 [ceil(Cout_kept / 16), kh, kw, Cin_kept, 16], contiguous, from
            pysparse.ops_conv.pack_compact_conv2d_weight (the CPU op's layout); or K-major
            [Cout_kept, kh, kw, Cin_kept], contiguous (``kmajor_weight``; this function only).
        bias: float32 [Cout_kept] or None.
        in_idx: int32/int64 [Cin_kept], the channels of x read; out_idx: int32/int64
            [Cout_kept], distinct channels of the output written. On the CPU they are
            checked (range, distinct) and copied to x's device; on x's device they are
            trusted, and values out of range are ignored (read as 0 / not written).
        stride, padding, dilation: (h, w) pairs (>= 1, >= 0, >= 1).
        out_channels: the output's full width.
        residual: float32 [N, out_channels, Ho, Wo] (any strides) or None.
        relu: ReLU on every channel after the residual add (NaN stays NaN).
        precision: "ieee" (fp32 products) or "tf32" (GPU tensor cores, 10-bit mantissa
            inputs; the interpreter computes fp32 either way).

    Returns:
        float32 [N, out_channels, Ho, Wo], channels_last: out[:, out_idx] = conv(x[:, in_idx])
        + bias (+ residual[:, out_idx]); every other channel 0, or residual; then relu.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 4:
        raise ValueError(f"{_OP}: x must be a 4-D float32 tensor [N, C, H, W], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    dev = x.device
    if (not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.dim() not in (4, 5)
            or (weight.dim() == 5 and weight.shape[4] != PANEL) or not weight.is_contiguous()):
        raise ValueError(f"{_OP}: weight must be the packed layout, a contiguous float32 tensor "
                         f"[ceil(Cout/16), kh, kw, Cin_kept, 16] (pysparse.ops_conv.pack_compact_conv2d_weight), "
                         f"or K-major [Cout_kept, kh, kw, Cin_kept] (kmajor_weight), got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}"
                         f"{'' if not isinstance(weight, torch.Tensor) or weight.is_contiguous() else ' (not contiguous)'}")
    if weight.device != dev:
        raise ValueError(f"{_OP}: weight is on {weight.device} but x is on {dev}")
    if precision not in PRECISIONS:
        raise ValueError(f"{_OP}: precision must be one of {PRECISIONS}, got {precision!r}")
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 0:
        raise ValueError(f"{_OP}: out_channels must be an int >= 0, got {out_channels!r}")
    kmajor = weight.dim() == 4
    rows, KH, KW, CIN = weight.shape[:4]
    if KH < 1 or KW < 1:
        raise ValueError(f"{_OP}: the kernel size must be >= 1, got {KH}x{KW}")
    if not isinstance(out_idx, torch.Tensor) or out_idx.dim() != 1 or rows != (
            out_idx.shape[0] if kmajor else -(-out_idx.shape[0] // PANEL)):
        held = f"{rows} rows" if kmajor else (f"{rows} panels of 16 ({max(rows * 16 - 15, 0)} to {rows * 16} "
                                              "outputs)")
        raise ValueError(f"{_OP}: out_idx ({tuple(getattr(out_idx, 'shape', ()))}) must list one output "
                         f"channel per kept output; the {'K-major' if kmajor else 'packed'} weight holds {held}")
    COUT = out_idx.shape[0]
    N, C, H, W = x.shape
    in_idx = _index(in_idx, "in_idx", CIN, "kept input channels", C, "x.shape[1]", False, dev)
    out_idx = _index(out_idx, "out_idx", COUT, "kept output channels", out_channels, "out_channels", True, dev)
    if bias is not None:
        _check_float(bias, "bias", f"of shape [{COUT}]", dev)
        if bias.dim() != 1 or bias.shape[0] != COUT:
            raise ValueError(f"{_OP}: bias must have shape [{COUT}] (one per kept output), got {tuple(bias.shape)}")
    eh, ew = dh * (KH - 1) + 1, dw * (KW - 1) + 1
    if H + 2 * ph < eh or W + 2 * pw < ew:
        raise ValueError(f"{_OP}: x ({H}x{W}, padding {ph},{pw}) is smaller than the dilated kernel ({eh}x{ew})")
    HO, WO = conv_out_size(H, KH, sh, ph, dh), conv_out_size(W, KW, sw, pw, dw)
    shape = (N, out_channels, HO, WO)
    if residual is not None:
        _check_float(residual, "residual", f"of the output's shape {list(shape)}", dev)
        if tuple(residual.shape) != shape:
            raise ValueError(f"{_OP}: residual must be a float32 tensor of the output's shape {list(shape)}, "
                             f"got {tuple(residual.shape)}")

    out = torch.empty(shape, dtype=torch.float32, device=dev, memory_format=torch.channels_last)
    # The channels the conv does not write (and, until the kernel overwrites them, the
    # kept ones): one pass. clamp(min=0) is relu with NaN kept.
    if residual is None:
        out.zero_()
    elif relu:
        torch.clamp(residual, min=0, out=out)
    else:
        out.copy_(residual)
    M = N * HO * WO
    if M == 0 or COUT == 0:
        return out
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        # Triton launches on the current device; the tensors may live on another one.
        with torch.cuda.device(dev):
            return _launch(x, weight, bias, in_idx, out_idx, residual, out, M, C, H, W, HO, WO, out_channels,
                           CIN, COUT, (sh, sw, ph, pw, dh, dw), KH, KW, bool(relu), precision, kmajor)
    return _launch(x, weight, bias, in_idx, out_idx, residual, out, M, C, H, W, HO, WO, out_channels,
                   CIN, COUT, (sh, sw, ph, pw, dh, dw), KH, KW, bool(relu), precision, kmajor)


def _launch(x, weight, bias, in_idx, out_idx, residual, out, M, C, H, W, HO, WO, out_channels, CIN, COUT,
            geom, KH, KW, relu, precision, kmajor) -> torch.Tensor:
    # Unused pointers (no bias, no residual, no kept input: an empty weight / in_idx) get
    # `out`, never a zero-size tensor (whose data pointer may be null).
    b = bias if bias is not None else out
    r = residual if residual is not None else out
    w = weight if CIN else out
    ii = in_idx if CIN else out_idx
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(COUT, meta["BLOCK_N"]),)
    _compact_conv2d_kernel[grid](
        x, w, b, ii, out_idx, r, out,
        M, H, W, HO, WO, C, out_channels, CIN, COUT, _m_bucket(M),
        *geom,
        *x.stride(), *out.stride(), *r.stride(),
        ii.stride(0), out_idx.stride(0), b.stride(0) if bias is not None else 0,
        KH=KH, KW=KW, HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
        PRECISION=precision, W_KMAJOR=kmajor,
    )
    return out


def kmajor_weight(packed: torch.Tensor, cout: int) -> torch.Tensor:
    """The packed panels [P, kh, kw, Cin, 16] as a K-major weight [cout, kh, kw, Cin] (each
    output channel's K = (kh, kw, cin) contiguous), on packed's device; for
    compact_conv2d_triton. Once, at setup: never per call."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 5 or packed.shape[4] != PANEL:
        raise ValueError(f"{_OP}: packed must be [P, kh, kw, Cin, {PANEL}] panels, got "
                         f"{tuple(getattr(packed, 'shape', ()))}")
    P, kh, kw, ci, _ = packed.shape
    if not 0 <= cout <= P * PANEL or -(-cout // PANEL) != P:
        raise ValueError(f"{_OP}: cout={cout} does not fit {P} panels of {PANEL}")
    return packed.permute(0, 4, 1, 2, 3).reshape(P * PANEL, kh, kw, ci)[:cout].contiguous()

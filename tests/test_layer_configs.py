"""Layers built from their config: every layer kind saves a state dict that is a function
of its config, loads into an empty layer built from that config (CPU or meta) bit for
bit, and refuses (naming the key) what does not fit; BlockSparseLinear's one class per
format, its timing cache, argument checks and NaN rule; Int8Linear's save and move."""
import io

import pytest
import torch
from torch import nn

import pysparse
from pysparse import formats, ops
from pysparse.nn import (BlockSparseConfig, BlockSparseLinear, BsrInt8Linear, BsrLinear, DenseInt8KeptLinear,
                         DenseKeptLinear, Int8Linear, Int8LinearConfig, SemiStructuredLinear, from_config)
from pysparse.nn import block_sparse_linear as bsl

N, K = 100, 130  # odd on purpose: edge blocks, padded packing


def _pruned_linear(block=(64, 32), bias=True):
    lin = nn.Linear(K, N, bias=bias)
    keep = torch.rand(-(-N // block[0]), -(-K // block[1])) < 0.5
    keep[0, 0] = False  # block (0, 0) pruned: the NaN test puts its NaN there
    keep[-1, -1] = True
    with torch.no_grad():
        lin.weight.mul_(formats.expand_block_mask(keep, N, K, *block))
    return lin


def _two_four_linear():
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        w = lin.weight.reshape(64, 32, 4)
        w[..., 2:] = 0
    return lin


def _semi_structured(device="cuda"):
    # the 2:4 format directly (dispatch="auto" may time it out of the choice)
    lin = _two_four_linear()
    w = lin.weight.detach()
    cfg = BlockSparseConfig("2:4", 128, 64, (64, 32), "bfloat16", True, None,
                            int(formats.block_mask(w, 64, 32).sum()))
    return SemiStructuredLinear._from_weight(cfg, w, lin.bias.detach(), torch.device(device))


CUDA = torch.cuda.is_available()
KINDS = {
    "int8-dynamic": lambda: Int8Linear.from_float(nn.Linear(K, N)),
    "int8-grouped": lambda: Int8Linear.from_float(nn.Linear(K, N), group_size=64),
    "int8-static": lambda: Int8Linear.from_float(nn.Linear(K, N), activations="static", x_scale=0.03),
    "int8-smoothquant": lambda: Int8Linear.from_float(nn.Linear(K, N, bias=False), activations="static",
                                                      x_scale=0.05, smooth=torch.rand(K) + 0.5),
    "bsr-fp32": lambda: BlockSparseLinear.from_dense(_pruned_linear(), dispatch="sparse"),
    "bsr-fp32-relu-16x8": lambda: BlockSparseLinear.from_dense(_pruned_linear((16, 8)), block=(16, 8),
                                                               activation="relu", dispatch="sparse"),
    "bsr-bf16": lambda: BlockSparseLinear.from_dense(_pruned_linear(), dtype=torch.bfloat16, dispatch="sparse"),
    "bsr-int8": lambda: BlockSparseLinear.from_dense(_pruned_linear((64, 64)), dtype=torch.int8,
                                                     dispatch="sparse"),
    "dense-fp32": lambda: BlockSparseLinear.from_dense(_pruned_linear(bias=False), dispatch="dense"),
    "dense-bf16": lambda: BlockSparseLinear.from_dense(_pruned_linear(), dtype=torch.bfloat16, dispatch="dense"),
    "dense-int8": lambda: BlockSparseLinear.from_dense(_pruned_linear((64, 64)), dtype=torch.int8,
                                                       dispatch="dense", activation="relu"),
    # off the GPU the 2:4 layer holds its plain weight (computed densely): its state dict,
    # config and checks are the GPU layer's
    "2:4-plain-on-cpu": lambda: _semi_structured("cpu"),
    "2:4": pytest.param(lambda: _semi_structured(), marks=pytest.mark.skipif(
        not CUDA, reason="2:4 semi-structured kernels need a GPU")),
}
KIND_PARAMS = pytest.mark.parametrize("make", list(KINDS.values()), ids=list(KINDS))


def _device(m):
    return next(t for t in m.state_dict().values() if isinstance(t, torch.Tensor)).device


def _x(m, M=7):
    return torch.randn(M, m.in_features, device=_device(m))


def _signature(sd):
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


@KIND_PARAMS
def test_state_dict_loads_into_an_empty_layer_of_its_config(make):
    m = make()
    dev = _device(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    # the config is plain python: a weights_only load (no code runs from the file) reads it
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert sd["_extra_state"] == m.config.to_dict()
    x = _x(m)
    y = m(x)
    empty = from_config(m.config, device=dev)
    assert type(empty) is type(m) and empty.config == m.config
    # the state dict is a function of the config: same keys, shapes and dtypes empty or full
    assert _signature(empty.state_dict()) == _signature(m.state_dict())
    empty.load_state_dict(sd)
    assert torch.equal(empty(x), y)
    # from a config dict (what a manifest holds) on the meta device, materialized, loaded
    meta = from_config(sd["_extra_state"], device="meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values() if isinstance(t, torch.Tensor))
    meta.to_empty(device=dev)
    meta.load_state_dict(sd)
    assert torch.equal(meta(x), y)


@KIND_PARAMS
def test_loading_another_config_names_the_key_and_both_configs(make):
    m = make()
    cfg = m.config
    other = Int8LinearConfig(K + 1, N) if isinstance(cfg, Int8LinearConfig) else \
        BlockSparseConfig(cfg.format, K, N + 1, cfg.block, cfg.dtype, cfg.bias, cfg.activation, 0)
    target = from_config(other)
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError) as e:
        target.load_state_dict(m.state_dict())
    msg = str(e.value)
    assert "_extra_state" in msg and str(cfg) in msg and str(other) in msg
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # a failed load changes nothing


def test_block_sparse_kinds_are_one_class_per_format():
    lin = _pruned_linear((64, 64))
    want = {(None, "sparse"): BsrLinear, (None, "dense"): DenseKeptLinear, (torch.bfloat16, "sparse"): BsrLinear,
            (torch.int8, "sparse"): BsrInt8Linear, (torch.int8, "dense"): DenseInt8KeptLinear}
    for (dt, d), cls in want.items():
        m = BlockSparseLinear.from_dense(lin, block=(64, 64), dtype=dt, dispatch=d)
        assert type(m) is cls and isinstance(m, BlockSparseLinear) and m.format == m.config.format
    assert issubclass(SemiStructuredLinear, BlockSparseLinear) and SemiStructuredLinear.format == "2:4"
    with pytest.raises(TypeError, match="from_config"):
        BlockSparseLinear(BlockSparseConfig("bsr", 8, 8))
    with pytest.raises(TypeError, match="BsrInt8Linear"):
        BsrLinear.from_config(BlockSparseConfig("bsr-int8", 8, 8, (64, 64), "int8"))


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="group_size"):
        Int8LinearConfig(64, 8, group_size=32)
    with pytest.raises(ValueError, match="format"):
        BlockSparseConfig("csr", 64, 8)
    with pytest.raises(ValueError, match="int8"):
        BlockSparseConfig("bsr-int8", 64, 8, (64, 32), "int8")
    with pytest.raises(ValueError, match="nnz_blocks"):
        BlockSparseConfig("bsr", 64, 64, (64, 32), nnz_blocks=3)
    with pytest.raises(ValueError, match="version"):
        pysparse.nn.config_from_dict({**Int8LinearConfig(64, 8).to_dict(), "version": 99})
    cfg = BlockSparseConfig("bsr", 130, 100, [64, 32], nnz_blocks=4)
    assert cfg.block == (64, 32) and pysparse.nn.config_from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- timing: once per shape
def test_auto_dispatch_times_each_shape_once(monkeypatch):
    calls = []
    real = bsl._median_ms
    monkeypatch.setattr(bsl, "_median_ms", lambda fn, x, reps=5: calls.append(1) or real(fn, x, reps))
    bsl.clear_timing_cache()
    torch.manual_seed(1)
    a = BlockSparseLinear.from_dense(_pruned_linear(), dispatch="auto")
    timed = len(calls)
    assert timed == 4  # sparse and dense, at M = 1 and 128
    torch.manual_seed(1)  # the same block pattern, other weights (a second layer of the shape)
    lin = _pruned_linear()
    with torch.no_grad():
        lin.weight.mul_(2.0)
    b = BlockSparseLinear.from_dense(lin, dispatch="auto")
    assert len(calls) == timed and b.format == a.format and b.timings["cached"]
    # the choice is in the config: a saved layer is rebuilt and loaded without timing
    c = from_config(a.config)
    c.load_state_dict(a.state_dict())
    assert len(calls) == timed and type(c) is type(a)
    bsl.clear_timing_cache()
    BlockSparseLinear.from_dense(_pruned_linear(), dispatch="auto")
    assert len(calls) == 2 * timed


# ---------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=torch.float16), "GPU"),
    (dict(dtype=torch.float64), "dtype"),
    (dict(dtype=torch.int32), "dtype"),
    (dict(block=(48, 32)), "block"),
    (dict(block=(64, 0)), "block"),
    (dict(block=(64,)), "block"),
    (dict(block=(64, 33), dtype=torch.bfloat16), "bk must be even"),
    (dict(block=(16, 16), dtype=torch.int8), "int8 blocks"),
    (dict(dispatch="fast"), "dispatch"),
    (dict(activation="gelu"), "activation"),
    (dict(probe_m=()), "probe_m"),
])
def test_check_args_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseLinear.check_args(K, N, **{"device": "cpu", **kwargs})
    lin = nn.Linear(K, N)
    w = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        BlockSparseLinear.from_dense(lin, **kwargs)
    assert torch.equal(lin.weight, w)


def test_check_args_returns_the_block():
    assert BlockSparseLinear.check_args(K, N) == formats.DEFAULT_BLOCK
    assert BlockSparseLinear.check_args(K, N, dtype=torch.int8) == formats.INT8_BLOCK
    assert BlockSparseLinear.check_args(K, N, (16, 7)) == (16, 7)
    with pytest.raises(ValueError, match="in_features"):
        BlockSparseLinear.check_args(-1, N)


# ---------------------------------------------------------------- NaN: one rule for every format
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_non_finite_input_row_gives_a_nan_row_in_every_format(dtype, dispatch, activation):
    block = (64, 64) if dtype == torch.int8 else (64, 32)
    lin = _pruned_linear(block)
    m = BlockSparseLinear.from_dense(lin, block=block, dtype=dtype, dispatch=dispatch, activation=activation)
    x = torch.randn(4, K)
    x[1, 3] = float("nan")  # input 3 lies in block (0, 0), pruned: the sparse kernel never reads it
    x[2, 3] = float("inf")
    y = m(x)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()


# ---------------------------------------------------------------- loading checks what it loads
def _int8():
    return Int8Linear.from_float(nn.Linear(K, N))


def _bsr():
    return BlockSparseLinear.from_dense(_pruned_linear(), dispatch="sparse")


def _bsr8():
    return BlockSparseLinear.from_dense(_pruned_linear((64, 64)), dtype=torch.int8, dispatch="sparse")


def _set(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key].clone())
    return edit


def _poke(i, v):
    def f(t):
        t.view(-1)[i] = v
        return t
    return f


@pytest.mark.parametrize("make,edit,match", [
    (_int8, _set("weight_scale", _poke(3, float("nan"))), "weight_scale: holds NaN"),
    (_int8, _set("weight_scale", _poke(0, float("inf"))), "weight_scale: holds NaN or Inf"),
    (_int8, _set("bias", lambda t: t[:-1]), "bias"),
    (_int8, _set("weight_int8", lambda t: t.to(torch.int16)), "weight_int8: expected torch.int8"),
    (_bsr, _set("bias", lambda t: torch.zeros(N + 1)), "bias: expected"),
    (_bsr, _set("values", _poke(0, float("nan"))), "values: holds NaN"),
    (_bsr, _set("row_ptr", lambda t: t.flip(0)), "row_ptr: expected non-decreasing"),
    (_bsr, _set("col_idx", _poke(0, 99)), r"col_idx: expected block columns in \[0, 5\)"),
    (_bsr, _set("col_idx", lambda t: t.to(torch.int64)), "col_idx: expected a 1-d int32"),
    (_bsr, _set("values", lambda t: t.double()), "values: expected torch.float32"),
    (_bsr8, _set("w_scale", _poke(5, float("inf"))), "w_scale: holds NaN"),
    (_bsr8, _set("values", _poke(7, 1)), "colsum: does not match"),
    (_bsr8, _set("values", lambda t: t.float()), "values: expected torch.int8"),
    (_bsr8, _set("col_idx", _poke(0, -1)), "col_idx"),
])
def test_load_checks_and_names_the_key(make, edit, match):
    src = make()
    sd = src.state_dict()
    edit(sd)
    dst = from_config(src.config)
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(sd)
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half loaded


def test_two_four_pattern_is_checked_on_load():
    src = _semi_structured("cpu")
    assert src.density == 0.5
    sd = src.state_dict()
    sd["dense.weight"] = sd["dense.weight"].clone()
    sd["dense.weight"][0, :4] = 1.0
    with pytest.raises(RuntimeError, match="dense.weight: not 2:4 sparse"):
        from_config(src.config).load_state_dict(sd)


def test_dense_kept_child_weights_are_checked_before_they_load():
    src = BlockSparseLinear.from_dense(_pruned_linear(), dispatch="dense")
    sd = src.state_dict()
    sd["dense.weight"] = sd["dense.weight"].clone()
    sd["dense.weight"][0, 0] = float("inf")
    dst = from_config(src.config)
    w = dst.dense.weight.detach().clone()
    with pytest.raises(RuntimeError, match="dense.weight: holds NaN or Inf"):
        dst.load_state_dict(sd)
    assert torch.equal(dst.dense.weight, w)


def test_nested_prefixes_are_named():
    src = nn.Sequential(nn.ReLU(), _int8())
    sd = src.state_dict()
    sd["1.weight_scale"] = sd["1.weight_scale"].clone().fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"1\.weight_scale"):
        nn.Sequential(nn.ReLU(), from_config(src[1].config)).load_state_dict(sd)


# ---------------------------------------------------------------- Int8Linear: save and move
def test_int8_state_dict_keeps_added_buffers():
    m = _int8()
    m.register_buffer("calib_amax", torch.arange(3.0))
    sd = m.state_dict()
    assert torch.equal(sd["calib_amax"], torch.arange(3.0))
    assert "packed" not in sd and "colsum" not in sd  # the device layout is never saved
    m2 = from_config(m.config)
    m2.register_buffer("calib_amax", torch.zeros(3))
    m2.load_state_dict(sd)
    assert torch.equal(m2.calib_amax, torch.arange(3.0))


def test_int8_moves_repack_only_when_the_device_type_changes(monkeypatch):
    m = _int8()
    packed, colsum = m.packed, m.colsum
    calls = []
    real = ops.int8_pack
    monkeypatch.setattr(ops, "int8_pack", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, K)
    y = m(x)
    m.to("cpu")
    m.float()
    m.half()
    m.bfloat16()
    m.eval()
    m.to(torch.device("cpu"), torch.float32)
    assert not calls and m.packed is packed and m.colsum is colsum
    assert torch.equal(m(x), y)
    m.to("meta")
    assert m.packed.device.type == "meta"


def test_block_sparse_moves_do_not_relayout_on_the_same_device():
    for dt in (None, torch.bfloat16, torch.int8):
        m = BlockSparseLinear.from_dense(_pruned_linear((64, 64)), block=(64, 64), dtype=dt, dispatch="sparse")
        v = m.values.data_ptr()
        x = torch.randn(3, K)
        y = m(x)
        m.to("cpu")
        m.float()
        m.half()
        m.eval()
        assert m.values.data_ptr() == v and torch.equal(m(x), y) and m.config.dtype == pysparse.nn.block_sparse_linear.dtype_name(dt)


def test_dense_kept_keeps_its_weight_through_cpu_casts():
    # the sparse choice keeps its fp32 blocks through .bfloat16() on the CPU; so must the dense one
    x = torch.randn(3, K)
    for d in ("sparse", "dense"):
        m = BlockSparseLinear.from_dense(_pruned_linear(), dispatch=d)
        y = m(x)
        m.bfloat16()
        assert m.config.dtype == "float32" and torch.equal(m(x), y), d


# ---------------------------------------------------------------- formats: written once
def test_expand_block_mask_and_bsr_round_trips():
    bn, bk = 16, 8
    keep = torch.rand(-(-N // bn), -(-K // bk)) < 0.4
    em = formats.expand_block_mask(keep, N, K, bn, bk)
    assert em.shape == (N, K) and torch.equal(formats.block_mask(em.float(), bn, bk), keep)
    w = torch.randn(N, K) * em
    v, lay = formats.pack_bsr_f32(w, bn, bk)
    assert torch.equal(formats.bsr_to_dense(v, lay.row_ptr, lay.col_idx, N, K), w)
    formats.check_bsr_layout(lay.row_ptr, lay.col_idx, N, K, bn, bk)
    w8 = torch.randn(N, K) * formats.expand_block_mask(torch.rand(2, 3) < 0.5, N, K, 64, 64)
    p = formats.pack_bsr_int8(w8)
    assert torch.equal(formats.int8_bsr_to_dense(p.values, p.layout.row_ptr, p.layout.col_idx, N, K), p.q)
    assert torch.equal(formats.int8_bsr_colsum(p.values, p.layout.row_ptr, N), p.colsum[0, :N])
    dup = lay.col_idx.clone()
    two = (lay.row_ptr[1:] - lay.row_ptr[:-1] >= 2).nonzero()
    if two.numel():
        j = int(lay.row_ptr[int(two[0])])
        dup[j + 1] = dup[j]
        with pytest.raises(ValueError, match="strictly increasing"):
            formats.check_bsr_layout(lay.row_ptr, dup, N, K, bn, bk)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", ["int8-dynamic", "bsr-fp32", "bsr-bf16", "bsr-int8", "dense-bf16", "dense-int8"])
def test_moving_to_a_gpu_and_back_keeps_the_state_dict(name):
    m = KINDS[name]()
    sd = m.state_dict()
    m.cuda()
    assert _signature(m.state_dict()) == _signature(sd)
    m.cpu()
    after = m.state_dict()
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in sd.items())

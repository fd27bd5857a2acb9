"""pysparse.serve.save / load: one safetensors file with a JSON manifest, rebuilt from a fresh
instance of the architecture. A compacted int8 ResNet and a block-sparse int8 transformer
stack come back bit for bit, under every CPU path; hostile files are refused with a
ValueError naming what is wrong, and the given model is never touched."""
import json
import struct

import pytest
import torch
from torch import nn

import pysparse
from pysparse import serve
from pysparse.nn import BsrInt8Linear, Int8Conv2d, Int8Linear
from tests import zoo

ISAS = [i for i in ("scalar", "avx2", "avx512", "amx")
        if ("scalar", "avx2", "avx512", "amx").index(i) <= ("scalar", "avx2", "avx512", "amx").index(
            pysparse.cpu_info()["best_isa"])]


class Block(nn.Module):
    """A pre-LN transformer encoder block (attention + MLP)."""

    def __init__(self, d=128, ff=256, heads=4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.act, self.fc2 = nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Stack(nn.Module):
    def __init__(self, d=128, ff=256, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, ff) for _ in range(n))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _resnet():
    torch.manual_seed(0)
    return zoo.randomize_bn(zoo.resnet_basic(width=8)).eval()


def _stack(d=128):
    torch.manual_seed(0)
    return Stack(d).eval()


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    m = _resnet()
    x = torch.randn(2, 3, 32, 32)
    pysparse.prune.filters(m, 0.5, example_inputs=x)
    gm = pysparse.compact(m, x)  # records the kept channels save needs (gm.meta)
    gm = pysparse.quantize_int8(gm, convs=True)
    assert any(isinstance(l, Int8Conv2d) for l in gm.modules()) and any(isinstance(l, Int8Linear) for l in gm.modules())
    p = tmp_path_factory.mktemp("serve") / "resnet.safetensors"
    serve.save(gm, p, example_inputs=x)
    return gm, p, x


@pytest.fixture(scope="module")
def stack_file(tmp_path_factory):
    m = _stack()
    pysparse.sparsify(m, 0.5, dtype=torch.int8, skip=("head",), dispatch="sparse")
    pysparse.quantize_int8(m)  # the head (out_proj is read by its parent: left as it is)
    assert sum(isinstance(l, BsrInt8Linear) for l in m.modules()) == 6 and isinstance(m.head, Int8Linear)
    p = tmp_path_factory.mktemp("serve") / "stack.safetensors"
    serve.save(m, p)
    return m, p, torch.randn(2, 7, 128)


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)},
            [(n, type(c)) for n, c in m.named_modules()])


def _untouched(m, snap):
    sd, mods = snap
    now = m.state_dict()
    return [(n, type(c)) for n, c in m.named_modules()] == mods and all(torch.equal(now[k], v) for k, v in sd.items())


@torch.no_grad()
def test_compacted_int8_resnet_round_trips_bit_for_bit(resnet_file):
    gm, p, x = resnet_file
    fresh = zoo.resnet_basic(width=8)  # other random weights: they must not matter
    snap = _snapshot(fresh)
    out = serve.load(p, fresh)
    assert out is not fresh and _untouched(fresh, snap)
    assert isinstance(out, torch.fx.GraphModule) and not out.training
    assert torch.equal(out(x), gm(x))
    man = serve.load_manifest(p)
    assert man["format_version"] == serve.FORMAT_VERSION and man["pysparse_version"] == pysparse.__version__
    assert man["inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "float32"}]
    assert man["modules"]["conv1"]["kind"] == "Int8Conv2d" and man["modules"]["fc"]["kind"] == "Int8Linear"


@torch.no_grad()
def test_block_sparse_int8_stack_round_trips_bit_for_bit(stack_file):
    m, p, x = stack_file
    fresh = Stack()
    snap = _snapshot(fresh)
    out = serve.load(p, fresh)
    assert _untouched(fresh, snap) and type(out.blocks[1].fc1) is BsrInt8Linear
    assert torch.equal(out(x), m(x))
    assert out.state_dict().keys() == m.state_dict().keys()


@torch.no_grad()
@pytest.mark.parametrize("save_isa", ISAS)
def test_a_file_saved_under_one_cpu_path_loads_and_matches_under_every_other(resnet_file, stack_file, save_isa,
                                                                           tmp_path):
    for model, src, x, fresh in ((resnet_file[0], resnet_file[1], resnet_file[2], zoo.resnet_basic(width=8)),
                                 (stack_file[0], stack_file[1], stack_file[2], Stack())):
        p = tmp_path / "m.safetensors"
        with pysparse.cpu_isa(save_isa):
            serve.save(model, p, example_inputs=x if src is resnet_file[1] else None)
        # files hold no kernel layout: the same bytes whatever path saved them
        assert p.read_bytes() == src.read_bytes()
        for load_isa in ISAS:
            with pysparse.cpu_isa(load_isa):
                out = serve.load(p, fresh)
                assert torch.equal(out(x), model(x)), (save_isa, load_isa)


def test_a_graph_module_without_a_compaction_record_is_refused(tmp_path):
    m = _resnet()
    gm = torch.fx.symbolic_trace(m)  # a graph pysparse.compact did not make: its code cannot be saved
    with pytest.raises(ValueError, match="without a compaction record"):
        serve.save(gm, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ hostile files
def _parts(p):
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write(p, header, data):
    h = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _edit_header(fn):
    def edit(src, dst):
        header, data = _parts(src)
        fn(header)
        _write(dst, header, data)
    return edit


def _edit_manifest(fn):
    def in_header(header):
        man = json.loads(header["__metadata__"]["pysparse"])
        fn(man)
        header["__metadata__"]["pysparse"] = json.dumps(man)
    return _edit_header(in_header)


def _raw(fn):
    def edit(src, dst):
        dst.write_bytes(fn(src.read_bytes()))
    return edit


def _first(header, pred):
    return next(k for k, v in header.items() if k != "__metadata__" and pred(k, v))


def _flip_data_byte(b):
    b = bytearray(b)
    b[-3] ^= 0x5A
    return bytes(b)


def _non_json(b):
    (n,) = struct.unpack("<Q", b[:8])
    return b[:8] + b"{not json" + b"\xff" * (n - 9) + b[8 + n:]


def _list_header(b):
    (n,) = struct.unpack("<Q", b[:8])
    return b[:8] + b"[1, 2]".ljust(n) + b[8 + n:]


def _offsets_outside(h):
    k = _first(h, lambda k, v: v["data_offsets"][1] > v["data_offsets"][0])
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b + 10 ** 9, e + 10 ** 9]


def _wrong_dtype(h):
    k = _first(h, lambda k, v: v["dtype"] == "I8")
    h[k]["dtype"] = "U8"  # same size: only the dtype check can catch it


def _wrong_shape(h):
    k = _first(h, lambda k, v: v["dtype"] == "I8" and len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1])
    h[k]["shape"] = h[k]["shape"][::-1]  # same bytes, transposed shape


def _unknown_kind(m):
    m["modules"]["head"]["kind"] = "Int4Linear"


def _unknown_module(m):
    m["modules"]["blocks.9.fc1"] = m["modules"].pop("blocks.1.fc1")


def _bad_config(m):
    m["modules"]["blocks.0.fc1"]["config"]["nnz_blocks"] = 10 ** 6


def _no_manifest(h):
    del h["__metadata__"]


STACK_CASES = {
    "truncated": (_raw(lambda b: b[: len(b) * 2 // 3]), "truncated"),
    "shorter-than-length-field": (_raw(lambda b: b[:5]), "shorter than the 8-byte header length"),
    "header-length-past-end": (_raw(lambda b: struct.pack("<Q", len(b)) + b[8:]), "only .* follow it"),
    "oversized-header-length": (_raw(lambda b: struct.pack("<Q", 1 << 40) + b[8:]), "above the .* byte limit"),
    "header-not-json": (_raw(_non_json), "not UTF-8 JSON"),
    "header-not-a-dict": (_raw(_list_header), "must be a JSON object, got list"),
    "offsets-outside-the-file": (_edit_header(_offsets_outside), "outside the .*-byte data region"),
    "corrupted-data-byte": (_raw(_flip_data_byte), "do not match the manifest's checksum"),
    "appended-bytes": (_raw(lambda b: b + b"\0" * 16), "bytes appended"),
    "wrong-dtype": (_edit_header(_wrong_dtype), "expected torch.int8"),
    "wrong-shape": (_edit_header(_wrong_shape), "expected torch.int8 of shape"),
    "unknown-format-version": (_edit_manifest(lambda m: m.update(format_version=99)), "unknown format version 99"),
    "unknown-layer-kind": (_edit_manifest(_unknown_kind), "unknown layer kind 'Int4Linear'"),
    "unknown-module-name": (_edit_manifest(_unknown_module), "'blocks.9.fc1': unknown module name"),
    "config-out-of-range": (_edit_manifest(_bad_config), "nnz_blocks"),
    "no-manifest": (_edit_header(_no_manifest), "without a pysparse manifest"),
}


@pytest.mark.parametrize("case", list(STACK_CASES))
def test_a_hostile_file_is_refused_naming_the_fault_and_the_model_is_untouched(stack_file, tmp_path, case):
    edit, msg = STACK_CASES[case]
    dst = tmp_path / "bad.safetensors"
    edit(stack_file[1], dst)
    fresh = Stack()
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=msg):
        serve.load(dst, fresh)
    assert _untouched(fresh, snap)


def test_a_file_of_another_architecture_is_refused(stack_file):
    other = Stack(d=192)  # wider: every layer's shapes differ
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="does not fit the given model"):
        serve.load(stack_file[1], other)
    assert _untouched(other, snap)


def _kept_out_of_range(m):
    e = m["compaction"]["live"]["layer1.0.conv1"]
    e["kept"] = e["kept"][:-1] + [e["channels"] + 3]


def _live_unknown_layer(m):
    live = m["compaction"]["live"]
    live["layer9.conv"] = live.pop("layer1.0.conv1")


RESNET_CASES = {
    "kept-index-out-of-range": (_edit_manifest(_kept_out_of_range), r"kept channel index \d+ is out of range"),
    "compaction-unknown-layer": (_edit_manifest(_live_unknown_layer), "'layer9.conv' is not in the given model"),
    "compaction-other-graph": (_edit_manifest(lambda m: m["compaction"].update(graph_sha256="0" * 64)),
                               "differs from the saved one"),
}


@pytest.mark.parametrize("case", list(RESNET_CASES))
def test_a_hostile_compaction_record_is_refused(resnet_file, tmp_path, case):
    edit, msg = RESNET_CASES[case]
    dst = tmp_path / "bad.safetensors"
    edit(resnet_file[1], dst)
    fresh = zoo.resnet_basic(width=8)
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=msg):
        serve.load(dst, fresh)
    assert _untouched(fresh, snap)

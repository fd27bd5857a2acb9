"""pysparse.compact(fuse_residual=True): each conv feeding a residual add becomes a CompactConv2d over
all its channels with the add (+ ReLU) in its epilogue. The result must equal the unfused
compacted model (and the masked model) on every residual architecture of the zoo, leave convs
whose add cannot be fused as they were, freeze the parameters, and save / load (the record says
so; records written without the option still rebuild without it)."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import nn

import pysparse
from pysparse import serve
from pysparse.nn import CompactConv2d
from pysparse.compact._record import RECORD_KEY
from pysparse.serve import compaction
from pysparse.serve.compaction import check_record
from pysparse.serve.manifest import ManifestError

from . import zoo

RESIDUAL = ["resnet_basic", "resnet_bottleneck", "mobilenet_v2"]


def _adds(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes
               if (n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add))
               or (n.op == "call_method" and n.target in ("add", "add_")))


def _fused(gm: torch.fx.GraphModule) -> list[str]:
    mods = dict(gm.named_modules())
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], CompactConv2d)
            and len(n.args) == 2]


@pytest.mark.parametrize("name", RESIDUAL)
def test_fused_equals_unfused(name):
    model = zoo.make(name)
    x = torch.randn(zoo.IMAGE)
    pysparse.prune.filters(model, 0.5, example_inputs=(x,))
    plain = pysparse.compact(model, (x,))
    fused = pysparse.compact(model, (x,), fuse_residual=True)
    names = _fused(fused)
    assert names, "no residual add was fused"
    assert _adds(fused) == _adds(plain) - len(names)
    assert not any(p.requires_grad for p in fused.parameters())
    assert any(p.requires_grad for p in plain.parameters())  # the default stays trainable
    with torch.no_grad():
        for xb in (x, torch.randn(zoo.IMAGE)):
            y, ref = fused(xb), plain(xb)
            # the same sums in another kernel's order: fp32 rounding of the conv, then one add
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1)


def test_unfusable_add_keeps_its_conv():
    class TwoReaders(nn.Module):
        # conv's output feeds the add and is also returned: fusing would lose it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y + x, y

    m = TwoReaders().eval()
    x = torch.randn(2, 8, 6, 6)
    gm = pysparse.compact(m, (x,), fuse_residual=True)
    assert not _fused(gm) and not any(isinstance(mod, CompactConv2d) for mod in gm.modules())
    with torch.no_grad():
        a, b = gm(x), m(x)
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, b))


def test_needs_channels_last():
    model = zoo.make("resnet_basic")
    x = torch.randn(zoo.IMAGE)
    gm = pysparse.compact(model, (x,), channels_last=False, fuse_residual=True)
    assert not _fused(gm)


def _pruned_fused(name: str):
    """(a fresh copy of the zoo model, the example input, the model 50% filter-pruned and compacted fused)."""
    model = zoo.make(name)
    x = torch.randn(zoo.IMAGE)
    fresh = copy.deepcopy(model)
    pysparse.prune.filters(model, 0.5, example_inputs=(x,))
    return fresh, x, pysparse.compact(model, (x,), fuse_residual=True)


@torch.no_grad()
def test_fused_model_saves_and_loads(tmp_path):
    fresh, x, gm = _pruned_fused("resnet_basic")
    assert gm.meta[RECORD_KEY]["fuse_residual"] is True
    p = tmp_path / "fused.safetensors"
    serve.save(gm, p, example_inputs=x)
    out = serve.load(p, fresh)
    assert _fused(out) == _fused(gm)
    assert torch.equal(out(x), gm(x))


def test_record_field_checked():
    model = zoo.make("resnet_basic")
    x = torch.randn(zoo.IMAGE)
    pysparse.prune.filters(model, 0.5, example_inputs=(x,))
    rec = dict(compaction.record(model, (x,)))
    rec["graph_sha256"] = "0" * 64
    assert "fuse_residual" not in rec  # records without the option are as they always were
    check_record(rec)
    check_record({**rec, "fuse_residual": True})
    for bad in (False, "yes", 1):
        with pytest.raises(ManifestError, match="fuse_residual"):
            check_record({**rec, "fuse_residual": bad})


@torch.no_grad()
def test_fused_convs_quantize_with_the_residual_in_the_epilogue(tmp_path):
    fresh, x, fused = _pruned_fused("resnet_bottleneck")
    n_fused = len(_fused(fused))
    q = pysparse.quantize_int8(copy.deepcopy(fused), activations="static", calibration_data=[x, torch.randn(zoo.IMAGE)],
                               convs=True)
    mods = dict(q.named_modules())
    called_with_residual = [n.target for n in q.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    assert len(called_with_residual) == n_fused
    assert all(isinstance(mods[t], pysparse.nn.Int8Conv2d) for t in called_with_residual)
    assert not any(isinstance(m, CompactConv2d) for m in q.modules())
    y, ref = q(x), fused(x)
    # int8 weights and static activations through the whole network: within 5% (measured ~1%)
    assert float((y - ref).norm() / ref.norm()) < 0.05
    p = tmp_path / "q.safetensors"
    serve.save(q, p, example_inputs=x)
    assert torch.equal(serve.load(p, fresh)(x), y)

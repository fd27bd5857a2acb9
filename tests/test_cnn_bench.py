"""`pysparse bench compact` on a tiny CNN: every contender runs, the compacted model really has
fewer MACs, the int8 and ONNX Runtime contenders agree with the compacted fp32 model, and the
table renders. (Speed is measured in bench/ and BENCHMARKS.md, never asserted here.)"""
from __future__ import annotations

import pytest
import torch

from pysparse.bench import cnn_bench
from pysparse.bench.models import resnet50
from pysparse.bench.results import render_text, tables_for
from pysparse.bench.timing import TimingConfig


def _tiny_timing() -> TimingConfig:
    return TimingConfig(warmup=1, rounds=2, turn_s=0.005, budget_s=0.5, min_samples=1)


def test_compact_bench_runs_every_contender():
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    run = cnn_bench.CnnRun(name="resnet50", model=resnet50(3, classes=10).eval(), input_shape=(3, 32, 32),
                           batches=(1,), timing=_tiny_timing(), progress=False)
    doc = cnn_bench.run_cnn(run, ["test"])
    got = {r["contender"]: r for r in doc["results"]}
    assert not doc["skipped"], doc["skipped"]
    assert set(got) == {"dense", "dense-folded", "dense-packed", "torch-pruning", "pysparse-compact",
                        "pysparse-compact-int8", "onnxruntime-int8"}
    # 50% of the channels of every layer: about 4x fewer MACs (each conv loses half its inputs
    # and half its outputs; the stem's 3 inputs and the head's 10 outputs stay)
    assert 3.0 < got["pysparse-compact"]["mac_reduction"] < 4.2
    assert 3.0 < got["torch-pruning"]["mac_reduction"] < 4.2
    assert got["pysparse-compact-int8"]["rel_err"] < 0.1  # int8 vs the compacted fp32 model
    assert got["onnxruntime-int8"]["rel_err"] < 0.2
    assert got["dense-folded"]["rel_err"] < 1e-4  # BN folding is exact up to rounding
    assert got["dense-packed"]["rel_err"] < 1e-4  # pysparse.compact of the unpruned model
    like = got["pysparse-compact"]["fraction_of_mac_reduction_like_for_like"]
    assert like == pytest.approx(got["dense-packed"]["median_ms"] / got["pysparse-compact"]["median_ms"]
                                 / got["pysparse-compact"]["mac_reduction"])
    text = "\n".join(render_text(t) for t in tables_for(doc))
    assert "pysparse-compact" in text and "of MAC reduction" in text and "like for like" in text


def test_compact_bench_bad_args():
    import argparse

    from pysparse.bench.models import BenchError

    ns = argparse.Namespace(builtin="resnet50", input_size=32, batch="0", amount=0.5, quick=True,
                            no_progress=True, no_int8=True, peers="none")
    with pytest.raises(BenchError, match="--batch"):
        cnn_bench.from_args(ns)
    ns.batch, ns.peers = "1", "tvm"
    with pytest.raises(BenchError, match="--peers"):
        cnn_bench.from_args(ns)
    ns.peers, ns.amount = "none", 1.5
    with pytest.raises(BenchError, match="--amount"):
        cnn_bench.from_args(ns)

"""``pysparse bench compact``: a filter-pruned CNN, compacted by pysparse, against the peers.

One run times, interleaved, at each batch size, on the same random-weight network:
- ``dense``: the unpruned model as the user has it (eval mode, NCHW);
- ``dense-folded``: the same model given the usual inference treatment, BatchNorm folded into
  the convs (torch.fx.experimental.optimization.fuse) and channels_last — the issue's baseline;
- ``dense-packed``: ``pysparse.compact`` of the unpruned model (nothing to remove: BatchNorm
  folded, channels_last, weights prepacked for oneDNN) — the like-for-like baseline of
  ``pysparse-compact``, which gets the same treatment;
- ``torch-pruning``: Torch-Pruning's MagnitudePruner at the same ratio, given the same treatment;
- ``pysparse-compact``: ``pysparse.prune.filters`` (L1) then ``pysparse.compact`` (which folds
  BatchNorm and uses channels_last itself);
- ``pysparse-compact-int8``: the compacted model through ``pysparse.quantize_int8`` with static
  activation scales, where it converts convolutions;
- ``onnxruntime-int8``: ONNX Runtime's static QDQ int8 quantization of the same compacted
  network (intra-op threads = torch's, spinning off).

Each row shows the median, the speedup over ``dense-folded``, the MACs and the fraction of the
MAC reduction the speedup achieves (1.0: time fell as much as the work did); pysparse's rows also
show it against ``dense-packed`` ("like for like").
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import peers
from .machine import finish, run_header
from .models import BenchError
from .timing import Timed, TimingConfig, time_interleaved


@dataclass
class CnnRun:
    """One ``pysparse bench compact`` run."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]  # (C, H, W); batches come from ``batches``
    batches: tuple[int, ...] = (1, 8)
    amount: float = 0.5
    timing: TimingConfig = field(default_factory=TimingConfig.full)
    progress: bool = True
    int8: bool = True
    peers: tuple[str, ...] = ("torch-pruning", "onnxruntime")


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward on ``x`` (convolutions and Linear layers, pysparse's
    compacted, int8 and block-sparse layers by what they compute): pysparse.compress's counter."""
    from ..compress.measure import macs

    return macs(model, x)


def _fold(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)


def _final_linear(model: nn.Module) -> list[nn.Module]:
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return lins[-1:]


def _torch_pruning(model: nn.Module, example: torch.Tensor, amount: float) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    with peers.quiet():
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=amount, ignored_layers=_final_linear(m))
        pruner.step()
    return _fold(m)


def _ort_int8(model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.it = iter([{name: c.numpy()} for c in calib])

        def get_next(self):  # noqa: ANN201 (ORT's interface)
            return next(self.it, None)

    d = tempfile.mkdtemp(prefix="pysparse-ort-")
    f32, q8 = os.path.join(d, "model.onnx"), os.path.join(d, "model.int8.onnx")
    m = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    with peers.quiet():
        torch.onnx.export(m, (example,), f32, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
        quantize_static(f32, q8, Reader("x"), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    # a spinning ORT pool steals the cores from the next contender in an interleaved run
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(q8, so, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"x": np.ascontiguousarray(x.numpy())})[0])


def _rel_err(y: Any, ref: torch.Tensor) -> float:
    y = (y if isinstance(y, torch.Tensor) else torch.as_tensor(y)).detach().double()
    return float((y - ref).norm() / ref.norm().clamp(min=1e-30))


def build_contenders(run: CnnRun, notes: list[str], skipped: list[dict]) -> dict[str, tuple[nn.Module, Callable]]:
    """Every contender's model (built once, batch-independent) and its call."""
    import pysparse

    torch.manual_seed(0)
    model = run.model.eval()
    example = torch.randn(1, *run.input_shape)
    out: dict[str, tuple[Any, Callable]] = {"dense": (model, lambda m, x: m(x))}
    cl = lambda m, x: m(x.contiguous(memory_format=torch.channels_last))  # noqa: E731
    out["dense-folded"] = (_fold(model), cl)
    # pysparse's inference treatment, for the unpruned model too (like for like): prepacked convs
    # and the residual adds (+ ReLU) fused into the conv before them
    out["dense-packed"] = (pysparse.compact(copy.deepcopy(model), (example,), fuse_residual=True), cl)
    if "torch-pruning" in run.peers:
        try:
            out["torch-pruning"] = (_torch_pruning(model, example, run.amount), cl)
        except Exception as e:  # not installed, or it cannot prune this model: say why
            skipped.append({"contender": "torch-pruning", "reason": f"{type(e).__name__}: {e}".splitlines()[0]})
    masked = copy.deepcopy(model)
    pysparse.prune.filters(masked, run.amount, criterion="l1", example_inputs=(example,))
    compacted = pysparse.compact(copy.deepcopy(masked), (example,))  # plain convs: what ONNX exports
    fused = pysparse.compact(masked, (example,), fuse_residual=True)
    out["pysparse-compact"] = (fused, cl)
    calib = [torch.randn(4, *run.input_shape) for _ in range(4)]
    if run.int8:
        try:
            # the fused convs become int8 convs with the residual add (+ ReLU) in their epilogue
            q = pysparse.quantize_int8(copy.deepcopy(fused), activations="static", calibration_data=calib,
                                       convs=True)
            out["pysparse-compact-int8"] = (q, cl)
        except Exception as e:
            skipped.append({"contender": "pysparse-compact-int8", "reason": f"{type(e).__name__}: {e}".splitlines()[0]})
    if "onnxruntime" in run.peers:
        try:
            out["onnxruntime-int8"] = (_ort_int8(compacted, calib, example), lambda f, x: f(x))
        except Exception as e:
            skipped.append({"contender": "onnxruntime-int8", "reason": f"{type(e).__name__}: {e}".splitlines()[0]})
    return out


def run_cnn(run: CnnRun, argv: Sequence[str]) -> dict:
    """Build every contender once, then time them interleaved at each batch size; return the
    results document (tables: results.cnn_tables)."""
    from tqdm.auto import tqdm

    doc = run_header("cnn", argv)
    doc.update({"timing": asdict(run.timing), "results": [], "skipped": [], "notes": [],
                "model": {"name": run.name, "input_shape": list(run.input_shape), "amount": run.amount}})
    bar = tqdm(total=1 + len(run.batches), desc=f"pysparse bench compact {run.name}", unit="step",
               file=sys.stderr, disable=not run.progress)
    # built with autograd on: Torch-Pruning traces its dependency graph through autograd
    contenders = build_contenders(run, doc["notes"], doc["skipped"])
    bar.update()
    with torch.no_grad():
        one = torch.randn(1, *run.input_shape)
        macs = {n: count_macs(m, one) for n, (m, _) in contenders.items() if isinstance(m, nn.Module)}
        macs["onnxruntime-int8"] = macs.get("pysparse-compact")
        base_macs = macs["dense"]
        for B in run.batches:
            x = torch.randn(B, *run.input_shape, generator=torch.Generator().manual_seed(B))
            ref_dense = contenders["dense"][0](x).double()
            ref_pruned = contenders["pysparse-compact"][0](x).double()
            items = []
            for name, (m, call) in contenders.items():
                # pruned contenders are checked against the compacted fp32 model (same pruning);
                # torch-pruning prunes its own channels, so it is checked against nothing
                ref = ref_dense if name.startswith("dense") else ref_pruned
                check = None if name == "torch-pruning" else (lambda y, ref=ref: _rel_err(y, ref))
                items.append(Timed(name, (lambda m=m, call=call, x=x: call(m, x)), check=check))
            failures: dict[str, str] = {}
            stats = time_interleaved(items, run.timing, failures)
            doc["skipped"] += [{"contender": n, "reason": f"failed: {w}"} for n, w in failures.items()]
            base = stats["dense-folded"].median_ms
            packed = stats["dense-packed"].median_ms if "dense-packed" in stats else None
            for name, st in stats.items():
                mac = macs.get(name)
                red = base_macs / mac if mac else None
                sp = base / st.median_ms
                # pysparse's models get pysparse.compact's treatment (prepacked weights): their
                # like-for-like baseline is the unpruned model given the same
                like = packed / st.median_ms if packed and name.startswith("pysparse") else None
                doc["results"].append({
                    "model": run.name, "batch": B, "contender": name, "median_ms": st.median_ms,
                    "iqr_ms": st.iqr_ms, "samples": st.samples, "speedup_vs_dense_folded": sp,
                    "macs": mac, "mac_reduction": red,
                    "fraction_of_mac_reduction": (sp / red) if red and not name.startswith("dense") else None,
                    "speedup_vs_dense_packed": like,
                    "fraction_of_mac_reduction_like_for_like": (like / red) if like and red else None,
                    "rel_err": st.error})
            bar.update()
    bar.close()
    doc["notes"].append("speedups are over dense-folded (BatchNorm folded, channels_last), the unpruned model "
                        "given the inference treatment the issue names; 'like for like' is pysparse's rows over "
                        "dense-packed, the unpruned model through pysparse.compact (the same folding, channels_last "
                        "and prepacked weights as pysparse-compact); int8 rows are checked against the compacted "
                        "fp32 model (rel_err)")
    return finish(doc)


def main_args(p: Any) -> None:
    """Add ``pysparse bench compact``'s own arguments to its parser."""
    p.add_argument("--builtin", default="resnet50", help="the built-in CNN (default resnet50)")
    p.add_argument("--input-size", type=int, default=224, help="H = W of the input (default 224)")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--amount", type=float, default=0.5, help="fraction of channels pruned in every layer")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 contenders")
    p.add_argument("--peers", default="torch-pruning,onnxruntime",
                   help="peers to run, comma-separated, from torch-pruning and onnxruntime, or none")


def from_args(args: Any) -> CnnRun:
    """The CnnRun an argparse namespace asks for (BenchError for a bad value)."""
    from .models import build_builtin

    try:
        batches = tuple(int(b) for b in str(args.batch).split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) <= 0:
        raise BenchError(f"--batch takes positive integers like 1,8, got {args.batch!r}")
    if not 0.0 <= args.amount < 1.0:
        raise BenchError(f"--amount must be in [0, 1), got {args.amount}")
    if args.input_size < 8:
        raise BenchError(f"--input-size must be at least 8, got {args.input_size}")
    peer_names = () if args.peers == "none" else tuple(p for p in args.peers.split(",") if p)
    bad = [p for p in peer_names if p not in ("torch-pruning", "onnxruntime")]
    if bad:
        raise BenchError(f"--peers takes torch-pruning, onnxruntime or none, got {bad}")
    model, shape = build_builtin(args.builtin, (1, 3, args.input_size, args.input_size))
    return CnnRun(name=args.builtin, model=model, input_shape=tuple(shape[1:]), batches=batches,
                  amount=args.amount, timing=TimingConfig.quick() if args.quick else TimingConfig.full(),
                  progress=not args.no_progress, int8=not args.no_int8, peers=peer_names)

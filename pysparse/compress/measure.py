"""What a compression report measures: stored size, multiply-accumulates, latency and the layer kinds."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._metric import evaluate_metric
from .._timing import clock, interleaved_ms
from ..nn import BlockSparseLinear, CompactConv2d, Int8Conv2d, Int8Linear


def as_args(example_inputs: Any) -> tuple:
    """example_inputs as positional args: a tensor becomes a 1-tuple; a dict stays one argument."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    return (example_inputs,)


def call(model: nn.Module, args: tuple) -> Any:
    """model(*args), a dict argument given as keywords (as Hugging Face models take it)."""
    if len(args) == 1 and isinstance(args[0], dict):
        return model(**args[0])
    return model(*args)


def size_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a saved state_dict would hold (int8 weights count one byte a value)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def nonzero_weights(model: nn.Module) -> int:
    """Non-zero weight values of the compute layers (dense, masked, compacted, int8 or block-sparse)."""
    n = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            n += int(torch.count_nonzero(m.weight.detach()))
        elif isinstance(m, Int8Conv2d):
            n += int(torch.count_nonzero(m.weight_int8))
        elif isinstance(m, Int8Linear):
            n += int(torch.count_nonzero(m.weight_int8()[0]))
        elif isinstance(m, BlockSparseLinear):
            n += int(round(m.in_features * m.out_features * _executed_fraction(m)))
        elif isinstance(m, CompactConv2d):
            kh, kw = m.kernel_size
            n += int(m.in_idx.numel() * m.out_idx.numel() * kh * kw)
    return n


def _executed_fraction(m: BlockSparseLinear) -> float:
    fmt = m.config.format
    if fmt in ("dense", "dense-int8"):
        return 1.0
    if fmt == "2:4":
        return 0.5
    return float(m.density)


def _rows(out: torch.Tensor, features: int) -> int:
    return out.numel() // max(features, 1)


def _layer_macs(m: nn.Module, out: Any) -> int:
    if not isinstance(out, torch.Tensor):
        return 0
    if isinstance(m, (nn.Conv2d, Int8Conv2d)):
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, CompactConv2d):
        kh, kw = m.kernel_size
        positions = out.numel() // max(m.out_channels, 1)
        return positions * m.out_idx.numel() * m.in_idx.numel() * kh * kw
    if isinstance(m, (nn.Linear, Int8Linear)):
        return _rows(out, m.out_features) * m.in_features * m.out_features
    if isinstance(m, BlockSparseLinear):
        dense = _rows(out, m.out_features) * m.in_features * m.out_features
        return int(round(dense * _executed_fraction(m)))
    return 0


@torch.no_grad()
def macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates the compute layers perform on one call with example_inputs (a masked
    weight still costs its MAC; a removed channel or a skipped block does not)."""
    total = [0]
    kinds = (nn.Conv2d, nn.Linear, Int8Conv2d, Int8Linear, CompactConv2d, BlockSparseLinear)

    def hook(m: nn.Module, _inp: Any, out: Any) -> None:
        total[0] += _layer_macs(m, out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        call(model, as_args(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return total[0]


@torch.inference_mode()
def latencies_ms(models: Sequence[nn.Module], example_inputs: Any, rounds: int = 15) -> list[float]:
    """Median milliseconds of one call of each model, interleaved turn by turn so a noisy
    neighbour slows every contender alike (pysparse._timing; with one torch thread the clock is
    the thread's CPU time, which another process's load does not inflate: see clock())."""
    args = as_args(example_inputs)
    fns = {str(i): (lambda m=m: call(m, args)) for i, m in enumerate(models)}
    got = interleaved_ms(fns, rounds=rounds, drop_slow=False)
    return [got[str(i)] for i in range(len(models))]


def clock_name() -> str:
    """Which clock latencies_ms uses now ("thread cpu time" with one torch thread, else "wall time")."""
    return clock()[1]


def layer_kinds(model: nn.Module) -> list[dict]:
    """One row per compute layer: name, its class, and what was done to it (format, density,
    kept channels, masked sparsity)."""
    from ..prune.masks import get_mask

    rows = []
    for name, m in model.named_modules():
        row: dict[str, Any] = {"layer": name, "kind": type(m).__name__}
        if isinstance(m, BlockSparseLinear):
            row["format"] = m.config.format
            row["density"] = round(float(m.density), 4)
        elif isinstance(m, CompactConv2d):
            row["kept_in"], row["kept_out"] = int(m.in_idx.numel()), int(m.out_idx.numel())
        elif isinstance(m, (Int8Linear, Int8Conv2d)):
            row["format"] = "int8"
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            mask = get_mask(m)
            if mask is not None:
                row["sparsity"] = round(1.0 - float(mask.float().mean()), 4)
            if isinstance(m, nn.Conv2d):
                row["channels"] = f"{m.in_channels}->{m.out_channels}"
            else:
                row["features"] = f"{m.in_features}->{m.out_features}"
        else:
            continue
        rows.append(row)
    return rows


def evaluate(eval_fn: Callable[[nn.Module], Any], model: nn.Module, where: str) -> float:
    """eval_fn(model) in eval mode as a finite float (the model's train/eval flags restored), with
    a clear error naming eval_fn when it raises or returns a non-number."""
    return evaluate_metric(eval_fn, model, where, eval_mode=True)

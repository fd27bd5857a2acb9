"""`make demo`: build a real small model, quantize it, and print size, latency against
fp32 and the peers, and accuracy — in about a minute on 2 cores.

Model 1: an MLP trained here on scikit-learn's bundled handwritten digits (accuracy).
Model 2: an LLM feed-forward block, 4096 -> 11008 -> 4096 (latency at decode and
prefill batch sizes; random weights, accuracy is not the point there).
Model 3: a small CNN trained here on the same digits: filter pruning, compaction and int8.
"""
from __future__ import annotations

import copy
import io
import statistics
import time
import warnings

import torch
from torch import nn

import pysparse


def _train_digits(hidden: int = 1024, epochs: int = 25) -> tuple[nn.Module, tuple]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n = int(0.7 * len(y))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in range(0, n, 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).backward()
            opt.step()
    return model.eval(), (x[:n], y[:n], x[n:], y[n:])


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


def _size_mb(model: nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


@torch.no_grad()
def _time_ms(fns: dict, x: torch.Tensor, rounds: int = 7, min_s: float = 0.15) -> dict:
    """Median ms per call; contenders interleaved round by round so drift hits all alike."""
    for f in fns.values():
        f(x)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                f(x)
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_s / rounds and n >= 2:
                    break
            times[k].append(dt / n * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _caller(name: str, m: nn.Module):
    return (lambda v: m(v.bfloat16())) if name == "bf16" else m


def _peers(model: nn.Module) -> dict:
    out = {"fp32": model, "bf16": copy.deepcopy(model).bfloat16()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                                         dtype=torch.qint8)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            m = copy.deepcopy(model)
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
            out["torchao int8"] = m
        except Exception as e:  # torchao missing or incompatible: say so, go on
            print(f"(torchao peer unavailable: {type(e).__name__}: {e})")
    out["pysparse int8"] = pysparse.quantize_int8(copy.deepcopy(model))
    return out


def _table(rows: list[list], head: list[str]) -> str:
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).rjust(w[i]) for i, c in enumerate(r)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def _cnn_section() -> None:
    from .bench.cnn_bench import _fold, _torch_pruning, count_macs
    from .cnn_digits import accuracy, prune_compact_finetune, train_digits_cnn

    print("\n5) digits CNN (4 convs, 32-128 channels): 50% of the filters pruned (L1), 4 epochs of fine-tuning "
          "with the masks held, compacted (channels removed, BatchNorm folded), then int8; batch 256")
    model, data = train_digits_cnn()
    xte, yte = data[2], data[3]
    compacted, q = prune_compact_finetune(model, data, 0.5, epochs=4, int8=True)
    example = xte[:1]
    models = {"dense fp32": model, "dense, BN folded + channels_last": _fold(model)}
    try:  # the peer, on the same ratio (its latency; it is not fine-tuned here)
        models["Torch-Pruning 50% (not fine-tuned)"] = _torch_pruning(model, example, 0.5)
    except Exception as e:
        print(f"(Torch-Pruning peer unavailable: {type(e).__name__}: {e})")
    models["pysparse compacted"] = compacted
    models["pysparse compacted int8"] = q
    x = xte[:256].contiguous(memory_format=torch.channels_last)
    lat = _time_ms(models, x)
    base = lat["dense, BN folded + channels_last"]
    rows = []
    for k, m in models.items():
        acc = "-" if "not fine-tuned" in k else f"{accuracy(m, xte, yte):.2f}"
        rows.append([k, f"{_size_mb(m) * 1e3:.0f}", f"{count_macs(m, example) / 1e6:.2f}", f"{lat[k]:.3f}",
                     f"{base / lat[k]:.2f}x", acc])
    print(_table(rows, ["model", "size KB", "MMACs / image", "latency ms", "vs dense folded", "accuracy %"]))


def _compress_section() -> None:
    from .cnn_digits import accuracy, train_digits_cnn

    recipe = [{"step": "prune", "kind": "filters", "amount": "sensitivity:0.5", "levels": [0.25, 0.5, 0.75]},
              {"step": "compact"},
              {"step": "recover", "epochs": 4, "lr": 1e-3},
              {"step": "quantize", "activations": "static", "calibration_batches": 4}]
    print("\n6) one call, pysparse.compress, on the digits CNN: filter pruning with per-layer amounts allocated "
          "from a measured sensitivity (50% of the weights overall), compaction, distillation from the original "
          "(4 epochs), static int8; batch 256")
    for step in recipe:
        print("   ", step)
    model, (xtr, ytr, xte, yte) = train_digits_cnn()
    batches = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(ytr), 64)]
    _, report = pysparse.compress(model, recipe, data=batches, eval_fn=lambda m: accuracy(m, xte, yte),
                                  example_inputs=xte[:256], progress=False)
    print(report.table())
    print("per-layer amounts from the sensitivity scan: "
          + ", ".join(f"{k} {v:.2f}" for k, v in (report.records[1].per_layer or {}).items()))


def main() -> None:
    t_start = time.time()
    info = pysparse.cpu_info()
    print(f"pysparse {pysparse.__version__} | torch {torch.__version__} | CPU path {info['selected_isa']} "
          f"(best {info['best_isa']}) | threads {info['threads']}")

    print("\n1) digits MLP 64-1024-1024-10, trained here; batch 256")
    model, (_, _, xte, yte) = _train_digits()
    models = _peers(model)
    x = xte[:256].contiguous()
    lat = _time_ms({k: _caller(k, m) for k, m in models.items()}, x)
    rows = []
    for k, m in models.items():
        xin = xte.bfloat16() if k == "bf16" else xte
        acc = (m(xin).argmax(-1) == yte).float().mean().item() * 100
        rows.append([k, f"{_size_mb(m):.2f}", f"{lat[k]:.3f}", f"{lat['fp32'] / lat[k]:.2f}x", f"{acc:.2f}"])
    print(_table(rows, ["model", "size MB", "latency ms", "vs fp32", "accuracy %"]))

    print("\n2) LLM feed-forward block 4096 -> 11008 -> 4096 (random weights)")
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(4096, 11008), nn.SiLU(), nn.Linear(11008, 4096)).eval()
    models = _peers(ffn)
    models.pop("bf16")  # on CPUs without AMX bf16 is slower than fp32; it is in `pysparse bench kernels`
    rows = []
    for M in (1, 16, 128):
        x = torch.randn(M, 4096)
        lat = _time_ms(dict(models), x, rounds=5, min_s=0.6)
        best_peer = min(v for k, v in lat.items() if k != "pysparse int8")
        rows.append([M] + [f"{lat[k]:.2f}" for k in models] + [f"{best_peer / lat['pysparse int8']:.2f}x"])
    print(_table(rows, ["M"] + [f"{k} ms" for k in models] + ["ours vs best peer"]))
    sizes = {k: _size_mb(m) for k, m in models.items() if k in ("fp32", "pysparse int8")}
    print(f"size: fp32 {sizes['fp32']:.0f} MB -> pysparse int8 {sizes['pysparse int8']:.0f} MB")
    print("\n3) block sparsity: the same feed-forward block with 90% of its 64x32 / 64x64 blocks pruned")
    sp = {"dense fp32": models["fp32"], "dense int8 (ours)": models["pysparse int8"],
          "bsr fp32 (ours)": pysparse.sparsify(copy.deepcopy(ffn), 0.9, dispatch="sparse"),
          "bsr int8 (ours)": pysparse.sparsify(copy.deepcopy(ffn), 0.9, dtype=torch.int8, dispatch="sparse")}
    rows = []
    for M in (1, 16, 128):
        x = torch.randn(M, 4096)
        lat = _time_ms(dict(sp), x, rounds=5, min_s=0.6)
        rows.append([M] + [f"{lat[k]:.2f}" for k in sp] + [f"{lat['dense fp32'] / lat['bsr int8 (ours)']:.1f}x"])
    print(_table(rows, ["M"] + [f"{k} ms" for k in sp] + ["bsr int8 vs fp32"]))
    print("size MB: " + ", ".join(f"{k} {_size_mb(m):.0f}" for k, m in sp.items()))

    print("\n4) digits MLP: 50% block sparsity + int8, 3 epochs of recovery fine-tuning")
    model, (xtr, ytr, xte, yte) = _train_digits()
    pruned = copy.deepcopy(model).train()
    pysparse.prune.block_magnitude(pruned, 0.5, block=(64, 64), skip=["4"])
    opt = torch.optim.Adam(pruned.parameters(), lr=5e-4)
    for _ in range(3):
        for i in range(0, len(ytr), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(pruned(xtr[i:i + 128]), ytr[i:i + 128]).backward()
            opt.step()
    sparse = pysparse.sparsify(pruned.eval(), 0.5, dtype=torch.int8, skip=["4"])
    lat = _time_ms({"fp32": model, "sparse int8": sparse}, xte[:256].contiguous())
    print(_table([["fp32", f"{_size_mb(model):.2f}", f"{lat['fp32']:.3f}", f"{_accuracy(model, xte, yte):.2f}"],
                  ["50% blocks + int8", f"{_size_mb(sparse):.2f}", f"{lat['sparse int8']:.3f}",
                   f"{_accuracy(sparse, xte, yte):.2f}"]],
                 ["model", "size MB", "latency ms (batch 256)", "accuracy %"]))
    print(pysparse.plan_report(sparse))
    _cnn_section()
    _compress_section()
    print(f"\n(demo took {time.time() - t_start:.0f} s; full grid: `pysparse bench kernels`)")


if __name__ == "__main__":
    main()

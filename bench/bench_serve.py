"""Serving throughput and latency: the example server (examples/serve) with dynamic batching
against the same model file served one request per model call (max_batch=1).

    python bench/bench_serve.py [--requests 2000] [--concurrency 64] [--max-batch 32] [--json out.json]

The model file is built here (a block-sparse int8 MLP, pysparse.sparsify + quantize_int8, saved
with pysparse.serve.save); each configuration runs the server in its own process (python -m
examples.serve.server, loopback, a free port) so the client here does not share its GIL. The
client keeps ``--concurrency`` requests in flight (httpx, asyncio), after a warm-up; latency is
per request as the client sees it. Printed as a table, written as JSON with the machine and
versions (pysparse.bench.machine).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

D_IN, D_HID, D_OUT = 512, 2048, 512


def make_mlp() -> nn.Module:
    """The architecture the server rebuilds (--arch bench.bench_serve:make_mlp)."""
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.ReLU(), nn.Linear(D_HID, D_HID), nn.ReLU(),
                         nn.Linear(D_HID, D_OUT))


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    name: str
    max_batch: int
    max_wait_ms: float


def build_file(path: str) -> None:
    import pysparse
    from pysparse import serve

    torch.manual_seed(0)
    m = make_mlp().eval()
    pysparse.sparsify(m, 0.75, dtype=torch.int8, skip=("4",), dispatch="sparse")
    pysparse.quantize_int8(m)
    serve.save(m, path, example_inputs=torch.randn(1, D_IN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, n: int, concurrency: int) -> tuple[float, list[float], str]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    body = json.dumps({"inputs": torch.randn(D_IN).tolist()})
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        async def one():
            async with sem:
                t0 = time.perf_counter()
                r = await c.post("/predict", content=body, headers={"content-type": "application/json"})
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(one() for _ in range(min(50, n))))  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
        metrics = (await c.get("/metrics")).text
    return wall, lat, metrics


def _mean_batch(metrics: str) -> float:
    vals = {l.split(" ")[0]: float(l.split(" ")[1]) for l in metrics.splitlines()
            if l.startswith("pysparse_batch_size_sum") or l.startswith("pysparse_batch_size_count")}
    return vals["pysparse_batch_size_sum"] / max(vals["pysparse_batch_size_count"], 1)


def run_one(path: str, cfg: ServeConfig, requests: int, concurrency: int, threads: Optional[int]) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "examples.serve.server", path, "--arch", "bench.bench_serve:make_mlp",
           "--port", str(port), "--max-batch", str(cfg.max_batch), "--max-wait-ms", str(cfg.max_wait_ms),
           "--queue-size", str(max(4 * concurrency, 64))]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() - t0 > 120:
                raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
            time.sleep(0.2)
        wall, lat, metrics = asyncio.run(_load(url, requests, concurrency))
    finally:
        proc.terminate()
        proc.wait(30)
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3  # noqa: E731
    return {"config": dataclasses.asdict(cfg), "requests": requests, "concurrency": concurrency,
            "throughput_rps": requests / wall, "p50_ms": q(0.5), "p99_ms": q(0.99), "mean_batch": _mean_batch(metrics)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pysparse.bench.machine import finish, run_header

    ap = argparse.ArgumentParser(description="serving throughput / latency, batching vs max_batch=1")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    doc = run_header("serve", ["bench/bench_serve.py", *(argv or sys.argv[1:])])
    configs = [ServeConfig("batching", a.max_batch, a.max_wait_ms), ServeConfig("no batching", 1, 0.0)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp.safetensors")
        build_file(path)
        doc["model"] = f"MLP {D_IN}-{D_HID}-{D_HID}-{D_OUT}, block-sparse int8 (density 0.25) + int8 head"
        doc["results"] = [run_one(path, c, a.requests, a.concurrency, a.threads) for c in configs]
    finish(doc)
    rows = [("config", "max_batch", "req/s", "p50 ms", "p99 ms", "mean batch")]
    rows += [(r["config"]["name"], str(r["config"]["max_batch"]), f"{r['throughput_rps']:.0f}", f"{r['p50_ms']:.1f}",
              f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.1f}") for r in doc["results"]]
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows))
    for n in doc.get("notes", []):
        print("note:", n)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

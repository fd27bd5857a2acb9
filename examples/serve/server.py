"""An HTTP inference server for a pysparse model file, on FastAPI + uvicorn.

    python -m examples.serve.server model.safetensors --arch tests.zoo:resnet_basic --port 8000

``--arch module:callable`` builds a fresh instance of the architecture (your code, not the
file's); ``pysparse.serve.load`` rebuilds the compressed model into it. Requests are batched
dynamically (batching.py); the JSON API:

    POST /predict   {"inputs": <one item, nested lists of the item shape>}
                    or {"inputs": [<item>, <item>, ...]} (up to --max-batch items)
                 -> {"outputs": <the model's output for the item(s)>}
    GET  /health    {"status": "ok", ...}
    GET  /metrics   Prometheus text: requests by code, batch size histogram, latency quantiles

Errors: 400 (body is not JSON / not {"inputs": ...}), 413 (body over --max-body-bytes), 422
(inputs of the wrong shape, not numbers, NaN or Inf), 503 (the queue is full: retry later;
or the server is stopping), 500 (the model raised). The item shape comes from the file's
manifest (``pysparse.serve.save(..., example_inputs=...)``) or --item-shape.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
from typing import Callable, Optional, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .batching import Batcher, QueueFull, ShuttingDown
from .metrics import Metrics


def _error(code: int, message: str, metrics: Metrics, **headers: str) -> JSONResponse:
    metrics.request(code)
    return JSONResponse({"error": message}, status_code=code, headers=headers or None)


def create_app(model: Callable[[torch.Tensor], torch.Tensor], item_shape: Sequence[int], *, max_batch: int = 32,
               max_wait_ms: float = 5.0, queue_size: int = 256, max_body_bytes: int = 1 << 20,
               name: str = "model") -> FastAPI:
    """A FastAPI app serving ``model`` (called on a batch [n, *item_shape] float32)."""
    item_shape = tuple(int(s) for s in item_shape)
    metrics = Metrics()
    batcher = Batcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"pysparse: {name}", lifespan=lifespan)
    app.state.metrics, app.state.batcher = metrics, batcher

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "item_shape": list(item_shape), "max_batch": max_batch,
                "max_wait_ms": max_wait_ms, "queue_depth": batcher.depth, "queue_size": queue_size}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth = batcher.depth
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/predict")
    async def predict(request: Request):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return _error(413, f"body of {length} bytes is over the {max_body_bytes}-byte limit", metrics)
        body = bytearray()
        async for chunk in request.stream():  # a chunked body without a length is capped too
            body += chunk
            if len(body) > max_body_bytes:
                return _error(413, f"body is over the {max_body_bytes}-byte limit", metrics)
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as e:
            return _error(400, f"body is not valid JSON: {e}", metrics)
        if not isinstance(doc, dict) or "inputs" not in doc:
            return _error(400, 'body must be a JSON object {"inputs": ...}', metrics)
        try:
            x = torch.tensor(doc["inputs"], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            return _error(422, f"inputs must be a rectangular array of numbers ({e})", metrics)
        single = tuple(x.shape) == item_shape
        if not single and not (x.dim() == len(item_shape) + 1 and tuple(x.shape[1:]) == item_shape
                               and 1 <= x.shape[0] <= max_batch):
            return _error(422, f"inputs must have shape {list(item_shape)} (one item) or [n, "
                               f"{', '.join(map(str, item_shape))}] with 1 <= n <= {max_batch}, got "
                               f"{list(x.shape)}", metrics)
        if not bool(torch.isfinite(x).all()):
            return _error(422, "inputs hold NaN or Inf", metrics)
        items = [x] if single else list(x)
        try:
            ys = [await batcher.submit(i) for i in items] if len(items) == 1 else \
                await _gather(batcher, items)
        except QueueFull:
            return _error(503, f"the queue is full ({queue_size} waiting); retry later", metrics, **{"Retry-After": "1"})
        except ShuttingDown:
            return _error(503, "the server is shutting down", metrics)
        except Exception as e:  # the model raised on the batch
            return _error(500, f"the model failed: {type(e).__name__}: {e}", metrics)
        out = ys[0].tolist() if single else torch.stack(ys).tolist()
        metrics.request(200, time.perf_counter() - t0)
        return JSONResponse({"outputs": out})

    return app


async def _gather(batcher: Batcher, items):
    import asyncio

    futs = [asyncio.ensure_future(batcher.submit(i)) for i in items]
    try:
        return await asyncio.gather(*futs)
    except BaseException:
        for f in futs:
            f.cancel()
        raise


def load_model(path: str, arch: str) -> tuple[torch.nn.Module, Optional[list]]:
    """(the model loaded from ``path`` into a fresh ``arch``, the item shape from its manifest or None)."""
    from pysparse import serve

    mod, _, attr = arch.partition(":")
    if not mod or not attr:
        raise ValueError(f"--arch must be module:callable, got {arch!r}")
    fresh = getattr(importlib.import_module(mod), attr)()
    model = serve.load(path, fresh).eval()
    inputs = serve.load_manifest(path)["inputs"]
    return model, (inputs[0]["shape"][1:] if inputs else None)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a file written by pysparse.serve.save")
    ap.add_argument("--arch", required=True, help="module:callable building a fresh instance of the architecture")
    ap.add_argument("--item-shape", type=lambda s: [int(v) for v in s.split(",")], default=None,
                    help="one input's shape, e.g. 3,32,32 (default: from the file's example inputs)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, shape = load_model(a.model, a.arch)
    shape = a.item_shape or shape
    if shape is None:
        ap.error("the file records no example inputs: give --item-shape")
    app = create_app(model, shape, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, queue_size=a.queue_size,
                     max_body_bytes=a.max_body_bytes, name=a.model)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()

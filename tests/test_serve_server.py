"""The example HTTP server (examples/serve): a pysparse file served on loopback with dynamic
batching; 240 concurrent requests from a bounded client each get the model's own answer,
batching shows in /metrics, malformed requests get 4xx with a message (and the server keeps
serving), a full queue gets 503 rather than a hang, and the server shuts down cleanly."""
import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest
import torch
from torch import nn

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import pysparse  # noqa: E402
from pysparse import serve  # noqa: E402
from examples.serve.server import create_app, load_model  # noqa: E402

D = 64


def make_mlp():
    """The architecture (what --arch names): a fresh, unconverted instance."""
    return nn.Sequential(nn.Linear(D, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    m = make_mlp().eval()
    pysparse.sparsify(m, 0.5, dtype=torch.int8, skip=("4",), dispatch="sparse")
    pysparse.quantize_int8(m)
    p = tmp_path_factory.mktemp("srv") / "mlp.safetensors"
    serve.save(m, p, example_inputs=torch.randn(1, D))
    return p


@contextlib.contextmanager
def running(app):
    """Run ``app`` under uvicorn on a free loopback port in a thread; stop it on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        assert th.is_alive() and time.time() - t0 < 30, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(15)
        sock.close()
    assert not th.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def loaded(model_file):
    model, shape = load_model(str(model_file), "tests.test_serve_server:make_mlp")
    assert shape == [D]
    return model


async def _post_many(url, xs, limit):
    sem = asyncio.Semaphore(limit)  # a bounded client: at most `limit` requests in flight
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=limit)) as c:
        async def one(x):
            async with sem:
                r = await c.post("/predict", json={"inputs": x.tolist()})
                return r.status_code, r.json()
        return await asyncio.gather(*(one(x) for x in xs))


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(loaded):
    app = create_app(loaded, [D], max_batch=16, max_wait_ms=20, queue_size=512)
    xs = torch.randn(240, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaded(xs)  # row by row the same as one at a time: the int8 kernels quantize per row
    with running(app) as url:
        got = asyncio.run(_post_many(url, xs, limit=48))
        text = httpx.get(url + "/metrics").text
        assert httpx.get(url + "/health").json()["status"] == "ok"
    assert [c for c, _ in got] == [200] * 240
    for i, (_, body) in enumerate(got):
        # other batch sizes may take other kernel tiles; integer sums are exact, the fp32
        # epilogue agrees to rounding
        assert torch.allclose(torch.tensor(body["outputs"]), want[i], rtol=1e-5, atol=1e-5), i
    assert _metric(text, 'pysparse_requests_total{code="200"}') == 240
    assert _metric(text, "pysparse_batch_size_sum") == 240
    batches = _metric(text, "pysparse_batch_size_count")
    assert batches < 240 / 2, f"{batches:.0f} model calls for 240 requests: little batching happened"
    assert _metric(text, 'pysparse_batch_size_bucket{le="1"}') < batches
    assert _metric(text, 'pysparse_request_latency_seconds{quantile="0.99"}') > 0


def test_malformed_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(loaded):
    app = create_app(loaded, [D], max_batch=8, max_wait_ms=1, max_body_bytes=32 * 1024)
    good = json.dumps({"inputs": [0.5] * D})
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2, 3]", 400, '{"inputs"'),
        (json.dumps({"inputs": [1.0] * (D + 1)}).encode(), 422, "must have shape"),
        (json.dumps({"inputs": [[1.0] * D] * 9}).encode(), 422, "n <= 8"),
        (json.dumps({"inputs": [[1.0] * D, [1.0] * 3]}).encode(), 422, "rectangular"),
        (json.dumps({"inputs": ["a"] * D}).encode(), 422, "numbers"),
        (good.replace("0.5", "NaN", 1).encode(), 422, "NaN or Inf"),
        (good.replace("0.5", "Infinity", 1).encode(), 422, "NaN or Inf"),
        (json.dumps({"inputs": [0.5] * 10000}).encode(), 413, "limit"),
    ]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        for body, code, msg in cases:
            r = c.post("/predict", content=body, headers={"content-type": "application/json"})
            assert r.status_code == code and msg in r.json()["error"], (body[:40], r.status_code, r.text)
            assert c.post("/predict", content=good).status_code == 200  # still serving
        r = c.post("/predict", json={"inputs": [[0.5] * D] * 3})  # a client-side batch
        assert r.status_code == 200 and len(r.json()["outputs"]) == 3
        text = c.get("/metrics").text
    assert _metric(text, 'pysparse_requests_total{code="422"}') == 6
    assert _metric(text, 'pysparse_requests_total{code="413"}') == 1


def test_a_full_queue_answers_503_not_a_hang(loaded):
    def slow(xs):
        time.sleep(0.05)  # a model slower than the arrival rate
        return loaded(xs)

    app = create_app(slow, [D], max_batch=2, max_wait_ms=0, queue_size=4)
    xs = torch.randn(60, D)
    with running(app) as url:
        t0 = time.time()
        got = asyncio.run(_post_many(url, xs, limit=60))
        took = time.time() - t0
        assert httpx.get(url + "/health").status_code == 200
    codes = [c for c, _ in got]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    assert all("queue is full" in b["error"] for c, b in got if c == 503)
    assert took < 20


def test_the_server_shuts_down_cleanly(loaded):
    app = create_app(loaded, [D])
    with running(app) as url:
        assert httpx.post(url + "/predict", json={"inputs": [0.0] * D}).status_code == 200
        port = int(url.rsplit(":", 1)[1])
    assert app.state.batcher._task is None  # the collector stopped, the worker thread joined
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_the_importable_app_for_multi_worker_servers_reads_the_environment(model_file, monkeypatch):
    import importlib
    import sys

    monkeypatch.setenv("PYSPARSE_MODEL", str(model_file))
    monkeypatch.setenv("PYSPARSE_ARCH", "tests.test_serve_server:make_mlp")
    monkeypatch.setenv("PYSPARSE_MAX_BATCH", "8")
    sys.modules.pop("examples.serve.app", None)
    app = importlib.import_module("examples.serve.app").app
    assert app.state.batcher.max_batch == 8
    with running(app) as url:
        r = httpx.post(url + "/predict", json={"inputs": [0.1] * D})
    assert r.status_code == 200 and len(r.json()["outputs"]) == 10

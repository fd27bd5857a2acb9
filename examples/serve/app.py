"""The server as an importable ASGI app, configured from the environment, for multi-worker
servers (each worker process loads the file once):

    PYSPARSE_MODEL=model.safetensors PYSPARSE_ARCH=mypkg.models:resnet50 PYSPARSE_THREADS=4 \\
        uvicorn examples.serve.app:app --workers 4 --host 0.0.0.0 --port 8000

PYSPARSE_MODEL, PYSPARSE_ARCH (module:callable): required. PYSPARSE_ITEM_SHAPE ("3,224,224"),
PYSPARSE_MAX_BATCH (32), PYSPARSE_MAX_WAIT_MS (5), PYSPARSE_QUEUE_SIZE (256),
PYSPARSE_MAX_BODY_BYTES (1 MiB), PYSPARSE_THREADS (torch threads per worker: cores / workers).
"""
from __future__ import annotations

import os

import torch

from .server import create_app, load_model


def _app():
    path, arch = os.environ.get("PYSPARSE_MODEL"), os.environ.get("PYSPARSE_ARCH")
    if not path or not arch:
        raise RuntimeError("set PYSPARSE_MODEL (a pysparse file) and PYSPARSE_ARCH (module:callable)")
    if os.environ.get("PYSPARSE_THREADS"):
        torch.set_num_threads(int(os.environ["PYSPARSE_THREADS"]))
    model, shape = load_model(path, arch)
    if os.environ.get("PYSPARSE_ITEM_SHAPE"):
        shape = [int(v) for v in os.environ["PYSPARSE_ITEM_SHAPE"].split(",")]
    if shape is None:
        raise RuntimeError("the file records no example inputs: set PYSPARSE_ITEM_SHAPE")
    env = os.environ.get
    return create_app(model, shape, max_batch=int(env("PYSPARSE_MAX_BATCH", "32")),
                      max_wait_ms=float(env("PYSPARSE_MAX_WAIT_MS", "5")),
                      queue_size=int(env("PYSPARSE_QUEUE_SIZE", "256")),
                      max_body_bytes=int(env("PYSPARSE_MAX_BODY_BYTES", str(1 << 20))), name=path)


app = _app()

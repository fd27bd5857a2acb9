"""Serving pysparse models: one safe file per model, loaded into a fresh architecture.

``save(model, path, example_inputs=None)`` writes one safetensors file whose header carries a
JSON manifest (structure, layer configs, kept channels of a compacted model, checksums,
versions); ``load(path, model)`` rebuilds the compressed model from a freshly built instance
of its architecture without pickle or code from the file, and returns it (the given instance
is never modified). ``pysparse.compact`` records in its result what save needs to rebuild a
compacted model (``compact`` here is the same call, kept for older code). ``load_manifest(path)`` reads the checked manifest alone.

An HTTP server with dynamic batching on top of these is in examples/serve/.
"""
from __future__ import annotations

from .compaction import compact
from .load import load, load_manifest
from .manifest import FORMAT_VERSION, ManifestError
from .save import save

__all__ = ["save", "load", "load_manifest", "compact", "FORMAT_VERSION", "ManifestError"]

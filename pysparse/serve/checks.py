"""Reading a pysparse file's header ourselves, with every bound checked, before any byte of it
reaches safetensors: an 8-byte little-endian header length, the JSON header (a dict of
tensor entries and ``__metadata__``), then the data region the entries point into.

A safetensors file is ``u64 n | n bytes of JSON | data``. Each tensor entry is
``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` with offsets relative to
the data region. Everything a hostile file can lie about (the length, the JSON, the dtypes,
shapes, offsets, overlaps, the region's size) is checked here and named in a ValueError.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

# The header is JSON describing tensors plus the manifest; 100 MB is safetensors' own limit
# (a ResNet-50's manifest with every kept-channel list is ~0.3 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors' dtype names -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "I16": (torch.int16, 2),
    "I32": (torch.int32, 4), "I64": (torch.int64, 8), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4), "F64": (torch.float64, 8),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file, as its header describes it (offsets absolute in the file)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """The checked header: tensor entries by name, the ``__metadata__`` strings, sizes."""
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    header_bytes: int
    file_bytes: int


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid pysparse file: {why}")


def read_header(path: str) -> Header:
    """Parse and check the safetensors header of ``path`` (reads only the header).

    Raises ValueError naming what is wrong: a file shorter than its length field, a header
    length past the end of the file or above MAX_HEADER_BYTES, a header that is not UTF-8
    JSON or not a dict, a tensor entry with an unknown dtype, a malformed shape, offsets that
    do not match the shape or leave the data region, tensors that overlap or leave gaps, or a
    data region longer or shorter than the tensors.
    """
    try:
        f: BinaryIO = open(path, "rb")
    except OSError as e:
        raise ValueError(f"{path}: cannot open the file ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _bad(path, f"the file is {size} bytes, shorter than the 8-byte header length (truncated?)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"the header length field says {n} bytes, above the {MAX_HEADER_BYTES} byte limit "
                             "(oversized or corrupted header)")
        if n > size - 8:
            raise _bad(path, f"the header length field says {n} bytes but only {size - 8} follow it "
                             "(truncated file or corrupted length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, "__metadata__ must be an object of strings")
    data_start = 8 + n
    data_bytes = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, e in header.items():
        entries[name] = _entry(path, name, e, data_start, data_bytes)
    # the tensors tile the data region exactly, in offset order (as safetensors writes them)
    pos = data_start
    for e in sorted(entries.values(), key=lambda t: (t.begin, t.end)):
        if e.begin != pos:
            raise _bad(path, f"tensor {e.name!r} starts at data offset {e.begin - data_start}, expected "
                             f"{pos - data_start} (tensors overlap or leave a gap)")
        pos = e.end
    if pos != size:
        raise _bad(path, f"the tensors end at data offset {pos - data_start} but the data region is "
                         f"{data_bytes} bytes (truncated file, or bytes appended)")
    return Header(entries, meta, n, size)


def _entry(path: str, name: str, e: object, data_start: int, data_bytes: int) -> TensorEntry:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"tensor {name!r}: an entry must be {{dtype, shape, data_offsets}}, got {e!r:.200}")
    dt = e["dtype"]
    if dt not in DTYPES:
        raise _bad(path, f"tensor {name!r}: unknown dtype {dt!r} (known: {sorted(DTYPES)})")
    shape = e["shape"]
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise _bad(path, f"tensor {name!r}: shape must be a list of at most 8 ints >= 0, got {shape!r:.200}")
    off = e["data_offsets"]
    if not (isinstance(off, list) and len(off) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in off)):
        raise _bad(path, f"tensor {name!r}: data_offsets must be [begin, end] ints, got {off!r:.200}")
    b, end = off
    nbytes = math.prod(shape) * DTYPES[dt][1]
    if not 0 <= b <= end <= data_bytes:
        raise _bad(path, f"tensor {name!r}: data_offsets {off} fall outside the {data_bytes}-byte data region "
                         "(truncated file or corrupted offsets)")
    if end - b != nbytes:
        raise _bad(path, f"tensor {name!r}: data_offsets {off} hold {end - b} bytes but {dt} {shape} needs "
                         f"{nbytes}")
    return TensorEntry(name, DTYPES[dt][0], tuple(shape), data_start + b, data_start + end)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors writes them (C order, little endian)."""
    t = t.detach().contiguous().cpu()
    b = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(b).hexdigest()


def verify_tensors(path: str, header: Header, tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> None:
    """Check the tensors safetensors loaded against the header checked before (names, dtypes,
    shapes) and each one's bytes against its sha256 in the manifest: a corrupted byte anywhere
    in the data region is caught, and what is checked is what gets loaded (the file is not
    read a second time)."""
    if set(tensors) != set(header.tensors):
        raise _bad(path, "the file changed while it was being loaded")
    missing = sorted(set(header.tensors) - set(digests))
    if missing:
        raise _bad(path, f"the manifest has no checksum for tensor(s) {missing[:5]}")
    extra = sorted(set(digests) - set(header.tensors))
    if extra:
        raise _bad(path, f"the manifest lists tensor(s) {extra[:5]} that the file does not hold")
    for name, t in tensors.items():
        e = header.tensors[name]
        if t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise _bad(path, "the file changed while it was being loaded")
        if tensor_digest(t) != digests[name]:
            raise _bad(path, f"tensor {name!r}: its bytes do not match the manifest's checksum (corrupted data)")

"""What obclip reads from an ONNX file without the ``onnx`` package: its tensors' names and where
their data lives.

The device runtime ships without ``onnx``, so this is a minimal protobuf reader over the memory-
mapped file. It walks the model's graph (initializers, sparse initializers, constant tensors in
node attributes, and nested graphs) and returns every tensor it finds, with the external-data
location of those stored outside the file. Two callers, one mechanism: the manifest confines every
external-data path to the engines folder, and the onnxruntime cloud backend hands the shared
weights (the initializers stored in ``weights.bin``) to each session.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError

# field numbers in onnx.proto: ModelProto.graph=7, GraphProto.node=1 initializer=5 sparse_initializer=15,
# NodeProto.attribute=5, AttributeProto t=5 g=6 tensors=10 graphs=11 sparse_tensor=22 sparse_tensors=23,
# SparseTensorProto values=1 indices=2, TensorProto name=8 external_data=13,
# StringStringEntryProto key=1 value=2.
_GRAPH_FIELDS = {1: "node", 5: "tensor", 15: "sparse"}
_ATTR_FIELDS = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_MAX_DEPTH = 16


class OnnxReadError(ArtifactError, ValueError):
    """The file is not a readable ONNX model."""


@dataclass(frozen=True)
class TensorRef:
    """One tensor stored in an ONNX file."""

    name: str
    location: str | None     # its external-data file (relative to the model file), or None: stored inline
    initializer: bool        # an initializer of the main graph (what a session can be handed by name)


def _varint(buf: Any, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise OnnxReadError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise OnnxReadError("bad varint")


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field in buf[start:end]; others skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise OnnxReadError("truncated field")
            yield num, i, i + n
            i += n
        else:
            raise OnnxReadError(f"unsupported wire type {wire}")
    if i != end:
        raise OnnxReadError("field overruns its message")


def _tensor(buf: Any, s: int, e: int, initializer: bool) -> TensorRef:
    name, location = "", None
    for num, a, b in _fields(buf, s, e):
        if num == 8:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif num == 13:
            entry = {k: bytes(buf[x:y]) for k, x, y in _fields(buf, a, b)}
            if entry.get(1) == b"location":
                location = entry.get(2, b"").decode("utf-8", "replace")
    return TensorRef(name, location, initializer)


def _sparse(buf: Any, s: int, e: int, initializer: bool) -> Iterator[TensorRef]:
    for num, a, b in _fields(buf, s, e):
        if num in (1, 2):   # values, indices
            yield _tensor(buf, a, b, initializer)


def _stored(kind: str | None, buf: Any, s: int, e: int, initializer: bool, depth: int) -> Iterator[TensorRef]:
    """The tensors in one field of a graph or a node attribute: a tensor, a sparse tensor, a graph."""
    if kind == "tensor":
        yield _tensor(buf, s, e, initializer)
    elif kind == "sparse":
        yield from _sparse(buf, s, e, initializer)
    elif kind == "graph":
        yield from _graph(buf, s, e, depth + 1)


def _graph(buf: Any, s: int, e: int, depth: int) -> Iterator[TensorRef]:
    if depth > _MAX_DEPTH:
        raise OnnxReadError("graphs nested too deep")
    for num, a, b in _fields(buf, s, e):
        kind = _GRAPH_FIELDS.get(num)
        if kind != "node":
            yield from _stored(kind, buf, a, b, depth == 0, depth)
            continue
        for n2, x, y in _fields(buf, a, b):
            if n2 == 5:   # attribute
                for n3, p, q in _fields(buf, x, y):
                    yield from _stored(_ATTR_FIELDS.get(n3), buf, p, q, False, depth)


_CACHE: dict[tuple[str, int, int], tuple[TensorRef, ...]] = {}


def onnx_tensors(path: str | Path) -> tuple[TensorRef, ...]:
    """Every tensor stored in an ONNX file, in file order (cached by path, size and mtime).
    An empty or unreadable file is an OnnxReadError naming it."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        if st.st_size == 0:
            raise OnnxReadError(f"{path} is empty; rerun export: python export/build_engines.py")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                found: list[TensorRef] = []
                for num, a, b in _fields(buf, 0, len(buf)):
                    if num == 7:
                        found.extend(_graph(buf, a, b, 0))
            except (OnnxReadError, IndexError) as e:
                raise OnnxReadError(f"{path} is not a readable ONNX file ({e}); rerun export: "
                                    "python export/build_engines.py") from None
        _CACHE[key] = tuple(found)
    return _CACHE[key]


def external_locations(path: str | Path) -> tuple[str, ...]:
    """Every external-data location an ONNX file names, sorted."""
    return tuple(sorted({t.location for t in onnx_tensors(path) if t.location is not None}))


def external_initializers(path: str | Path, location: str | None = None) -> frozenset[str]:
    """Names of the main graph's initializers stored as external data (in ``location`` if given)."""
    return frozenset(t.name for t in onnx_tensors(path)
                     if t.initializer and t.location is not None and (location is None or t.location == location))

"""One weights file shared by many graphs: mapped once, handed to every session by name.

The cloud export (``export/cloud_engines.py``) writes every step-mode graph with its large
initializers as external data in one content-addressed ``weights.bin`` and an index
``weights.json`` (name -> offset, dtype, shape). ``SharedWeights`` memory-maps that file once and
gives each session the tensors it names (``SessionOptions.add_initializer``), so N mode graphs
cost one copy of the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError
from .onnx_file import external_initializers
from .sessions import SessionConfig, open_session, ort

# Mode graphs: provider-independent fusions plus the extended ones; "all" adds layout transforms
# (NCHWc on CPU) that copy every conv weight per session, which defeats the one shared copy.
SHARED_SESSION = SessionConfig(optimization="extended", memory_arena=False, prepacking=False)


class SharedWeights:
    """A shared weights file (``path``) and its index, read once; ``session`` opens a graph on it."""

    def __init__(self, path: Path, index: Mapping[str, Sequence[Any]]):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"shared weights {self.path} are missing; rerun export: python export/build_engines.py")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.values: dict[str, ort.OrtValue] = {}
        for name, (offset, dtype, shape) in index.items():
            dt = np.dtype(dtype)
            count = int(np.prod(shape)) if shape else 1
            array = np.frombuffer(self._map, dtype=dt, count=count, offset=int(offset)).reshape(shape)
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)

    @classmethod
    def from_index(cls, path: Path, index_path: Path) -> SharedWeights:
        return cls(path, json.loads(Path(index_path).read_text()))

    def session(self, graph: Path, config: SessionConfig = SHARED_SESSION) -> ort.InferenceSession:
        """``graph`` opened with every initializer it keeps in this file handed over from the one map.
        ``config.prepacking`` makes a prepacked copy of the weights it packs in each session (memory
        per session, not shared): the caller chooses."""
        names = external_initializers(graph, self.path.name) & set(self.values)
        return open_session(graph, config,
                            initializers={name: self.values[name] for name in sorted(names)})

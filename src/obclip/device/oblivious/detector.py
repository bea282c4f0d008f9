"""A learned detector for the oblivious transform: a token classifier on onnxruntime.

ObCLIP's paper finds sensitive words with a DistilBERT PII token classifier. Any token
classifier exported to ONNX plugs in here: a model whose output is per-token label logits
(batch, tokens, labels), its tokenizer.json (the Hugging Face `tokenizers` format) and its labels
(a JSON list of label names in id order, or the model's config.json with "id2label"). Every
token whose most likely label is not "O" (and, if given, is one of `labels`) becomes a
Finding; TransformConfig(detector=...) merges them with the rules so that the detector can only
add protection, never remove it (docs/privacy.md).

Only this module needs more than the standard library (onnxruntime, tokenizers, numpy), and it
imports them when a detector is made. The transform runs the detector on the first candidate
with the rewritten words masked out, so its answer is the same whichever value is real.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..sensitive import Finding
from .schema import ObliviousError

OUTSIDE = "O"


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Label names in id order: a JSON list, or a config.json with "id2label"."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ObliviousError(f"cannot read the detector's labels {str(path)!r}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("id2label"), dict):
        table = data["id2label"]
        try:
            ids = sorted(int(k) for k in table)
        except ValueError as exc:
            raise ObliviousError(f"{str(path)!r}: id2label keys must be label ids (0, 1, ...)") from exc
        if ids != list(range(len(ids))):
            raise ObliviousError(f"{str(path)!r}: id2label must number the labels 0..{len(ids) - 1}")
        data = [table[str(i)] if str(i) in table else table[i] for i in ids]
    if not isinstance(data, list) or not data or not all(isinstance(x, str) and x for x in data):
        raise ObliviousError(f"{str(path)!r} must be a JSON list of label names in id order, or a config.json "
                             f"with 'id2label'")
    return tuple(data)


def entity(label: str) -> str:
    """The entity a BIO label marks: "B-NAME" and "I-NAME" -> "NAME"."""
    return label[2:] if label[:2] in ("B-", "I-", "E-", "S-") else label


class OnnxTokenClassifier:
    """A token classifier as a SpanDetector: find(text) -> the stretches it labels."""

    def __init__(self, model: str | Path, tokenizer: str | Path, labels: str | Path,
                 only: Iterable[str] | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
        from tokenizers import Tokenizer

        from obclip.runtime.sessions import SessionConfig, open_session

        for what, path in (("model", model), ("tokenizer", tokenizer)):
            if not Path(path).is_file():
                raise ObliviousError(f"detector {what} {str(path)!r} does not exist")
        self.labels = read_labels(labels)
        self.only = frozenset(entity(x) for x in only) if only is not None else None
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.session = open_session(model, SessionConfig(providers=tuple(providers)))
        self.inputs = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in self.inputs:
            raise ObliviousError(f"detector model {str(model)!r} has inputs {self.inputs}; a token classifier "
                                 f"takes 'input_ids' (and optionally 'attention_mask', 'token_type_ids')")

    @classmethod
    def from_folder(cls, folder: str | Path, only: Iterable[str] | None = None) -> OnnxTokenClassifier:
        """A folder as an ONNX export of a Hugging Face token classifier leaves it: model.onnx,
        tokenizer.json, and labels.json or config.json."""
        folder = Path(folder)
        labels = folder / "labels.json" if (folder / "labels.json").is_file() else folder / "config.json"
        return cls(folder / "model.onnx", folder / "tokenizer.json", labels, only)

    def find(self, text: str) -> list[Finding]:
        import numpy as np  # here, so that importing the transform stays standard library only

        enc = self.tokenizer.encode(text)
        if not enc.ids:
            return []
        ids = np.asarray([enc.ids], dtype=np.int64)
        feed: dict[str, Any] = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.asarray([enc.attention_mask], dtype=np.int64)
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.asarray([enc.type_ids], dtype=np.int64)
        logits = np.asarray(self.session.run(None, feed)[0])
        if logits.ndim != 3 or logits.shape[:2] != ids.shape or logits.shape[2] != len(self.labels):
            raise ObliviousError(f"detector output has shape {tuple(logits.shape)}; expected (1, {ids.shape[1]}, "
                                 f"{len(self.labels)}) for {len(self.labels)} labels")
        best = logits[0].argmax(axis=-1)
        out: list[Finding] = []
        for k, (start, end) in enumerate(enc.offsets):
            name = entity(self.labels[int(best[k])])
            if end <= start or name == OUTSIDE or (self.only is not None and name not in self.only):
                continue
            if out and out[-1].attribute == f"detector:{name}" and not text[out[-1].end:start].strip():
                prev = out.pop()  # one stretch: the word pieces and words of one entity
                start = prev.start
            out.append(Finding(start, end, text[start:end], f"detector:{name}", "learned detector",
                               "words the detector does not label"))
        return out

"""CLIP tokenization without transformers: ``tokenizers`` reading an exported tokenizer.json.

The one place token ids are built for an exported text encoder (device engines, the onnxruntime
cloud backend, export's checks): BOS + BPE + EOS, padded to the context length, the same ids as
transformers' CLIPTokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import InputError


class PromptTooLongError(InputError):
    """A prompt (or candidate) longer than the text encoder's context."""


class ClipTokenizer:
    """Same ids as the cloud's transformers CLIPTokenizer: BOS + BPE + EOS, padded to max_length."""

    def __init__(self, path: str | Path, max_length: int, pad_token_id: int, *, json: str | None = None):
        """From ``path`` (a tokenizer.json), or from its text ``json`` when given (then ``path`` only names it)."""
        self._tok = Tokenizer.from_str(json) if json is not None else Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    @property
    def backend(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` (no padding, no truncation), for word-level alignment."""
        return self._tok

    def count(self, text: str) -> int:
        """Number of tokens including BOS and EOS."""
        return len(self._tok.encode(text).ids)

    def check_fits(self, texts: Sequence[str], what: str = "prompt") -> None:
        """Raise if any text exceeds the context; names the longest one."""
        counts = [self.count(t) for t in texts]
        worst = int(np.argmax(counts))
        if counts[worst] > self.max_length:
            raise PromptTooLongError(
                f"{what} is {counts[worst]} tokens, over the text encoder's limit of {self.max_length} "
                f"(including start/end tokens): {texts[worst]!r}; shorten the prompt")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids [len(texts), max_length] (int64); a text over the context is a PromptTooLongError."""
        self.check_fits(texts)
        ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            enc = self._tok.encode(text).ids
            ids[row, : len(enc)] = enc
        return ids

"""CLIP tokenization on the device: ``tokenizers`` reading the exported tokenizer.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class PromptTooLongError(ValueError):
    """A prompt (or candidate) longer than the text encoder's context."""


class ClipTokenizer:
    """Same ids as the cloud's transformers CLIPTokenizer: BOS + BPE + EOS, padded to max_length."""

    def __init__(self, path: str | Path, max_length: int, pad_token_id: int):
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

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

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.check_fits(texts)
        ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            enc = self._tok.encode(text).ids
            ids[row, : len(enc)] = enc
        return ids

"""Tokenizer of a package (`tokenizer.json`, through `tokenizers`) and streaming detokenization.

`TextStream` turns a growing list of token ids into text pieces as they become final:
a token that ends in the middle of a multi-byte character yields nothing until the
character is complete, so a stream never shows a replacement character that the full
decode would not.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer

from llmc.errors import LlmcError

INCOMPLETE = "\ufffd"


def _return_freed_memory() -> None:
    """Give the pages malloc holds free back to the system. Parsing tokenizer.json frees about
    15 MB of buffers that glibc would otherwise keep, counted in the process's peak memory once
    the weights are mapped beside them."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries may lack it
    if trim is not None:
        trim(0)


class Tokenizer:
    def __init__(self, path: Path):
        if not path.is_file():
            raise LlmcError(f"the package has no tokenizer ({path.name} is missing); pass token ids instead of text")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own Exception subclass
            raise LlmcError(f"{path} is not a valid tokenizer.json: {error}") from None
        _return_freed_memory()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:  # lone surrogates: undecodable bytes in argv, "\ud800" in JSON
            raise LlmcError(f"the text is not valid Unicode: {error.reason} at character {error.start}") from None
        # encode_batch, unlike encode, lets go of the GIL: a long prompt does not stall the server's other threads.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


class TextStream:
    """Incremental detokenizer: `push(token)` returns the text that token completes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            self._prefix, self._read = self._read, len(self.tokens)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character stays as the replacement character)."""
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return after[len(before):]

"""Constrained decoding: a request's output held to a grammar (a JSON schema, any JSON object, GBNF or
Lark, or llmc's tool-call grammars), through llguidance: it has no Python dependencies (xgrammar pulls
torch into the runtime), computes a token mask in microseconds with the GIL released, and is imported
at the first grammar. JSON is held to `json.dumps`'s layout (", ", ": ", no other whitespace): free
whitespace would let a sampled model pad forever.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import numpy as np

from llmc.errors import LlmcError

if TYPE_CHECKING:
    import llguidance

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_KINDS = ("json_schema", "json_object", "grammar", "lark")
# Masks expected to take less than this (by the time each constraint's last one took) are computed in the
# caller's thread before the step: waking another thread costs more, and on a CPU it takes a core from the model.
OVERLAP_ABOVE_S = 200e-6
CACHED_GRAMMARS = 64
T = TypeVar("T")


class GrammarError(LlmcError):
    """A grammar or schema that cannot constrain decoding: invalid, or using what the engine lacks."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. `kind`: `json_schema` (`source` is the schema as JSON text),
    `json_object` (any JSON object), `grammar` (GBNF or Lark text, as llama.cpp's `grammar` field takes)
    or `lark` (a Lark grammar in llguidance's dialect, which llmc writes for tool calls)."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema is an object (or true); got "
                               f"{'false, which nothing matches' if schema is False else type(schema).__name__}")
        try:
            return cls("json_schema", json.dumps(schema, allow_nan=False))  # key order kept: the output follows it
        except ValueError:
            raise GrammarError("the JSON schema holds Infinity or NaN, which JSON does not have") from None

    @property
    def what(self) -> str:
        return {"json_schema": "the JSON schema", "json_object": "the JSON object grammar"}.get(self.kind, "the grammar")

    def llguidance_grammar(self) -> str:
        import llguidance
        from llguidance.gbnf_to_lark import any_to_lark

        if self.kind in ("json_schema", "json_object"):
            schema = self.source if self.kind == "json_schema" else {"type": "object"}
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
            except ValueError as error:
                raise GrammarError(f"the JSON schema cannot constrain decoding: {error}") from None
        if self.kind == "grammar":
            try:
                return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.source))
            except Exception as error:  # the GBNF converter raises what its parser meets
                raise GrammarError(f"the grammar is neither valid GBNF nor Lark: {error}") from None
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        raise GrammarError(f"unknown grammar kind {self.kind!r}; llmc takes {', '.join(GRAMMAR_KINDS)}")


class Constraint:
    """One request's place in its grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._fresh = False  # whether _bits holds the mask of the current state
        self.mask_seconds = 0.0  # how long the last mask took

    @property
    def needs_mask(self) -> bool:
        return not self._fresh

    def prepare(self) -> None:
        """Compute the mask of the current state (GIL released), if not done yet."""
        if not self._fresh:
            started = time.perf_counter()
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self.mask_seconds = time.perf_counter() - started
            self._fresh = True

    def allowed(self) -> np.ndarray:
        """A boolean per token of the vocabulary: may it come next?"""
        self.prepare()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size].view(bool)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not continue the grammar: {self.matcher.get_error()}")
        self._fresh = False

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar would take from here."""
        return self.matcher.validate_tokens(tokens)

    @property
    def complete(self) -> bool:
        """The grammar takes no more tokens (only the end of sequence)."""
        return self.matcher.is_stopped()


class Grammars:
    """A tokenizer's compiled grammars. llguidance's view of the tokenizer takes ~0.2 s to build, so it is
    built at the first constrained request. The `CACHED_GRAMMARS` most recently used specs keep a matcher in
    its start state, which each request copies instead of building the grammar again."""

    def __init__(self, tokenizer_json: Callable[[], str], eos_ids: list[int], vocab_size: int):
        self._tokenizer_json = tokenizer_json
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._start_states: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance

        if self._tokenizer is None:
            try:
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size,
                                                         eos_token=self.eos_ids or None)
            except Exception as error:  # llguidance raises ValueError/RuntimeError on tokenizers it cannot read
                raise GrammarError(f"constrained decoding cannot use this package's tokenizer: {error}") from None
        return self._tokenizer

    def constraint(self, spec: GrammarSpec) -> Constraint:
        """A request's own place in `spec`'s grammar; GrammarError naming what is wrong or unsupported."""
        import llguidance

        start = self._start_states.get(spec)
        if start is None:
            grammar = spec.llguidance_grammar()
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            start = None if failed else llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if failed or start.is_error():
                message = messages[0] if failed else start.get_error()
                raise GrammarError(f"{spec.what} cannot constrain decoding: {_readable(message)}")
            self._start_states[spec] = start
            if len(self._start_states) > CACHED_GRAMMARS:
                self._start_states.popitem(last=False)
        self._start_states.move_to_end(spec)
        return Constraint(start.deep_copy(), self.vocab_size)


_mask_thread: ThreadPoolExecutor | None = None


def masks_during(constraints: Iterable[Constraint], work: Callable[[], T]) -> T:
    """Run `work` (a model step) while another thread computes the constraints' next masks (when they are
    expected to take OVERLAP_ABOVE_S or more; else here, first)."""
    global _mask_thread
    pending = [c for c in constraints if c.needs_mask]
    if sum(c.mask_seconds for c in pending) < OVERLAP_ABOVE_S:
        for constraint in pending:
            constraint.prepare()
        return work()
    if _mask_thread is None:
        _mask_thread = ThreadPoolExecutor(1, thread_name_prefix="llmc-grammar")
    masks = _mask_thread.submit(_prepare_each, pending)
    try:
        return work()
    finally:
        masks.result()


def _prepare_each(constraints: list[Constraint]) -> None:
    """Compute each mask; one that fails stays to compute, so that its request alone fails, when it asks for it."""
    for constraint in constraints:
        try:
            constraint.prepare()
        except BaseException:  # llguidance's panics are BaseExceptions; the request's own call raises it again
            pass


def _readable(message: str) -> str:
    """llguidance's error, without its internal prefixes."""
    for prefix in ("Error creating grammar: ", "Grammar error: "):
        message = message.removeprefix(prefix)
    return message.strip()

"""Constrained decoding: a request's output held to a grammar, through llguidance.

A `GrammarSpec` says what the output must be: JSON valid against a schema, any JSON object,
a Lark or GBNF grammar, or a grammar llmc builds (tool calls, runtime/tool_calls.py). The
`Grammars` of an engine compile specs against the package's tokenizer (once each, cached) and
give each request its own `Constraint`: the set of tokens the grammar allows next, as a mask
over the vocabulary, and the state that each accepted token advances.

llguidance was chosen over xgrammar: it has no Python dependencies, where xgrammar pulls torch,
transformers, triton and pydantic into the runtime, which must stay free of them. It computes a
mask in microseconds to a fraction of a millisecond and lets go of the GIL while it does, so the
scheduler computes the masks of the next tokens while the model runs the step that produces
their logits (`masks_during`).

JSON is generated in one layout, that of Python's `json.dumps`: ", " between items, ": " after
keys, no other whitespace. Free whitespace would let a sampled model pad its output forever;
this layout is also the one models see most. llguidance is imported at the first grammar (35 ms),
not when the runtime starts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import numpy as np

from llmc.errors import LlmcError

if TYPE_CHECKING:
    import llguidance

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_KINDS = ("json_schema", "json_object", "grammar", "lark")
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
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object (or true/false), not {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))  # key order kept: properties are generated in it

    @property
    def what(self) -> str:
        return {"json_schema": "the JSON schema", "json_object": "the JSON object grammar"}.get(self.kind, "the grammar")

    def llguidance_grammar(self) -> str:
        import llguidance
        from llguidance.gbnf_to_lark import any_to_lark

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_LAYOUT)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_LAYOUT)
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

    @property
    def needs_mask(self) -> bool:
        return not self._fresh

    def prepare(self) -> None:
        """Compute the mask of the current state (GIL released), if not done yet."""
        if not self._fresh:
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
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
    built at the first constrained request; a spec's grammar is checked once and kept."""

    def __init__(self, tokenizer_json: Callable[[], str], eos_ids: list[int], vocab_size: int):
        self._tokenizer_json = tokenizer_json
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: dict[GrammarSpec, str] = {}

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

    def compile(self, spec: GrammarSpec) -> str:
        """The checked llguidance grammar for `spec`; GrammarError naming what is wrong or unsupported."""
        import llguidance

        if spec not in self._compiled:
            grammar = spec.llguidance_grammar()
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if failed:
                raise GrammarError(f"{spec.what} cannot constrain decoding: {_readable(messages[0])}")
            self._compiled[spec] = grammar
        return self._compiled[spec]

    def constraint(self, spec: GrammarSpec) -> Constraint:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, self.compile(spec), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.what} cannot constrain decoding: {_readable(matcher.get_error())}")
        return Constraint(matcher, self.vocab_size)


_mask_thread: ThreadPoolExecutor | None = None


def masks_during(constraints: Iterable[Constraint], work: Callable[[], T]) -> T:
    """Run `work` (a model step) while another thread computes the constraints' next masks."""
    global _mask_thread
    pending = [c for c in constraints if c.needs_mask]
    if not pending:
        return work()
    if _mask_thread is None:
        _mask_thread = ThreadPoolExecutor(1, thread_name_prefix="llmc-grammar")
    masks = _mask_thread.submit(lambda: [c.prepare() for c in pending])
    try:
        return work()
    finally:
        masks.result()


def _readable(message: str) -> str:
    """llguidance's error, without its internal prefixes."""
    for prefix in ("Error creating grammar: ", "Grammar error: "):
        message = message.removeprefix(prefix)
    return message.strip()

"""The Python API over a package: score, generate, stream and chat.

`llmc.load(DIR)` returns an `Engine`. `forward(ids)` gives the logits of every position
(perplexity and scoring); `generate` and `chat` run one request at a time (prefill in
chunks, then decode) and can stream text through a callback; `stream` yields the text
pieces as they come. With `speculation`, decoding checks drafted tokens several at a time
(runtime/speculation.py). A request whose `SamplingParams.grammar` is set is held to it
(runtime/grammar.py), here and in the batching engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from llmc.errors import LlmcError

from .chat_template import ChatTemplate, Message
from .grammar import Grammars, masks_during
from .model import CacheSettings, CompiledModel, ContextOverflow, check_fits
from .package import Package
from .request import Generation, Request
from .sampling import SamplingParams
from .speculation import Speculation, speculates, speculators
from .tokenizer import Tokenizer
from .validation import InvalidParameter

TOKENIZER_FILE = "tokenizer.json"


class Engine:
    def __init__(self, path: str | Path, device: str = "cpu", cache: CacheSettings | None = None,
                 speculation: Speculation | None = None):
        self.package = Package.open(path)
        self.package.require_one_device()
        info = self.package.metadata.get("tokenizer") or {}
        self.eos_ids: list[int] = list(info.get("eos_token_ids", []))
        # The weights' checksum runs on the other core while the tokenizer loads.
        self.package.map_weights()
        self.tokenizer = Tokenizer(self._tokenizer_file(info.get("file", TOKENIZER_FILE))) if info else None
        template = info.get("chat_template")
        self.chat_template = (ChatTemplate(template, {"bos_token": info.get("bos_token"),
                                                      "eos_token": info.get("eos_token")}) if template else None)
        self.model = CompiledModel(self.package, device, cache)
        self.grammars = (Grammars(lambda: self.tokenizer.backend.to_str(), self.eos_ids, self.model.vocab_size)
                         if self.tokenizer is not None else None)
        self.speculators = speculators(speculation, self.model, device) if speculation else None

    def _tokenizer_file(self, name: str) -> Path:
        """The tokenizer file, checked against its checksum when the package records it."""
        if name in self.package.metadata["files"]:
            return self.package.verified(name)
        return self.package.path / name

    @property
    def context_length(self) -> int:
        return self.model.context_length

    # -- prompts ---------------------------------------------------------------------------------------
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LlmcError(f"the package {self.package.path} has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._require_tokenizer().encode(text)

    def chat_prompt(self, messages: Sequence[Message], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's turn."""
        if self.chat_template is None:
            raise LlmcError("the model has no chat template; send the prompt as raw text")
        return self.encode(self.chat_template.render(messages, add_generation_prompt=True, tools=tools))

    def prompt_ids(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids for `prompt`: given ids as they are; text as is, or as one user message in
        the chat template when `chat` and the model has one."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat and self.chat_template is not None:
            return self.chat_prompt([{"role": "user", "content": prompt}])
        return self.encode(prompt)

    # -- scoring ---------------------------------------------------------------------------------------
    def forward(self, input_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits of every position, shape (len(input_ids), vocab)."""
        ids = [int(t) for t in np.asarray(input_ids).reshape(-1)]
        if not ids:
            raise LlmcError("forward needs at least one token")
        self._check_length(len(ids))
        return self.model.score(ids)

    def _check_length(self, count: int) -> None:
        if count > self.context_length:
            raise ContextOverflow(f"the prompt has {count} tokens, more than the model's context window of "
                                  f"{self.context_length} tokens")

    # -- generation ------------------------------------------------------------------------------------
    def _run(self, request: Request) -> Iterator[str]:
        """Prefill what the prefix cache lacks of the prompt, then decode; a finished sequence stays cached."""
        cache, prefix = self.model.cache, self.model.prefix
        ids, chunk = request.prompt_ids, cache.prefill_chunk
        seq_id, cached = prefix.start(ids)
        finished = False

        speculator = self.speculators() if self.speculators and speculates(request.params) else None

        def step(tokens: list[int], rows: int = 1):
            length = cache.lengths[seq_id]
            prefix.make_room(cache.pages_for(length + len(tokens)) - cache.pages_for(length))
            return self.model.step([seq_id], [tokens], [rows])
        constraints = [request.constraint] if request.constraint is not None else []
        try:
            logits = None
            for start in range(cached, len(ids), chunk):
                tokens = ids[start:start + chunk]
                logits = masks_during(constraints, lambda: step(tokens))
            text = request.accept(logits[0])
            while True:
                if text:
                    yield text
                if request.done:
                    finished = True
                    return
                draft = speculator.draft_for(request, self.context_length, self.model.tokens_before_slow_kernels(1),
                                             self.model.step_cost) if speculator else []
                if not draft:
                    text = request.accept(masks_during(constraints, lambda: step([request.next_input]))[0])
                    continue
                length = cache.lengths[seq_id]
                text, kept = speculator.check(request, step([request.next_input, *draft], len(draft) + 1), draft)
                cache.truncate(seq_id, length + 1 + kept)
        finally:
            if speculator is not None:
                speculator.close()
            if finished:
                prefix.finish(seq_id, (ids + request.output_ids)[:cache.lengths[seq_id]])
            else:
                prefix.remove(seq_id)

    def new_request(self, prompt_ids: Sequence[int], params: SamplingParams, context_length: int) -> Request:
        """A request for this engine's model, its grammar compiled (LlmcError for a bad grammar, bias or prompt)."""
        if not prompt_ids:
            raise LlmcError("the prompt is empty")
        self.model.check_tokens(prompt_ids)
        biased = [token for token, _ in params.logit_bias]
        if biased and max(biased) >= self.model.vocab_size:
            raise InvalidParameter("logit_bias", f"logit_bias names token {max(biased)}, outside the vocabulary "
                                                 f"(0..{self.model.vocab_size - 1})")
        constraint = None
        if params.grammar is not None:
            if self.grammars is None:
                raise LlmcError(f"the package {self.package.path} has no tokenizer, which a grammar needs")
            constraint = self.grammars.constraint(params.grammar)
        return Request(prompt_ids, params, self.tokenizer, self.eos_ids, context_length, constraint)

    def _request(self, prompt_ids: Sequence[int], params: SamplingParams | None) -> Request:
        params = params or SamplingParams()
        check_fits(len(prompt_ids), params.max_tokens, self.context_length)
        return self.new_request(prompt_ids, params, self.context_length)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, chat: bool = False,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        request = self._request(self.prompt_ids(prompt, chat), params)
        for text in self._run(request):
            if on_text is not None:
                on_text(text)
        return request.result()

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[str]:
        yield from self._run(self._request(self.prompt_ids(prompt, chat), params))

    def chat(self, messages: Sequence[Message], params: SamplingParams | None = None,
             on_text: Callable[[str], None] | None = None) -> Generation:
        request = self._request(self.chat_prompt(messages), params)
        for text in self._run(request):
            if on_text is not None:
                on_text(text)
        return request.result()


def load(path: str | Path, device: str = "cpu", cache: CacheSettings | None = None,
         speculation: Speculation | None = None) -> Engine:
    return Engine(path, device, cache, speculation)

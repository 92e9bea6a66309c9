"""The model's chat template, rendered with jinja2 the way Hugging Face renders it.

Same environment (sandboxed, trim_blocks, lstrip_blocks, loop controls), the same
helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text) and
the same variables (`messages`, `add_generation_prompt`, the special tokens), so a
prompt renders to exactly the text, and thus the token ids, that
`apply_chat_template(..., add_generation_prompt=True)` gives.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Sequence

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmc.errors import LlmcError

Message = dict[str, Any]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str | None]):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = environment.from_string(source)
            self.variables = meta.find_undeclared_variables(environment.parse(source))
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise LlmcError(f"the model's chat template is not valid jinja2: {error}") from None
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def reads(self, variable: str) -> bool:
        """Whether the template uses `variable` (`tools`, say) at all."""
        return variable in self.variables

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt text; `tools` (OpenAI function definitions) go to the template as transformers passes them."""
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise LlmcError(f"chat message {index} needs a 'role' and a 'content'")
        extra = {"tools": tools} if tools else {}
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **extra)
        except jinja2.exceptions.TemplateError as error:
            raise LlmcError(f"the model's chat template refused the conversation: {error}") from None

"""Tool calls in chat completions: OpenAI's `tools` and `tool_choice` into the prompt (the template's
`tools`, or a system message for a template without them) and into a grammar that forces each call to
parse against its tool's parameters; calls out of the model's text, whole or streamed. Calls use the
Hermes format (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`) of Qwen, Hermes, SmolLM3.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llmc.errors import LlmcError

from .grammar import JSON_LAYOUT, GrammarSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)


class ToolError(LlmcError):
    """A `tools`, `tool_choice` or message field the server refuses; `param` names it."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and which it must call: `forced` is a tool's name, `*` for any (required),
    or None (auto); with `parallel` false, auto allows at most one call."""

    tools: tuple[Tool, ...]
    forced: str | None
    parallel: bool = True

    def grammar(self) -> GrammarSpec:
        tools = [t for t in self.tools if self.forced in (None, "*", t.name)]
        call = {"anyOf": [_call_schema(t) for t in tools]} if len(tools) > 1 else _call_schema(tools[0])
        body = f'"\\n" %json {json.dumps({**call, "x-guidance": JSON_LAYOUT})} "\\n{CALL_CLOSE}"'
        if self.forced is not None:
            return GrammarSpec("lark", f'start: "{CALL_OPEN}" {body}\n')
        # Free text, in which each `<tool_call>` (found lazily, wherever the text has it) starts a call; the text
        # after the last call holds no `<tool_call>`.
        return GrammarSpec("lark", "%llguidance {}\n"
                                   f"start: call{'*' if self.parallel else '?'} TAIL\n"
                                   f"call: call_open {body}\n"
                                   f'call_open[lazy]: TEXT "{CALL_OPEN}"\n'
                                   "TEXT: /(.|\\n)*/\n"
                                   f"TAIL: /(.|\\n)*/ & ~/(.|\\n)*{CALL_OPEN}(.|\\n)*/\n")


def _call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_tools(tools: Any, tool_choice: Any) -> ToolUse | None:
    """The request's tool use, or None (no tools, or `tool_choice` "none"); ToolError for a bad field."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    parsed = tuple(_tool(entry, index) for index, entry in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) < len(names):
        raise ToolError(f"'tools' names a function twice: {sorted(n for n in names if names.count(n) > 1)[0]}",
                        "tools")
    if tool_choice in (None, "auto"):
        return ToolUse(parsed, None)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolUse(parsed, "*")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
            isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise ToolError(f"'tool_choice' names function {name!r}, which 'tools' does not have", "tool_choice")
        return ToolUse(parsed, name)
    raise ToolError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                    "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def _tool(entry: Any, index: int) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
        raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
    function = entry["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'", "tools")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ToolError(f"{where}.function.description must be a string", "tools")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
    return Tool(name, description, parameters)


def special_markers(tokenizer: Any) -> bool:
    """Whether a `tokenizers.Tokenizer` holds the call markers as special tokens: llguidance keeps those apart
    from text, so the grammar's literal markers could not be written with them, and decoding would drop them."""
    return any(added.special and added.content in (CALL_OPEN, CALL_CLOSE)
               for added in tokenizer.get_added_tokens_decoder().values())


# -- the prompt ------------------------------------------------------------------------------------------
def tools_system_text(tools: tuple[Tool, ...]) -> str:
    """What a template that does not read `tools` gets told, in a system message."""
    listing = "\n".join(json.dumps(t.openai()["function"]) for t in tools)
    return ("You can call functions to answer. They are, one JSON object each:\n<tools>\n" + listing +
            "\n</tools>\nTo call one, answer with only\n" + CALL_OPEN +
            '\n{"name": "<function name>", "arguments": {<its arguments>}}\n' + CALL_CLOSE)


def call_text(name: str, arguments: Any) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CALL_CLOSE}"


# -- the output ------------------------------------------------------------------------------------------
def new_call(name: str, arguments: Any) -> dict:
    """An OpenAI `tool_calls` entry."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def _parse_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return new_call(call["name"], call.get("arguments", {}))


def split_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside calls, None if there is none; the calls) of a whole output. Where there are calls,
    whitespace next to them is dropped; a block that does not parse stays in the text."""
    calls, segments, position = [], [], 0
    for match in _CALL_BLOCK.finditer(text):
        call = _parse_call(match.group(1))
        if call is None:
            continue
        segments.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    segments.append(text[position:])
    if not calls:
        return text, []
    content = segments[0].rstrip() + "".join(segment.strip() for segment in segments[1:])
    return content or None, calls


class CallStream:
    """Splits streamed text into text deltas and whole calls, as `split_calls` splits the whole text: text that
    could begin `<tool_call>` is held until it is known not to, a call is emitted when its block closes, and
    whitespace is held until text follows it (whitespace next to a call is dropped)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.spaces = ""  # whitespace emitted text ended with, not sent yet
        self.calls = 0
        self._after_call = False  # the next text follows a call: its leading whitespace is dropped

    def push(self, delta: str) -> tuple[str, list[dict]]:
        """(text to emit now, calls completed by this delta)."""
        self.buffer += delta
        text, calls = "", []
        while True:
            start = self.buffer.find(CALL_OPEN)
            if start < 0:
                safe = len(self.buffer) - _held_prefix(self.buffer)
                text += self._text(self.buffer[:safe])
                self.buffer = self.buffer[safe:]
                break
            end = self.buffer.find(CALL_CLOSE, start)
            if end < 0:
                text += self._text(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            call = _parse_call(self.buffer[start + len(CALL_OPEN):end].strip())
            stop = end + len(CALL_CLOSE)
            if call is None:
                text += self._text(self.buffer[:stop])
            else:
                text += self._text(self.buffer[:start])
                self.spaces = ""
                self._after_call = True
                self.calls += 1
                calls.append(call)
            self.buffer = self.buffer[stop:]
        return text, calls

    def _text(self, piece: str) -> str:
        """What of `piece` to send: whitespace waits for the text after it; none right after a call."""
        body = piece.rstrip()
        if not body:
            self.spaces += piece
            return ""
        out = self.spaces + piece[:len(body)]
        if self._after_call:
            out = out.lstrip()
        self.spaces = piece[len(body):]
        self._after_call = False
        return out

    def flush(self) -> str:
        """What is held at the end: a call that never closed is text; trailing whitespace only without calls."""
        text = self._text(self.buffer)
        self.buffer = ""
        return text + (self.spaces if not self.calls else "")


def _held_prefix(text: str) -> int:
    """The length of the longest end of `text` that begins `<tool_call>`."""
    for size in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0

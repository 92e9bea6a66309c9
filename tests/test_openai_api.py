"""The OpenAI API beyond plain generation, through the official client against the tiny chat model:
response formats and grammars, tool calls, log-probabilities, penalties, logit bias and the smaller
fields; and a 400 naming the field for each bad value, after which the server goes on serving."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from llmc.runtime.chat_template import ChatTemplate
from llmc.runtime.model import CacheSettings
from server_process import MODEL, ServerThread
from tiny_models import build_chat_package

SCHEMAS = sorted((Path(__file__).parent / "data" / "schemas").glob("*.json"))
USER = [{"role": "user", "content": "the quick brown fox"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": json.loads((Path(__file__).parent / "data" / "schemas" / "weather_call_args.json").read_text())}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny chat model with 2,048 positions: tool definitions take ~700 of its byte-level tokens."""
    package = build_chat_package(tmp_path_factory.mktemp("chat-2k"), context=2048)
    with ServerThread(package, CacheSettings(max_total_tokens=8192, max_batch_size=16, prefill_chunk=256)) as s:
        yield s


def _ids(entries) -> list[int]:
    """The token ids of logprobs entries asked for with return_tokens_as_token_ids."""
    return [int(e.token.removeprefix("token_id:")) for e in entries]


def _ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


# -- response formats and grammars ------------------------------------------------------------------------
@pytest.mark.parametrize("path", SCHEMAS[::3], ids=lambda p: p.stem)
def test_json_schema_response_format_in_both_endpoints(server, path):
    schema = json.loads(path.read_text())
    response_format = {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}
    chat = server.client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, seed=7, max_tokens=200,
                                                 response_format=response_format)
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    completion = server.client.completions.create(model=MODEL, prompt="the lazy dog", temperature=1.0, seed=8,
                                                  max_tokens=200, extra_body={"response_format": response_format})
    jsonschema.validate(json.loads(completion.choices[0].text), schema)
    streamed = server.client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, seed=7,
                                                     max_tokens=200, response_format=response_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_json_object_and_grammar_fields(server):
    """Any JSON object; its strings are free, so the random model is nudged (with a logit bias) to close them."""
    engine = server.engine.engine
    closers = {str(engine.encode(c)[0]): 4 for c in ('"', "}")}
    reply = server.client.chat.completions.create(model=MODEL, messages=USER, temperature=1.0, max_tokens=200,
                                                  response_format={"type": "json_object"}, n=3, logit_bias=closers)
    assert all(c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict) for c in reply.choices)
    grammar = 'root ::= ("fox" | "dog") " " [0-9]'
    texts = {server.client.completions.create(model=MODEL, prompt="x", temperature=1.0, seed=seed, max_tokens=10,
                                              extra_body={"grammar": grammar}).choices[0].text for seed in range(6)}
    assert all(t[:3] in ("fox", "dog") and t[4].isdigit() and len(t) == 5 for t in texts)


# -- tool calls ---------------------------------------------------------------------------------------------
def _valid_call(call, tools=(WEATHER, CLOCK)) -> None:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_always_parse_and_validate(server, choice):
    for seed in range(6):
        reply = server.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER, CLOCK],
                                                      tool_choice=choice, temperature=1.0, seed=seed, max_tokens=200)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
        assert len(message.tool_calls) == 1
        _valid_call(message.tool_calls[0])
        if isinstance(choice, dict):
            assert message.tool_calls[0].function.name == "get_time"


def test_streamed_tool_calls_equal_the_whole_reply(server):
    args = dict(model=MODEL, messages=USER, tools=[WEATHER, CLOCK], tool_choice="required", temperature=1.0, seed=3,
                max_tokens=200)
    whole = server.client.chat.completions.create(**args).choices[0]
    calls, finish = [], None
    for chunk in server.client.chat.completions.create(stream=True, **args):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and [c.index for c in calls] == [0]
    assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == \
        (whole.message.tool_calls[0].function.name, json.loads(whole.message.tool_calls[0].function.arguments))


def test_auto_tool_choice_gives_text_or_valid_calls(server):
    """The random model writes text (the grammar's call path is tested below, without a model); a call begun and
    cut by max_tokens is the one way `<tool_call>` could stay in the text."""
    for seed in range(8):
        choice = server.client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER], temperature=1.0,
                                                       seed=seed, max_tokens=120).choices[0]
        for call in choice.message.tool_calls or []:
            _valid_call(call)
        assert "<tool_call>" not in (choice.message.content or "") or choice.finish_reason == "length"


def test_tools_and_results_go_through_the_template(server):
    """A template that does not read `tools` gets them, the calls and the results as text."""
    engine = server.engine.engine
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 degrees"}]
    reply = server.client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=5,
                                                  temperature=0)
    assert reply.usage.prompt_tokens > 0
    from llmc.runtime.openai_protocol import _chat_prompt  # what the server ran
    from llmc.runtime.tool_calls import parse_tools
    text = engine.tokenizer.decode(_chat_prompt({"messages": history}, server.engine, parse_tools([WEATHER], None)))
    assert '"name": "get_weather"' in text and "<tool_response>\n-3 degrees\n</tool_response>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in text


def test_a_template_that_reads_tools_gets_them_as_transformers_passes_them():
    source = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
              "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% else %}{{ m.content }}{% endif %};"
              "{% endfor %}")
    template = ChatTemplate(source, {})
    assert template.reads("tools") and not ChatTemplate("{{ messages }}", {}).reads("tools")
    messages = [{"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"city": "Oslo"}}}]}]
    assert template.render(messages, tools=[WEATHER]) == "[get_weather]assistant:Oslo;"


# -- log-probabilities ----------------------------------------------------------------------------------------
def test_top_logprobs_are_the_log_softmax_of_the_engines_logits(server):
    engine = server.engine.engine
    reply = server.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=1.0, seed=2,
                                                  logprobs=True, top_logprobs=5,
                                                  extra_body={"return_tokens_as_token_ids": True})
    prompt = engine.chat_prompt(USER)
    entries = reply.choices[0].logprobs.content
    tokens = _ids(entries)
    assert engine.tokenizer.decode(tokens) == reply.choices[0].message.content
    for position, entry in enumerate(entries):
        expected = _log_softmax(engine.forward(prompt + tokens[:position])[-1])
        best = np.argsort(-expected, kind="stable")[:5]
        assert _ids(entry.top_logprobs) == best.tolist()
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], expected[best], atol=1e-4)
        assert math.isclose(entry.logprob, expected[tokens[position]], abs_tol=1e-4)


def test_a_constrained_tokens_logprob_is_the_unconstrained_one(server):
    engine = server.engine.engine
    schema = json.loads(SCHEMAS[0].read_text())
    reply = server.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=40, temperature=1.0, seed=4, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        extra_body={"return_tokens_as_token_ids": True})
    prompt = engine.chat_prompt(USER)
    entries = reply.choices[0].logprobs.content
    tokens = _ids(entries)
    assert len(tokens) > 5
    for position, entry in enumerate(entries):
        expected = _log_softmax(engine.forward(prompt + tokens[:position])[-1])
        assert math.isclose(entry.logprob, expected[tokens[position]], abs_tol=1e-4)


def test_completion_logprobs_give_the_top_tokens(server):
    reply = server.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=4, temperature=0,
                                             logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens) == 4
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen) and top[token] == pytest.approx(chosen)
    assert server.engine.engine.tokenizer.decode(_ids_of(logprobs.tokens)) == reply.choices[0].text


# -- penalties, bias and the smaller fields ----------------------------------------------------------------
def test_penalties_and_bias_change_the_logits_as_openai_defines(server):
    """Greedy with presence/frequency penalties and a bias picks, each step, the argmax of
    logits - frequency * count - presence * (count > 0) + bias over the tokens generated so far."""
    engine = server.engine.engine
    prompt = engine.encode("the lazy dog the lazy dog")
    bias = {engine.encode(" fox")[0]: 3.5}
    reply = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                             presence_penalty=0.7, frequency_penalty=1.3, logit_bias=bias,
                                             logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    tokens = [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]
    for position, token in enumerate(tokens):
        logits = engine.forward(prompt + tokens[:position])[-1].astype(np.float64)
        seen, counts = np.unique(np.asarray(tokens[:position], dtype=np.int64), return_counts=True)
        logits[seen] -= 1.3 * counts + 0.7
        for key, value in bias.items():
            logits[key] += value
        assert token == int(np.argmax(logits))
    plain = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert plain.choices[0].text != reply.choices[0].text


def test_logit_bias_forces_and_bans_tokens(server):
    engine = server.engine.engine
    fox = engine.encode(" fox")[0]
    forced = server.client.completions.create(model=MODEL, prompt="the", max_tokens=3, temperature=0,
                                              logit_bias={str(fox): 100})
    assert forced.choices[0].text == " fox" * 3
    plain = server.client.completions.create(model=MODEL, prompt="the", max_tokens=1, temperature=0, logprobs=0,
                                             extra_body={"return_tokens_as_token_ids": True})
    first = int(plain.choices[0].logprobs.tokens[0].removeprefix("token_id:"))
    banned = server.client.completions.create(model=MODEL, prompt="the", max_tokens=1, temperature=0, logprobs=0,
                                              logit_bias={str(first): -100},
                                              extra_body={"return_tokens_as_token_ids": True})
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]


def test_echo_stop_lists_seed_and_usage(server):
    echoed = server.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0,
                                              echo=True)
    plain = server.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=5, temperature=0)
    assert echoed.choices[0].text == "the lazy dog" + plain.choices[0].text
    long = server.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=40, temperature=0)
    words = long.choices[0].text.split()
    stopped = server.client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=40, temperature=0,
                                               stop=["@@", words[1]])
    assert stopped.choices[0].text == long.choices[0].text[:long.choices[0].text.index(words[1])]
    seeded = [server.client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=8, seed=11,
                                                    temperature=1.0).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=8,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8
    assert all(c.usage is None for c in chunks[:-1])


# -- bad values ---------------------------------------------------------------------------------------------
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                   "unevaluatedProperties": False}}}


@pytest.mark.parametrize("path, extra, param, says", [
    ("chat", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("chat", {"response_format": SCHEMA_FORMAT}, "response_format", "unevaluatedProperties"),
    ("completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ("chat", {"grammar": "root ::= ("}, "grammar", "GBNF"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
     "response_format", "false"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "number", "maximum": float("inf")}}}}, "response_format", "Infinity"),
    ("chat", {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "not both"),
    ("chat", {"tools": {"name": "f"}}, "tools", "list"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "letters"),
    ("chat", {"tools": [WEATHER, WEATHER]}, "tools", "twice"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                      "unevaluatedProperties": False}}}]},
     "tools", "unevaluatedProperties"),
    ("chat", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ("chat", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ("chat", {"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ("chat", {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools", "cannot be combined"),
    ("chat", {"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs", "between 0 and 5"),
    ("completions", {"echo": True, "logprobs": 0}, "echo", "prompt"),
    ("completions", {"echo": "yes"}, "echo", "bool"),
    ("chat", {"presence_penalty": 2.5}, "presence_penalty", "between -2.0 and 2.0"),
    ("chat", {"frequency_penalty": "high"}, "frequency_penalty", "int or float"),
    ("chat", {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ("chat", {"logit_bias": {"\u00b2": 1}}, "logit_bias", "token ids"),
    ("chat", {"logit_bias": {"9" * 5000: 1}}, "logit_bias", "token ids"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias", "between -100.0 and 100.0"),
    ("chat", {"logit_bias": {"99999": 1}}, "logit_bias", "outside the vocabulary"),
    ("chat", {"logit_bias": [1, 2]}, "logit_bias", "dict"),
    ("chat", {"stop": ["a", 3]}, "stop", "strings"),
    ("chat", {"seed": -1}, "seed", "seed"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("chat", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", "include_usage"),
    ("chat", {"functions": [{"name": "f"}]}, "functions", "not supported"),
    ("completions", {"suffix": "end"}, "suffix", "not supported"),
    ("chat", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f",
                                                                                              "arguments": "{"}}]}]},
     "messages", "not JSON"),
])
def test_bad_values_get_a_400_naming_the_field(server, path, extra, param, says):
    base = {"model": MODEL, "max_tokens": 5}
    base.update({"messages": USER} if path == "chat" else {"prompt": "the"})
    response = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}",
                          content=json.dumps({**base, **extra}),  # Python's JSON, which writes Infinity
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert server.client.completions.create(model=MODEL, prompt="the", max_tokens=2).choices[0].text is not None


def test_the_official_client_gets_the_400(server):
    with pytest.raises(openai.BadRequestError, match="unevaluatedProperties"):
        server.client.chat.completions.create(model=MODEL, messages=USER, response_format=SCHEMA_FORMAT)


# -- the tool-call grammar and parser, without a model ----------------------------------------------------
def test_the_auto_grammar_frees_text_and_holds_calls_to_their_schemas(server):
    from llmc.runtime.tool_calls import parse_tools

    engine = server.engine.engine
    grammars = engine.grammars
    spec = parse_tools([WEATHER, CLOCK], "auto").grammar()

    def takes(text: str) -> bool:
        constraint = grammars.constraint(spec)
        tokens = grammars.tokenizer.tokenize_str(text)
        return constraint.valid_prefix(tokens) == len(tokens)
    assert takes("Just text, with <tags> and {braces}.")
    assert takes('Let me look. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call> done')
    assert not takes('<tool_call>\n{"name": "get_time", "arguments": {"zone": "PST"}}')  # not in the enum
    assert not takes('<tool_call>\n{"name": "send_mail", "arguments": {}}')  # no such tool
    assert not takes('<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius"}}')  # city is required
    single = parse_tools([CLOCK], "auto")
    from dataclasses import replace
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    one = grammars.constraint(replace(single, parallel=False).grammar())
    tokens = grammars.tokenizer.tokenize_str(call + call)
    assert one.valid_prefix(tokens) < len(tokens)


@pytest.mark.parametrize("pieces", [1, 3, 7, 10_000])  # 10,000: one character a delta
def test_streamed_calls_split_as_the_whole_text_does(pieces):
    from llmc.runtime.tool_calls import CallStream, split_calls

    text = ('  Checking <tool_c. <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
            '<tool_call>not json</tool_call> end')
    content, calls = split_calls(text)
    stream, streamed, names = CallStream(), "", []
    size = -(-len(text) // pieces)
    for start in range(0, len(text), size):
        delta, done = stream.push(text[start:start + size])
        streamed += delta
        names += [c["function"]["name"] for c in done]
    streamed += stream.flush()
    assert names == [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert streamed == content == "  Checking <tool_c.<tool_call>not json</tool_call> end"

"""SmolLM2 (as `llmc run smollm2-135m` compiles it: Q4_1/Q8_0) under constrained decoding, sampled at
temperature 1 in one continuous batch: every schema of tests/data/schemas gives JSON that validates, forced
tool calls always parse against their parameters, and `tool_choice: auto` gives text or valid calls."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import llmc
from llmc.runtime.grammar import GrammarSpec
from llmc.runtime.openai_protocol import parse_chat
from llmc.runtime.async_engine import AsyncEngine
from llmc.runtime.model import CacheSettings
from llmc.runtime.request import Request
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.tool_calls import split_calls

pytestmark = pytest.mark.slow
SCHEMAS = sorted((Path(__file__).parent / "data" / "schemas").glob("*.json"))
SEEDS = (0, 1)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": json.loads((Path(__file__).parent / "data" / "schemas" / "weather_call_args.json").read_text())}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                          "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                         "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine(smollm2_auto_package):
    return AsyncEngine(llmc.load(smollm2_auto_package, cache=CacheSettings(max_total_tokens=32768, max_batch_size=32,
                                                                           prefill_chunk=1024)))


def _run_batch(engine: AsyncEngine, requests: list[Request]) -> None:
    scheduler = Scheduler(engine.engine.model)
    for request in requests:
        scheduler.add(request)
    while scheduler.has_work:
        scheduler.step()


def test_every_schema_validates_when_sampled(engine):
    jobs = []
    for path in SCHEMAS:
        schema = json.loads(path.read_text())
        prompt = engine.engine.chat_prompt([{"role": "user", "content": f"Write JSON for this schema: {json.dumps(schema)}"}])
        for seed in SEEDS:
            params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed, grammar=GrammarSpec.json_schema(schema))
            jobs.append((path, engine.request(prompt, params)))
    _run_batch(engine, [request for _, request in jobs])
    for path, request in jobs:
        text = request.result().text
        assert request.finish_reason == "stop", (path.stem, text)
        jsonschema.validate(json.loads(text), json.loads(path.read_text()), format_checker=jsonschema.FormatChecker())


def _chat(engine: AsyncEngine, seed: int, **fields) -> tuple[Request, object]:
    body = {"model": "m", "messages": [{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
            "tools": [WEATHER, CLOCK], "temperature": 1.0, "seed": seed, "max_tokens": 300, **fields}
    call = parse_chat(body, engine)
    return call.requests[0], call


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_and_validate(engine, choice):
    requests = [_chat(engine, seed, tool_choice=choice)[0] for seed in range(4)]
    _run_batch(engine, requests)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for request in requests:
        content, calls = split_calls(request.result().text)
        assert content is None and len(calls) == 1, request.result().text
        function = calls[0]["function"]
        jsonschema.validate(json.loads(function["arguments"]), schemas[function["name"]])
        assert isinstance(choice, str) or function["name"] == "get_weather"


def test_auto_tool_choice_gives_text_or_valid_calls(engine):
    """Each output is text, calls or both; a call that was begun and cut by max_tokens is the one exception."""
    requests = [_chat(engine, seed)[0] for seed in range(6)]
    _run_batch(engine, requests)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for request in requests:
        text = request.result().text
        content, calls = split_calls(text)
        assert "<tool_call>" not in (content or "") or request.finish_reason == "length", text
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])

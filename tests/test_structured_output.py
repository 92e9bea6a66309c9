"""Constrained decoding: output held to JSON schemas and grammars, in the Python API and the batching engine,
sampled at temperature 1 (tests/data/schemas holds the corpus); the grammar engine's errors as clear ones."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jsonschema
import pytest

import llmc
from llmc.errors import LlmcError
from llmc.runtime.grammar import GrammarSpec
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler

SCHEMAS = sorted((Path(__file__).parent / "data" / "schemas").glob("*.json"))
SAMPLES_PER_SCHEMA = 4


def _schema(path: Path) -> dict:
    return json.loads(path.read_text())


def _valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def chat_engine(chat_package):
    return llmc.load(chat_package)


def test_the_corpus_has_the_shapes_the_issue_asks_for():
    text = " ".join(path.read_text() for path in SCHEMAS)
    assert len(SCHEMAS) >= 25
    for keyword in ("enum", "maxItems", "minItems", "required", "pattern", "minimum", "maximum", "$ref", "anyOf"):
        assert keyword in text, keyword
    assert any(json.dumps(_schema(p)).count('"properties"') >= 3 for p in SCHEMAS)  # nesting


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_sampled_output_validates_against_each_schema(chat_engine, path):
    schema = _schema(path)
    for seed in range(SAMPLES_PER_SCHEMA):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed, grammar=GrammarSpec.json_schema(schema))
        result = chat_engine.generate("the quick brown fox", params)
        assert result.finish_reason == "stop", (path.stem, seed, result.text)
        _valid(result.text, schema)


def test_batched_requests_keep_their_own_grammars(chat_engine):
    """Many requests, each with another schema, in one continuous batch: each output validates."""
    scheduler = Scheduler(chat_engine.model)
    requests = {}
    for index, path in enumerate(SCHEMAS):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=100 + index,
                                grammar=GrammarSpec.json_schema(_schema(path)))
        request = chat_engine.new_request(chat_engine.encode("the lazy dog"), params, chat_engine.context_length)
        scheduler.add(request)
        requests[request] = path
    while scheduler.has_work:
        scheduler.step()
    for request, path in requests.items():
        assert request.finish_reason == "stop"
        _valid(request.result().text, _schema(path))


def test_json_object_and_grammars(chat_engine):
    result = chat_engine.generate("hi", SamplingParams(max_tokens=200, temperature=1.0, seed=1,
                                                       grammar=GrammarSpec("json_object")))
    assert isinstance(json.loads(result.text), dict)
    gbnf = 'root ::= "the " ("fox" | "dog") " jumps " [0-9] [0-9]?'
    for seed in range(5):
        text = chat_engine.generate("x", SamplingParams(max_tokens=50, temperature=1.0, seed=seed,
                                                         grammar=GrammarSpec("grammar", gbnf))).text
        assert text.startswith(("the fox jumps ", "the dog jumps ")) and text.split()[-1].isdigit(), text
    lark = 'start: "yes" | "no"'
    assert chat_engine.generate("x", SamplingParams(max_tokens=10, grammar=GrammarSpec("grammar", lark))).text in \
        ("yes", "no")


def test_greedy_under_a_grammar_picks_the_best_allowed_token(chat_engine):
    """Greedy with a grammar takes, at each step, the most likely token the grammar allows."""
    prompt = chat_engine.encode("the quick")
    schema = _schema(SCHEMAS[0])
    result = chat_engine.generate(prompt, SamplingParams(max_tokens=200, grammar=GrammarSpec.json_schema(schema)))
    constraint = chat_engine.grammars.constraint(GrammarSpec.json_schema(schema))
    tokens = list(prompt)
    for token in result.output_ids:
        logits = chat_engine.forward(tokens)[-1]
        allowed = constraint.allowed()
        assert token == max((i for i in range(len(logits)) if allowed[i]), key=lambda i: logits[i])
        constraint.accept(token)
        tokens.append(token)


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (GrammarSpec.json_schema({"type": "object", "unevaluatedProperties": False}), "unevaluatedProperties"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
    (GrammarSpec("grammar", "start: undefined_rule"), "undefined_rule"),
    (GrammarSpec("grammar", "root ::= ("), "grammar"),
])
def test_unsupported_or_broken_grammars_are_refused_by_name(chat_engine, spec, message):
    with pytest.raises(LlmcError, match=message):
        chat_engine.generate("hi", SamplingParams(max_tokens=10, grammar=spec))


def test_a_schema_must_be_an_object():
    with pytest.raises(LlmcError, match="JSON schema is an object"):
        GrammarSpec.json_schema([1, 2])


def test_speculative_decoding_under_a_grammar_gives_the_plain_tokens(chat_package, monkeypatch):
    """Drafts are cut where the grammar refuses them, and the kept tokens are the plain constrained greedy ones."""
    from llmc.runtime.request import Request
    from llmc.runtime.speculation import Speculation

    checked: list[int] = []
    accept_drafted = Request.accept_drafted
    monkeypatch.setattr(Request, "accept_drafted",
                        lambda self, logits, draft: (checked.append(len(draft)), accept_drafted(self, logits, draft))[1])
    plain = llmc.load(chat_package)
    speculating = llmc.load(chat_package, speculation=Speculation("ngram", 4))
    spec = GrammarSpec("grammar", 'start: ("fox " | "dog " | "the ")+ "end"')
    for prompt in ("the fox the dog the fox the dog the fox", "the the the the"):
        params = SamplingParams(max_tokens=60, grammar=spec)
        assert speculating.generate(prompt, params).output_ids == plain.generate(prompt, params).output_ids
    assert sum(checked) > 0  # drafts were checked


def test_masks_computed_beside_the_step_give_the_same_output(chat_engine, monkeypatch):
    """Masks computed in another thread while the model runs (as they are when they take long) or before the step
    (when they are quick): the same tokens."""
    import llmc.runtime.grammar as grammar

    def batch() -> list[list[int]]:
        scheduler = Scheduler(chat_engine.model)
        requests = [chat_engine.new_request(chat_engine.encode("the lazy dog"),
                                            SamplingParams(max_tokens=200, temperature=1.0, seed=seed,
                                                           grammar=GrammarSpec.json_schema(_schema(path))),
                                            chat_engine.context_length)
                    for seed, path in enumerate(SCHEMAS[:8])]
        for request in requests:
            scheduler.add(request)
        while scheduler.has_work:
            scheduler.step()
        return [r.output_ids for r in requests]

    inline = batch()
    overlapped_threads = []
    monkeypatch.setattr(grammar, "OVERLAP_ABOVE_S", -1.0)
    prepare = grammar.Constraint.prepare
    monkeypatch.setattr(grammar.Constraint, "prepare",
                        lambda self: (overlapped_threads.append(threading.current_thread().name), prepare(self)))
    assert batch() == inline
    assert any(name.startswith("llmc-grammar") for name in overlapped_threads)

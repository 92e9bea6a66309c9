"""What constrained decoding costs: decode speed with a grammar against without, single stream, in one
process, alternating; and each corpus schema's grammar compile time.

Decode speed is the tokens after the first over the time after the first, greedy chat, medians over
`--rounds` rounds, each running every case once:

- `plain`: no grammar, "Write a short story about a robot who learns to paint." (200 tokens);
- `any text`: the same prompt under a grammar that allows any text, so the tokens are the plain ones
  and the difference is the mask's cost alone (computed, applied, advanced);
- `json schema`: a list of 12 people (name, age, email pattern, role enum) under its schema, the
  output a real JSON answer;
- `plain, same prompt`: that prompt without the grammar, as many tokens (end of sequence ignored), so
  that its context grows as the constrained one's does.

Compile time: llguidance's view of the tokenizer (once per engine), then for each schema of
tests/data/schemas the grammar built, checked and a first matcher made (median of 5, fresh each time).

    python benchmarks/structured.py PACKAGE
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe_machine  # noqa: E402

import llmc  # noqa: E402
from llmc.runtime.grammar import GrammarSpec, Grammars  # noqa: E402
from llmc.runtime.model import CacheSettings  # noqa: E402
from llmc.runtime.sampling import SamplingParams  # noqa: E402

SCHEMAS = Path(__file__).resolve().parent.parent / "tests" / "data" / "schemas"
STORY = "Write a short story about a robot who learns to paint."
PEOPLE_PROMPT = "List 12 people who work at a small company, as JSON: name, age, email and role."
PEOPLE = {"type": "array", "minItems": 12, "maxItems": 12, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "email", "role"],
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 18,
                                                                         "maximum": 80},
                   "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
                   "role": {"enum": ["engineer", "manager", "designer", "sales"]}}}}


def decode(engine: Any, prompt: str, params: SamplingParams) -> tuple[float, list[int]]:
    """(decode tokens per second, output ids) of one chat generation."""
    first: list[float] = []
    started = time.perf_counter()
    result = engine.generate(prompt, params, chat=True,
                             on_text=lambda _: first.append(time.perf_counter()) if not first else None)
    finished = time.perf_counter()
    return (len(result.output_ids) - 1) / (finished - (first[0] if first else started)), result.output_ids


def compile_times(engine: Any) -> tuple[float, dict[str, float]]:
    """(seconds to build llguidance's tokenizer, {schema: median seconds to compile it and make a matcher})."""
    def fresh() -> Grammars:
        return Grammars(lambda: engine.tokenizer.backend.to_str(), engine.eos_ids, engine.model.vocab_size)
    started = time.perf_counter()
    tokenizer = fresh().tokenizer
    tokenizer_s = time.perf_counter() - started
    times = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        spec = GrammarSpec.json_schema(json.loads(path.read_text()))
        runs = []
        for _ in range(5):
            grammars = fresh()
            grammars._tokenizer = tokenizer  # the tokenizer is built once per engine; time the grammar alone
            started = time.perf_counter()
            grammars.constraint(spec)
            runs.append(time.perf_counter() - started)
        times[path.stem] = statistics.median(runs)
    return tokenizer_s, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    engine = llmc.load(args.package, cache=CacheSettings(prefix_cache=False))
    cases = {"plain": (STORY, SamplingParams(max_tokens=args.max_tokens)),
             "any text": (STORY, SamplingParams(max_tokens=args.max_tokens,
                                                grammar=GrammarSpec("grammar", "start: /(.|\\n)*/"))),
             "json schema": (PEOPLE_PROMPT, SamplingParams(max_tokens=1000, grammar=GrammarSpec.json_schema(PEOPLE)))}
    _, answer = decode(engine, PEOPLE_PROMPT, cases["json schema"][1])  # warm-up, and the grammars compiled
    cases["plain, same prompt"] = (PEOPLE_PROMPT, SamplingParams(max_tokens=len(answer), ignore_eos=True))
    for prompt, params in cases.values():
        decode(engine, prompt, params)
    rates: dict[str, list[float]] = {name: [] for name in cases}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, (prompt, params) in cases.items():
            rate, outputs[name] = decode(engine, prompt, params)
            rates[name].append(rate)
    plain = statistics.median(rates["plain"])
    print(f"Machine: {describe_machine()}; package {args.package}; {args.rounds} rounds\n")
    same_prompt = statistics.median(rates["plain, same prompt"])
    print("| case | tokens | decode tok/s | against its plain run | same tokens as plain |\n|---|---|---|---|---|")
    for name in cases:
        rate = statistics.median(rates[name])
        base = same_prompt if name == "json schema" else plain
        same = "yes" if outputs[name] == outputs["plain"] else ("no" if name == "any text" else "n/a")
        print(f"| {name} | {len(outputs[name])} | {rate:.1f} | {rate / base:.3f}x | {same} |")
    json.loads(engine.tokenizer.decode(outputs["json schema"]))  # the answer parses
    tokenizer_s, times = compile_times(engine)
    print(f"\nllguidance's tokenizer: {tokenizer_s * 1e3:.0f} ms (once per engine). Grammar compile + first matcher, "
          "median of 5, per schema:\n")
    print("| schema | ms |\n|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.2f} |")
    print(f"| (median over {len(times)}) | {statistics.median(times.values()) * 1e3:.2f} |")


if __name__ == "__main__":
    main()

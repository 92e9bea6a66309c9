"""Regenerate tests/ARCHITECTURES.md: try every causal-LM architecture transformers knows (tests/architecture_survey.py)
and write the table of verdicts.

    python tests/write_architectures.py            # every architecture (about 9 minutes on 2 cores)
    python tests/write_architectures.py llama gpt2 # only these rows; the others keep their recorded verdicts
"""

from __future__ import annotations

import sys
from collections import Counter
from datetime import date
from pathlib import Path

import transformers

from architecture_survey import NEW_TOKENS, TABLE_ROW, VERDICTS, Outcome, causal_lm_architectures, survey

TABLE = Path(__file__).with_name("ARCHITECTURES.md")
HEADER = """# Architectures

Every causal-LM architecture in transformers {version}, tried as a new user would: a tiny random-weight config of
the family (2 layers, width 64, 4 heads, the family's defaults otherwise), compiled by llmc for the CPU, and
{tokens} greedy tokens compared with transformers' `generate`. Written by `python tests/write_architectures.py`
on {day}; `tests/test_architectures.py` checks each in-scope row in CI. Rows named `family+variant` try a
mechanism that no family's defaults use (rotary scaling) on that family.

- **exact**: the greedy tokens equal transformers' and the log-probabilities agree to 1e-3.
- **refused**: `llmc compile` refuses the model with an error naming what it does not support.
- **untestable**: transformers itself cannot build or run the tiny config, so there is nothing to compare.
- **broken**: anything else. The test fails on a broken row, and on a row that moved from exact.
- **out of scope**: not a text decoder (multimodal, audio, encoder-decoder halves, masked-LM encoders); not counted.

{counts}

| model type | class | verdict | detail |
|---|---|---|---|
"""


def parse_rows(text: str) -> dict[str, str]:
    """model_type -> its whole table row, from an existing table."""
    return {match["type"]: match[0] for match in map(TABLE_ROW.match, text.splitlines()) if match}


def row(outcome: Outcome) -> str:
    detail = outcome.detail.replace("|", "\\|").replace("\n", " ")
    return f"| `{outcome.model_type}` | `{outcome.class_name}` | {outcome.verdict} | {detail} |"


def main(model_types: list[str]) -> None:
    rows = parse_rows(TABLE.read_text()) if model_types and TABLE.exists() else {}
    for outcome in survey(model_types or sorted(causal_lm_architectures())):
        rows[outcome.model_type] = row(outcome)
        print(rows[outcome.model_type], flush=True)
    body = "\n".join(rows[name] for name in sorted(rows)) + "\n"
    verdicts = Counter(match["verdict"] for match in map(TABLE_ROW.match, body.splitlines()) if match)
    counts = ", ".join(f"{verdicts[v]} {v}" for v in (*VERDICTS, "out of scope"))
    TABLE.write_text(HEADER.format(version=transformers.__version__, tokens=NEW_TOKENS, day=date.today(),
                                   counts=f"Totals: {counts}.") + body)


if __name__ == "__main__":
    main(sys.argv[1:])

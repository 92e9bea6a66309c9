"""The generated architecture test: every causal-LM architecture transformers knows, built tiny, compiled and
decoded greedily (tests/architecture_survey.py, two at a time). An architecture may be token-exact or refused at
compile time with a clear message; a broken one fails, and so does one that tests/ARCHITECTURES.md records as exact
and is no longer."""

from __future__ import annotations

from pathlib import Path

import pytest

from architecture_survey import Outcome, causal_lm_architectures, out_of_scope, recorded_verdicts, survey

TABLE = Path(__file__).with_name("ARCHITECTURES.md")
ARCHITECTURES = causal_lm_architectures()
IN_SCOPE = [name for name in sorted(ARCHITECTURES) if out_of_scope(name, ARCHITECTURES[name]) is None]
RECORDED = recorded_verdicts(TABLE)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    """Every in-scope architecture's outcome; those recorded as exact (a compile each) go first, so the two
    workers finish together."""
    order = sorted(IN_SCOPE, key=lambda name: RECORDED.get(name) != "exact")
    return dict(zip(order, survey(order)))


def test_the_table_lists_every_architecture():
    """ARCHITECTURES.md is regenerated when transformers gains or loses an architecture."""
    assert sorted(RECORDED) == sorted(ARCHITECTURES), "run python tests/write_architectures.py"


@pytest.mark.parametrize("model_type", IN_SCOPE)
def test_architecture_is_exact_or_refused_at_compile_time(outcomes, model_type):
    outcome = outcomes[model_type]
    if outcome.verdict == "untestable":
        pytest.skip(f"transformers cannot run a tiny {model_type}: {outcome.detail}")
    assert outcome.verdict != "broken", outcome.detail
    if RECORDED.get(model_type) == "exact":
        assert outcome.verdict == "exact", f"{model_type} was token-exact and is now {outcome.verdict}: {outcome.detail}"

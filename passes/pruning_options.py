"""What `--prune` asks for: how many decoder layers, KV groups of heads and MLP channels to remove.

Each amount is a count (`layers=3`: three layers; `heads=1`: one KV group in every layer;
`mlp=256`: 256 channels in every MLP) or a share of what the model has, written with a
decimal point or a percent sign (`mlp=0.25`, `layers=10%`). The passes turn shares into
counts against the model they meet, and refuse a count that would remove all there is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmc.ir import LlmcError

KINDS = {"layers": "decoder layers", "heads": "KV groups of heads per layer", "mlp": "MLP channels per layer"}


class PruningError(LlmcError):
    """A `--prune` request that cannot be met: malformed, or more than the model has."""


@dataclass(frozen=True)
class Amount:
    """A count (`share` False) or a share of what exists (`share` True, value below 1)."""

    value: float = 0
    share: bool = False

    def __str__(self) -> str:
        return f"{self.value:g}" if not self.share else f"{self.value * 100:g}%"

    def count(self, existing: int, kind: str) -> int:
        """How many of `existing` to remove; an error when that leaves none."""
        removed = round(self.value * existing) if self.share else int(self.value)
        if removed >= existing:
            raise PruningError(f"--prune {kind}={self}: cannot remove {removed} of the model's {existing} "
                               f"{KINDS[kind]}; at least one must stay")
        return removed


@dataclass(frozen=True)
class Pruning:
    layers: Amount = Amount()
    heads: Amount = Amount()
    mlp: Amount = Amount()

    @property
    def requested(self) -> bool:
        return any(a.value for a in (self.layers, self.heads, self.mlp))

    def __str__(self) -> str:
        return ",".join(f"{kind}={getattr(self, kind)}" for kind in KINDS if getattr(self, kind).value) or "none"

    @staticmethod
    def parse(text: str) -> "Pruning":
        """`layers=3,mlp=0.25,heads=1` (any of the three, in any order)."""
        amounts: dict[str, Amount] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, value = item.partition("=")
            kind = kind.strip()
            if kind not in KINDS:
                raise PruningError(f"--prune {item!r}: llmc prunes {', '.join(KINDS)} (e.g. layers=3,mlp=0.25)")
            if kind in amounts:
                raise PruningError(f"--prune names {kind} twice")
            amounts[kind] = _amount(kind, value.strip())
        return Pruning(**amounts)


def _amount(kind: str, text: str) -> Amount:
    share = text.endswith("%") or "." in text
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text) if share else int(text)
    except ValueError:
        raise PruningError(f"--prune {kind}={text!r}: give a count (3) or a share (0.25 or 25%)") from None
    if not math.isfinite(value) or value < 0 or (share and value >= 1):
        raise PruningError(f"--prune {kind}={text}: a count must be at least 0 and a share below 1 (100%)")
    return Amount(value, share)

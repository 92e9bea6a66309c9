"""Width pruning of the MLPs: the channels between the up (and gate) projections and the down
projection that score lowest are removed, from every MLP alike.

MLPs are found as passes/decoder_structure.py says. A channel's score is its fluctuation on
the down projection's input (passes/pruning_importance.py). The up and gate projections lose
the channels' rows (and biases), the down projection their columns and gains their mean
contribution as a bias.
Where an MLP is whole groups of 32 (a quantization group), whole groups are removed, so a
pruned model quantizes as the unpruned one does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from llmc.ir import Module
from llmc.ir.quant_formats import GROUP

from .decoder_structure import Mlp, mlps, weight_of
from .pruning_importance import Importance
from .pruning_options import Amount, PruningError
from .slice_weights import Cut, add_cut, slice_weights


def channel_cuts(module: Module, kept_channels: Callable[[Mlp, int], np.ndarray]) -> dict[str, Cut]:
    """The cuts that keep, in each MLP, the channels `kept_channels(mlp, width)` names (sorted)."""
    cuts: dict[str, Cut] = {}
    for graph in module.functions.values():
        for mlp in mlps(graph):
            kept = kept_channels(mlp, module.weights[weight_of(mlp.down)].shape[1])
            add_cut(cuts, weight_of(mlp.down), Cut(1, kept))
            for up in mlp.ups:
                for position in (1, 2):
                    if weight_of(up, position) is not None:
                        add_cut(cuts, weight_of(up, position), Cut(0, kept))
    return cuts


def _kept_count(width: int, amount: Amount) -> int:
    """Channels kept of `width`: the amount removed, rounded to whole quantization groups when `width` is whole
    groups (at least one group removed when any is asked for)."""
    removed = amount.count(width, "mlp")
    if removed and width % GROUP == 0:
        removed = max(GROUP, int(round(removed / GROUP)) * GROUP)
        if removed >= width:
            raise PruningError(f"--prune mlp={amount}: removing whole groups of {GROUP} channels leaves none of "
                               f"the {width}")
    return width - removed


def prune_mlp(module: Module, importance: Importance, amount: Amount) -> Module:
    """`module` with `amount` channels fewer in every MLP."""
    biases: dict[str, np.ndarray] = {}
    widths: dict[str, list[int]] = {}

    def most_important(mlp: Mlp, width: int) -> np.ndarray:
        down = weight_of(mlp.down)
        scores = importance.channel_scores(down, module.weights[down])
        kept = np.sort(np.argsort(-scores, kind="stable")[:_kept_count(width, amount)])
        removed = np.setdiff1d(np.arange(width), kept)
        if removed.size:
            biases[down] = importance.compensation(down, module.weights[down], removed)
        widths[down] = [width, len(kept)]
        return kept

    cuts = channel_cuts(module, most_important)
    if not widths:
        raise PruningError("--prune mlp: llmc finds no MLP in this model (a matmul whose input elementwise ops make "
                           "from other matmuls)")
    metadata = {**module.metadata, "pruning": {**module.metadata.get("pruning", {}), "mlp": widths}}
    return slice_weights(module, cuts, {}, {}, metadata, "--prune mlp", biases)

"""What pruning measures before it cuts: one run of the reference interpreter over a calibration text.

Two kinds of importance come out of the stateless graph (before KV-cache lowering):
- each decoder layer's block influence (ShortGPT): 1 - cos(stream on entry, stream on exit),
  averaged over the tokens. A layer that barely turns the residual stream matters little.
- each matmul input channel's mean and variance over the tokens. A removed channel's mean
  is folded into the matmul's bias (FLAP's compensation), so what removing it loses is its
  fluctuation: variance times the squared norm of the weight's column it meets. That scores
  the channels of an MLP's down projection, and summed over a head's columns, the heads of
  the output projection.
The default text (calibration.txt beside this file) mixes prose, dialogue, instructions and
code; `llmc compile --calibration FILE` takes another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llmc.ir import PARAM, Module, Node, run_graph

from .decoder_structure import layer_bounds

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")
# Tokens of the calibration text the interpreter runs (its attention is quadratic in them).
CALIBRATION_TOKENS = 512


@dataclass(frozen=True)
class ChannelStatistics:
    """Of each input channel of a matmul, over the calibration tokens."""

    mean: np.ndarray
    variance: np.ndarray


@dataclass(frozen=True)
class Importance:
    influence: dict[int, float]  # decoder layer -> block influence
    inputs: dict[str, ChannelStatistics]  # a linear's weight name -> its input channels

    def channel_scores(self, weight_name: str, weight: np.ndarray) -> np.ndarray:
        """What removing each input channel of `weight` (outputs, inputs) loses once its mean is compensated:
        the channel's variance times its column's squared norm."""
        columns = np.square(weight.astype(np.float64)).sum(axis=0)
        return self.inputs[weight_name].variance * columns

    def compensation(self, weight_name: str, weight: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """What the removed input channels gave the output on average: to be added to the matmul's bias."""
        mean = self.inputs[weight_name].mean[removed]
        return (weight[:, removed].astype(np.float64) @ mean).astype(np.float32)


def measure_importance(module: Module, tokens: Sequence[int]) -> Importance:
    """Run `module`'s forward over the first CALIBRATION_TOKENS of `tokens` (fewer where the model's context is
    shorter) and measure."""
    graph = module.functions["forward"]
    limit = min(CALIBRATION_TOKENS, module.metadata.get("context_length", CALIBRATION_TOKENS))
    ids = np.asarray(list(tokens)[:limit], dtype=np.int64)[None, :]
    entering: dict[int, list[int]] = {}
    leaving: dict[int, list[int]] = {}
    for layer, (entry, exit) in layer_bounds(graph).items():
        entering.setdefault(id(entry), []).append(layer)
        leaving.setdefault(id(exit), []).append(layer)
    read_by: dict[int, list[str]] = {}
    for node in graph.nodes:
        if node.op == "linear" and node.inputs[1].op == PARAM:
            read_by.setdefault(id(node.inputs[0]), []).append(node.inputs[1].attrs["weight"])
    streams: dict[int, np.ndarray] = {}
    influence: dict[int, float] = {}
    sums: dict[str, list] = {}  # weight name -> [rows, sum, sum of squares]

    def observe(node: Node, value: Any) -> None:
        if id(node) in read_by:
            rows = np.asarray(value, dtype=np.float64).reshape(-1, np.shape(value)[-1])
            for name in read_by[id(node)]:
                total = sums.setdefault(name, [0, 0.0, 0.0])
                total[0] += len(rows)
                total[1] = total[1] + rows.sum(axis=0)
                total[2] = total[2] + (rows * rows).sum(axis=0)
        for layer in leaving.get(id(node), []):
            influence[layer] = _block_influence(streams.pop(layer), np.asarray(value))
        for layer in entering.get(id(node), []):
            streams[layer] = np.asarray(value)

    run_graph(graph, {graph.inputs[0].name: ids}, module.weights, observe)
    inputs = {name: ChannelStatistics(total / count, np.maximum(squares / count - np.square(total / count), 0))
              for name, (count, total, squares) in sums.items()}
    return Importance(influence, inputs)


def _block_influence(entry: np.ndarray, exit: np.ndarray) -> float:
    a = entry.reshape(-1, entry.shape[-1]).astype(np.float64)
    b = exit.reshape(-1, exit.shape[-1]).astype(np.float64)
    cosine = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(1.0 - cosine.mean())

"""``sfx analyze``: which layers does quantization disturb most? (upstream "maximum neuron spread").

Upstream's recipe (``lth_analysis.py``): run the original and the vanilla-quantized
model on the same text, record the average activation magnitude of every layer, rank
the layers by how much quantization changed it, and cluster the strongly deviating
layers as the ones to fine-tune. Here, for every layer that ``quantize_`` replaces (each
quantized linear), forward hooks record on the calibration blocks, over real tokens only
(padding excluded):

* ``float_mean_abs``: mean ``|y|`` of the layer's output in the float model;
* ``quant_mean_abs``: the same in the quantized model (whose inputs already carry the
  errors of the layers before it, as in upstream's analysis);
* ``deviation = |quant_mean_abs - float_mean_abs| / float_mean_abs`` (upstream's
  measure, made relative so that layers of different scale compare);
* ``rel_error = ||y_q - y_f|| / ||y_f||`` over the same tokens (a stricter measure:
  errors that cancel in the mean still count).

Layers are ranked by ``metric`` (``deviation`` by default, upstream's; ``rel_error``
optional), rank 1 = most disturbed, and the values of that metric are clustered by a
deterministic 1-D k-means (k=2 by default: initial centres at the minimum and maximum,
Lloyd iterations until nothing moves). The cluster with the highest centre is the
*critical* cluster. ``opt``/``fasteropt`` train either the top ``fraction`` of the
ranking or (``fraction="cluster"``) the critical cluster.
"""
from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .config import WASQConfig
from .layers import candidate_layers, convert_rtn_, evaluating, quantized_layers
from .train import Blocks, default_forward

__all__ = ["LayerStats", "Analysis", "analyze", "kmeans_1d", "select_layers", "METRICS", "block_index"]

METRICS = ("deviation", "rel_error")
_BLOCK_RE = re.compile(r"\.(\d+)\.")


def block_index(name: str) -> int:
    """Index of the transformer block a layer belongs to (the first ``.<int>.`` of its
    name, e.g. ``model.layers.3.mlp.up_proj`` -> 3), -1 when there is none."""
    m = _BLOCK_RE.search("." + name + ".")
    return int(m.group(1)) if m else -1


@dataclass
class LayerStats:
    layer: str
    in_features: int
    out_features: int
    float_mean_abs: float
    quant_mean_abs: float
    rel_error: float
    rank: int = 0
    cluster: int = 0
    critical: bool = False

    @property
    def block(self) -> int:
        return block_index(self.layer)

    @property
    def kind(self) -> str:
        return self.layer.rsplit(".", 1)[-1]

    @property
    def deviation(self) -> float:
        f = self.float_mean_abs
        return abs(self.quant_mean_abs - f) / f if f > 0 else (0.0 if self.quant_mean_abs == 0 else math.inf)

    def value(self, metric: str) -> float:
        return self.deviation if metric == "deviation" else self.rel_error

    def row(self) -> dict[str, Any]:
        return {"rank": self.rank, "layer": self.layer, "block": self.block, "kind": self.kind,
                "in_features": self.in_features, "out_features": self.out_features,
                "float_mean_abs": self.float_mean_abs, "quant_mean_abs": self.quant_mean_abs,
                "deviation": self.deviation, "rel_error": self.rel_error, "cluster": self.cluster,
                "critical": int(self.critical)}


@dataclass
class Analysis:
    """Per-layer statistics in model order, plus the ranking settings."""

    layers: list[LayerStats]
    metric: str = "deviation"
    clusters: int = 2
    tokens: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> list[LayerStats]:
        return sorted(self.layers, key=lambda s: s.rank)

    def critical(self) -> list[str]:
        return [s.layer for s in self.ranked() if s.critical]

    def __len__(self) -> int:
        return len(self.layers)


def kmeans_1d(values: Sequence[float], k: int = 2, max_iter: int = 100) -> tuple[list[int], list[float]]:
    """Deterministic 1-D k-means: labels ``0..k-1`` ordered by centre (0 = lowest) and the
    centres. Initial centres are evenly spaced quantiles (min and max for k=2); an empty
    cluster keeps its centre. ``k`` is capped at the number of distinct values."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"number of clusters must be a positive int, got {k!r}")
    xs = [float(v) for v in values]
    if not xs:
        return [], []
    if any(not math.isfinite(v) for v in xs):
        raise ValueError("kmeans_1d: values must be finite")
    distinct = sorted(set(xs))
    k = min(k, len(distinct))
    srt = sorted(xs)
    centres = [srt[round(i * (len(srt) - 1) / (k - 1))] if k > 1 else sum(xs) / len(xs) for i in range(k)]
    labels = [0] * len(xs)
    for _ in range(max_iter):
        new = [min(range(k), key=lambda j: (abs(x - centres[j]), j)) for x in xs]
        sums = [0.0] * k
        counts = [0] * k
        for x, c in zip(xs, new):
            sums[c] += x
            counts[c] += 1
        centres = [sums[j] / counts[j] if counts[j] else centres[j] for j in range(k)]
        if new == labels and _ > 0:
            break
        labels = new
    order = sorted(range(k), key=lambda j: centres[j])
    remap = {old: new for new, old in enumerate(order)}
    return [remap[c] for c in labels], [centres[j] for j in order]


def _rank_and_cluster(stats: list[LayerStats], metric: str, clusters: int) -> None:
    vals = [s.value(metric) for s in stats]
    finite = [v if math.isfinite(v) else max([w for w in vals if math.isfinite(w)] or [0.0]) * 2 + 1 for v in vals]
    order = sorted(range(len(stats)), key=lambda i: (-finite[i], i))
    for r, i in enumerate(order, 1):
        stats[i].rank = r
    labels, _ = kmeans_1d(finite, clusters)
    top = max(labels) if labels else 0
    for s, c in zip(stats, labels):
        s.cluster = c
        s.critical = c == top


@torch.no_grad()
def analyze(float_model: nn.Module, blocks: Blocks, config: WASQConfig, *, quant_model: nn.Module | None = None,
            metric: str = "deviation", clusters: int = 2, batch_size: int = 1, progress: bool = True) -> Analysis:
    """Compare every quantized layer's output magnitude between ``float_model`` and its
    quantized twin on ``blocks`` (see the module docstring). ``quant_model`` defaults to
    a deep copy of ``float_model`` passed through ``quantize_(copy, config)``; neither
    model is modified."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, METRICS))}, got {metric!r}")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be a positive int, got {clusters!r}")
    if not isinstance(blocks, Blocks) or len(blocks) == 0:
        raise ValueError("analyze needs at least one calibration block")
    if quantized_layers(float_model):
        raise ValueError("analyze: float_model is already quantized; pass the float model (and quant_model)")
    names = list(candidate_layers(float_model, config))
    if not names:
        raise ValueError(f"analyze: nothing to quantize in {type(float_model).__name__} with skip={list(config.skip)}")
    if quant_model is None:
        if config.method != "rtn":
            raise ValueError(f"analyze ranks layers under round to nearest; got method {config.method!r} "
                             f"(quantize with that method first and pass quant_model=)")
        quant_model = copy.deepcopy(float_model)
        convert_rtn_(quant_model, config, candidate_layers(quant_model, config))
    qlayers = quantized_layers(quant_model)
    missing = [n for n in names if n not in qlayers]
    if missing:
        raise ValueError(f"analyze: quant_model has no quantized layer {missing[0]!r} ({len(missing)} missing)")

    n = len(names)
    f_sum = torch.zeros(n, dtype=torch.float64)
    q_sum = torch.zeros(n, dtype=torch.float64)
    d_sq = torch.zeros(n, dtype=torch.float64)
    f_sq = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    feats: dict[str, tuple[int, int]] = {}
    ctx: dict[str, Any] = {"mask": None, "float": {}}

    def flat(y: torch.Tensor) -> torch.Tensor:
        y = y.detach()
        m = ctx["mask"]
        if m is not None and y.dim() == 3 and y.shape[:2] == m.shape:
            return y[m].float()
        return y.reshape(-1, y.shape[-1]).float()

    def float_hook(i: int, name: str):
        def hook(mod, inp, out):
            y = flat(out)
            f_sum[i] += y.abs().sum(dtype=torch.float64)
            f_sq[i] += y.double().pow(2).sum()
            counts[i] += y.numel()
            ctx["float"][name] = y
        return hook

    def quant_hook(i: int, name: str):
        def hook(mod, inp, out):
            y = flat(out)
            q_sum[i] += y.abs().sum(dtype=torch.float64)
            yf = ctx["float"].pop(name)
            d_sq[i] += (y.double() - yf.double()).pow(2).sum()
        return hook

    handles = []
    for i, name in enumerate(names):
        fm = float_model.get_submodule(name)
        feats[name] = (int(qlayers[name].in_features), int(qlayers[name].out_features))
        handles.append(fm.register_forward_hook(float_hook(i, name)))
        handles.append(qlayers[name].register_forward_hook(quant_hook(i, name)))
    fdev = next(float_model.parameters()).device
    qdev = next(quant_model.parameters()).device
    try:
        from tqdm.auto import tqdm

        with evaluating(float_model, quant_model, hooks=handles):
            starts = range(0, len(blocks), batch_size)
            for s in tqdm(starts, desc="analyze", unit="batch", disable=not progress, file=sys.stderr):
                idx = range(s, min(s + batch_size, len(blocks)))
                b = blocks.batch(idx, fdev)
                ctx["mask"] = b["attention_mask"].bool()
                ctx["float"] = {}
                default_forward(float_model, b)
                bq = blocks.batch(idx, qdev)
                ctx["mask"] = bq["attention_mask"].bool()
                default_forward(quant_model, bq)
    finally:
        ctx["float"] = {}
    stats = []
    for i, name in enumerate(names):
        c = float(counts[i]) or 1.0
        rel = math.sqrt(float(d_sq[i]) / float(f_sq[i])) if float(f_sq[i]) > 0 else (0.0 if float(d_sq[i]) == 0
                                                                                        else math.inf)
        stats.append(LayerStats(name, feats[name][0], feats[name][1], float(f_sum[i]) / c, float(q_sum[i]) / c, rel))
    _rank_and_cluster(stats, metric, clusters)
    return Analysis(stats, metric, clusters, blocks.n_tokens, config.to_dict())


def select_layers(analysis: Analysis, fraction: float | str = 0.25) -> list[str]:
    """Layers to train, most disturbed first: the top ``ceil(fraction * n)`` of the ranking
    (``0 < fraction <= 1``) or the critical cluster (``fraction="cluster"``)."""
    if fraction == "cluster":
        return analysis.critical()
    if isinstance(fraction, str):
        try:
            fraction = float(fraction)
        except ValueError:
            raise ValueError(f"fraction must be a number in (0, 1] or 'cluster', got {fraction!r}") from None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1] or 'cluster', got {fraction!r}")
    k = max(1, math.ceil(fraction * len(analysis) - 1e-9))
    return [s.layer for s in analysis.ranked()[:k]]

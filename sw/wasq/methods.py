"""The WASQ methods: ``vanilla``, ``fpm``, ``opt``, ``fasteropt``, ``lth``.

Each takes a *float* causal LM, quantizes it in place with :func:`quantize_` and returns
a :class:`MethodResult` (the model, now quantized, plus what was done). Saving is
separate (:func:`superfloat.sw.wasq.checkpoint.save_checkpoint` re-projects every
shadow weight onto its SFx grid). See ``docs/wasq-methods.md`` for the upstream intent
of each method and what was fixed.

* :func:`vanilla`: post-training round-to-nearest, no training.
* :func:`fpm`: full-parameter QAT (every parameter trains, through the STE of
  :class:`SFxLinear`).
* :func:`opt`: QAT of the critical layers only (ranked by :func:`analyze`).
* :func:`fasteropt`: :func:`opt` with the frozen prefix (every block before the first
  trained one, and the embeddings) run once: its outputs are cached and training starts
  from there. Same result as :func:`opt` (bit for bit on CPU with the same batch shapes).
* :func:`lth`: iterative magnitude pruning with rewinding to the pretrained weights
  (lottery ticket), masks kept through SFx QAT and export.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .analyze import Analysis, analyze, select_layers
from .config import WASQConfig
from .layers import evaluating
from .quantize import quantize_, quantized_layers
from .train import Blocks, TrainConfig, TrainStats, default_forward, freeze_all_but, train

__all__ = ["MethodResult", "METHODS", "vanilla", "fpm", "opt", "fasteropt", "lth", "run_method", "PrefixCache",
           "decoder_blocks", "sparsity", "OutputCalibration", "TRAIN_BACKENDS", "RECALIBRATE", "calibration_batches"]

METHODS = ("vanilla", "fpm", "opt", "fasteropt", "lth")
#: where the quantized layers compute while a method trains (``backend=``)
TRAIN_BACKENDS = ("fake", "accelerator")
#: when QAT on the accelerator calibrates the static output exponents (:class:`OutputCalibration`)
RECALIBRATE = ("never", "epoch", "end")


@dataclass
class MethodResult:
    """What a method did. ``model`` is the (now quantized) model; ``seconds`` the wall time
    of the whole method (analysis, caching and training included)."""

    method: str
    model: nn.Module
    config: WASQConfig
    train: TrainStats | None = None
    trained_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "quant_config": self.config.to_dict(), "seconds": self.seconds,
                             "trained_layers": list(self.trained_layers)}
        if self.train is not None:
            d["train"] = self.train.to_dict()
        d.update({k: v for k, v in self.extra.items() if k not in ("analysis", "masks")})
        return d


@dataclass(frozen=True)
class OutputCalibration:
    """The static output exponents (SPEC section 8) a method writes into the model, so that
    the trained model (and its checkpoint) runs on the accelerator as it is
    (:func:`superfloat.sw.wasq.accelerator.calibrate_outputs_` on the training text).

    Attributes:
        tokens: calibrate on the first ``tokens`` real tokens of the training blocks (whole
            blocks, padding left out; at least one block).
        out_bits: output width of every quantized layer (``None``: the layer's, else SF16).
        headroom: factor above the calibrated maximum (``None``: by output width).
        recalibrate: with ``backend="accelerator"``, when the exponents are calibrated:
            ``"never"`` (once, before training: the model is trained and saved with the same
            exponents), ``"epoch"`` (before every epoch, on the current weights; the last
            ones are saved) or ``"end"`` (before training and again after it, on the trained
            weights: the saved exponents are not the ones training saw). With
            ``backend="fake"`` the exponents are calibrated once, after training.
    """

    tokens: int = 2048
    out_bits: int | None = None
    headroom: float | None = None
    recalibrate: str = "never"

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"OutputCalibration.tokens must be a positive int, got {self.tokens!r}")
        if self.out_bits is not None:
            from .. import sfx

            sfx.check_bits(self.out_bits, "OutputCalibration.out_bits")
        if self.headroom is not None and (isinstance(self.headroom, bool) or not isinstance(self.headroom, (int, float))
                                          or not (self.headroom >= 1.0) or self.headroom == float("inf")):
            raise ValueError(f"OutputCalibration.headroom must be a finite number >= 1, got {self.headroom!r}")
        if self.recalibrate not in RECALIBRATE:
            raise ValueError(f"OutputCalibration.recalibrate must be one of {', '.join(map(repr, RECALIBRATE))}, "
                             f"got {self.recalibrate!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "out_bits": self.out_bits, "headroom": self.headroom,
                "recalibrate": self.recalibrate}


def calibration_batches(blocks: Blocks, tokens: int) -> list[torch.Tensor]:
    """The first blocks of ``blocks`` holding ``tokens`` real tokens (at least one block), each
    as a ``[1, n]`` token tensor without its padding: calibration text for
    :func:`~superfloat.sw.wasq.accelerator.calibrate_outputs_` and for the post-training
    methods of :func:`quantize_`."""
    out: list[torch.Tensor] = []
    n = 0
    for i in range(len(blocks)):
        real = int(blocks.attention_mask[i].sum())
        out.append(blocks.input_ids[i:i + 1, :real].clone())
        n += real
        if n >= tokens:
            break
    return out


class _Backend:
    """Where a method's quantized layers compute while it trains, and their output exponents.

    ``backend="accelerator"``: the output exponents are calibrated on the training text before
    training, then every quantized layer runs on the accelerator backend (the hardware's values
    in the forward, the fake-quantized layer's gradients: straight through), re-calibrated per
    :attr:`OutputCalibration.recalibrate`. The exponents are saved in every training checkpoint
    (``state_dict``), so a resumed run continues with the ones it had. ``backend="fake"``:
    fake quantization while training, exponents calibrated after it (when ``outputs`` is given).
    """

    def __init__(self, model: nn.Module, blocks: Blocks | None, backend: str, outputs: OutputCalibration | None,
                 progress: bool, who: str) -> None:
        if backend not in TRAIN_BACKENDS:
            raise ValueError(f"{who}: backend must be one of {', '.join(map(repr, TRAIN_BACKENDS))}, got {backend!r}")
        if outputs is not None and not isinstance(outputs, OutputCalibration):
            raise TypeError(f"{who}: outputs must be an OutputCalibration or None, got {type(outputs).__name__}")
        if backend == "accelerator" and outputs is None:
            outputs = OutputCalibration()
        self.model, self.blocks, self.backend, self.outputs = model, blocks, backend, outputs
        self.progress, self.who = progress, who
        self.events: list[dict[str, Any]] = []
        self._batches: list[torch.Tensor] | None = None

    @property
    def accelerator(self) -> bool:
        return self.backend == "accelerator"

    def run_id(self) -> dict[str, Any]:
        d: dict[str, Any] = {"backend": self.backend}
        if self.accelerator and self.outputs is not None:  # what the training sees
            d["outputs"] = json.dumps(self.outputs.to_dict(), sort_keys=True)
        return d

    def batches(self) -> list[torch.Tensor]:
        if self._batches is None:
            if self.blocks is None:
                raise ValueError(f"{self.who}: calibrating output exponents needs calibration text (blocks)")
            self._batches = calibration_batches(self.blocks, self.outputs.tokens if self.outputs else 2048)
        return self._batches

    def calibrate(self, when: str) -> None:
        from .accelerator import calibrate_outputs_

        assert self.outputs is not None
        t0 = time.perf_counter()
        batches = self.batches()
        rep = calibrate_outputs_(self.model, batches, out_bits=self.outputs.out_bits, headroom=self.outputs.headroom,
                                 progress=self.progress)
        self.events.append({"when": when, "tokens": int(sum(b.numel() for b in batches)),
                            "seconds": round(time.perf_counter() - t0, 3),
                            "raised_channels": int(sum(r["raised_channels"] for r in rep.values())),
                            "out_bits": sorted({r["out_bits"] for r in rep.values()}),
                            "headroom": sorted({r["headroom"] for r in rep.values()})})

    def before_train(self) -> None:
        """Calibrate and switch to the accelerator (``backend="accelerator"``); nothing for ``"fake"``."""
        if not self.accelerator:
            return
        from .accelerator import set_backend

        self.calibrate("before training")
        set_backend(self.model, "accelerator")

    def epoch_start(self, epoch: int) -> None:
        if self.accelerator and self.outputs.recalibrate == "epoch" and epoch > 0:
            self.calibrate(f"epoch {epoch}")

    def after_train(self) -> None:
        if self.outputs is None:
            return
        if not self.accelerator:
            self.calibrate("after training")
        elif self.outputs.recalibrate == "end":
            self.calibrate("after training")

    def checkpoint_objects(self) -> list[Any]:
        return [self] if self.accelerator else []

    # registered with accelerate: the exponents go into every training checkpoint
    def state_dict(self) -> dict[str, Any]:
        import numpy as np

        out = {}
        for name, layer in quantized_layers(self.model).items():
            if layer.out_exponent is not None:
                out[name] = {"out_bits": int(layer.out_bits), "out_exponent":
                             torch.from_numpy(np.asarray(layer.out_exponent, dtype=np.int8).copy())}
        return {"layers": out, "events": list(self.events)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        layers = quantized_layers(self.model)
        for name, v in d.get("layers", {}).items():
            if name not in layers:
                raise ValueError(f"cannot resume: the checkpoint's output exponents name layer {name!r}, which this "
                                 f"model does not have")
            layers[name].out_bits = int(v["out_bits"])
            layers[name].out_exponent = v["out_exponent"].numpy().astype("int8")
            layers[name].invalidate_program()
        self.events = list(d.get("events", [])) + [{"when": "resumed (exponents of the checkpoint)"}]

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"backend": self.backend}
        if self.outputs is not None:
            d["output_calibration"] = {**self.outputs.to_dict(), "events": list(self.events)}
        return d


def _prepare(model: nn.Module, config: WASQConfig, calibration: Iterable[Any] | None, blocks: Blocks | None,
             outputs: OutputCalibration | None, progress: bool, who: str) -> None:
    """``quantize_(model, config)``; a post-training method in ``config.method`` (the QAT
    initialisation: ``"gptq"``, ``"adaround"``, ``"awq"``, ...) runs on ``calibration``,
    default the first :attr:`OutputCalibration.tokens` (2048) tokens of ``blocks``."""
    if config.needs_calibration and calibration is None:
        if blocks is None:
            raise ValueError(f"{who}: the post-training method {config.method!r} needs calibration text")
        calibration = calibration_batches(blocks, outputs.tokens if outputs is not None else 2048)
    quantize_(model, config, calibration=calibration, progress=progress)


def _check_float_model(model: nn.Module, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch nn.Module, got {type(model).__name__}")
    if quantized_layers(model):
        raise ValueError(f"{who}: the model is already quantized; pass the float model (the method quantizes it)")


def _start(model: nn.Module, who: str, blocks: Blocks | None, train_cfg: TrainConfig | None, backend: str,
           outputs: OutputCalibration | None) -> tuple[float, TrainConfig, _Backend]:
    """The start of every QAT method: ``model`` must be float; ``(start time, TrainConfig, backend)``."""
    _check_float_model(model, who)
    t0 = time.perf_counter()
    cfg = train_cfg or TrainConfig()
    return t0, cfg, _Backend(model, blocks, backend, outputs, cfg.progress, who)


def _ensure_fp32(model: nn.Module) -> None:
    """fp32 master weights: a bf16/fp16 model is upcast (never the other way round)."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        print("[wasq] upcasting the model to float32 for training (fp32 master weights)", file=sys.stderr)
        model.float()


# --------------------------------------------------------------------------- vanilla / fpm


def vanilla(model: nn.Module, config: WASQConfig, *, calibration: Iterable[Any] | None = None,
            outputs: OutputCalibration | None = None) -> MethodResult:
    """Post-training quantization: ``quantize_(model, config)`` (round to nearest, or the
    post-training method ``config.method``; ``calibration`` batches feed that method and set
    static activation exponents when ``config.act_exponent == "static"``). With ``outputs``,
    the static output exponents are calibrated on ``calibration`` too."""
    _check_float_model(model, "vanilla")
    t0 = time.perf_counter()
    quantize_(model, config, calibration=calibration)
    extra: dict[str, Any] = {}
    if outputs is not None:
        if calibration is None:
            raise ValueError("vanilla: calibrating output exponents (outputs=) needs calibration batches")
        from .accelerator import calibrate_outputs_

        batches = list(calibration)
        calibrate_outputs_(model, batches, out_bits=outputs.out_bits, headroom=outputs.headroom)
        extra = {"backend": "fake", "output_calibration": {**outputs.to_dict(), "events": [
            {"when": "after quantization", "tokens": int(sum(torch.as_tensor(b).numel() for b in batches))}]}}
    return MethodResult("vanilla", model, config, seconds=time.perf_counter() - t0, extra=extra)


def fpm(model: nn.Module, blocks: Blocks, config: WASQConfig, train_cfg: TrainConfig | None = None, *,
        state_dir: str | Path | None = None, resume: bool = False,
        callback: Callable[[int, float], None] | None = None, backend: str = "fake",
        outputs: OutputCalibration | None = None, calibration: Iterable[Any] | None = None,
        **train_kwargs: Any) -> MethodResult:
    """Full parameter method: quantize, then QAT of *every* parameter (embeddings, norms
    and LM head included; the quantized linears through the STE) for ``train_cfg.epochs``
    passes over ``blocks``.

    ``config.method`` other than ``"rtn"`` initialises QAT from that post-training method
    (``"gptq"``, ``"adaround"``, ``"awq"``, ...; run on ``calibration``, default the first
    ``outputs.tokens`` tokens of ``blocks``). ``backend="accelerator"`` trains on the
    accelerator's arithmetic (:class:`OutputCalibration`, docs/wasq-methods.md); ``outputs``
    calibrates the static output exponents (always with the accelerator backend)."""
    t0, cfg, be = _start(model, "fpm", blocks, train_cfg, backend, outputs)
    _ensure_fp32(model)
    _quantize_and_freeze(model, config, None, "fpm", calibration, blocks, be.outputs, cfg.progress)
    be.before_train()
    stats = train(model, blocks, cfg, state_dir=state_dir, resume=resume, callback=callback, desc="fpm",
                  run_id={"method": "fpm", "quant": json.dumps(config.to_dict(), sort_keys=True), **be.run_id()},
                  epoch_start=be.epoch_start, checkpoint_objects=be.checkpoint_objects(), **train_kwargs)
    be.after_train()
    return MethodResult("fpm", model, config, stats, list(quantized_layers(model)), time.perf_counter() - t0,
                        be.summary())


# --------------------------------------------------------------------------- opt


def _choose(model: nn.Module, blocks: Blocks, config: WASQConfig, layers: Sequence[str] | None,
            analysis: Analysis | None, fraction: float | str, analysis_blocks: Blocks | None,
            progress: bool) -> tuple[list[str], Analysis | None]:
    if layers is not None:
        layers = list(layers)
        if not layers:
            raise ValueError("opt: the list of layers to train is empty")
        return layers, analysis
    if analysis is None:
        ab = analysis_blocks if analysis_blocks is not None else blocks.subset(range(min(len(blocks), 4)))
        # ranked by round to nearest (a post-training initialisation needs calibration text and
        # changes the float model: the ranking stays the one of the plain format)
        analysis = analyze(model, ab, config.replace(method="rtn") if config.method != "rtn" else config,
                           progress=progress)
    return select_layers(analysis, fraction), analysis


def _quantize_and_freeze(model: nn.Module, config: WASQConfig, layers: list[str] | None, who: str,
                        calibration: Iterable[Any] | None = None, blocks: Blocks | None = None,
                        outputs: OutputCalibration | None = None, progress: bool = False) -> None:
    """:func:`_prepare`, then train only ``layers`` (None: every parameter)."""
    _prepare(model, config, calibration, blocks, outputs, progress, who)
    q = quantized_layers(model)
    bad = [n for n in layers or () if n not in q]
    if bad:
        raise ValueError(f"{who}: {bad[0]!r} is not a quantized layer of this model "
                         f"({len(q)} are, e.g. {next(iter(q), '?')!r})")
    freeze_all_but(model, layers)


def opt(model: nn.Module, blocks: Blocks, config: WASQConfig, train_cfg: TrainConfig | None = None, *,
        layers: Sequence[str] | None = None, analysis: Analysis | None = None, fraction: float | str = 0.25,
        analysis_blocks: Blocks | None = None, state_dir: str | Path | None = None, resume: bool = False,
        callback: Callable[[int, float], None] | None = None, backend: str = "fake",
        outputs: OutputCalibration | None = None, calibration: Iterable[Any] | None = None,
        **train_kwargs: Any) -> MethodResult:
    """QAT of the critical layers only: the layers ``analysis`` (computed with
    :func:`analyze` on ``analysis_blocks``, default the first 4 training blocks, when not
    given) ranks as most disturbed by quantization, top ``fraction`` (or the critical
    cluster with ``fraction="cluster"``), unless ``layers`` names them. Only those
    layers' weights and biases train; every other parameter stays bit for bit.
    ``backend``, ``outputs``, ``calibration`` and a post-training ``config.method``: as
    :func:`fpm` (the analysis ranks layers by round to nearest)."""
    t0, cfg, be = _start(model, "opt", blocks, train_cfg, backend, outputs)
    _ensure_fp32(model)
    chosen, analysis = _choose(model, blocks, config, layers, analysis, fraction, analysis_blocks, cfg.progress)
    t_an = time.perf_counter() - t0
    _quantize_and_freeze(model, config, chosen, "opt", calibration, blocks, be.outputs, cfg.progress)
    be.before_train()
    stats = train(model, blocks, cfg, state_dir=state_dir, resume=resume, callback=callback, desc="opt",
                  run_id={"method": "opt", "layers": ",".join(chosen),
                          "quant": json.dumps(config.to_dict(), sort_keys=True), **be.run_id()},
                  epoch_start=be.epoch_start, checkpoint_objects=be.checkpoint_objects(), **train_kwargs)
    be.after_train()
    return MethodResult("opt", model, config, stats, chosen, time.perf_counter() - t0,
                        {"analysis": analysis, "analysis_seconds": t_an, "fraction": fraction, **be.summary()})


# --------------------------------------------------------------------------- fasteropt


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the transformer blocks: the longest ``nn.ModuleList`` whose
    every entry holds linear layers (``model.layers``, ``transformer.h``, ``decoder.layers``)."""
    from transformers.pytorch_utils import Conv1D

    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if all(any(isinstance(m, (nn.Linear, Conv1D)) for m in child.modules()) for child in mod):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise ValueError(f"fasteropt: cannot find the transformer blocks of {type(model).__name__} "
                         f"(no ModuleList of blocks holding linear layers); use opt")
    return best


class _StopForward(Exception):
    pass


class _Skip(nn.Module):
    """Stands in for a frozen block whose output is cached: returns its input."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):  # noqa: D401
        return (hidden_states,) if self.as_tuple else hidden_states


class PrefixCache:
    """Caches the input of transformer block ``first`` for every training block, so that
    training runs blocks ``first..`` only. Valid because nothing before block ``first``
    trains (embeddings and earlier blocks are frozen), so those inputs never change.

    Use :meth:`build` once, then ``with cache.installed(): train(..., forward=cache.forward)``.
    """

    def __init__(self, model: nn.Module, first: int) -> None:
        self.model = model
        self.list_name, self.blocks = decoder_blocks(model)
        if not 0 <= first < len(self.blocks):
            raise ValueError(f"fasteropt: first trained block {first} is outside 0..{len(self.blocks) - 1}")
        self.first = first
        self.hidden: torch.Tensor | None = None  # [N, T, D]
        self.as_tuple = False
        self.current: torch.Tensor | None = None
        self.seconds = 0.0

    @staticmethod
    def _get_hidden(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    @torch.no_grad()
    def build(self, blocks: Blocks, batch_size: int = 1) -> None:
        t0 = time.perf_counter()
        target = self.blocks[self.first]
        store: list[torch.Tensor] = []

        def grab(mod, args, kwargs):
            store.append(self._get_hidden(args, kwargs).detach().clone())
            raise _StopForward

        def out_kind(mod, args, out):
            self.as_tuple = isinstance(out, tuple)

        h1 = target.register_forward_pre_hook(grab, with_kwargs=True)
        h2 = self.blocks[0].register_forward_hook(out_kind) if self.first > 0 else None
        dev = next(self.model.parameters()).device
        with evaluating(self.model, hooks=[h for h in (h1, h2) if h is not None]):
            for s in range(0, len(blocks), batch_size):
                b = blocks.batch(range(s, min(s + batch_size, len(blocks))), dev)
                try:
                    default_forward(self.model, b)
                except _StopForward:
                    pass
        self.hidden = torch.cat(store, 0)
        self.seconds = time.perf_counter() - t0

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.current = batch["index"]
        return default_forward(model, batch)

    def installed(self):
        import contextlib

        cache = self

        @contextlib.contextmanager
        def ctx():
            if cache.hidden is None:
                raise RuntimeError("PrefixCache.build() first")
            saved = [cache.blocks[i] for i in range(cache.first)]

            def feed(mod, args, kwargs):
                h = cache.hidden[cache.current.cpu()].to(cache._get_hidden(args, kwargs).device)
                if args:
                    args = (h, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": h}
                return args, kwargs

            for i in range(cache.first):
                cache.blocks[i] = _Skip(cache.as_tuple)
            handle = cache.blocks[cache.first].register_forward_pre_hook(feed, with_kwargs=True)
            try:
                yield cache
            finally:
                handle.remove()
                for i, m in enumerate(saved):
                    cache.blocks[i] = m

        return ctx()


def fasteropt(model: nn.Module, blocks: Blocks, config: WASQConfig, train_cfg: TrainConfig | None = None, *,
              layers: Sequence[str] | None = None, analysis: Analysis | None = None, fraction: float | str = 0.25,
              analysis_blocks: Blocks | None = None, state_dir: str | Path | None = None, resume: bool = False,
              callback: Callable[[int, float], None] | None = None, backend: str = "fake",
              outputs: OutputCalibration | None = None, calibration: Iterable[Any] | None = None,
              **train_kwargs: Any) -> MethodResult:
    """:func:`opt`, faster: everything before the first transformer block that holds a
    trained layer is frozen, so its output for each training block is computed once (no
    grad) and cached; each training step then runs (forward and backward) only from that
    block on. Saves ``(epochs - 1) / epochs`` of the prefix forward passes (all of them
    after the first pass); the result equals :func:`opt`'s (bit for bit on CPU when the
    cache is built with the training batch size, which it is). ``backend``, ``outputs``,
    ``calibration``: as :func:`opt`; on the accelerator the cached prefix is computed
    accelerator-exact, and ``outputs.recalibrate="epoch"`` is refused (the calibration pass
    cannot run while the prefix is cached; use :func:`opt`)."""
    t0, cfg, be = _start(model, "fasteropt", blocks, train_cfg, backend, outputs)
    if be.accelerator and be.outputs.recalibrate == "epoch":
        raise ValueError("fasteropt: recalibrate='epoch' is not supported (the calibration pass cannot run while "
                         "the frozen prefix is cached); use opt, or recalibrate='never'/'end'")
    _ensure_fp32(model)
    chosen, analysis = _choose(model, blocks, config, layers, analysis, fraction, analysis_blocks, cfg.progress)
    t_an = time.perf_counter() - t0
    _quantize_and_freeze(model, config, chosen, "fasteropt", calibration, blocks, be.outputs, cfg.progress)
    be.before_train()
    list_name, blist = decoder_blocks(model)
    prefix = list_name + "."
    idx = []
    for n in chosen:
        if not n.startswith(prefix):
            idx.append(0)  # a trained layer outside the blocks: no prefix can be skipped
        else:
            idx.append(int(n[len(prefix):].split(".", 1)[0]))
    first = min(idx)
    cache = PrefixCache(model, first)
    if first > 0:
        cache.build(blocks, batch_size=cfg.batch_size)
    run_id = {"method": "fasteropt", "layers": ",".join(chosen), "quant": json.dumps(config.to_dict(), sort_keys=True),
              **be.run_id()}
    kw = dict(state_dir=state_dir, resume=resume, callback=callback, desc="fasteropt", run_id=run_id,
              epoch_start=be.epoch_start, checkpoint_objects=be.checkpoint_objects(), **train_kwargs)
    if first == 0:
        stats = train(model, blocks, cfg, **kw)
    else:
        with cache.installed():
            stats = train(model, blocks, cfg, forward=cache.forward, **kw)
    cache.hidden = None
    be.after_train()
    extra = {"analysis": analysis, "analysis_seconds": t_an, "fraction": fraction, "first_trained_block": first,
             "blocks": len(blist), "cache_seconds": cache.seconds, **be.summary()}
    return MethodResult("fasteropt", model, config, stats, chosen, time.perf_counter() - t0, extra)


# --------------------------------------------------------------------------- lth


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all quantized linear layers."""
    layers = quantized_layers(model)
    tot = sum(m.weight.numel() for m in layers.values())
    zero = sum(int((m.weight.detach() == 0).sum()) for m in layers.values())
    return zero / tot if tot else 0.0


def _prune(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per layer, zero the ``round(fraction * remaining)`` smallest-magnitude surviving
    weights (ties broken by position: deterministic)."""
    out = {}
    for name, w in weights.items():
        m = masks[name].reshape(-1).clone()
        alive = torch.nonzero(m, as_tuple=False).reshape(-1)
        k = int(round(fraction * alive.numel()))
        if k > 0:
            mag = w.detach().reshape(-1)[alive].abs()
            order = torch.argsort(mag, stable=True)
            m[alive[order[:k]]] = False
        out[name] = m.reshape(w.shape)
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lth(model: nn.Module, blocks: Blocks, config: WASQConfig, train_cfg: TrainConfig | None = None, *,
        rounds: int = 2, prune: float = 0.2, eval_fn: Callable[[nn.Module], float] | None = None,
        state_dir: str | Path | None = None, resume: bool = False,
        callback: Callable[[int, float], None] | None = None, backend: str = "fake",
        outputs: OutputCalibration | None = None, calibration: Iterable[Any] | None = None,
        **train_kwargs: Any) -> MethodResult:
    """Lottery-ticket QAT: iterative magnitude pruning with rewinding.

    Round 0 trains the dense quantized model (every parameter, like :func:`fpm`). Then
    ``rounds`` times: prune ``prune`` of the surviving weights of every quantized layer
    (smallest trained magnitude, per layer), rewind *every* parameter to its pretrained
    value, apply the masks, and train again. Masked weights are held at exactly zero
    throughout: their gradients are masked and the masks are re-applied after every
    optimizer step, and SFx encodes 0 as code 0, so they stay zero in the export.

    ``eval_fn(model) -> float`` (e.g. perplexity) is recorded after each round's training
    in ``extra["rounds"]`` as ``{round, sparsity, eval, loss}``: sparsity against quality.
    With ``state_dir`` each round keeps its own resumable checkpoints and the masks are
    saved, so ``resume`` continues where a run stopped. ``backend``, ``outputs``,
    ``calibration``: as :func:`fpm`; on the accelerator the output exponents are calibrated
    at the start of every round (after rewinding and masking).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"lth: rounds must be an int >= 0, got {rounds!r}")
    if not isinstance(prune, (int, float)) or not 0 < prune < 1:
        raise ValueError(f"lth: prune must be a fraction in (0, 1), got {prune!r}")
    t0, cfg, be = _start(model, "lth", blocks, train_cfg, backend, outputs)
    _ensure_fp32(model)
    _quantize_and_freeze(model, config, None, "lth", calibration, blocks, be.outputs, cfg.progress)
    layers = quantized_layers(model)
    pretrained = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    sd = Path(state_dir) if state_dir is not None else None
    records: list[dict[str, Any]] = []
    rec_path = sd / "lth_rounds.json" if sd is not None else None
    if resume and rec_path is not None and rec_path.is_file():
        records = json.loads(rec_path.read_text())
    stats: TrainStats | None = None
    total_seconds_train = 0.0
    for r in range(rounds + 1):
        if r > 0:
            mpath = sd / f"masks-round{r}.pt" if sd is not None else None
            if resume and mpath is not None and mpath.is_file():
                masks = {k: v.to(torch.bool) for k, v in torch.load(mpath).items()}
            else:
                masks = _prune({n: m.weight for n, m in layers.items()}, masks, prune)
                if mpath is not None:
                    _atomic_torch_save(masks, mpath)
        with torch.no_grad():  # rewind everything to the pretrained weights, then mask
            model.load_state_dict(pretrained)
            for n, m in layers.items():
                m.weight.mul_(masks[n].to(m.weight.dtype))
        hooks = [m.weight.register_hook(lambda g, mk=masks[n]: g * mk.to(g.dtype)) for n, m in layers.items()]

        def apply_masks() -> None:
            with torch.no_grad():
                for n, m in layers.items():
                    m.weight.mul_(masks[n].to(m.weight.dtype))

        be.before_train()
        try:
            stats = train(model, blocks, cfg, state_dir=(sd / f"round-{r}") if sd is not None else None,
                          resume=resume, callback=callback, post_step=apply_masks, desc=f"lth round {r}",
                          run_id={"method": "lth", "round": r, "prune": prune,
                                  "quant": json.dumps(config.to_dict(), sort_keys=True), **be.run_id()},
                          epoch_start=be.epoch_start, checkpoint_objects=be.checkpoint_objects(), **train_kwargs)
        finally:
            for h in hooks:
                h.remove()
        apply_masks()  # a resumed round loads weights saved after the post-step masking; harmless either way
        total_seconds_train += stats.seconds
        sp = sparsity(model)
        if len(records) > r:
            rec = records[r]
        else:
            rec = {"round": r, "sparsity": sp, "loss": stats.last_loss,
                   "eval": float(eval_fn(model)) if eval_fn is not None else None}
            records.append(rec)
            if rec_path is not None:
                rec_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = rec_path.with_name(f".lth_rounds.json.tmp{os.getpid()}")  # (one per process: several may write)
                tmp.write_text(json.dumps(records, indent=2) + "\n")
                os.replace(tmp, rec_path)
        print(f"[lth] round {r}: sparsity {sp:.3f}, last loss {stats.last_loss:.4f}"
              + (f", eval {rec['eval']:.4g}" if rec.get("eval") is not None else ""), file=sys.stderr)
    be.after_train()
    extra = {"rounds": records, "prune": prune, "sparsity": sparsity(model), "train_seconds_all_rounds":
             total_seconds_train, "masks": {n: m.clone() for n, m in masks.items()}, **be.summary()}
    return MethodResult("lth", model, config, stats, list(layers), time.perf_counter() - t0, extra)


# --------------------------------------------------------------------------- dispatcher


def run_method(method: str, model: nn.Module, blocks: Blocks | None, config: WASQConfig,
               train_cfg: TrainConfig | None = None, **kwargs: Any) -> MethodResult:
    """Dispatch by name (:data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "vanilla":
        return vanilla(model, config, calibration=kwargs.get("calibration"), outputs=kwargs.get("outputs"))
    if blocks is None:
        raise ValueError(f"method {method!r} trains: it needs calibration blocks")
    fn = {"fpm": fpm, "opt": opt, "fasteropt": fasteropt, "lth": lth}[method]
    return fn(model, blocks, config, train_cfg, **kwargs)

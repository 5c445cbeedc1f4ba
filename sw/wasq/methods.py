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
from .quantize import quantize_, quantized_layers
from .train import Blocks, TrainConfig, TrainStats, default_forward, freeze_all_but, train

__all__ = ["MethodResult", "METHODS", "vanilla", "fpm", "opt", "fasteropt", "lth", "run_method", "PrefixCache",
           "decoder_blocks", "sparsity"]

METHODS = ("vanilla", "fpm", "opt", "fasteropt", "lth")


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


def _check_float_model(model: nn.Module, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch nn.Module, got {type(model).__name__}")
    if quantized_layers(model):
        raise ValueError(f"{who}: the model is already quantized; pass the float model (the method quantizes it)")


def _ensure_fp32(model: nn.Module) -> None:
    """fp32 master weights: a bf16/fp16 model is upcast (never the other way round)."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        print("[wasq] upcasting the model to float32 for training (fp32 master weights)", file=sys.stderr)
        model.float()


# --------------------------------------------------------------------------- vanilla / fpm


def vanilla(model: nn.Module, config: WASQConfig, *, calibration: Iterable[Any] | None = None) -> MethodResult:
    """Post-training round-to-nearest: ``quantize_(model, config)`` (``calibration``
    batches set static activation exponents when ``config.act_exponent == "static"``)."""
    _check_float_model(model, "vanilla")
    t0 = time.perf_counter()
    quantize_(model, config, calibration=calibration)
    return MethodResult("vanilla", model, config, seconds=time.perf_counter() - t0)


def fpm(model: nn.Module, blocks: Blocks, config: WASQConfig, train_cfg: TrainConfig | None = None, *,
        state_dir: str | Path | None = None, resume: bool = False,
        callback: Callable[[int, float], None] | None = None, **train_kwargs: Any) -> MethodResult:
    """Full parameter method: quantize, then QAT of *every* parameter (embeddings, norms
    and LM head included; the quantized linears through the STE) for ``train_cfg.epochs``
    passes over ``blocks``."""
    _check_float_model(model, "fpm")
    t0 = time.perf_counter()
    _ensure_fp32(model)
    quantize_(model, config)
    freeze_all_but(model, None)
    stats = train(model, blocks, train_cfg, state_dir=state_dir, resume=resume, callback=callback, desc="fpm",
                  run_id={"method": "fpm", "quant": json.dumps(config.to_dict(), sort_keys=True)}, **train_kwargs)
    return MethodResult("fpm", model, config, stats, list(quantized_layers(model)), time.perf_counter() - t0)


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
        analysis = analyze(model, ab, config, progress=progress)
    return select_layers(analysis, fraction), analysis


def _quantize_and_freeze(model: nn.Module, config: WASQConfig, layers: list[str], who: str) -> None:
    quantize_(model, config)
    q = quantized_layers(model)
    bad = [n for n in layers if n not in q]
    if bad:
        raise ValueError(f"{who}: {bad[0]!r} is not a quantized layer of this model "
                         f"({len(q)} are, e.g. {next(iter(q), '?')!r})")
    freeze_all_but(model, layers)


def opt(model: nn.Module, blocks: Blocks, config: WASQConfig, train_cfg: TrainConfig | None = None, *,
        layers: Sequence[str] | None = None, analysis: Analysis | None = None, fraction: float | str = 0.25,
        analysis_blocks: Blocks | None = None, state_dir: str | Path | None = None, resume: bool = False,
        callback: Callable[[int, float], None] | None = None, **train_kwargs: Any) -> MethodResult:
    """QAT of the critical layers only: the layers ``analysis`` (computed with
    :func:`analyze` on ``analysis_blocks``, default the first 4 training blocks, when not
    given) ranks as most disturbed by quantization, top ``fraction`` (or the critical
    cluster with ``fraction="cluster"``), unless ``layers`` names them. Only those
    layers' weights and biases train; every other parameter stays bit for bit."""
    _check_float_model(model, "opt")
    t0 = time.perf_counter()
    _ensure_fp32(model)
    progress = (train_cfg or TrainConfig()).progress
    chosen, analysis = _choose(model, blocks, config, layers, analysis, fraction, analysis_blocks, progress)
    t_an = time.perf_counter() - t0
    _quantize_and_freeze(model, config, chosen, "opt")
    stats = train(model, blocks, train_cfg, state_dir=state_dir, resume=resume, callback=callback, desc="opt",
                  run_id={"method": "opt", "layers": ",".join(chosen),
                          "quant": json.dumps(config.to_dict(), sort_keys=True)}, **train_kwargs)
    return MethodResult("opt", model, config, stats, chosen, time.perf_counter() - t0,
                        {"analysis": analysis, "analysis_seconds": t_an, "fraction": fraction})


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
        was = self.model.training
        self.model.eval()
        dev = next(self.model.parameters()).device
        try:
            for s in range(0, len(blocks), batch_size):
                b = blocks.batch(range(s, min(s + batch_size, len(blocks))), dev)
                try:
                    default_forward(self.model, b)
                except _StopForward:
                    pass
        finally:
            h1.remove()
            if h2 is not None:
                h2.remove()
            self.model.train(was)
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
              callback: Callable[[int, float], None] | None = None, **train_kwargs: Any) -> MethodResult:
    """:func:`opt`, faster: everything before the first transformer block that holds a
    trained layer is frozen, so its output for each training block is computed once (no
    grad) and cached; each training step then runs (forward and backward) only from that
    block on. Saves ``(epochs - 1) / epochs`` of the prefix forward passes (all of them
    after the first pass); the result equals :func:`opt`'s (bit for bit on CPU when the
    cache is built with the training batch size, which it is)."""
    _check_float_model(model, "fasteropt")
    t0 = time.perf_counter()
    _ensure_fp32(model)
    cfg = train_cfg or TrainConfig()
    chosen, analysis = _choose(model, blocks, config, layers, analysis, fraction, analysis_blocks, cfg.progress)
    t_an = time.perf_counter() - t0
    _quantize_and_freeze(model, config, chosen, "fasteropt")
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
    extra = {"analysis": analysis, "analysis_seconds": t_an, "fraction": fraction, "first_trained_block": first,
             "blocks": len(blist), "cache_seconds": cache.seconds}
    run_id = {"method": "fasteropt", "layers": ",".join(chosen), "quant": json.dumps(config.to_dict(), sort_keys=True)}
    if first == 0:
        stats = train(model, blocks, cfg, state_dir=state_dir, resume=resume, callback=callback, desc="fasteropt",
                      run_id=run_id, **train_kwargs)
    else:
        with cache.installed():
            stats = train(model, blocks, cfg, state_dir=state_dir, resume=resume, callback=callback,
                          forward=cache.forward, desc="fasteropt", run_id=run_id, **train_kwargs)
    cache.hidden = None
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
        callback: Callable[[int, float], None] | None = None, **train_kwargs: Any) -> MethodResult:
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
    saved, so ``resume`` continues where a run stopped.
    """
    _check_float_model(model, "lth")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"lth: rounds must be an int >= 0, got {rounds!r}")
    if not isinstance(prune, (int, float)) or not 0 < prune < 1:
        raise ValueError(f"lth: prune must be a fraction in (0, 1), got {prune!r}")
    t0 = time.perf_counter()
    _ensure_fp32(model)
    quantize_(model, config)
    freeze_all_but(model, None)
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

        try:
            stats = train(model, blocks, train_cfg, state_dir=(sd / f"round-{r}") if sd is not None else None,
                          resume=resume, callback=callback, post_step=apply_masks, desc=f"lth round {r}",
                          run_id={"method": "lth", "round": r, "prune": prune,
                                  "quant": json.dumps(config.to_dict(), sort_keys=True)}, **train_kwargs)
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
    extra = {"rounds": records, "prune": prune, "sparsity": sparsity(model), "train_seconds_all_rounds":
             total_seconds_train, "masks": {n: m.clone() for n, m in masks.items()}}
    return MethodResult("lth", model, config, stats, list(layers), time.perf_counter() - t0, extra)


# --------------------------------------------------------------------------- dispatcher


def run_method(method: str, model: nn.Module, blocks: Blocks | None, config: WASQConfig,
               train_cfg: TrainConfig | None = None, **kwargs: Any) -> MethodResult:
    """Dispatch by name (:data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "vanilla":
        return vanilla(model, config, calibration=kwargs.get("calibration"))
    if blocks is None:
        raise ValueError(f"method {method!r} trains: it needs calibration blocks")
    fn = {"fpm": fpm, "opt": opt, "fasteropt": fasteropt, "lth": lth}[method]
    kwargs.pop("calibration", None)
    return fn(model, blocks, config, train_cfg, **kwargs)

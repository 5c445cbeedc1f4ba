"""The post-training passes, run by :func:`superfloat.sw.wasq.quantize_` for ``config.method != "rtn"``.

Order (each step optional, see :class:`~superfloat.sw.wasq.ptq.MethodOptions`):

0. rotations folded into the float model (:mod:`.rotation`; before calibration, so that
   the captured inputs are the rotated model's);
1. capture the float model's layer inputs on the calibration tokens (:mod:`.calib`);
2. SmoothQuant factors folded into norms / previous linears (:mod:`.smoothquant`);
3. mixed precision: sensitivity ranking, bits per layer (:mod:`.mixed_precision`);
4. AWQ scale search, folded like SmoothQuant (:mod:`.awq`);
5. group sizes (fixed, or dynamic per layer);
6. per layer: clip search (AWQ clip / outlier-aware, or GPTQ's weight-MSE clip), then RTN,
   AdaRound (:mod:`.adaround`) or GPTQ (:mod:`.gptq`) codes;
7. per layer: the activation quantizer; static ranges searched per layer
   (:mod:`.clipping`);
8. every quantized ``nn.Linear`` / ``Conv1D`` is replaced by the one quantized layer,
   :class:`~superfloat.sw.wasq.SFxLinear`, holding the chosen codes (``load_quantized``).

Steps 2 and 4 leave the float model's function unchanged; the captured inputs are
rescaled alongside, so one calibration pass serves everything. The searches of steps 4
and 6 use ``search_tokens`` evenly spaced calibration tokens; AdaRound and the
sensitivities use all of them.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..config import WASQConfig
from ..formats import ActQuantizer, quantize_levels, quantize_weight, weight_grid
from ..layers import set_module
from ..qlinear import SFxLinear
from .adaround import adaround_levels
from .awq import awq_scale_, choose_group_sizes, clip_search
from .calib import Calibration
from .clipping import calibrate_act
from .config import GROUP_CHOICES
from .gptq import gptq_levels, mse_clip
from .graph import linear_weight, scale_groups
from .mixed_precision import allocate_bits, analyze_ranking, layer_sensitivity
from .rotation import attach_online_rotations, rotate_
from .smoothquant import smooth_

__all__ = ["run_method", "PTQReport"]


@dataclass
class PTQReport:
    """What the method's passes did: per layer and per scale group, and how long each step took."""

    config: WASQConfig
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calib_tokens: int = 0
    ranking: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def hardware_executable(self) -> bool:
        return self.config.hardware_executable

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "hardware_executable": self.hardware_executable,
                "hardware_notes": self.config.hardware_notes(), "layers": self.layers, "groups": self.groups,
                "seconds": self.seconds, "calib_tokens": self.calib_tokens, "ranking": self.ranking,
                "notes": self.notes}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[ptq] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def run_method(model: nn.Module, config: WASQConfig, cands: dict[str, str],
               calibration: Calibration | Iterable[Any] | None = None, *, calib_tokens: int | None = None,
               search_tokens: int = 256, progress: bool = False, weight_cache: dict | None = None) -> PTQReport:
    """Run ``config.method``'s passes on the float ``model`` and convert the layers ``cands``
    (``{name: "linear"|"conv1d"}``) to :class:`SFxLinear` with the chosen codes (in place).

    Args:
        model: a float transformers causal LM (Llama-style, OPT or GPT-2 for the scale
            searches; any model with ``nn.Linear``/``Conv1D`` layers otherwise).
        config: the formats and the method (``config.options`` are its knobs).
        cands: the layers to quantize (:func:`superfloat.sw.wasq.candidate_layers`).
        calibration: token batches (``[B, T]`` / ``[T]`` tensors or dicts, no padding), or a
            :class:`Calibration` captured from this very float model (it is not modified).
            Required when ``config.needs_calibration``.
        calib_tokens: cap on the calibration tokens captured from batches.
        search_tokens: tokens used by the AWQ scale/clip and activation-range searches.
        weight_cache: a dict shared across calls to reuse quantized weights (clip search,
            AdaRound) when a layer's float weights, calibration inputs and weight settings
            are identical (keys hold digests of both tensors), e.g. the same AdaRound
            weights for W4A16, W4A8 and W4A4.
    Returns:
        a :class:`PTQReport`.

    Raises:
        ValueError: missing calibration, unsupported architecture for SmoothQuant/AWQ.
    """
    opt = config.options
    report = PTQReport(config)
    t_all = time.perf_counter()
    names = list(cands)
    scaling = opt.scaling

    # 0. rotations (change the float weights: before anything is captured)
    online_rotations = {}
    if opt.rotate is not None:
        if isinstance(calibration, Calibration):
            raise ValueError(f"PTQ method {config.method!r} rotates the model before calibrating it: pass token "
                             f"batches as calibration=, not a Calibration captured from the unrotated model")
        t0 = time.perf_counter()
        rot = rotate_(model, kind=opt.rotate, seed=opt.rotate_seed, online=opt.rotate_online, heads=opt.rotate_heads)
        online_rotations = rot["online"]
        report.groups["_rotation"] = {k: v for k, v in rot.items() if k != "online"} | {
            "online_layers": len(online_rotations), "online_where": "host (float)" if online_rotations else None}
        report.seconds["rotation"] = time.perf_counter() - t0
        _log(progress, f"rotation: residual {rot['residual']}, heads {rot['heads']}, down_proj input {rot['down']} "
                       f"(online on the host)")

    groups = scale_groups(model) if scaling else []  # unsupported architectures fail before calibration
    # a scale folded into a layer that an online rotation feeds would not commute with the rotation
    groups = [g for g in groups if not set(g.consumers) & set(online_rotations)]

    # 1. calibration
    calib = None
    if config.needs_calibration:
        if calibration is None:
            raise ValueError(f"PTQ method {config.method!r} needs calibration data: pass calibration= token batches "
                             f"(e.g. superfloat.sw.wasq.data.calibration_batches(ids, 512, 2048))")
        t0 = time.perf_counter()
        if isinstance(calibration, Calibration):
            missing = [n for n in names if n not in calibration]
            if missing:
                raise ValueError(f"the Calibration has no inputs for layer {missing[0]!r}; was it captured from this "
                                 f"model with the same skip patterns?")
            calib = Calibration(dict(calibration.inputs) if scaling else calibration.inputs,
                                dict(calibration.key_of), calibration.tokens, calibration.batches)
        else:
            calib = Calibration.collect(model, calibration, names, max_tokens=calib_tokens, progress=progress)
        report.calib_tokens = calib.tokens
        report.seconds["calibration"] = time.perf_counter() - t0
        _log(progress, f"calibration: {calib.tokens} tokens, {len(calib.inputs)} distinct layer inputs")

    # 2. SmoothQuant
    if opt.smoothquant is not None:
        t0 = time.perf_counter()
        rep = smooth_(model, calib, float(opt.smoothquant), groups=groups, which=opt.smooth_groups)
        for g, r in rep.items():
            report.groups.setdefault(g, {})["smoothquant"] = r
        report.seconds["smoothquant"] = time.perf_counter() - t0
        _log(progress, f"smoothquant: alpha {opt.smoothquant}, {len(rep)} groups")

    def base_act(bits: int | None) -> ActQuantizer | None:
        if bits is None:
            return None
        return ActQuantizer(config.codes, bits, config.act_exponent, scale_kind=config.act_scale, rounding=config.rounding,
                            clip_ratio=config.act_clip_ratio)

    def search_act(bits: int | None) -> ActQuantizer | None:  # static ranges are not calibrated yet: per token
        if bits is None:
            return None
        return ActQuantizer(config.codes, bits, "dynamic", rounding=config.rounding)

    # 3. mixed precision
    wbits = {n: config.weight_bits for n in names}
    abits = {n: config.act_bits for n in names}
    if opt.mixed_precision:
        t0 = time.perf_counter()
        hb = opt.mp_high_bits
        promotable = hb > config.weight_bits or (opt.mp_act and config.act_bits is not None and hb > config.act_bits)
        if not promotable:
            report.notes.append(f"mixed precision: W{config.weight_bits}A{config.act_bits or 16} is already at or "
                                f"above {hb} bits; nothing promoted")
        else:
            sens, how = _sensitivity(model, calib, names, config, calibration, search_act, search_tokens)
            report.ranking = how
            sizes = {n: int(linear_weight(model.get_submodule(n)).numel()) for n in names}
            chosen = allocate_bits(sens, sizes, 0, 1, fraction=float(opt.mp_fraction))
            for n, hi in chosen.items():
                if hi:
                    wbits[n] = max(config.weight_bits, hb)
                    if opt.mp_act and config.act_bits is not None:
                        abits[n] = max(config.act_bits, hb)
                report.layers.setdefault(n, {})["sensitivity"] = sens[n]
            _log(progress, f"mixed precision ({how}): {sum(chosen.values())} of {len(names)} layers at {hb} bits")
        report.seconds["mixed_precision"] = time.perf_counter() - t0

    # 4. AWQ scales
    fixed_group = config.group_size if isinstance(config.group_size, int) else None
    if opt.awq:
        t0 = time.perf_counter()
        search_group = fixed_group if fixed_group is not None else (config.group_budget if config.group_size ==
                                                                    "dynamic" else None)
        rep = awq_scale_(model, calib, lambda n: config.weight_format(wbits.get(n, config.weight_bits), search_group),
                         lambda n: search_act(abits.get(n, config.act_bits)), grid=opt.awq_grid,
                         tokens=search_tokens, groups=groups)
        for g, r in rep.items():
            report.groups.setdefault(g, {})["awq"] = r
        report.seconds["awq_scale"] = time.perf_counter() - t0
        n_scaled = sum(1 for r in rep.values() if r["alpha"] is not None)
        _log(progress, f"awq: {n_scaled} of {len(rep)} groups scaled")

    # 5. group sizes
    gsize: dict[str, int | None] = {n: fixed_group for n in names}
    if config.group_size == "dynamic":
        t0 = time.perf_counter()
        stats = {}
        for n in names:
            w = linear_weight(model.get_submodule(n)).to(torch.float32)
            x = calib.x(n)
            stats[n] = (w, x.double().pow(2).mean(0))
        choice, info = choose_group_sizes(stats, lambda n: config.weight_format(wbits[n]), budget=config.group_budget,
                                          choices=GROUP_CHOICES)
        gsize.update(choice)
        report.groups["_dynamic_groups"] = info
        report.seconds["group_sizes"] = time.perf_counter() - t0
        hist = {g: sum(1 for v in choice.values() if v == g) for g in sorted(set(choice.values()))}
        _log(progress, f"dynamic group sizes: {hist}")

    # 6-8. per layer
    t_w = t_a = 0.0
    for i, n in enumerate(names):
        mod = model.get_submodule(n)
        w = linear_weight(mod).to(torch.float32).contiguous()
        fmt = config.weight_format(wbits[n], gsize[n])
        info = report.layers.setdefault(n, {})
        info.update({"bits": fmt.bits, "group_size": fmt.group_size, "format": fmt.label()})
        t0 = time.perf_counter()
        key = None
        if weight_cache is not None and (opt.weight_clip or opt.adaround or opt.gptq):
            key = (n, fmt, opt.weight_clip, opt.adaround, opt.adaround_iters, search_tokens, opt.gptq, opt.gptq_damp,
                   opt.gptq_act_order, opt.gptq_block, opt.gptq_mse_clip, _digest(w), _digest(calib.x(n)))
        if key is not None and key in weight_cache:
            qw, cached_info = weight_cache[key]
            info.update(cached_info)
            info["cached"] = True
        else:
            clip = None
            if opt.weight_clip:
                clip, st = clip_search(w, calib.sample(n, search_tokens), fmt)
                info["clip"] = {"error": st["error"], "error_noclip": st["error_noclip"],
                                "mean_ratio": float(clip.double().mean())}
            elif opt.gptq and opt.gptq_mse_clip:
                clip = mse_clip(w, fmt)
                info["clip"] = {"mean_ratio": float(clip.double().mean()), "search": "weight mse"}
            if opt.gptq:
                grid = weight_grid(w, fmt, clip)
                q, st = gptq_levels(w, calib.x(n), grid, damp=float(opt.gptq_damp), act_order=opt.gptq_act_order,
                                    block=opt.gptq_block)
                qw = quantize_levels(q, grid)
                info["gptq"] = st
            elif opt.adaround:
                grid = weight_grid(w, fmt, clip)
                q, st = adaround_levels(w, calib.x(n), grid, iters=opt.adaround_iters)
                qw = quantize_levels(q, grid)
                info["adaround"] = st
            else:
                qw = quantize_weight(w, fmt, clip)
            if key is not None:
                weight_cache[key] = (qw, {k: info[k] for k in ("clip", "adaround", "gptq") if k in info})
        t_w += time.perf_counter() - t0
        t0 = time.perf_counter()
        act = base_act(abits[n])
        if act is not None and act.mode == "static":
            info["act"] = calibrate_act(act, calib.sample(n, search_tokens), w, opt.act_clip)
        if act is not None:
            info["act_bits"] = act.bits
            info["act"] = {**info.get("act", {}), "describe": act.describe()}
        t_a += time.perf_counter() - t0
        layer = SFxLinear.from_float(mod, config, n, bits=qw.bits, group_size=qw.fmt.group_size)
        layer.act_bits = None if act is None else act.bits
        if act is not None:
            layer.act_exponent = act.mode
            layer.act_scale = act.scale_kind
            layer.act_amax = act.threshold
        layer.load_quantized(qw)
        set_module(model, n, layer)
        if progress and (i + 1) % 20 == 0:
            _log(progress, f"layers: {i + 1}/{len(names)}")
    attach_online_rotations(model, online_rotations)  # onto the converted layers
    report.seconds["weights"] = t_w
    report.seconds["activations"] = t_a
    report.seconds["total"] = time.perf_counter() - t_all
    return report


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.blake2b(t.detach().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _sensitivity(model, calib, names, config, calibration, search_act, search_tokens):
    how = config.options.mp_ranking
    if how in ("analyze", "auto"):  # "auto": analyze where it can rank the layers, else own
        src = calib.batches if calib is not None else None
        batches = [b if isinstance(b, torch.Tensor) else torch.as_tensor(b["input_ids"]) for b in src or []]
        why = ("sfx analyze has no asymmetric integer quantizer" if config.codes == "int_asym"
               else None if batches else "analyze needs the calibration token batches")
        if why is None:
            wc = WASQConfig(weight_bits=config.weight_bits, act_bits=config.act_bits, scale_kind=config.scale_kind,
                            codes=config.codes, skip=config.skip, rounding=config.rounding)
            sens = analyze_ranking(copy.deepcopy(model), batches, wc)
            missing = [n for n in names if n not in sens]
            if not missing:
                return sens, "analyze"
            why = f"analyze did not rank {missing[0]}"
        if how == "analyze":
            raise ValueError(f"mp_ranking='analyze' needs superfloat.sw.wasq.analyze (sfx analyze): {why}")
    sens = {}
    for n in names:
        w = linear_weight(model.get_submodule(n))
        sens[n] = layer_sensitivity(w, calib.sample(n, search_tokens * 2), config.weight_format(),
                                    search_act(config.act_bits))
    return sens, "own"

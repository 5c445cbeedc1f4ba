"""Co-simulation of WASQ checkpoints on the simulated accelerator (``sfx cosim``, docs/cosim.md).

The flow, for one layer, a block of layers or the whole forward pass:

1. load the checkpoint (:func:`superfloat.sw.wasq.load_checkpoint`: every tensor checked);
   every quantized layer needs its calibrated static output exponents (``<name>.out_exponent``,
   SPEC sections 7-8): without them :class:`CosimError` says how to calibrate them, or
   ``calibrate_outputs=True`` calibrates them here
   (:func:`superfloat.sw.wasq.accelerator.calibrate_outputs_` on calibration text). Output
   exponents are never taken from the output being computed;
2. check that the selected layers fit the array before anything is built (widths, ``K``,
   ``N``, the output width the exponents are calibrated for);
3. run the model on the tokens:

   * **software**: the checkpoint's fake-quantized forward (``backend="fake"``);
   * **accelerator**: the accelerator-exact backend (``set_backend(model, "accelerator")``,
     SPEC section 8) for every quantized layer;
   * **RTL**: the accelerator backend again, with each selected layer's output replaced,
     through a forward hook, by the codes the RTL computes in an HDL simulator
     (:class:`RTLSession`; or ``sfx.linear`` alone with ``engine="reference"``) from the same
     :class:`~superfloat.sw.wasq.accelerator.LayerProgram` (:func:`program_ops`), decoded
     with the same exponents;

4. report, per layer: RTL codes against ``sfx.linear`` on the same operations (zero
   differences required), the decoded RTL output against the backend's (identical
   required), the error against the fake-quantized layer, cycles, utilisation and the time
   on the FPGA at its reported Fmax; for the model: whether the RTL forward's logits equal,
   bit for bit, the accelerator backend's, and (``data`` mode) the perplexity of a text
   computed with every selected layer on the RTL beside the backend's perplexity of the same
   tokens (equal bit for bit) and the fake-quantized and float ones.

The code is split by concern: :mod:`.engines` (engines and simulator sessions),
:mod:`.mapping` (layer program -> LINEAR operations), :mod:`.fmax` (Fmax lookup),
:mod:`.hooks` (model hooks), :mod:`.report` (the report).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from superfloat.sw import sfx

from .engines import (ArrayConfig, Op, OpResult, OpStats, ReferenceEngine, RTLSession, RunLinearEngine,
                      SessionEngine, make_engine, prebuild)
from .fmax import find_fmax, fmax_sources
from .hooks import _OutputCapture, _ProgramHooks, _Recorder
from .mapping import CosimError, LayerCall, program_ops, resolve_array, select_layers
from .nonfinite import CosimNaN, count_nonfinite, describe_source, locate_nonfinite, same_float
from .report import CosimReport, _build_report

__all__ = [
    "CosimError",
    "CosimNaN",
    "ArrayConfig",
    "LayerCall",
    "Op",
    "OpResult",
    "OpStats",
    "RTLSession",
    "prebuild",
    "SessionEngine",
    "RunLinearEngine",
    "ReferenceEngine",
    "make_engine",
    "program_ops",
    "resolve_array",
    "select_layers",
    "find_fmax",
    "fmax_sources",
    "cosim",
    "CosimReport",
    "DEFAULT_CALIB_DATA",
    "DEFAULT_CALIB_TOKENS",
]


DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea, "
                  "there lived an old clockmaker who built machines that could count the stars, and every "
                  "night the children of the town came to listen to his stories about numbers and light.")
DEFAULT_TOKENS = 8
#: calibration text of ``calibrate_outputs=True`` (the Shakespeare plays' train split: held out
#: from the test split that ``data="shakespeare"`` scores)
DEFAULT_CALIB_DATA = "shakespeare"
DEFAULT_CALIB_TOKENS = 1024
_CALIB_CONTEXT = 256


def _token_ids(tok: Any, prompt: str | None, tokens: int | None, vocab: int | None) -> tuple[list[int], str, list[str]]:
    notes = []
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise CosimError(f"--tokens must be a positive int, got {tokens!r}")
    text = DEFAULT_PROMPT if prompt is None else prompt
    if prompt is None and tokens is None:
        tokens = DEFAULT_TOKENS
    if tok is None:
        ids = [b % (vocab or 256) for b in text.encode()]
        notes.append("the checkpoint has no tokenizer: token ids are the prompt's UTF-8 bytes")
    else:
        ids = list(tok(text)["input_ids"])
    if tokens is not None:
        if tokens > len(ids):
            raise CosimError(f"--tokens {tokens} asks for more tokens than the prompt has ({len(ids)})")
        ids = ids[:tokens]
    if not ids:
        raise CosimError("the prompt gives no tokens")
    _check_t(len(ids))
    return ids, text, notes


def _check_t(t: int) -> None:
    from superfloat.hw.interface import TN_BITS

    if t > (1 << TN_BITS) - 1:
        raise CosimError(f"{t} tokens per forward pass do not fit the 16-bit T field of a command; use a shorter "
                         f"--context")


def _data_ids(tok: Any, data: str, split: str | None, max_tokens: int | None) -> tuple[list[int], str]:
    from superfloat.sw.wasq.data import load_text, tokenize

    if tok is None:
        raise CosimError("--data needs a checkpoint with a tokenizer (save_checkpoint(..., tokenizer=...))")
    if max_tokens is None:
        raise CosimError("--data needs --max-tokens N (every token is simulated: start with 128)")
    try:
        text = load_text(data, split)
        ids = tokenize(tok, text, max_tokens)
    except ValueError as e:
        raise CosimError(f"--data {data}: {e}") from None
    if len(ids) < 2:
        raise CosimError(f"--data {data}: {len(ids)} token(s); a perplexity needs at least 2")
    return [int(v) for v in ids], f"{data} ({split or 'default split'}), first {len(ids)} tokens"


def _cpu() -> tuple[float, float]:
    """CPU seconds of this process (all threads) and of its finished child processes (the
    simulator sessions, once closed)."""
    import resource

    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime


class _torch_threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)


class _Logits:
    """A callable model wrapper for :func:`superfloat.sw.wasq.evaluate.perplexity` that keeps
    every logits tensor it returns (float64 numpy, in call order)."""

    def __init__(self, model: Any):
        self.model = model
        self.logits: list = []

    def __call__(self, **kw):
        out = self.model(**kw)
        lg = out.logits if hasattr(out, "logits") else out
        self.logits.append(lg.detach().to("cpu").double().numpy())
        return out

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()
        return self

    @property
    def training(self) -> bool:
        return self.model.training

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def all(self):
        import numpy as np

        return np.concatenate([x.reshape(-1, x.shape[-1]) for x in self.logits])[None]


def _missing_exponents_error(missing: list[str], checkpoint: Any) -> CosimError:
    more = f" (and {len(missing) - 1} more layer(s))" if len(missing) > 1 else ""
    return CosimError(
        f"layer {missing[0]}{more} has no calibrated static output exponents (<name>.out_exponent, SPEC sections "
        f"7-8): co-simulation streams the checkpoint's exponents and never derives them from the output it "
        f"computes. Calibrate them: 'sfx cosim --checkpoint {checkpoint} ... --calibrate-outputs' (on "
        f"--calib-data/--calib-tokens, default {DEFAULT_CALIB_TOKENS} tokens of the {DEFAULT_CALIB_DATA} train split), "
        f"'sfx quantize ... --calib-tokens N', or in Python superfloat.sw.wasq.accelerator.calibrate_outputs_(model, "
        f"batches) followed by save_checkpoint")


def _calibrate(model: Any, tok: Any, *, data: str, tokens: int, out_bits: int | None, headroom: float | None,
               progress: bool) -> dict:
    from superfloat.sw.wasq.accelerator import AcceleratorError, calibrate_outputs_
    from superfloat.sw.wasq.data import calibration_batches, load_text, tokenize

    if tok is None:
        raise CosimError("--calibrate-outputs needs a checkpoint with a tokenizer (or calibrate in Python with "
                         "superfloat.sw.wasq.accelerator.calibrate_outputs_)")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise CosimError(f"--calib-tokens must be an int >= 2, got {tokens!r}")
    try:
        ids = tokenize(tok, load_text(data, "train"), tokens)
    except ValueError as e:
        raise CosimError(f"--calib-data {data}: {e}") from None
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or _CALIB_CONTEXT
    batches = list(calibration_batches(ids, min(_CALIB_CONTEXT, int(limit)), tokens))
    kw = {} if headroom is None else {"headroom": headroom}
    try:
        rep = calibrate_outputs_(model, batches, out_bits=out_bits, progress=progress, **kw)
    except (AcceleratorError, ValueError) as e:
        raise CosimError(f"calibrating the output exponents: {e}") from None
    return {"data": f"{data} (train split)", "tokens": int(len(ids)), "layers": len(rep),
            "raised_channels": sum(r["raised_channels"] for r in rep.values())}


def _software_passes(model: Any, fm: Any, forward, modules: dict, block_module: Any, block_name: str | None):
    """The fake-quantized pass, the float model's (if any) and the accelerator backend's (which
    also records the plan of layer calls). Returns ``(logits, perplexities, captures,
    accelerator pass seconds, accelerator statistics, plan)``."""
    import torch

    from superfloat.sw.wasq.accelerator import accelerator_stats, reset_accelerator_stats, set_backend

    with torch.no_grad():
        set_backend(model, "fake")
        with _OutputCapture(block_module) as cap_sw:
            logits_sw, ppl_sw = forward(model)
        logits_fp = block_fp = ppl_fp = None
        if fm is not None:
            with _OutputCapture(fm.get_submodule(block_name) if block_name else None) as cap_fp:
                logits_fp, ppl_fp = forward(fm)
            block_fp = cap_fp.value
        set_backend(model, "accelerator")
        reset_accelerator_stats(model)
        t0 = time.perf_counter()
        with _Recorder(modules) as rec, _OutputCapture(block_module) as cap_acc:
            logits_acc, ppl_acc = forward(model)
        acc_s = time.perf_counter() - t0
        acc_stats = accelerator_stats(model)
    return ((logits_sw, logits_acc, logits_fp), (ppl_sw, ppl_acc, ppl_fp), (cap_sw, cap_acc, block_fp), acc_s,
            acc_stats, rec.record)


def _nonfinite(model: Any, fm: Any, forward, set_backend, logits: dict, ppls: dict) -> dict | None:
    """``None`` when every logit and perplexity of the passes is finite; else where NaN or
    infinity appeared (``in``), their counts and the module that first produced them (the
    accelerator-exact pass run again under :func:`locate_nonfinite`; the float model's when
    only its logits are non-finite)."""
    import numpy as np

    where, counts = [], {}
    for name, lg in logits.items():
        if lg is not None and not np.isfinite(lg).all():
            where.append(name)
            counts[name] = count_nonfinite(lg)
    for name, p in ppls.items():
        if p is not None and not np.isfinite(p.perplexity):
            where.append(f"{name} perplexity")
    if not where:
        return None
    if all(w.startswith("float") for w in where):
        src = locate_nonfinite(fm, lambda: forward(fm))
        src = None if src is None else {**src, "module": f"float model: {src['module']}"}
    else:
        set_backend(model, "accelerator")
        src = locate_nonfinite(model, lambda: forward(model))
    return {"in": where, "counts": counts, "source": src, "description": describe_source(src)}


def cosim(checkpoint: str | os.PathLike, layer: str = "all", *, prompt: str | None = None, tokens: int | None = None,
          data: str | None = None, split: str | None = None, max_tokens: int | None = None,
          context: int | None = None, simulator: str = "verilator", rows: int = 8, cols: int = 8,
          k_max: int = sfx.DEFAULT_K_MAX, a_bits: int | None = None, w_bits: int | None = None,
          out_bits: int | None = None, calibrate_outputs: bool = False, calib_data: str = DEFAULT_CALIB_DATA,
          calib_tokens: int = DEFAULT_CALIB_TOKENS, headroom: float | None = None, jobs: int = 1,
          engine: str = "session", waves: bool = False, target: str = "ecp5-25k", fmax_mhz: float | None = None,
          float_model: Any = None, progress: bool = False,
          fmax_sources: Sequence[str | os.PathLike] = ()) -> "CosimReport":
    """Co-simulate layer(s) of a WASQ checkpoint on the generated accelerator (see the module docstring).

    Args:
        checkpoint: WASQ checkpoint directory (SPEC section 7).
        layer: a quantized layer name, a block (a module holding several, e.g.
            ``model.layers.0.mlp``), several of these separated by commas, or ``"all"``
            (every quantized layer: the whole forward).
        prompt, tokens: the input text, and how many of its tokens to use (default: the
            first 8 tokens of :data:`DEFAULT_PROMPT`).
        data, split, max_tokens, context: perplexity mode: the first ``max_tokens`` tokens of
            a text (:func:`superfloat.sw.wasq.load_text` spec: a file, ``shakespeare``, ...;
            ``split`` default: ``all`` for files, ``test`` for corpora), scored by
            :func:`superfloat.sw.wasq.perplexity` in windows of ``context`` tokens (default:
            one window of ``max_tokens``).
        simulator: ``"verilator"`` or ``"icarus"``.
        rows, cols, k_max: the array's shape and longest reduction.
        a_bits, w_bits, out_bits: the array's widths (default: each layer's program's).
            Narrower codes are widened exactly, wider ones are an error; the output width
            must be the one the exponents are calibrated for.
        calibrate_outputs: calibrate every layer's static output exponents first (on
            ``calib_tokens`` tokens of ``calib_data``'s train split, for ``out_bits`` or the
            layers' widths, with ``headroom``), replacing the checkpoint's.
        jobs: operations simulated at once (one simulator process each).
        engine: ``"session"`` (default), ``"session-percycle"``, ``"run_linear"`` (one simulator
            per operation) or ``"reference"`` (``sfx.linear`` only, no simulator: a dry run).
        waves: record waveforms (paths in the report).
        target, fmax_mhz: the FPGA target whose Fmax converts cycles to time, or a given Fmax.
        fmax_sources: extra synthesis report files searched first (see :func:`find_fmax`).
        float_model: optional float model (a ``load_model`` spec or a module) to compare
            against as well (logits, perplexity; per layer: the layer with float weights).
        progress: step lines and a progress bar on stderr.

    A NaN or an infinity in the logits or perplexities is reported as such (the report's
    ``nan``: where, and the module that first produced it; ``bit_exact`` is then ``None``),
    never as an RTL mismatch.

    Raises:
        CosimError: a damaged or mismatched checkpoint, uncalibrated output exponents, an
            unknown layer, a layer that does not fit the array, a bad option; always before
            any simulator build starts.
        CosimNaN: (a :class:`CosimError`) the forward pass stopped on a NaN or an infinity
            (a quantized layer refuses a non-finite input) before anything was compared; the
            message names the module that first produced it.
        superfloat.sim.SimulatorNotFound, superfloat.sim.SimulationFailed: simulator problems.
    """
    import torch

    from . import runner

    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[cosim {time.perf_counter() - t_start:5.1f} s] {msg}", file=sys.stderr, flush=True)

    extra_sources = [Path(p) for p in fmax_sources]
    if simulator not in runner.SIMULATORS:
        raise CosimError(f"simulator must be one of {', '.join(map(repr, runner.SIMULATORS))}, got {simulator!r}")
    if engine not in ("session", "session-percycle", "run_linear", "reference"):
        raise CosimError(f"engine must be 'session', 'session-percycle', 'run_linear' or 'reference', got {engine!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise CosimError(f"jobs must be a positive int, got {jobs!r}")
    if fmax_mhz is not None and not (isinstance(fmax_mhz, (int, float)) and math.isfinite(fmax_mhz) and fmax_mhz > 0):
        raise CosimError(f"--fmax must be a positive number of MHz, got {fmax_mhz!r}")
    if fmax_mhz is None:
        from superfloat.hw.fpga.flow import TARGETS

        if target not in TARGETS:
            raise CosimError(f"unknown FPGA target {target!r} for --target: choose one of {', '.join(TARGETS)}, or "
                             f"give --fmax MHZ for another device")
    for nm, v in (("a_bits", a_bits), ("w_bits", w_bits), ("out_bits", out_bits)):
        if v is not None:
            try:
                sfx.check_bits(v, nm)
            except (TypeError, ValueError) as e:
                raise CosimError(str(e)) from None
    if data is None and (max_tokens is not None or context is not None or split is not None):
        raise CosimError("--max-tokens, --context and --split go with --data (perplexity of a text)")
    if data is not None and (prompt is not None or tokens is not None):
        raise CosimError("give either --data (perplexity of a text) or --prompt/--tokens, not both")
    for nm, v in (("max_tokens", max_tokens), ("context", context)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise CosimError(f"--{nm.replace('_', '-')} must be an int >= 2, got {v!r}")

    from superfloat.sw.wasq import quantized_layers
    from superfloat.sw.wasq.accelerator import AcceleratorError, set_backend
    from superfloat.sw.wasq.checkpoint import CheckpointError, load_checkpoint

    say(f"loading checkpoint {checkpoint}")
    try:
        model, tok, info = load_checkpoint(checkpoint, return_info=True)
    except CheckpointError as e:
        raise CosimError(f"cannot co-simulate this checkpoint: {e}") from None
    model.eval()
    qlayers = quantized_layers(model)
    names, kind = select_layers(list(qlayers), layer)
    notes: list[str] = []
    calibration = None
    if calibrate_outputs:
        say(f"calibrating the static output exponents on {calib_tokens} tokens of {calib_data}")
        with _torch_threads(max(1, torch.get_num_threads())):
            calibration = _calibrate(model, tok, data=calib_data, tokens=calib_tokens, out_bits=out_bits,
                                     headroom=headroom, progress=progress)
        notes.append(f"output exponents calibrated here on {calibration['tokens']} tokens of {calibration['data']} "
                     f"(the checkpoint's were replaced)")
    else:
        missing = [n for n, m in qlayers.items() if m.out_exponent is None]
        if missing:
            raise _missing_exponents_error(missing, checkpoint)
    try:
        set_backend(model, "accelerator")
    except (AcceleratorError, ValueError) as e:
        raise CosimError(f"the accelerator cannot run this checkpoint: {e}") from None
    programs = {n: qlayers[n].accelerator_program() for n in names}
    arrays = {n: resolve_array(n, programs[n], rows=rows, cols=cols, k_max=k_max, simulator=simulator,
                               a_bits=a_bits, w_bits=w_bits, out_bits=out_bits) for n in names}
    sources = sorted({p.act_source for p in programs.values() if p.act_source != "layer"})
    notes += sources
    widened = [n for n in names if arrays[n].w_bits > programs[n].w_bits or arrays[n].a_bits > programs[n].a_bits]
    if widened:
        notes.append(f"{len(widened)} layer(s) have codes narrower than the array; they were widened exactly "
                     f"(e.g. {widened[0]})")
    base_note = (info.get("base_model") or {}).get("note")
    if base_note:
        notes.append(str(base_note))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
    if data is not None:
        ids, text = _data_ids(tok, data, split, max_tokens)
        ctx = context or len(ids)
        if limit is not None and context is not None and context > limit:
            raise CosimError(f"--context {context} exceeds the model's {limit} positions (max_position_embeddings): "
                             f"give --context {limit} or less")
        if limit is not None and context is None and len(ids) - 1 > limit:
            raise CosimError(f"--max-tokens {len(ids)} is one window longer than the model's {limit} positions "
                             f"(max_position_embeddings): add --context {limit} or less")
        _check_t(min(ctx, len(ids) - 1))
    else:
        ids, text, tok_notes = _token_ids(tok, prompt, tokens, vocab)
        notes += tok_notes
        ctx = None
        if limit is not None and len(ids) > limit:
            raise CosimError(f"{len(ids)} tokens exceed the model's {limit} positions (max_position_embeddings): give "
                             f"--tokens {limit} or fewer")
    if engine != "reference":
        runner.check_simulator(simulator)  # SimulatorNotFound (with install hints) before any work
    input_ids = torch.tensor([ids], dtype=torch.long)
    modules = {n: qlayers[n] for n in names}
    block_module = model.get_submodule(layer) if kind == "block" else None

    fm = None
    if float_model is not None:
        if isinstance(float_model, str):
            from superfloat.sw.wasq import load_model

            say(f"loading float model {float_model}")
            try:
                fm = load_model(float_model, progress=progress).model
            except (ValueError, OSError) as e:
                raise CosimError(f"--float-model {float_model}: {e}") from None
        else:
            fm = float_model
        fm.eval()
    float_modules = {}
    if fm is not None:
        for n in names:
            try:
                float_modules[n] = fm.get_submodule(n)
            except AttributeError:
                pass

    from superfloat.sw.wasq.evaluate import perplexity

    def forward(m: Any) -> tuple[Any, Any]:
        """Logits ``[1, L, V]`` (float64 numpy) and the perplexity (data mode) of model ``m``."""
        if data is None:
            return m(input_ids).logits.double().numpy(), None
        rec = _Logits(m)
        ppl = perplexity(rec, torch.tensor(ids), context=ctx, progress=False)
        return rec.all(), ppl

    T = len(ids) if data is None else min(ctx, len(ids) - 1)
    say(f"{kind} {layer!r}: {len(names)} layer(s), {len(ids)} token(s); fake-quantized and accelerator-exact passes")
    # A forward pass over a few tokens gains little from intra-op threads, and spinning threads
    # would take the core that a simulator process needs.
    with _torch_threads(1):
        try:
            logits, ppls, caps, acc_s, acc_stats, plan = _software_passes(
                model, fm, forward, modules, block_module, layer if kind == "block" else None)
        except ValueError as e:  # AcceleratorError too: first, was it a NaN?
            backend = "fake"
            set_backend(model, backend)
            src = locate_nonfinite(model, lambda: forward(model))
            if src is not None:
                raise CosimNaN(f"NaN/infinity in the model's forward pass, not an RTL mismatch (nothing was "
                               f"compared): {describe_source(src)}; the pass then stopped: {src['error'] or e}",
                               src) from None
            if isinstance(e, AcceleratorError):
                raise CosimError(f"the accelerator backend cannot run this checkpoint: {e}") from None
            raise
        logits_sw, logits_acc, logits_fp = logits
        ppl_sw, ppl_acc, ppl_fp = ppls
        cap_sw, cap_acc, block_fp = caps
        say(f"{len(plan)} layer call(s) of {T} row(s) on {engine} ({simulator}, array "
            f"{', '.join(sorted({a.name for a in arrays.values()}))}, jobs={jobs})")

        eng = make_engine(engine, jobs, waves=waves)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan), desc=f"cosim {simulator}", unit="layer", file=sys.stderr, dynamic_ncols=True,
                       leave=False)
        t0, c0 = time.perf_counter(), _cpu()
        try:
            with torch.no_grad(), _ProgramHooks(modules, programs, arrays, eng, plan=plan, prefetch=jobs > 1,
                                                float_modules=float_modules, compare_fake=True,
                                                on_call=(lambda _c: bar.update(1)) if bar is not None else None) \
                    as hc, _OutputCapture(block_module) as cap_rtl:
                logits_rtl, ppl_rtl = forward(model)
        finally:
            if bar is not None:
                bar.close()
            eng.close()
        rtl_s = time.perf_counter() - t0
        rtl_cpu = [b - a for a, b in zip(c0, _cpu())]
        nonfinite = _nonfinite(model, fm, forward, set_backend,
                               {"accelerator backend logits": logits_acc, "RTL forward logits": logits_rtl,
                                "fake-quantized logits": logits_sw, "float model logits": logits_fp},
                               {"RTL": ppl_rtl, "accelerator": ppl_acc, "fake": ppl_sw, "float": ppl_fp})
        if nonfinite is not None:
            say(f"NaN/infinity in {', '.join(nonfinite['in'])}: {nonfinite['description']}")

        fmax = {a.name: find_fmax(a, target, fmax_mhz, extra_sources)
                for a in {arrays[n] for n in names}}
        ppl = None
        if data is not None:
            ppl = {"rtl": ppl_rtl.to_dict(), "accelerator": ppl_acc.to_dict(), "fake": ppl_sw.to_dict(),
                   "float": ppl_fp.to_dict() if ppl_fp is not None else None,
                   "identical": same_float(ppl_rtl.nll, ppl_acc.nll) and same_float(ppl_rtl.perplexity,
                                                                                      ppl_acc.perplexity),
                   "data": text, "context": ctx}
        report = _build_report(
            checkpoint=str(checkpoint), info=info, layer=layer, kind=kind, names=names, ids=ids,
            text=text if data is None else None, simulator=simulator, engine=eng, jobs=jobs, arrays=arrays,
            programs=programs, rtl_calls=hc.calls, logits=(logits_sw, logits_acc, logits_rtl, logits_fp),
            blocks=(cap_sw.value, cap_acc.value, cap_rtl.value, block_fp), fmax=fmax, target=target, notes=notes,
            timing={"accelerator_pass_s": acc_s, "rtl_pass_s": rtl_s, "rtl_pass_host_cpu_s": rtl_cpu[0],
                    "rtl_pass_sim_cpu_s": rtl_cpu[1], "wall_s": time.perf_counter() - t_start},
            perplexity=ppl, calibration=calibration, accelerator_stats=acc_stats, nonfinite=nonfinite)
        say(f"done in {report['wall_s']:.1f} s: {report['mismatches']} differing code(s) of "
            f"{report['codes_compared']}")
        return report

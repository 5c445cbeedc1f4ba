"""Co-simulation of WASQ checkpoints on the simulated accelerator (``sfx cosim``, docs/cosim.md).

The flow, for one layer, a block of layers or the whole forward pass:

1. load the checkpoint (:func:`superfloat.sw.wasq.load_checkpoint`: every tensor checked)
   and check that it fits the array before anything is built: weight / activation widths
   against the array's, ``K <= k_max``, the layer names;
2. run the model in software on the prompt three times:

   * **software**: the checkpoint's own forward (fake-quantized weights, float or
     fake-quantized activations between layers);
   * **reference**: every selected linear layer replaced, through a forward hook, by the
     bit-exact integer path: its input quantized per token (:func:`quantize_input`), the
     weight codes, bias and scales mapped onto the accelerator's parameters
     (:func:`layer_ops`) and computed by :func:`superfloat.sw.sfx.linear`, the codes
     decoded with the output exponents;
   * **RTL**: the same, with each operation computed by the generated accelerator in an
     HDL simulator (:class:`RTLSession`, or :func:`superfloat.sim.run_linear` with
     ``engine="run_linear"``);

3. report, per layer: RTL codes against ``sfx.linear`` on the same inputs (zero
   mismatches required), the dequantized RTL output against the float layer output,
   cycles, utilisation and the time on the FPGA at its reported Fmax; for the model:
   whether the RTL forward's logits equal the reference forward's, and how close both are
   to the software model.

How the checkpoint maps onto the accelerator (SPEC sections 1, 3-5):

* weights: the stored codes; a power-of-two exponent ``Ew[n]`` goes into ``shift``; a
  float scale ``s[n] * 2**Ew[n]`` is folded by ``sfx.fold_scale`` into ``mult[n]`` and
  ``shift``;
* activations: SF``a`` codes with one exponent per token (``xexp``, streamed with each
  row) or one static exponent; a weight-only checkpoint gets SF8 per-token dynamic
  activations (the report says so);
* output: SF``o`` codes with an output exponent ``Eo`` per channel (or per tensor) chosen
  from the float layer output so that the right shift stays in 0..63;
  ``shift[n] = Ew[n] - Eo[n]`` (or the folded shift minus ``Eo[n]``);
* bias: in accumulator units, ``round_nearest_even(b / unit)`` with
  ``unit = 2**(Ea - F) * 2**Ew`` (times ``mult * 2**(shift_w - 16)`` for a folded scale),
  computed exactly with rationals (:func:`bias_to_accumulator`). The accumulator's unit
  depends on the token's exponent ``Ea``, so a layer with a bias is run as one operation
  per distinct ``Ea`` (tokens grouped; a static activation exponent gives one group).

The code is split by concern; every public name is importable from here:
:mod:`.engines` (engines and simulator sessions), :mod:`.mapping` (checkpoint -> LINEAR),
:mod:`.fmax` (Fmax lookup), :mod:`.hooks` (model hooks), :mod:`.report` (the report).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence


from superfloat.sw import sfx

from .engines import (ArrayConfig, Op, OpResult, OpStats, ReferenceEngine, RTLSession, RunLinearEngine,
                      SessionEngine, make_engine, prebuild)
from .fmax import find_fmax, fmax_sources
from .hooks import _LinearHooks, _OutputCapture
from .mapping import (CosimError, LayerCall, LayerQuant, bias_to_accumulator, layer_ops, output_exponent,
                      quantize_input, resolve_array, select_layers, weight_scale_params, widen_codes)
from .report import CosimReport, _build_report

__all__ = [
    "CosimError",
    "ArrayConfig",
    "LayerQuant",
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
    "bias_to_accumulator",
    "weight_scale_params",
    "output_exponent",
    "quantize_input",
    "widen_codes",
    "layer_ops",
    "resolve_array",
    "select_layers",
    "find_fmax",
    "fmax_sources",
    "cosim",
    "CosimReport",
]


DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea, "
                  "there lived an old clockmaker who built machines that could count the stars, and every "
                  "night the children of the town came to listen to his stories about numbers and light.")
DEFAULT_TOKENS = 8


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
    from superfloat.hw.interface import TN_BITS

    if len(ids) > (1 << TN_BITS) - 1:
        raise CosimError(f"{len(ids)} tokens do not fit the 16-bit T field of a command")
    return ids, text, notes


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


def cosim(checkpoint: str | os.PathLike, layer: str = "all", *, prompt: str | None = None, tokens: int | None = None,
          simulator: str = "verilator", rows: int = 8, cols: int = 8, k_max: int = sfx.DEFAULT_K_MAX,
          a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None,
          out_exponent: str = "channel", jobs: int = 1, engine: str = "session", waves: bool = False,
          target: str = "ecp5-25k", fmax_mhz: float | None = None, float_model: Any = None,
          progress: bool = False, fmax_sources: Sequence[str | os.PathLike] = ()) -> "CosimReport":
    """Co-simulate layer(s) of a WASQ checkpoint on the generated accelerator (see the module docstring).

    Args:
        checkpoint: WASQ checkpoint directory (SPEC section 7).
        layer: a quantized layer name, a block (a module holding several, e.g.
            ``model.layers.0.mlp``), several of these separated by commas, or ``"all"``
            (every quantized layer: the whole forward).
        prompt, tokens: the input text, and how many of its tokens to use (default: the
            first 8 tokens of :data:`DEFAULT_PROMPT`).
        simulator: ``"verilator"`` or ``"icarus"``.
        rows, cols, k_max: the array's shape and longest reduction.
        a_bits, w_bits, out_bits: the array's widths (default: the checkpoint's; weight-only
            checkpoints get 8-bit activations; outputs as wide as the activations).
            Narrower checkpoint codes are widened exactly, wider ones are an error.
        out_exponent: ``"channel"`` (default) or ``"tensor"`` output exponents.
        jobs: operations simulated at once (one simulator process each).
        engine: ``"session"`` (default), ``"run_linear"`` (one simulator per operation) or
            ``"reference"`` (``sfx.linear`` only, no simulator: a dry run).
        waves: record waveforms (paths in the report).
        target, fmax_mhz: the FPGA target whose Fmax converts cycles to time, or a given Fmax.
        fmax_sources: extra synthesis report files searched first (see :func:`find_fmax`).
        float_model: optional float model (a ``load_model`` spec or a module) to compare
            against as well (logits; per layer: the layer with float weights).
        progress: step lines and a progress bar on stderr.

    Raises:
        CosimError: a damaged or mismatched checkpoint, an unknown layer, a layer that does
            not fit the array, a bad option; always before any simulator build starts.
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
    if out_exponent not in ("channel", "tensor"):
        raise CosimError(f"out_exponent must be 'channel' or 'tensor', got {out_exponent!r}")
    for nm, v in (("a_bits", a_bits), ("w_bits", w_bits), ("out_bits", out_bits)):
        if v is not None:
            try:
                sfx.check_bits(v, nm)
            except (TypeError, ValueError) as e:
                raise CosimError(str(e)) from None

    from superfloat.sw.wasq import quantized_layers
    from superfloat.sw.wasq.checkpoint import CheckpointError, load_checkpoint

    say(f"loading checkpoint {checkpoint}")
    try:
        model, tok, info = load_checkpoint(checkpoint, return_info=True)
    except CheckpointError as e:
        raise CosimError(f"cannot co-simulate this checkpoint: {e}") from None
    qlayers = quantized_layers(model)
    names, kind = select_layers(list(qlayers), layer)
    lqs = {n: LayerQuant.from_module(n, qlayers[n], default_act_bits=a_bits or 8) for n in names}
    arrays = {n: resolve_array(lqs[n], rows=rows, cols=cols, k_max=k_max, simulator=simulator, a_bits=a_bits,
                               w_bits=w_bits, out_bits=out_bits) for n in names}
    notes: list[str] = []
    wo = sorted({lq.act_source for lq in lqs.values() if lq.act_source != "checkpoint"})
    notes += wo
    widened = [n for n in names if arrays[n].w_bits > lqs[n].bits or arrays[n].a_bits > lqs[n].act_bits]
    if widened:
        notes.append(f"{len(widened)} layer(s) have codes narrower than the array; they were widened exactly "
                     f"(e.g. {widened[0]})")
    base_note = (info.get("base_model") or {}).get("note")
    if base_note:
        notes.append(str(base_note))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids, text, tok_notes = _token_ids(tok, prompt, tokens, vocab)
    notes += tok_notes
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
            fm = load_model(float_model, progress=progress).model
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

    T = len(ids)
    say(f"{kind} {layer!r}: {len(names)} layer(s), {T} token(s); software and reference (sfx.linear) passes")
    # A forward pass over a few tokens gains nothing from intra-op threads, and spinning threads
    # would take the core that a simulator process needs.
    with _torch_threads(1):
        with torch.no_grad():
            with _OutputCapture(block_module) as cap_sw:
                logits_sw = model(input_ids).logits.double().numpy()
            logits_fp = block_fp = None
            if fm is not None:
                with _OutputCapture(fm.get_submodule(layer) if kind == "block" else None) as cap_fp:
                    logits_fp = fm(input_ids).logits.double().numpy()
                block_fp = cap_fp.value
            ref_engine = ReferenceEngine()
            t0 = time.perf_counter()
            with _LinearHooks(modules, lqs, arrays, ref_engine, out_exponent=out_exponent,
                              float_modules=float_modules) as hb, _OutputCapture(block_module) as cap_ref:
                logits_ref = model(input_ids).logits.double().numpy()
            ref_s = time.perf_counter() - t0
        plan = hb.record
        total_ops = sum(len(c.call.ops) for c in hb.calls)
        total_macs = sum(op.macs for c in hb.calls for op in c.call.ops)
        distinct = sorted({a.name for a in arrays.values()})
        say(f"{total_ops} accelerator operation(s), {total_macs / 1e6:.2f} M MACs, on {engine} "
            f"({simulator}, array {', '.join(distinct)}, jobs={jobs})")

        eng = make_engine(engine, jobs, waves=waves)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_ops, desc=f"cosim {simulator}", unit="op", file=sys.stderr, dynamic_ncols=True,
                       leave=False)
        lock = threading.Lock()

        def done(_r: OpResult) -> None:
            if bar is not None:
                with lock:
                    bar.update(1)

        t0 = time.perf_counter()
        try:
            with torch.no_grad(), _LinearHooks(modules, lqs, arrays, eng, out_exponent=out_exponent, plan=plan,
                                               prefetch=jobs > 1, float_modules=float_modules,
                                               on_op_done=done) as hc, _OutputCapture(block_module) as cap_rtl:
                logits_rtl = model(input_ids).logits.double().numpy()
        finally:
            if bar is not None:
                bar.close()
            eng.close()
        rtl_s = time.perf_counter() - t0

        fmax = {a.name: find_fmax(a, target, fmax_mhz, extra_sources)
                for a in {arrays[n] for n in names}}
        report = _build_report(
            checkpoint=str(checkpoint), info=info, layer=layer, kind=kind, names=names, ids=ids, text=text,
            simulator=simulator, engine=eng, jobs=jobs, arrays=arrays, lqs=lqs, ref_calls=hb.calls, rtl_calls=hc.calls,
            logits=(logits_sw, logits_ref, logits_rtl, logits_fp),
            blocks=(cap_sw.value, cap_ref.value, cap_rtl.value, block_fp), fmax=fmax, target=target, notes=notes,
            timing={"reference_pass_s": ref_s, "rtl_pass_s": rtl_s, "wall_s": time.perf_counter() - t_start},
            out_exponent=out_exponent)
        say(f"done in {report['wall_s']:.1f} s: {report['mismatches']} mismatching code(s) of "
            f"{report['codes_compared']}")
        return report

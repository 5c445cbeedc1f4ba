"""A whole in-memory model's quantized linears on the simulated RTL (docs/python-api.md).

:func:`on_rtl` is a context manager: inside it, every forward pass of the model runs on the
accelerator-exact backend (SPEC section 8) with the selected layers' outputs replaced by the
codes the accelerator RTL computes in an HDL simulator, from the same
:class:`~superfloat.sw.wasq.accelerator.LayerProgram` (:func:`superfloat.sim.mapping.layer_call`)
and decoded with the same exponents; every call is checked against ``sfx.linear`` and the
backend. It is the in-memory form of ``sfx cosim`` (:func:`superfloat.sim.cosim.cosim`, which
loads a checkpoint and writes a report)::

    from superfloat.sim.model import on_rtl
    with on_rtl(model, "all", rows=8, cols=8) as rtl:
        logits = model(input_ids).logits
    assert rtl.bit_exact, rtl.summary()

:func:`capture_inputs` records the inputs of quantized layers during a forward pass (to run
one of them with :func:`superfloat.sim.mapping.run_layer`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from superfloat.sw import sfx

from .hooks import _ProgramHooks
from .mapping import CosimError, resolve_array, select_layers

__all__ = ["on_rtl", "RTLModel", "capture_inputs"]


def _qlayers(model: Any) -> dict[str, Any]:
    from superfloat.sw.wasq import quantized_layers

    layers = quantized_layers(model)
    if not layers:
        raise CosimError("the model has no quantized layers (SFxLinear): quantize it first "
                         "(superfloat.sw.wasq.quantize_(model, WASQConfig(...)) or load a WASQ checkpoint)")
    return layers


def capture_inputs(model: Any, layers: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run ``model(*args, **kwargs)`` (no gradients) and return ``{name: input}``: the input
    tensor of the first call of each quantized layer that ``layers`` selects (a layer name, a
    block prefix such as ``model.layers.0.mlp``, several separated by commas, or ``"all"``;
    :func:`superfloat.sim.mapping.select_layers`), detached."""
    import torch

    qlayers = _qlayers(model)
    names, _ = select_layers(list(qlayers), layers)
    seen: dict[str, Any] = {}
    handles = []

    def make(name: str):
        def hook(module, inp, out):
            if name not in seen:
                seen[name] = inp[0].detach().clone()
        return hook

    for n in names:
        handles.append(qlayers[n].register_forward_hook(make(n)))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: seen[n] for n in names if n in seen}


class RTLModel:
    """The context manager of :func:`on_rtl`. While it is open, the selected quantized layers
    of the model are computed by the RTL; afterwards the figures stay readable:

    * ``calls``: one dict per layer call (``layer``, ``T``, ``N``, ``K``, ``operations``,
      ``mismatches`` against ``sfx.linear``, ``equal_to_backend``, ``cycles``,
      ``saturated``, ``rtl_error``);
    * ``mismatches``, ``codes_compared``, ``calls_differing_from_backend``, ``cycles``;
    * ``bit_exact``: at least one call, no differing code, every call's output identical to the
      accelerator-exact backend's, no RTL error flag;
    * ``summary()``: all of it as one dict.

    On exit the engine's simulator processes end and the layers get their backend back."""

    def __init__(self, model: Any, layers: str, *, rows: int, cols: int, k_max: int, a_bits: int | None,
                 w_bits: int | None, out_bits: int | None, simulator: str, engine: str, jobs: int, waves: bool):
        from superfloat.sw.wasq.accelerator import AcceleratorError

        from . import runner

        if simulator not in runner.SIMULATORS:
            raise ValueError(f"simulator must be one of {', '.join(map(repr, runner.SIMULATORS))}, got {simulator!r}")
        if engine not in ("session", "session-percycle", "run_linear", "reference"):
            raise ValueError(f"engine must be 'session', 'session-percycle', 'run_linear' or 'reference', "
                             f"got {engine!r}")
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        self.model = model
        qlayers = _qlayers(model)
        self.names, self.kind = select_layers(list(qlayers), layers)
        try:  # every layer runs on the backend inside the context: each needs its program
            programs = {n: m.accelerator_program() for n, m in qlayers.items()}
        except AcceleratorError as e:
            raise CosimError(f"the accelerator cannot run this model: {e}") from None
        self.programs = {n: programs[n] for n in self.names}
        self.arrays = {n: resolve_array(n, self.programs[n], rows=rows, cols=cols, k_max=k_max, simulator=simulator,
                                        a_bits=a_bits, w_bits=w_bits, out_bits=out_bits) for n in self.names}
        if engine != "reference":
            runner.check_simulator(simulator)
        self._qlayers = qlayers
        self._modules = {n: qlayers[n] for n in self.names}
        self._saved: dict[str, str] = {}
        self._engine_args = (engine, jobs, waves)
        self._engine = None
        self._hooks: _ProgramHooks | None = None
        self._calls: list = []

    def _restore(self, qlayers: dict[str, Any]) -> None:
        for n, m in qlayers.items():
            m.backend = self._saved.get(n, "fake")

    def __enter__(self) -> "RTLModel":
        from .engines import make_engine

        engine, jobs, waves = self._engine_args
        self._saved = {n: getattr(m, "backend", "fake") for n, m in self._qlayers.items()}
        for m in self._qlayers.values():
            m.backend = "accelerator"
        try:
            self._engine = make_engine(engine, jobs, waves=waves)
            self._hooks = _ProgramHooks(self._modules, self.programs, self.arrays, self._engine)
            self._hooks.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._hooks is not None:
                self._hooks.__exit__(*exc)
                self._calls = list(self._hooks.calls)
        finally:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            self._restore(self._qlayers)

    # ------------------------------------------------------------------ figures

    def _live_calls(self) -> list:
        return list(self._hooks.calls) if self._hooks is not None else self._calls

    @property
    def calls(self) -> list[dict[str, Any]]:
        out = []
        for c in self._live_calls():
            t, n, k = c.call.shape
            diff = int(np.count_nonzero(c.codes.astype(np.int64) != c.reference.astype(np.int64)))
            out.append({"layer": c.name, "T": t, "N": n, "K": k, "operations": len(c.call.ops), "mismatches": diff,
                        "equal_to_backend": bool(c.equal_to_backend),
                        "cycles": int(sum(getattr(r.stats, "cycles", 0) or 0 for r in c.results)),
                        "saturated": int(sum(getattr(r.stats, "saturated", 0) or 0 for r in c.results)),
                        "rtl_error": any(bool(getattr(r.stats, "error", False)) for r in c.results)})
        return out

    @property
    def mismatches(self) -> int:
        return sum(c["mismatches"] for c in self.calls)

    @property
    def codes_compared(self) -> int:
        return sum(c["T"] * c["N"] for c in self.calls)

    @property
    def calls_differing_from_backend(self) -> int:
        return sum(1 for c in self.calls if not c["equal_to_backend"])

    @property
    def cycles(self) -> int:
        return sum(c["cycles"] for c in self.calls)

    @property
    def bit_exact(self) -> bool:
        calls = self.calls
        return bool(calls) and all(c["mismatches"] == 0 and c["equal_to_backend"] and not c["rtl_error"]
                                   for c in calls)

    def summary(self) -> dict[str, Any]:
        return {"layers": len(self.names), "selection": self.kind, "calls": len(self.calls),
                "mismatches": self.mismatches, "codes_compared": self.codes_compared,
                "calls_differing_from_backend": self.calls_differing_from_backend, "cycles": self.cycles,
                "arrays": sorted({a.name for a in self.arrays.values()}), "bit_exact": self.bit_exact}


def on_rtl(model: Any, layers: str = "all", *, rows: int = 8, cols: int = 8, k_max: int = sfx.DEFAULT_K_MAX,
           a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None,
           simulator: str = "verilator", engine: str = "session", jobs: int = 1, waves: bool = False) -> RTLModel:
    """Compute the selected quantized linears of ``model`` on the accelerator RTL while the
    returned context manager is open (:class:`RTLModel`).

    Inside it the model runs on the accelerator-exact backend (``set_backend(model,
    "accelerator")``, SPEC section 8; restored on exit) and each selected layer's output is
    replaced by the decoded codes the RTL computes from the same program
    (:func:`superfloat.sim.mapping.layer_call`), so the logits equal the backend's bit for bit
    when the RTL is right. Layers that are not selected run on the backend.

    Args:
        model: a model quantized with ``quantize_`` (or loaded from a WASQ checkpoint) whose
            layers have calibrated static output exponents
            (:func:`superfloat.sw.wasq.accelerator.calibrate_outputs_`).
        layers: a layer name, a block prefix (``model.layers.0.mlp``), several separated by
            commas, or ``"all"``.
        rows, cols, k_max, a_bits, w_bits, out_bits: the array (widths default to each
            layer's own; one simulator build per distinct configuration).
        simulator: ``"verilator"`` or ``"icarus"``.
        engine: ``"session"`` (default), ``"session-percycle"``, ``"run_linear"`` or
            ``"reference"`` (``sfx.linear``, no simulator).
        jobs: simulator processes run at once (layers that share an input are not
            prefetched here; use ``sfx cosim --jobs`` for that).
        waves: record waveforms.

    Raises (before any build):
        CosimError: no quantized layers, an unknown layer name, uncalibrated exponents, a layer
            that does not fit the array.
        ValueError: a bad simulator, engine or jobs.
        superfloat.sim.SimulatorNotFound: the simulator is missing.
    """
    return RTLModel(model, layers, rows=rows, cols=cols, k_max=k_max, a_bits=a_bits, w_bits=w_bits,
                    out_bits=out_bits, simulator=simulator, engine=engine, jobs=jobs, waves=waves)

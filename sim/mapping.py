"""How a checkpoint's quantized layer becomes accelerator operations (docs/cosim.md).

Co-simulation does not map layers itself: each layer's LINEAR parameters come from the
:class:`superfloat.sw.wasq.accelerator.LayerProgram` that the accelerator-exact backend
runs (``layer.accelerator_program()``): weight codes, multiplier and ``shift = w_shift - Eo``
with the checkpoint's calibrated static output exponents ``Eo``, the activation stream
(codes and per-row exponents, :meth:`LayerProgram.stream_rows`), the bias in accumulator
units of each row exponent (:func:`superfloat.sw.wasq.accelerator.bias_to_accumulator`) and
the output width. The backend and the RTL therefore compute the same operations by
construction; every operation is still checked against ``sfx.linear``.

Public API for an in-memory model (docs/python-api.md): :func:`layer_call` (a quantized
layer and its input -> the LINEAR operations, as keyword arguments of ``run_linear`` /
``sfx.linear`` with :meth:`LayerCall.run_linear_kwargs`) and :func:`run_layer` (the same
operations on the simulated RTL, checked against ``sfx.linear`` and the accelerator-exact
backend; :class:`LayerRun`). :func:`superfloat.sim.model.on_rtl` runs the selected linears
of a whole model on the RTL.

* :func:`program_ops`: one layer call (float rows ``[T, K]``) as :class:`LayerCall`: the
  operations of :meth:`LayerProgram.operations` (one, or one per distinct row exponent when
  the layer has a bias: its accumulator units depend on the exponent); codes narrower than the
  array are widened exactly (and the bias scaled by the same power of two);
* :func:`resolve_array`: the array a layer runs on, checked before any build;
* :func:`select_layers`: layer names from ``--layer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from superfloat.sw import sfx

from .engines import ArrayConfig, Op, OpResult

__all__ = ["CosimError", "LayerCall", "LayerRun", "layer_program", "layer_call", "run_layer", "program_ops",
           "resolve_array", "select_layers"]


class CosimError(ValueError):
    """A checkpoint, a layer name or an option that cannot be co-simulated (raised before
    any simulator build starts; the message says what to change)."""


@dataclass
class LayerCall:
    """The accelerator operations of one call of a layer, and how to put the output together
    (:func:`layer_call`, :func:`program_ops`).

    Members: ``name`` (the layer), ``program`` (its
    :class:`~superfloat.sw.wasq.accelerator.LayerProgram`), ``array`` (the
    :class:`~superfloat.sim.engines.ArrayConfig` that runs it), ``ops`` (one
    :class:`~superfloat.sim.engines.Op` per LINEAR operation: one, or one per distinct row
    exponent when the layer has a bias; ``op.rows_index`` says which output rows it fills),
    ``x_exponent`` (``[T]``, the streamed row exponents), ``clamped_rows``, ``shape``
    (``T, N, K``) and ``x`` (the float rows ``[T, K]``)."""

    name: str
    program: Any  # superfloat.sw.wasq.accelerator.LayerProgram
    array: ArrayConfig
    ops: list[Op]
    x_exponent: np.ndarray  # [T] as streamed
    clamped_rows: int  # rows whose exponent the program moved into the shifts' range
    shape: tuple[int, int, int]  # T, N, K
    x: Any = None  # the float rows [T, K] (torch)

    @property
    def out_exponent(self) -> np.ndarray:
        """The layer's static output exponents ``Eo`` ``[N]`` (int64)."""
        return np.asarray(self.program.out_exponent, dtype=np.int64)

    def linear_kwargs(self) -> list[dict[str, Any]]:
        """Every operation as keyword arguments of :func:`superfloat.sw.sfx.linear`
        (``x_codes``, ``w_codes``, widths, ``bias`` in accumulator units, ``shift``, ``mult``,
        ``x_exponent``, ``relu``, ``rounding``, ``k_max``): ``sfx.linear(**kw)``. Codes are
        already widened to the array's widths."""
        from .scoreboard import linear_kwargs

        return [dict(x_codes=op.args.x, w_codes=op.args.w, **linear_kwargs(op.args)) for op in self.ops]

    def run_linear_kwargs(self) -> list[dict[str, Any]]:
        """:meth:`linear_kwargs` plus the array (``rows``, ``cols``, ``simulator``):
        ``superfloat.sim.run_linear(**kw)`` runs one operation on the RTL."""
        a = self.array
        return [dict(kw, rows=a.rows, cols=a.cols, simulator=a.simulator) for kw in self.linear_kwargs()]

    def assemble(self, results: Sequence[Any], which: str = "codes") -> np.ndarray:
        """The layer's ``[T, N]`` output codes from one result per operation, in
        :attr:`ops` order: code arrays (``run_linear``'s or ``sfx.linear``'s) or
        :class:`~superfloat.sim.engines.OpResult` s (their ``which`` field: ``"codes"`` or
        ``"reference"``)."""
        results = list(results)
        if len(results) != len(self.ops):
            raise ValueError(f"layer {self.name}: {len(results)} result(s) for {len(self.ops)} operation(s)")
        t, n, _ = self.shape
        out = np.zeros((t, n), dtype=sfx.code_dtype(self.array.out_bits))
        for op, r in zip(self.ops, results):
            out[op.rows_index] = r if isinstance(r, np.ndarray) else getattr(r, which)
        return out

    def backend_codes(self) -> np.ndarray:
        """The ``[T, N]`` output codes of the accelerator-exact backend on the same rows
        (:meth:`LayerProgram.codes`, what ``set_backend(model, "accelerator")`` computes; the
        layer's accelerator statistics are left as they were)."""
        import torch

        if self.x is None:
            raise ValueError(f"layer {self.name}: this LayerCall holds no input rows")
        prog = self.program
        saved = {k: v.clone() for k, v in prog.stats.items()}
        try:
            with torch.no_grad():
                codes = prog.codes(self.x.to(prog.device))[0]
        finally:
            prog.stats = saved
        return codes.cpu().numpy().astype(sfx.code_dtype(self.array.out_bits))

    def decode(self, codes: np.ndarray, like: Any):
        """The layer output the backend hands on: ``decode(codes, out_bits, Eo)`` as
        :meth:`LayerProgram.forward` computes it (float32, or float64 for float64 inputs),
        in the dtype and device of the tensor ``like``."""
        import torch

        from superfloat.sw import sfx_torch

        eo = torch.as_tensor(self.out_exponent, dtype=torch.int64)[None, :]
        y = sfx_torch.decode(torch.from_numpy(np.asarray(codes, dtype=np.int64)), self.array.out_bits, eo,
                             dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
        return y.to(device=like.device, dtype=like.dtype)


def program_ops(name: str, prog: Any, x2: Any, array: ArrayConfig) -> LayerCall:
    """The LINEAR operations that compute one call of the layer whose program is ``prog`` on
    float rows ``x2`` (torch ``[T, K]``), on ``array``: :meth:`LayerProgram.operations` (what
    the backend computes, one operation per row exponent when the layer has a bias), with codes
    narrower than the array widened exactly and the bias scaled by the same power of two. Every
    operation is validated by ``sfx.check_linear_args``; a problem raises :class:`CosimError`
    naming the layer."""
    import torch

    from superfloat.sw.wasq.accelerator import widen_codes

    x2 = x2.detach()
    try:
        raw = prog.operations(x2)
        with torch.no_grad():
            st = prog.stream(x2.to(prog.device))
    except ValueError as e:
        raise CosimError(f"layer {name}: {e}") from None
    t, k = int(x2.shape[0]), int(x2.shape[1])
    da, dw = array.a_bits - prog.a_bits, array.w_bits - prog.w_bits
    ops = []
    try:
        wc = widen_codes(np.asarray(prog.w_codes), prog.w_bits, array.w_bits)
        for o in raw:
            bias = None if o["bias"] is None else np.asarray(o["bias"], dtype=np.int64) * (1 << (da + dw))
            args = sfx.check_linear_args(widen_codes(np.asarray(o["x_codes"]), prog.a_bits, array.a_bits), wc,
                                         a_bits=array.a_bits, w_bits=array.w_bits, out_bits=array.out_bits,
                                         bias=bias, shift=o["shift"], relu=False, rounding=o["rounding"],
                                         k_max=array.k_max, mult=o["mult"], x_exponent=o["x_exponent"],
                                         xmult=o.get("xmult"))
            rows = np.asarray(o["rows"])
            label = name if len(raw) == 1 else f"{name} [Ea={int(args.x_exponent[0])}]"
            ops.append(Op(args, array, name, rows, label))
    except (ValueError, TypeError) as e:
        raise CosimError(f"layer {name}: {e}") from None
    ea = st.x_exponent.cpu().numpy().astype(np.int64)
    return LayerCall(name, prog, array, ops, ea, int(st.clamped.sum()), (t, int(prog.N), k), x2)


# --------------------------------------------------------------------------- preflight


def resolve_array(name: str, prog: Any, *, rows: int, cols: int, k_max: int, simulator: str,
                  a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None) -> ArrayConfig:
    """The array that runs the layer ``name`` (program ``prog``): the given widths, or the
    program's own. Raises :class:`CosimError` when the layer does not fit: codes wider than
    the array's, an output width other than the calibrated one, ``K > k_max``, ``N`` too
    large. A layer whose activations carry a per-row float scale (``act_scale="float"``) runs
    on an array generated with the per-row multiplier (``xmult``, SPEC revision 2)."""
    a = prog.a_bits if a_bits is None else a_bits
    w = prog.w_bits if w_bits is None else w_bits
    o = prog.out_bits if out_bits is None else out_bits
    try:
        cfg = ArrayConfig(rows=rows, cols=cols, a_bits=a, w_bits=w, out_bits=o, k_max=k_max, simulator=simulator,
                          xmult=getattr(prog, "act_mode", "") == "xmult")
        cfg.params()
    except (TypeError, ValueError) as e:
        raise CosimError(f"array: {e}") from None
    if prog.w_bits > w:
        raise CosimError(
            f"layer {name}: the checkpoint holds SF{prog.w_bits} weight codes but the array takes SF{w} weights "
            f"(--w-bits {w}): codes wider than the array cannot be streamed; use an array generated with "
            f"--w-bits {prog.w_bits} (or leave --w-bits out)")
    if prog.a_bits > a:
        raise CosimError(
            f"layer {name}: the layer streams SF{prog.a_bits} activations ({prog.act_source}) but the array takes "
            f"SF{a} activations (--a-bits {a}); use an array generated with --a-bits {prog.a_bits} (or leave "
            f"--a-bits out)")
    if prog.out_bits != o:
        raise CosimError(
            f"layer {name}: its static output exponents are calibrated for SF{prog.out_bits} outputs but the array "
            f"produces SF{o} (--out-bits {o}); leave --out-bits out, or recalibrate for SF{o} with "
            f"--calibrate-outputs --out-bits {o}")
    if prog.K > k_max:
        raise CosimError(f"layer {name}: K={prog.K} exceeds the array's k_max={k_max} (longest reduction it "
                         f"accepts); use an array generated with --k-max {prog.K} or more")
    from superfloat.hw.interface import TN_BITS

    if prog.N > (1 << TN_BITS) - 1:
        raise CosimError(f"layer {name}: N={prog.N} does not fit the 16-bit command field")
    return cfg


def select_layers(names: Sequence[str], layer: str) -> tuple[list[str], str]:
    """The layer names that ``layer`` selects and its kind: ``"layer"`` (one name), ``"block"``
    (a module prefix: every quantized layer under it), ``"all"``, or ``"layers"`` (several
    comma-separated selections). Unknown names raise :class:`CosimError` listing a few valid ones."""
    names = list(names)
    if layer == "all":
        return names, "all"
    if "," in layer:  # several selections: their union, in model order
        chosen: set[str] = set()
        for part in (p.strip() for p in layer.split(",")):
            if part:
                chosen.update(select_layers(names, part)[0])
        return [n for n in names if n in chosen], "layers"
    if layer in names:
        return [layer], "layer"
    prefix = layer.rstrip(".") + "."
    block = [n for n in names if n.startswith(prefix)]
    if block:
        return block, "block"
    import difflib

    blocks = sorted({n.rsplit(".", 1)[0] for n in names}, key=lambda b: names.index(next(n for n in names
                                                                                          if n.startswith(b + "."))))
    last = layer.rsplit(".", 1)[-1]
    same_last = [n for n in names + blocks if n.rsplit(".", 1)[-1] == last]
    close = difflib.get_close_matches(layer, same_last, n=3, cutoff=0.0) if same_last else \
        difflib.get_close_matches(layer, names + blocks, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CosimError(
        f"no quantized layer or block named {layer!r} in the checkpoint.{hint} Valid layers "
        f"({len(names)} in total) include {', '.join(names[:4])}; blocks include {', '.join(blocks[:3])}; "
        f"or 'all' (sfx cosim --list-layers shows every name)")


# --------------------------------------------------------------------------- public API: one layer


def layer_program(layer: Any) -> Any:
    """The :class:`~superfloat.sw.wasq.accelerator.LayerProgram` of ``layer``: a quantized
    layer of a model (:class:`~superfloat.sw.wasq.SFxLinear`, from ``quantize_`` or a
    checkpoint; its static output exponents must be calibrated), or a ``LayerProgram``
    (returned as is). Raises :class:`CosimError` saying what to do."""
    from superfloat.sw.wasq import SFxLinear
    from superfloat.sw.wasq.accelerator import AcceleratorError, LayerProgram

    if isinstance(layer, LayerProgram):
        return layer
    if not isinstance(layer, SFxLinear):
        raise TypeError(f"layer must be a quantized layer (SFxLinear: a module of a model after quantize_, e.g. "
                        f"superfloat.sw.wasq.quantized_layers(model)[name]) or a LayerProgram, got "
                        f"{type(layer).__name__}")
    try:
        return layer.accelerator_program()
    except AcceleratorError as e:
        raise CosimError(str(e)) from None


def layer_call(layer: Any, x: Any, *, rows: int = 8, cols: int = 8, k_max: int = sfx.DEFAULT_K_MAX,
               a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None,
               simulator: str = "verilator", name: str | None = None) -> LayerCall:
    """The LINEAR operations (SPEC section 5) that compute ``layer(x)`` on the accelerator.

    Everything comes from the layer's :class:`~superfloat.sw.wasq.accelerator.LayerProgram`,
    the object the accelerator-exact backend runs: weight codes, the folded multiplier and
    ``shift = w_shift - Eo`` with the layer's calibrated static output exponents ``Eo``, the
    input rows streamed as codes with one exponent per row, the bias in accumulator units of
    each row exponent (one operation per distinct row exponent when the layer has a bias).
    Codes narrower than the array are widened exactly. Nothing is simulated here.

    Args:
        layer: an :class:`~superfloat.sw.wasq.SFxLinear` (calibrated output exponents:
            :func:`superfloat.sw.wasq.accelerator.calibrate_outputs_`) or a ``LayerProgram``.
        x: the layer's float input, a torch tensor ``[..., K]`` (all leading dimensions are
            rows ``T``).
        rows, cols, k_max: the accelerator's array shape and longest reduction.
        a_bits, w_bits, out_bits: the array's widths (default: the layer's own). Codes
            wider than the array, or an output width other than the calibrated one, are
            errors.
        simulator: the simulator the operations are meant for (``"verilator"`` or
            ``"icarus"``; used by :meth:`LayerCall.run_linear_kwargs` and :func:`run_layer`).
        name: the layer's name in messages (default: the program's).

    Returns:
        :class:`LayerCall`: ``run_linear_kwargs()`` / ``linear_kwargs()`` give each operation
        as keyword arguments, ``assemble(codes)`` the ``[T, N]`` output codes,
        ``decode(codes, like)`` the layer's float output, ``backend_codes()`` the
        accelerator-exact backend's codes for comparison.

    Raises:
        CosimError: uncalibrated output exponents, a layer that does not fit the array,
            an input of the wrong width. A layer with a per-row float activation scale
            (``act_scale="float"``) gets an array generated with ``xmult`` (SPEC revision 2).
        TypeError: ``layer`` is not a quantized layer.
    """
    import torch

    prog = layer_program(layer)
    name = name or prog.name or "layer"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor [..., K] (the layer's input), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != prog.K:
        raise CosimError(f"layer {name}: input has shape {list(x.shape)}, expected [..., {prog.K}] (K = the "
                         f"layer's input features)")
    arr = resolve_array(name, prog, rows=rows, cols=cols, k_max=k_max, simulator=simulator, a_bits=a_bits,
                        w_bits=w_bits, out_bits=out_bits)
    return program_ops(name, prog, x.detach().reshape(-1, prog.K), arr)


@dataclass
class LayerRun:
    """What :func:`run_layer` computed.

    Members: ``call`` (:class:`LayerCall`), ``results`` (one
    :class:`~superfloat.sim.engines.OpResult` per operation, with the simulator's
    :class:`~superfloat.sim.engines.OpStats`), ``codes`` (the RTL's ``[T, N]`` output codes),
    ``reference`` (``sfx.linear``'s codes of the same operations), ``backend_codes`` (the
    accelerator-exact backend's codes), ``output`` (the layer's output decoded from the RTL's
    codes, a torch tensor shaped like ``layer(x)``)."""

    call: LayerCall
    results: list[OpResult]
    codes: np.ndarray
    reference: np.ndarray
    backend_codes: np.ndarray
    output: Any

    @property
    def mismatches(self) -> int:
        """Codes of the RTL that differ from ``sfx.linear`` (0 unless the RTL has a bug)."""
        return int(np.count_nonzero(self.codes.astype(np.int64) != self.reference.astype(np.int64)))

    @property
    def equal_to_backend(self) -> bool:
        """The RTL's codes equal, bit for bit, the accelerator-exact backend's."""
        return bool(np.array_equal(self.codes.astype(np.int64), self.backend_codes.astype(np.int64)))

    @property
    def cycles(self) -> int:
        """Clock cycles of the operations (``cmd`` accepted to the last ``res`` beat, summed)."""
        return int(sum(getattr(r.stats, "cycles", 0) or 0 for r in self.results))

    @property
    def rtl_error(self) -> bool:
        """The RTL's sticky error flag was raised by an operation."""
        return any(bool(getattr(r.stats, "error", False)) for r in self.results)

    @property
    def bit_exact(self) -> bool:
        """No code differs from ``sfx.linear`` or from the backend, and no error flag."""
        return self.mismatches == 0 and self.equal_to_backend and not self.rtl_error

    def summary(self) -> dict[str, Any]:
        t, n, k = self.call.shape
        return {"layer": self.call.name, "array": self.call.array.name, "simulator": self.call.array.simulator,
                "T": t, "N": n, "K": k, "operations": len(self.call.ops), "mismatches": self.mismatches,
                "equal_to_backend": self.equal_to_backend, "rtl_error": self.rtl_error, "cycles": self.cycles,
                "bit_exact": self.bit_exact}


def run_layer(layer: Any, x: Any, *, rows: int = 8, cols: int = 8, k_max: int = sfx.DEFAULT_K_MAX,
              a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None,
              simulator: str = "verilator", engine: str = "session", waves: bool = False) -> LayerRun:
    """``layer(x)`` computed by the accelerator RTL in an HDL simulator.

    The operations of :func:`layer_call` (same arguments) run on ``engine``:
    ``"session"`` (default: one simulator process serving every operation),
    ``"run_linear"`` (one :func:`superfloat.sim.run_linear` per operation),
    ``"session-percycle"`` (Python drives every beat; debugging) or ``"reference"``
    (``sfx.linear`` only, no simulator: a dry run). The first call of an array configuration
    builds the simulator (cached under ``build/sim/``, :func:`superfloat.sim.runner.build_root`).

    Returns:
        :class:`LayerRun`: the RTL's codes, ``sfx.linear``'s and the accelerator-exact
        backend's codes, the decoded output, cycles; ``bit_exact`` when all agree.

    Raises:
        CosimError, TypeError: as :func:`layer_call` (before any build).
        ValueError: an unknown engine.
        superfloat.sim.SimulatorNotFound, superfloat.sim.SimulationFailed: simulator problems.
    """
    from . import runner
    from .engines import make_engine

    if engine not in ("session", "session-percycle", "run_linear", "reference"):
        raise ValueError(f"engine must be 'session', 'session-percycle', 'run_linear' or 'reference', got {engine!r}")
    if simulator not in runner.SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(map(repr, runner.SIMULATORS))}, got {simulator!r}")
    call = layer_call(layer, x, rows=rows, cols=cols, k_max=k_max, a_bits=a_bits, w_bits=w_bits,
                      out_bits=out_bits, simulator=simulator)
    if engine != "reference":
        runner.check_simulator(simulator)
    eng = make_engine(engine, 1, waves=waves)
    try:
        futures = [eng.submit(op) for op in call.ops]
        results = [f.result() for f in futures]
    finally:
        eng.close()
    codes = call.assemble(results, "codes")
    ref = call.assemble(results, "reference")
    y = call.decode(codes, x).reshape(*x.shape[:-1], call.shape[1])
    return LayerRun(call, results, codes, ref, call.backend_codes(), y)

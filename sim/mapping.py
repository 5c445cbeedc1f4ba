"""How a checkpoint's quantized layer becomes accelerator operations (docs/cosim.md).

Co-simulation does not map layers itself: each layer's LINEAR parameters come from the
:class:`superfloat.sw.wasq.accelerator.LayerProgram` that the accelerator-exact backend
runs (``layer.accelerator_program()``): weight codes, multiplier and ``shift = w_shift - Eo``
with the checkpoint's calibrated static output exponents ``Eo``, the activation stream
(codes and per-row exponents, :meth:`LayerProgram.stream_rows`), the bias in accumulator
units of each row exponent (:func:`superfloat.sw.wasq.accelerator.bias_to_accumulator`) and
the output width. The backend and the RTL therefore compute the same operations by
construction; every operation is still checked against ``sfx.linear``.

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


class CosimError(ValueError):
    """A checkpoint, a layer name or an option that cannot be co-simulated (raised before
    any simulator build starts; the message says what to change)."""


@dataclass
class LayerCall:
    """The accelerator operations of one call of a layer, and how to put the output together."""

    name: str
    program: Any  # superfloat.sw.wasq.accelerator.LayerProgram
    array: ArrayConfig
    ops: list[Op]
    x_exponent: np.ndarray  # [T] as streamed
    clamped_rows: int  # rows whose exponent the program moved into the shifts' range
    shape: tuple[int, int, int]  # T, N, K

    @property
    def out_exponent(self) -> np.ndarray:
        return np.asarray(self.program.out_exponent, dtype=np.int64)

    def assemble(self, results: Sequence[OpResult], which: str = "codes") -> np.ndarray:
        t, n, _ = self.shape
        out = np.zeros((t, n), dtype=sfx.code_dtype(self.array.out_bits))
        for op, r in zip(self.ops, results):
            out[op.rows_index] = getattr(r, which)
        return out

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
            if o.get("xmult") is not None:
                raise ValueError("a per-row activation multiplier (xmult) has no port on the accelerator RTL")
            bias = None if o["bias"] is None else np.asarray(o["bias"], dtype=np.int64) * (1 << (da + dw))
            args = sfx.check_linear_args(widen_codes(np.asarray(o["x_codes"]), prog.a_bits, array.a_bits), wc,
                                         a_bits=array.a_bits, w_bits=array.w_bits, out_bits=array.out_bits,
                                         bias=bias, shift=o["shift"], relu=False, rounding=o["rounding"],
                                         k_max=array.k_max, mult=o["mult"], x_exponent=o["x_exponent"])
            rows = np.asarray(o["rows"])
            label = name if len(raw) == 1 else f"{name} [Ea={int(args.x_exponent[0])}]"
            ops.append(Op(args, array, name, rows, label))
    except (ValueError, TypeError) as e:
        raise CosimError(f"layer {name}: {e}") from None
    ea = st.x_exponent.cpu().numpy().astype(np.int64)
    return LayerCall(name, prog, array, ops, ea, int(st.clamped.sum()), (t, int(prog.N), k))


# --------------------------------------------------------------------------- preflight


def resolve_array(name: str, prog: Any, *, rows: int, cols: int, k_max: int, simulator: str,
                  a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None) -> ArrayConfig:
    """The array that runs the layer ``name`` (program ``prog``): the given widths, or the
    program's own. Raises :class:`CosimError` when the layer does not fit: codes wider than
    the array's, an output width other than the calibrated one, ``K > k_max``, ``N`` too
    large."""
    a = prog.a_bits if a_bits is None else a_bits
    w = prog.w_bits if w_bits is None else w_bits
    o = prog.out_bits if out_bits is None else out_bits
    try:
        cfg = ArrayConfig(rows=rows, cols=cols, a_bits=a, w_bits=w, out_bits=o, k_max=k_max, simulator=simulator)
        cfg.params()
    except (TypeError, ValueError) as e:
        raise CosimError(f"array: {e}") from None
    if getattr(prog, "act_mode", "") == "xmult":
        raise CosimError(
            f"layer {name}: its activations carry a per-row float scale (act_scale='float': a 16-bit multiplier "
            f"per row, SPEC revision 2 xmult), which the accelerator RTL has no port for (rows stream a "
            f"power-of-two exponent only); quantize with act_scale='pow2' to co-simulate it")
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

"""GPTQ (Frantar et al. 2023) on a fixed grid: SFx codes, or the integer baselines.

GPTQ quantizes a layer's weight matrix ``W`` (``[N, K]``) column by column and, after each
column, spreads that column's rounding error over the columns not yet quantized, weighted
by the inverse Hessian of the layer's output error on the calibration inputs ``X``
(``[T, K]``)::

    H = 2 X^T X / T  (+ damp * mean(diag H) * I)

(the optimal-brain-surgeon update; the output error ``||(W~ - W) X^T||^2`` it minimises is
the one AdaRound minimises, but GPTQ needs no optimisation loop: one Cholesky factor of
``H^-1`` and a sweep over the columns). Implementation as in the reference code:

* **lazy block updates**: columns are processed in blocks of ``block`` (128); inside a
  block the updates touch only the block, and the rest of the matrix gets one
  ``[N, block] x [block, K']`` update per block;
* **damping**: ``damp`` (default 0.01) times the mean of ``diag(H)`` is added to the
  diagonal; columns whose input is always zero (``H_kk = 0``) get ``H_kk = 1`` and weight 0;
* **act-order** (``act_order=True``): columns are processed by decreasing ``H_kk`` (the
  inputs with the most energy first, while the most columns are left to absorb their
  error); the result is permuted back, so the stored codes keep the layer's column order
  (nothing changes for the hardware).

**The grid is fixed before GPTQ** (:func:`superfloat.sw.wasq.formats.weight_grid`): one
float scale per output row from the row maximum (SFx float scales, the
:func:`~superfloat.sw.wasq.formats.float_scale` rule), or one power-of-two exponent per row
(SFx ``pow2``), optionally shrunk by per-row clip ratios found first (the clip search of
:func:`.awq.clip_search`, ``MethodOptions.weight_clip``, or ``gptq_mse_clip``: the ratio
minimising ``sum |Q(w) - w|^2.4`` per row, the reference's ``mse`` option); the integer
baselines (``codes="int"`` / ``"int_asym"``) use their own grids the same way. GPTQ then only
chooses the integer level of every weight on that grid; the SFx levels go through
:mod:`superfloat.sw.sfx_torch` (``encode`` with the layer's rounding and saturation) and the
result is stored by :func:`~superfloat.sw.wasq.formats.quantize_levels`, i.e. exactly the codes
that :meth:`SFxLinear.export` writes and the accelerator executes. Per-group formats (software
only) work too: each column uses its group's unit.

Finally each row keeps GPTQ's levels or round-to-nearest's, whichever has the smaller exact
output error on the calibration inputs (as AdaRound does), so the result is never worse than
RTN there (on the calibration tokens; reported as ``rows_improved``).
"""
from __future__ import annotations

import torch

from ... import sfx_torch
from ..formats import WeightFormat, WeightGrid, best_clip, fake_quant_weight, group_view
from .adaround import output_error_rows

__all__ = ["gptq_levels", "hessian", "mse_clip", "DEFAULT_DAMP", "DEFAULT_BLOCK"]

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
MSE_RATIOS = tuple(1.0 - 0.02 * i for i in range(31))  # 1.0 .. 0.4
MSE_NORM = 2.4


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 X^T X / T`` (float64 ``[K, K]``) of calibration inputs ``x`` ``[T, K]``."""
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"GPTQ: calibration inputs must be a non-empty [T, K] matrix, got shape {list(x.shape)}")
    x64 = x.detach().to(torch.float64)
    return 2.0 * (x64.t() @ x64) / x.shape[0]


def _round_column(w: torch.Tensor, unit: torch.Tensor, zero: torch.Tensor | None, grid: WeightGrid) -> torch.Tensor:
    """Round-to-nearest levels (float64 ``[N]``) of one column ``w`` on per-row ``unit``/``zero``:
    SFx through ``sfx_torch``'s rounding and saturation rule (the signed level that
    ``sfx_torch.encode(w / (unit * 2**M), bits)`` encodes; the final codes are encoded by
    :func:`~superfloat.sw.wasq.formats.quantize_levels`), the integer kinds through ATen's
    fake-quantize formula (as :func:`formats.weight_grid`'s RTN)."""
    fmt = grid.fmt
    if fmt.kind == "sfx":
        m = fmt.bits - 1
        return sfx_torch._round(w / unit, fmt.bits, fmt.rounding)  # w / unit = (w / (unit 2**M)) 2**M, exact
    w32 = w.to(torch.float32)
    inv = 1.0 / unit.to(torch.float32)
    z = zero.to(torch.float32) if zero is not None else 0.0
    return torch.clamp(torch.round(w32 * inv) + z, grid.qlo, grid.qhi).to(torch.float64)


def _check(name: str, v, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"GPTQ {name} must be {what}, got {v!r}")


class _one_thread:
    """GPTQ's many small operations run faster on one thread (and far faster on a loaded machine)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@torch.no_grad()
def gptq_levels(w: torch.Tensor, x: torch.Tensor | None, grid: WeightGrid, *, damp: float = DEFAULT_DAMP,
                act_order: bool = True, block: int = DEFAULT_BLOCK, h: torch.Tensor | None = None,
                rtn_levels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GPTQ levels of ``w`` (``[N, K]``) on ``grid`` for calibration inputs ``x`` (``[T, K]``).

    Args:
        w: float weights; x: calibration inputs (or ``h``: a precomputed :func:`hessian`).
        grid: the fixed grid (:func:`~superfloat.sw.wasq.formats.weight_grid`).
        damp: fraction of the mean diagonal of ``H`` added to the diagonal (> 0).
        act_order: process columns by decreasing ``H_kk``.
        block: columns per lazy block update.
    Returns:
        ``(levels int64 [N, K], stats)``: ``stats`` has the relative output errors
        (``error_rtn``, ``error_gptq``, ``error``: the kept one, against the output energy
        ``w H w^T``) and ``rows_improved`` (share of rows that kept GPTQ's levels).
    """
    _check("damp", damp, isinstance(damp, (int, float)) and not isinstance(damp, bool) and 0 < float(damp) <= 1,
           "a number in (0, 1]")
    _check("block", block, isinstance(block, int) and not isinstance(block, bool) and block >= 1, "a positive int")
    if not isinstance(act_order, bool):
        raise TypeError(f"GPTQ act_order must be a bool, got {act_order!r}")
    if w.dim() != 2:
        raise ValueError(f"GPTQ: weights must be a 2-D [N, K] tensor, got shape {list(w.shape)}")
    n, k = w.shape
    if grid.k != k or grid.unit.shape[0] != n:
        raise ValueError(f"GPTQ: the grid is for [{grid.unit.shape[0]}, {grid.k}] weights, got {list(w.shape)}")
    if h is None:
        if x is None:
            raise ValueError("GPTQ needs calibration inputs x [T, K] (or their Hessian h)")
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"GPTQ: w [N, K] and x [T, K] must agree, got {list(w.shape)} and {list(x.shape)}")
        h = hessian(x)
    elif tuple(h.shape) != (k, k):
        raise ValueError(f"GPTQ: Hessian must be [{k}, {k}], got {list(h.shape)}")
    with _one_thread():
        return _gptq(w, h, grid, float(damp), act_order, block, rtn_levels)


def _gptq(w, h, grid, damp, act_order, block, rtn_levels):
    n, k = w.shape
    h_err = h.to(torch.float64)  # the undamped Hessian measures the output error
    w64 = w.detach().to(torch.float64)
    unit = grid.per_weight(grid.unit)
    zero = grid.per_weight(grid.zero) if grid.zero is not None else None
    if rtn_levels is None:
        rtn_levels = grid.levels_rtn(w)
    z0 = zero if zero is not None else 0.0
    e_rtn_rows = output_error_rows((rtn_levels.to(torch.float64) - z0) * unit - w64, h_err)
    energy = float(((w64 @ h_err) * w64).sum()) or 1.0

    hmat = h_err.clone()
    dead = torch.diagonal(hmat) <= 0
    wq = w64.clone()
    if bool(dead.any()):
        hmat[dead, dead] = 1.0
        wq[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(hmat), descending=True, stable=True) if act_order else torch.arange(k)
    inv = torch.argsort(perm)
    # transposed ([K, N]): a column of W is a contiguous row
    wt, hmat = wq[:, perm].t().contiguous(), hmat[perm][:, perm]
    unit_t = unit[:, perm].t().contiguous()
    zero_t = zero[:, perm].t().contiguous() if zero is not None else None
    d = damp * float(torch.diagonal(hmat).mean())
    hmat = hmat + d * torch.eye(k, dtype=torch.float64)
    try:
        l = torch.linalg.cholesky(hmat)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError derives from RuntimeError
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite ({e}); raise the damping "
                         f"(gptq_damp, now {damp})") from None

    qt = torch.zeros_like(wt)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[i]
            c = i1 + i
            lev = _round_column(col, unit_t[c], None if zero_t is None else zero_t[c], grid)
            qt[c] = lev
            deq = (lev - zero_t[c]) * unit_t[c] if zero_t is not None else lev * unit_t[c]
            e = (col - deq) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:].unsqueeze(1) * e.unsqueeze(0)
            err1[i] = e
        if i2 < k:
            wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
    q = qt.t()[:, inv]
    e_gptq_rows = output_error_rows((q - z0) * unit - w64, h_err)
    better = e_gptq_rows < e_rtn_rows
    levels = torch.where(better.reshape(-1, 1), q, rtn_levels.to(torch.float64)).to(torch.int64)
    e = float(torch.where(better, e_gptq_rows, e_rtn_rows).sum())
    return levels, {"error_rtn": float(e_rtn_rows.sum()) / energy, "error_gptq": float(e_gptq_rows.sum()) / energy,
                    "error": e / energy, "rows_improved": float(better.double().mean())}


@torch.no_grad()
def mse_clip(w: torch.Tensor, fmt: WeightFormat, ratios=MSE_RATIOS, norm: float = MSE_NORM) -> torch.Tensor:
    """Per-row (per-group) clip ratios minimising ``sum |Q_r(w) - w|**norm`` (the GPTQ reference's
    ``mse`` grid search; ``norm`` 2.4): ``[N]`` (or ``[N, G]``) ratios in ``(0, 1]``."""
    with _one_thread():
        return _mse_clip(w, fmt, ratios, norm)


def _mse_clip(w, fmt, ratios, norm):
    w = w.detach().to(torch.float32)
    best, _, _ = best_clip(ratios, lambda r: group_view(fake_quant_weight(w, fmt, clip=r) - w, fmt.group_size)
                           .abs().double().pow(norm).sum(dim=2))  # [N, G]
    return best.reshape(-1) if best.shape[1] == 1 else best

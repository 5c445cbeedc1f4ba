"""Scoreboards: every ``res`` beat of the accelerator against :func:`superfloat.sw.sfx.linear`.

The expected codes always come from the reference model (``sfx.linear`` /
``sfx.linear_with_stats``); this module only reorders them into beats (tile order of
:func:`superfloat.hw.interface.tile_schedule`) and compares integers. Zero tolerance:
the first differing beat raises :class:`ScoreboardMismatch` naming the operation, the
beat, the tile, the output element ``(t, n)``, and the expected and received codes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from superfloat.hw.interface import AccelParams, pack_lanes, tile_schedule, unpack_lanes
from superfloat.sw import sfx

__all__ = ["ScoreboardMismatch", "ExpectedOp", "LinearScoreboard", "expected_res_words", "first_mismatch"]


class ScoreboardMismatch(AssertionError):
    """An RTL result differs from the reference model."""


def expected_res_words(codes: np.ndarray, p: AccelParams) -> list[int]:
    """``[T, N]`` result codes to the ``res`` beats in stream order (lanes past ``N`` are 0)."""
    codes = np.asarray(codes, dtype=np.int64)
    t_total, n_total = codes.shape
    words: list[int] = []
    for t0, tv, n0, nv in tile_schedule(t_total, n_total, p.rows, p.cols):
        blk = np.zeros((tv, p.cols), dtype=np.int64)
        blk[:, :nv] = codes[t0:t0 + tv, n0:n0 + nv]
        words += pack_lanes(blk, p.out_bits)
    return words


def _beat_index(t_total: int, n_total: int, p: AccelParams) -> list[tuple[int, int, int, int, int]]:
    """Per beat: ``(t, n0, cols_valid, tile_index, row_in_tile)``."""
    out = []
    for ti, (t0, tv, n0, nv) in enumerate(tile_schedule(t_total, n_total, p.rows, p.cols)):
        for i in range(tv):
            out.append((t0 + i, n0, nv, ti, i))
    return out


@dataclass
class ExpectedOp:
    """One operation's expected ``res`` beats."""

    name: str
    codes: np.ndarray  # [T, N] from the reference model
    words: list[int]
    n_saturated: int = 0
    info: dict = field(default_factory=dict)
    next: int = 0
    p: AccelParams | None = None
    _index: list | None = None

    @property
    def done(self) -> bool:
        return self.next >= len(self.words)

    def locate(self, beat: int) -> tuple[int, int, int, int, int]:
        if self._index is None:
            t, n = self.codes.shape
            self._index = _beat_index(t, n, self.p)
        return self._index[beat]


class LinearScoreboard:
    """Checks ``res`` beats, in order, against queued expected operations.

    Use :meth:`expect` (or :meth:`expect_linear`) for each operation in the order its
    command is sent, and pass :meth:`check` to :class:`~superfloat.sim.streams.StreamSink`
    as ``on_beat``. After a reset call :meth:`clear`.
    """

    def __init__(self, p: AccelParams, *, context: str = ""):
        self.p = p
        self.context = context
        self.pending: deque[ExpectedOp] = deque()
        self.done_ops: list[ExpectedOp] = []
        self.beats_checked = 0

    def expect(self, codes: Any, *, name: str = "", n_saturated: int = 0, info: dict | None = None) -> ExpectedOp:
        """Queue an operation whose reference result is ``codes`` ([T, N])."""
        codes = np.asarray(codes)
        op = ExpectedOp(name or f"op{len(self.done_ops) + len(self.pending)}", codes,
                        expected_res_words(codes, self.p), int(n_saturated), dict(info or {}), p=self.p)
        self.pending.append(op)
        return op

    def expect_linear(self, args: sfx.LinearArgs, *, name: str = "", info: dict | None = None) -> ExpectedOp:
        """Queue the reference result of validated LINEAR arguments (``sfx.check_linear_args``)."""
        codes, stats = sfx.linear_with_stats(args.x, args.w, **linear_kwargs(args))
        return self.expect(codes, name=name, n_saturated=stats.n_saturated, info=info)

    def clear(self) -> None:
        """Forget pending operations (after a reset)."""
        self.pending.clear()

    @property
    def idle(self) -> bool:
        return not self.pending

    @property
    def expected_beats(self) -> int:
        return sum(len(op.words) - op.next for op in self.pending)

    def check(self, word: int) -> None:
        """Compare one received ``res`` beat with the next expected one."""
        if not self.pending:
            raise ScoreboardMismatch(f"{self._ctx()}unexpected res beat {word:#x}: no operation is pending "
                                     f"({len(self.done_ops)} completed)")
        op = self.pending[0]
        i = op.next
        exp = op.words[i]
        if word != exp:
            raise ScoreboardMismatch(self._describe(op, i, word))
        op.next = i + 1
        self.beats_checked += 1
        if op.next == len(op.words):
            self.done_ops.append(self.pending.popleft())

    def _ctx(self) -> str:
        return f"[{self.context}] " if self.context else ""

    def _describe(self, op: ExpectedOp, beat: int, word: int) -> str:
        p = self.p
        t, n0, nv, ti, row = op.locate(beat)
        exp = unpack_lanes([op.words[beat]], p.out_bits, p.cols)[0]
        got = unpack_lanes([word], p.out_bits, p.cols)[0]
        bad = [j for j in range(p.cols) if exp[j] != got[j]]
        j = bad[0]
        where = (f"Y[t={t}, n={n0 + j}]" if j < nv else f"padding lane {j} (channel {n0 + j} >= N)")
        return (f"{self._ctx()}{op.name}: res beat {beat} (tile {ti}, row {row}) differs in {len(bad)} lane(s); "
                f"first at {where}: expected code {int(exp[j]):#x}, got {int(got[j]):#x} "
                f"(t={t}, n={n0 + j}; expected lanes {exp.tolist()}, got {got.tolist()}; {op.info})")


def linear_kwargs(args: sfx.LinearArgs) -> dict:
    """Keyword arguments of ``sfx.linear`` that reproduce validated :class:`sfx.LinearArgs`."""
    return dict(a_bits=args.a_bits, w_bits=args.w_bits, out_bits=args.out_bits, bias=args.bias,
                shift=args.shift, relu=args.relu, rounding=args.rounding, k_max=args.k_max,
                mult=args.mult, x_exponent=args.x_exponent, xmult=args.xmult)


def first_mismatch(got: np.ndarray, expected: np.ndarray) -> tuple[int, dict | None]:
    """Number of differing codes and the first one as ``{t, n, expected, got}`` (or None)."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        raise ValueError(f"shapes differ: got {list(got.shape)}, expected {list(expected.shape)}")
    diff = got.astype(np.int64) != expected.astype(np.int64)
    count = int(diff.sum())
    if not count:
        return 0, None
    t, n = (int(v) for v in np.argwhere(diff)[0])
    return count, {"t": t, "n": n, "expected": int(expected[t, n]), "got": int(got[t, n])}

"""Build the stream beats of LINEAR operations for :class:`SFxAccelerator` and run them
in Amaranth's simulator. Expected results always come from ``superfloat.sw.sfx``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from superfloat.hw.interface import (ROUNDING_CODES, AccelParams, cmd_layout, pack_lanes,
                                     tile_schedule)
from superfloat.sw import sfx

from hw_stream_helpers import Sink, Source, make_sim, pack, run_streams

__all__ = ["Op", "random_op", "op_beats", "bad_cmd_beat", "run_ops", "OpsResult"]


@dataclass
class Op:
    """One LINEAR operation (arguments of :func:`superfloat.sw.sfx.linear`)."""

    x: np.ndarray
    w: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    mult: np.ndarray | None = None
    xexp: np.ndarray | None = None
    relu: bool = False
    rounding: str = "nearest_even"
    check: bool = True   # compare the results (False for an op that is expected to set error)
    xmult: np.ndarray | None = None   # per-row multipliers (SPEC revision 2), accelerators with xmult

    def expected(self, p: AccelParams):
        return sfx.linear_with_stats(self.x, self.w, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits,
                                     bias=self.bias, shift=self.shift, relu=self.relu, rounding=self.rounding,
                                     k_max=p.k_max, mult=self.mult, x_exponent=self.xexp, xmult=self.xmult)


def random_op(p: AccelParams, rng: np.random.Generator, t: int, n: int, k: int, *, use_mult: bool | None = None,
              use_xexp: bool = True, relu: bool | None = None, rounding: str | None = None,
              big_acc: bool = False, use_xmult: bool | None = None) -> Op:
    """A random legal operation whose outputs exercise rounding and saturation (``use_xmult``:
    per-row multipliers, random on an accelerator generated with ``xmult``, else never)."""
    x = rng.integers(0, 1 << p.a_bits, (t, k))
    w = rng.integers(0, 1 << p.w_bits, (n, k))
    if big_acc:   # all-maximal magnitudes: the largest accumulators the array can see
        x = x | ((1 << (p.a_bits - 1)) - 1)
        w = w | ((1 << (p.w_bits - 1)) - 1)
    blim = (1 << (p.acc_bits - 2)) - 1
    bias = rng.integers(-min(blim, 1 << p.frac_bits), min(blim, 1 << p.frac_bits) + 1, n)
    if big_acc:
        bias = np.where(rng.random(n) < 0.5, blim, -blim)
    use_mult = bool(rng.integers(0, 2)) if use_mult is None else use_mult
    mult = rng.integers(1 << 15, 1 << 16, n) if use_mult else None
    use_xmult = (p.xmult and bool(rng.integers(0, 2))) if use_xmult is None else use_xmult
    xmult = rng.integers(1 << 15, 1 << 16, t) if use_xmult else None
    if xmult is not None:
        xmult[::3] = (1 << 16) - 1
    f = p.frac_bits + sfx.MULT_FRAC_BITS * (use_mult + use_xmult)
    mo = p.out_bits - 1
    xexp = rng.integers(-2, 3, t) if use_xexp else None
    # Output magnitude ~ 2**(F - 2 + log2(K)/2 - r): aim at the top of the SF range
    # (rounding and some saturation), keep r = f - mo - shift - xexp in 0..63.
    shift = int(round(1 - 0.5 * np.log2(k))) + rng.integers(-2, 3, n)
    shift = np.clip(shift, f - mo - 61, f - mo - 2)
    relu = bool(rng.integers(0, 2)) if relu is None else relu
    rounding = rounding or ("nearest_even", "toward_zero")[int(rng.integers(0, 2))]
    return Op(x, w, bias, shift, mult, xexp, relu, rounding, xmult=xmult)


def bad_cmd_beat(p: AccelParams, *, k: int, t: int, n: int) -> int:
    return pack(cmd_layout(p), {"k": k, "t": t, "n": n, "relu": 0, "rounding": 0, "use_mult": 0,
                                **({"use_xmult": 0} if p.xmult else {})})


@dataclass
class Beats:
    cmd: list[int] = field(default_factory=list)
    par: list[int] = field(default_factory=list)
    act: list[int] = field(default_factory=list)
    wgt: list[int] = field(default_factory=list)
    res: list[int | None] = field(default_factory=list)   # None: a beat whose value is not checked
    n_saturated: int | None = 0   # None once an unchecked op is included
    macs: int = 0

    def __iadd__(self, other: "Beats"):
        for name in ("cmd", "par", "act", "wgt", "res"):
            getattr(self, name).extend(getattr(other, name))
        if self.n_saturated is None or other.n_saturated is None:
            self.n_saturated = None
        else:
            self.n_saturated += other.n_saturated
        self.macs += other.macs
        return self


def op_beats(p: AccelParams, op: Op, rng: np.random.Generator | None = None) -> Beats:
    """The beats of ``op`` in the order of ``interface.py``, and the expected ``res`` beats.

    With ``rng``, padding lanes get random legal values and the ``exp`` field of
    non-first ``act`` beats random garbage (both must be ignored by the hardware).
    """
    T, K = op.x.shape
    N = op.w.shape[0]
    A = p.acc_bits
    b = Beats()
    fields = {"k": K, "t": T, "n": N, "relu": int(op.relu), "rounding": ROUNDING_CODES[op.rounding],
              "use_mult": int(op.mult is not None)}
    if p.xmult:
        fields["use_xmult"] = int(op.xmult is not None)
    elif op.xmult is not None:
        raise ValueError("op.xmult needs an accelerator generated with xmult")
    b.cmd.append(pack(cmd_layout(p), fields))
    if op.check:
        y, stats = op.expected(p)
        b.n_saturated = stats.n_saturated
    else:
        y = None
        b.n_saturated = None
    b.macs = T * N * K
    xexp = np.zeros(T, dtype=np.int64) if op.xexp is None else np.broadcast_to(op.xexp, (T,))
    mult = np.ones(N, dtype=np.int64) if op.mult is None else op.mult
    # an op without xmult on an xmult accelerator sends a pattern that must be ignored
    xmult = np.full(T, 0xA5A5, dtype=np.int64) if op.xmult is None else np.broadcast_to(op.xmult, (T,))
    codes_w = p.rows * p.a_bits
    for t0, tv, n0, nv in tile_schedule(T, N, p.rows, p.cols):
        for j in range(p.cols):   # one par beat per channel
            if j < nv:
                bb, sh, mu = int(op.bias[n0 + j]), int(op.shift[n0 + j]), int(mult[n0 + j])
            elif rng is not None:
                blim = (1 << (A - 2)) - 1
                bb, sh, mu = int(rng.integers(-blim, blim + 1)), int(rng.integers(-128, 128)), int(rng.integers(1, 1 << 16))
            else:
                bb, sh, mu = 0, 0, 1
            b.par.append((bb & ((1 << A) - 1)) | ((sh & 0xFF) << A) | (mu << (A + 8)))
        xt = np.zeros((K, p.rows), dtype=np.int64)
        xt[:, :tv] = op.x[t0:t0 + tv, :].T
        et = np.zeros((1, p.rows), dtype=np.int64)
        et[0, :tv] = xexp[t0:t0 + tv]
        exp_word = pack_lanes(et, 8)[0]
        if p.xmult:   # the row multipliers above the exponents (act_layout's field order)
            xm = np.full((1, p.rows), 0x5A5A, dtype=np.int64)
            xm[0, :tv] = xmult[t0:t0 + tv]
            exp_word |= pack_lanes(xm, 16)[0] << (8 * p.rows)
        ext_w = (8 + 16 * p.xmult) * p.rows
        for k, cw in enumerate(pack_lanes(xt, p.a_bits)):
            ew = exp_word
            if k > 0 and rng is not None:
                ew = int.from_bytes(rng.bytes((ext_w + 7) // 8), "little") & ((1 << ext_w) - 1)
            b.act.append(cw | (ew << codes_w))
        wt = np.zeros((K, p.cols), dtype=np.int64)
        wt[:, :nv] = op.w[n0:n0 + nv, :].T
        b.wgt.extend(pack_lanes(wt, p.w_bits))
        if y is None:
            b.res.extend([None] * tv)
        else:
            yt = np.zeros((tv, p.cols), dtype=np.int64)
            yt[:, :nv] = y[t0:t0 + tv, n0:n0 + nv]
            b.res.extend(pack_lanes(yt, p.out_bits))
    return b


@dataclass
class OpsResult:
    cycles: int
    res: list[int]
    expected: Beats
    sat_count: int
    error: int
    busy_after: int


def run_ops(dut, items, *, stall: float = 0.0, res_stall: float | None = None, seed: int = 0,
            max_cycles: int = 200_000, rng_pad: bool = True) -> OpsResult:
    """Run ``items`` (``Op`` or raw ``cmd`` beats for malformed commands) back to back
    through ``dut`` with random stalls on every stream; return what came out."""
    p = dut.params
    rng = np.random.default_rng(seed)
    beats = Beats()
    for it in items:
        if isinstance(it, Op):
            beats += op_beats(p, it, rng if rng_pad else None)
        else:
            beats.cmd.append(int(it))
    res_stall = stall if res_stall is None else res_stall
    srcs = [Source(dut.cmd, beats.cmd, stall=stall, seed=seed + 1, name="cmd"),
            Source(dut.par, beats.par, stall=stall, seed=seed + 2, name="par"),
            Source(dut.act, beats.act, stall=stall, seed=seed + 3, name="act"),
            Source(dut.wgt, beats.wgt, stall=stall, seed=seed + 4, name="wgt")]
    sink = Sink(dut.res, stall=res_stall, seed=seed + 5, name="res")
    sim, _ = make_sim(dut)
    out = {}

    async def tb(ctx):
        n_res = len(beats.res)
        cycles = await run_streams(ctx, srcs, [sink], max_cycles=max_cycles,
                                   until=lambda: len(sink.beats) >= n_res and all(s.done for s in srcs))
        await ctx.tick()
        out.update(cycles=cycles, sat=ctx.get(dut.sat_count), err=ctx.get(dut.error), busy=ctx.get(dut.busy))

    sim.add_testbench(tb)
    sim.run()
    return OpsResult(out["cycles"], sink.beats, beats, out["sat"], out["err"], out["busy"])


def check_results(r: OpsResult) -> None:
    """Zero tolerance: every checked ``res`` beat equal, nothing more, nothing less."""
    assert len(r.res) == len(r.expected.res), (len(r.res), len(r.expected.res))
    bad = [(i, got, exp) for i, (got, exp) in enumerate(zip(r.res, r.expected.res)) if exp is not None and got != exp]
    assert not bad, f"{len(bad)} res beat(s) differ, first (index, got, expected): {bad[0]}"

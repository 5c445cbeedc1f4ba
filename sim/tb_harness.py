"""cocotb side of the in-simulation harness (:mod:`superfloat.sim.harness`, top ``sfx_harness``).

cocotb is the orchestrator: it starts the clock (cocotb's GPI clock, no Python per edge),
toggles ``go`` once per job and waits for ``done`` to toggle; the harness feeds and
collects every stream cycle by cycle meanwhile. The job's files are in the simulator's
working folder (:func:`superfloat.sim.harness.write_job`).

Tests:

* ``run_job``: one job written by :func:`superfloat.sim.run_linear` (``SFX_SIM_HARNESS_JOB``);
  timings to ``sfx_timing.json``;
* ``serve``: jobs from a host over the Unix socket ``SFX_COSIM_SOCKET`` (``go`` -> ``ok
  <loop_s> <loop_cpu_s>``, ``quit``), for :class:`superfloat.sim.engines.RTLSession`;
* the regression tests (``HARNESS_TESTS``), which pack random operations in this process,
  run them in batches with random stalls on every stream (seed ``SFX_SIM_SEED``, printed),
  and check every ``res`` beat with :class:`~superfloat.sim.scoreboard.LinearScoreboard`
  against ``sfx.linear``; ``verify`` runs ``SFX_SIM_VERIFY_CODES`` output codes of random
  operations (the verification at scale of ``sfx bench rtl``).
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import Edge

from .harness import Beats, HarnessJob, Stalls, batch_job, depths_for, linear_beats, raw_beats, read_result, write_job

__all__ = ["Harness", "HARNESS_TESTS"]

#: The regression tests run on the harness (``tests/test_sim_harness.py``).
HARNESS_TESTS = ("h_random_batches", "h_long_result_backpressure", "h_reset_mid_operation", "h_malformed_commands",
                 "h_bias_out_of_range")


class Harness:
    """Clock and job control of ``sfx_harness``. :meth:`run` runs the job whose files are in the
    working folder and returns ``(loop_s, loop_cpu_s)``: wall and CPU time of the simulation."""

    def __init__(self, dut, period_ns: int = 10):
        self.dut = dut
        self.jobs = 0
        done = str(dut.done.value)
        # The harness stays in the simulator across cocotb tests: go continues from done.
        self.go = 1 if done == "1" else 0
        dut.go.value = self.go
        if hasattr(dut, "clk"):  # harness built with clock="port"; else the clock runs inside
            Clock(dut.clk, period_ns, unit="ns", impl="gpi").start(start_high=False)

    async def run(self) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        self.go ^= 1
        self.dut.go.value = self.go
        while str(self.dut.done.value) != str(self.go):  # (Icarus: done goes X -> 0 at time 0)
            await Edge(self.dut.done)
        self.jobs += 1
        return time.perf_counter() - t0, time.process_time() - c0


@cocotb.test(skip=not os.environ.get("SFX_SIM_HARNESS_JOB"))
async def run_job(dut):
    """One job prepared by the host in the working folder; timings to ``sfx_timing.json``."""
    h = Harness(dut)
    loop_s, cpu_s = await h.run()
    Path("sfx_timing.json").write_text(json.dumps({"loop_s": loop_s, "loop_cpu_s": cpu_s}))


@cocotb.test(skip=not os.environ.get("SFX_COSIM_SOCKET"))
async def serve(dut):
    """Run jobs from the host over ``SFX_COSIM_SOCKET`` until ``quit``: the simulator is
    blocked (no cycles pass) while the host prepares the next job."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["SFX_COSIM_SOCKET"])
    f = sock.makefile("rwb", buffering=0)
    h = Harness(dut)
    try:
        f.write(b"ready\n")
        while True:
            line = f.readline()
            if not line or line.strip() == b"quit":
                break
            if line.strip() != b"go":
                raise ValueError(f"bad request {line!r}")
            loop_s, cpu_s = await h.run()
            f.write(f"ok {loop_s!r} {cpu_s!r}\n".encode())
    finally:
        dut._log.info("harness session served %d job(s)", h.jobs)
        try:
            f.close()
            sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- regression tests


def _params():
    from .tb_accelerator import _params as p

    return p()


def _seed() -> int:
    return int(os.environ.get("SFX_SIM_SEED", "1"))


class HarnessBench:
    """Regression bench on the harness: jobs of operations packed here, every result code
    compared with ``sfx.linear`` (vectorized; on a difference the job's beats are replayed
    through :class:`LinearScoreboard`, whose message names the first wrong element), status
    and handshake monitors checked after every job."""

    def __init__(self, dut, p, *, name: str, seed: int):
        self.dut = dut
        self.p = p
        self.h = Harness(dut)
        self.depths = depths_for("icarus" if "icarus" in cocotb.SIM_NAME.lower() else "verilator")
        self.context = f"{name} seed={seed}"
        self.name = name
        self.seed = seed
        self.jobs = 0
        self.codes = 0
        self.ops = 0
        self.cycles = 0
        self.sim_s = 0.0
        dut._log.info("%s: seed %d", name, seed)

    def _replay(self, expected, words_text: bytes) -> None:
        """Check the job's beats one by one with the scoreboard (raises with its message)."""
        from .scoreboard import LinearScoreboard

        sb = LinearScoreboard(self.p, context=self.context)
        for name, codes, nsat, info in expected:
            sb.expect(codes, name=name, n_saturated=nsat, info=info)
        words = [int(w, 16) for w in words_text.decode().split() if not w.startswith(("//", "@"))]
        for word in words:
            sb.check(word)
        assert sb.idle, f"[{self.context}] {sb.expected_beats} res beats missing"

    async def job(self, ops, *, stalls: Stalls, reset_cycles: int = 2, tail_cycles: int = 0, abort=None,
                  check: bool = True, inject: bool = False, expect_timeout: bool = False):
        """Run ``ops`` (``(sfx.LinearArgs, name)`` pairs, or ``(Beats, name)``) back to back in
        one job; return the :class:`HarnessResult`."""
        from superfloat.sw import sfx

        from .harness import lanes_to_codes, read_res_text, res_words_lanes, split_lanes
        from .scoreboard import linear_kwargs

        self.jobs += 1
        seed = (self.seed * 1_000_003 + self.jobs) & 0xFFFFFFFF
        expected, sat = [], 0
        packed = []
        for op, name in ops:
            if isinstance(op, Beats):
                packed.append(op)
                continue
            packed.append(linear_beats(op, self.p))
            if check:
                codes, st = sfx.linear_with_stats(op.x, op.w, **linear_kwargs(op))
                if inject and not expected:
                    codes = codes.copy()
                    codes[0, 0] ^= 1
                expected.append((name, codes, st.n_saturated,
                                 {"T": op.T, "N": op.N, "K": op.K, "relu": op.relu, "rounding": op.rounding,
                                  "mult": op.mult is not None, "job seed": seed}))
                sat += st.n_saturated
        job: HarnessJob = batch_job(packed, self.p, seed=seed, stalls=stalls, reset_cycles=reset_cycles,
                                    tail_cycles=tail_cycles, abort=abort)
        write_job(".", job, self.depths)
        loop_s, _ = await self.h.run()
        self.sim_s += loop_s
        r = read_result(".", words=False)
        st = r.stats
        self.cycles += st["cycles"]
        where = f"{self.name} job {self.jobs} (job seed {seed}, {stalls.describe()})"
        assert not r.protocol_errors, f"{where}: {r.protocol_errors}"
        if expect_timeout:
            assert st["timeout"], f"{where}: expected the job to hang"
            return r
        assert not st["timeout"], (f"{where}: timeout after {st['cycles']} cycles: taken cmd {st['got_cmd']}/"
                                   f"{job.counts['cmd']}, par {st['got_par']}/{job.counts['par']}, act "
                                   f"{st['got_act']}/{job.counts['act']}, wgt {st['got_wgt']}/{job.counts['wgt']}; "
                                   f"res {st['got_res']}/{job.counts['res']}")
        text = read_res_text(".")
        r.res_text = text
        if check:
            lanes = res_words_lanes(text, self.p)
            ok = lanes.shape[0] == job.counts["res"] == sum(e[1].shape[0] * -(-e[1].shape[1] // self.p.cols)
                                                             for e in expected)
            if ok:
                for (name, codes, _, _), part in zip(expected, split_lanes(
                        lanes, [c.shape for _, c, _, _ in expected], self.p)):
                    got, pad = lanes_to_codes(part, codes.shape[0], codes.shape[1], self.p)
                    if pad or not np.array_equal(got, codes):
                        ok = False
                        break
            if not ok:
                self._replay(expected, text)
                raise AssertionError(f"{where}: the res beats differ from the reference, but the scoreboard "
                                     f"replay found no difference (a bench bug)")
            assert st["got_res"] == job.counts["res"], f"{where}: {st['got_res']} res beats, expected " \
                                                       f"{job.counts['res']}"
            if reset_cycles and not abort:
                assert st["sat_count"] == min(sat, (1 << 32) - 1), \
                    f"{where}: sat_count {st['sat_count']}, the reference saturated {sat}"
            self.codes += sum(int(c.size) for _, c, _, _ in expected)
            self.ops += len(expected)
        return r


#: longest K of the regression tests' random operations (arrays with a larger k_max reach it in
#: ``verify``, on one tile, where it costs k_max cycles instead of k_max per tile)
REGRESSION_K = 256


def _ops(rng, p, count, **kw):
    from .tb_accelerator import random_args

    if p.k_max > REGRESSION_K and "k" not in kw:
        return [(random_args(rng, p, use_mult=bool(rng.getrandbits(1)), use_xexp=bool(rng.getrandbits(1)),
                             k=rng.choice([1, 2, REGRESSION_K, rng.randint(1, REGRESSION_K)]), **kw), f"op{i}")
                for i in range(count)]
    return [(random_args(rng, p, use_mult=bool(rng.getrandbits(1)), use_xexp=bool(rng.getrandbits(1)), **kw),
             f"op{i}") for i in range(count)]


@cocotb.test()
async def h_random_batches(dut):
    """Batches of random operations back to back (tiling in T, N, K, relu, both roundings,
    mult, per-row exponents, biases at the limit), each batch with its own stall pattern on
    every stream (none, light, heavy, long gaps), every code checked."""
    p = _params()
    b = HarnessBench(dut, p, name="h_random_batches", seed=_seed())
    rng = random.Random(_seed() * 7 + 1)
    nops = int(os.environ.get("SFX_SIM_NOPS", "6"))
    inject = os.environ.get("SFX_SIM_INJECT") == "flip"  # self-test: the scoreboard must fail
    for i, stalls in enumerate((Stalls(), Stalls.uniform(0.1, 4), Stalls.uniform(0.4, 8), Stalls.uniform(0.05, 64))):
        await b.job(_ops(rng, p, nops), stalls=stalls, inject=inject and i == 0)
    dut._log.info("h_random_batches: %d codes checked in %d jobs", b.codes, b.jobs)


@cocotb.test()
async def h_long_result_backpressure(dut):
    """Drain-bound operations (K = 1, 2) while ``res`` is held off for runs of up to 64 cycles."""
    p = _params()
    b = HarnessBench(dut, p, name="h_long_result_backpressure", seed=_seed() + 6)
    rng = random.Random(_seed() * 19 + 6)
    ops = _ops(rng, p, 4, t=2 * p.rows + 1, n=2 * p.cols + 1, k=1)
    ops += _ops(rng, p, 2, t=2 * p.rows + 1, n=2 * p.cols + 1, k=2)
    await b.job(ops, stalls=Stalls.uniform(0.0, 1, res_prob=0.7, res_max_len=64))


@cocotb.test()
async def h_reset_mid_operation(dut):
    """A reset while inputs stream in, while results drain, and while ``res`` is blocked (the
    inputs must then stop being taken); after each, the status reads 0 and the next operation
    is correct."""
    from .tb_accelerator import random_args

    p = _params()
    b = HarnessBench(dut, p, name="h_reset_mid_operation", seed=_seed() + 3)
    rng = random.Random(_seed() * 17 + 3)
    for phase in ("inputs", "results", "blocked"):
        big = phase == "blocked"
        args = random_args(rng, p, use_mult=True, use_xexp=True, t=(4 if big else 2) * p.rows,
                           n=(2 if big else 1) * p.cols + 1, k=max(2, min(p.k_max, REGRESSION_K) // 2))
        beats = linear_beats(args, p)
        counts = beats.counts
        if phase == "inputs":
            abort, stalls = ("act", rng.randint(1, max(1, counts["act"] - 1))), Stalls.uniform(0.25, 6)
        elif phase == "results":
            abort, stalls = ("res", 1), Stalls.uniform(0.25, 6)
        else:
            abort = ("cycle", 2 * counts["act"] + 50 * p.cols)
            stalls = Stalls.uniform(0.0, 1, res_prob=1.0, res_max_len=1)
        r = await b.job([(beats, f"aborted-{phase}")], stalls=stalls, abort=abort, check=False)
        assert r.stats["aborted"], f"{phase}: the job was not cut by the reset ({r.stats})"
        if phase == "blocked":
            assert r.stats["got_res"] == 0, "res transferred while ready was low"
            assert r.stats["got_act"] < counts["act"], "the inputs were all taken although no result could leave"
        r = await b.job(_ops(rng, p, 1), stalls=Stalls.uniform(0.25, 6), reset_cycles=3)
        after = {"busy": r.stats["rst_busy"], "error": r.stats["rst_error"], "sat_count": r.stats["rst_sat"]}
        assert after == {"busy": 0, "error": 0, "sat_count": 0}, f"status after the reset ({phase}): {after}"
        assert r.stats["error"] == 0, f"error after the operation following the reset ({phase})"


@cocotb.test()
async def h_malformed_commands(dut):
    """K = 0, K = k_max + 1, the largest K field, T = 0, N = 0: the command is consumed, error is
    set and sticky, nothing comes out (20 cycles watched), and the next operation is correct."""
    from .packing import cmd_word

    p = _params()
    b = HarnessBench(dut, p, name="h_malformed_commands", seed=_seed() + 4)
    rng = random.Random(_seed() * 13 + 4)
    kmax_field = (1 << p.k_bits) - 1
    cases = [("K=0", dict(k=0, t=p.rows, n=p.cols)), ("K=k_max+1", dict(k=p.k_max + 1, t=1, n=1)),
             (f"K={kmax_field}", dict(k=kmax_field, t=p.rows + 1, n=2)), ("T=0", dict(k=2, t=0, n=1)),
             ("N=0", dict(k=2, t=1, n=0))]
    for name, fields in cases:
        raw = raw_beats({"cmd": [cmd_word(p, relu=bool(rng.getrandbits(1)), **fields)]}, p)
        r = await b.job([(raw, name)], stalls=Stalls.uniform(0.2, 4), tail_cycles=20)
        st = r.stats
        assert st["got_cmd"] == 1, f"the {name} command was not taken"
        assert st["error"] == 1 and st["busy"] == 0, f"after {name}: error {st['error']}, busy {st['busy']}"
        assert st["got_res"] == 0, f"{st['got_res']} res beat(s) came out after {name}"
        r = await b.job(_ops(rng, p, 1), stalls=Stalls.uniform(0.2, 4), reset_cycles=0)
        assert r.stats["error"] == 1, f"after {name} and a correct operation: error must stay set (sticky)"
    r = await b.job(_ops(rng, p, 1), stalls=Stalls(), reset_cycles=3)
    assert r.stats["rst_error"] == 0 and r.stats["error"] == 0, "reset must clear error"


@cocotb.test()
async def h_bias_out_of_range(dut):
    """``|bias| = 2**(A-2)`` on a valid channel sets error (the results are not checked); after a
    reset the next operation is correct."""
    from .tb_accelerator import random_args
    from .packing import linear_traffic

    p = _params()
    b = HarnessBench(dut, p, name="h_bias_out_of_range", seed=_seed() + 5)
    rng = random.Random(_seed() * 11 + 5)
    args = random_args(rng, p, use_mult=False, use_xexp=False, t=1, n=1, k=2)
    tr = linear_traffic(args, p)
    lim = 1 << (p.acc_bits - 2)
    beats = raw_beats({"cmd": [tr.cmd], "par": [(tr.par[0] & ~((1 << p.acc_bits) - 1)) | lim, *tr.par[1:]], "act": tr.act,
                       "wgt": tr.wgt}, p, res=tr.res_beats)
    r = await b.job([(beats, "bias error")], stalls=Stalls.uniform(0.2, 4), check=False)
    assert r.stats["error"] == 1 and r.stats["got_res"] == tr.res_beats, f"bias out of range: {r.stats}"
    r = await b.job(_ops(rng, p, 1), stalls=Stalls.uniform(0.2, 4), reset_cycles=3)
    assert r.stats["error"] == 0


#: ``(probability a gap starts in a cycle, longest gap)`` per stream of a verification job
STALL_PATTERNS = ((0.0, 1), (0.0, 1), (0.02, 4), (0.05, 2), (0.2, 1), (0.01, 64))


#: one operation with K = k_max (on one tile) per this many checked codes, and in the first job
KMAX_EVERY_CODES = 100_000


def verify_ops(rng: random.Random, p, count: int, *, k_max_op: bool = False) -> list:
    """Random operations for the verification at scale: random shapes with tiling in T, N and K,
    random relu, rounding, mult (with extreme multipliers), per-row exponents, biases at the
    accumulator limit and shifts over the whole legal range. ``T``, ``N``: 1, rows + 1, 2, 3 or 4 full
    tiles, or random up to ``max(4 * rows + 1, 33)`` (a tile drains all its lanes: full tiles give
    the most codes per cycle). ``K`` is mostly 1..2*rows (the array
    drains a tile while it computes the next, so most cycles produce codes); ``10 % * rows*cols/64``
    of the operations reduce up to 64, ``0.5 % * rows*cols/64`` 65..1024 (the longer reductions
    cost the same cycles for fewer codes on small arrays); ``k_max_op`` adds one operation with
    ``K = k_max`` on one tile."""
    from .tb_accelerator import random_args

    share = p.rows * p.cols / 64
    p_long, p_mid = 0.005 * share, 0.10 * share
    out = []
    for i in range(count):
        r = rng.random()
        t = rng.choice([1, p.rows + 1, 2 * p.rows, 3 * p.rows, 4 * p.rows, rng.randint(1, max(4 * p.rows + 1, 33))])
        n = rng.choice([1, p.cols + 1, 2 * p.cols, 3 * p.cols, 4 * p.cols, rng.randint(1, max(4 * p.cols + 1, 33))])
        if k_max_op and i == 0:  # the longest reduction (accumulator width), one tile
            k, t, n = p.k_max, rng.randint(1, p.rows), rng.randint(1, p.cols)
        elif r < p_long:
            k = rng.randint(65, max(65, min(p.k_max, 1024)))
        elif r < p_long + p_mid:
            k = rng.randint(2 * p.rows + 1, max(2 * p.rows + 1, 64))
        elif r < p_long + p_mid + 0.15:
            k = rng.choice([1, 2])
        else:
            k = rng.randint(1, 2 * p.rows)
        out.append(random_args(rng, p, use_mult=bool(rng.getrandbits(1)), use_xexp=bool(rng.getrandbits(1)),
                               t=t, n=n, k=min(k, p.k_max)))
    return out


@cocotb.test(skip=not os.environ.get("SFX_SIM_VERIFY_CODES"))
async def verify(dut):
    """Random operations (:func:`verify_ops`) until ``SFX_SIM_VERIFY_CODES`` output codes are
    checked against ``sfx.linear``, in jobs of 16 back to back, each job with a new random
    stall pattern on every stream (a quarter at full rate); statistics to ``sfx_verify.json``."""
    p = _params()
    target = int(os.environ["SFX_SIM_VERIFY_CODES"])
    seed = _seed()
    b = HarnessBench(dut, p, name="verify", seed=seed)
    rng = random.Random(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    stall_jobs = 0
    features = {"relu": 0, "toward_zero": 0, "mult": 0, "mult_extreme": 0, "xexp": 0, "xmult": 0, "bias_at_limit": 0,
                "k_max": 0, "saturated_codes": 0, "tiled_t": 0, "tiled_n": 0, "tiled_k_ge_64": 0}
    acc_lim = (1 << (p.acc_bits - 2)) - 1
    next_kmax = 0
    while b.codes < target:
        kmax = b.codes >= next_kmax
        if kmax:
            next_kmax += KMAX_EVERY_CODES
        args = verify_ops(rng, p, 16, k_max_op=kmax)
        for a in args:
            features["relu"] += a.relu
            features["toward_zero"] += a.rounding == "toward_zero"
            features["mult"] += a.mult is not None
            features["mult_extreme"] += a.mult is not None and bool(((a.mult == 1) | (a.mult == 65535)
                                                                     | (a.mult < 32768)).any())
            features["xexp"] += bool(np.asarray(a.x_exponent).any())
            features["xmult"] += a.xmult is not None
            features["bias_at_limit"] += bool((np.abs(a.bias) == acc_lim).any())
            features["k_max"] += a.K == p.k_max
            features["tiled_t"] += a.T > p.rows
            features["tiled_n"] += a.N > p.cols
            features["tiled_k_ge_64"] += a.K >= 64
        if rng.random() < 0.25:
            stalls = Stalls()
        else:
            # per stream: none, rare short gaps, frequent single-cycle gaps, or rare long gaps (up to 64 cycles)
            pick = {s: rng.choice(STALL_PATTERNS) for s in ("cmd", "par", "act", "wgt", "res")}
            stalls = Stalls({s: v[0] for s, v in pick.items()}, {s: v[1] for s, v in pick.items()})
            stall_jobs += 1
        r = await b.job([(a, f"op{b.ops + i}") for i, a in enumerate(args)], stalls=stalls)
        features["saturated_codes"] += r.stats["sat_count"]
        if b.codes * 10 // target > (b.codes - sum(a.T * a.N for a in args)) * 10 // target:
            dut._log.info("verify: %d of %d codes checked (%d operations, %d cycles, %.0f s)", b.codes, target,
                          b.ops, b.cycles, time.perf_counter() - t0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    Path("sfx_verify.json").write_text(json.dumps({
        "codes": b.codes, "operations": b.ops, "jobs": b.jobs, "jobs_with_stalls": stall_jobs,
        "cycles": b.cycles, "seed": seed, "wall_s": wall, "cpu_s": cpu, "sim_loop_s": b.sim_s,
        "features": features}))
    dut._log.info("verify: %d codes of %d operations checked in %d jobs (seed %d), %d cycles, %.1f s", b.codes,
                  b.ops, b.jobs, seed, b.cycles, wall)

"""cocotb benches of the stream helpers against :class:`superfloat.sim.fixtures.AddOne`.

Environment: ``SFX_SIM_BEATS`` (beats per test, default 2000), ``SFX_SIM_SEED``,
``SFX_SIM_OUT`` (the ``speed`` test writes its measurement there as JSON).
"""
from __future__ import annotations

import json
import os
import random
import time

import cocotb

from .streams import StreamBench, StreamDriver, StreamProtocolError, StreamSink


def _n() -> int:
    return int(os.environ.get("SFX_SIM_BEATS", "2000"))


def _seed() -> int:
    return int(os.environ.get("SFX_SIM_SEED", "1"))


async def _bench(dut, *, seed: int, poll: int = 1):
    bench = StreamBench(dut, poll=poll)
    drv = bench.add(StreamDriver(dut, "i", max_gap=6, seed=seed))
    snk = bench.add(StreamSink(dut, "o", max_stall=6, seed=seed + 1))
    await bench.start()
    return bench, drv, snk


async def _pass_beats(bench, drv, snk, *, gaps: float, stalls: float, n: int, seed: int):
    drv.gap_prob, snk.stall_prob = gaps, stalls
    snk.clear()
    rng = random.Random(seed)
    mask = (1 << drv.width) - 1
    data = [rng.getrandbits(drv.width) for _ in range(n)]
    data[:3] = [0, mask, mask - 1]  # wrap-around of +1
    drv.put(data)
    t0 = time.perf_counter()
    cycles = await bench.until(lambda: len(snk.beats) == n, max_cycles=50 * n + 100, what=f"{n} beats")
    dt = time.perf_counter() - t0
    exp = [(d + 1) & mask for d in data]
    for i, (e, g) in enumerate(zip(exp, snk.beats)):
        assert e == g, f"beat {i}: expected {e:#x}, got {g:#x}"
    return cycles, dt


@cocotb.test()
async def random_gaps_and_stalls(dut):
    """Every beat arrives once, in order, +1, under random gaps and stalls."""
    bench, drv, snk = await _bench(dut, seed=_seed())
    n = _n() // 4
    for gaps, stalls in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.4, 0.4)):
        before = drv.transfers
        cycles, _ = await _pass_beats(bench, drv, snk, gaps=gaps, stalls=stalls, n=n, seed=_seed())
        assert drv.transfers - before == n == len(snk.beats)
        if gaps == stalls == 0.0:
            # full rate: one beat per cycle after the FIFO's latency
            assert cycles <= n + 4, f"{cycles} cycles for {n} beats at full rate"


@cocotb.test()
async def reset_clears_endpoints(dut):
    """A reset in the middle drops queued beats; afterwards traffic is exact again."""
    bench = StreamBench(dut)
    drv = bench.add(StreamDriver(dut, "i", gap_prob=0.2, seed=_seed()))
    snk = bench.add(StreamSink(dut, "o", stall_prob=0.2, seed=_seed()))
    await bench.start()
    drv.put(range(100))
    await bench.until(lambda: len(snk.beats) >= 10, max_cycles=1000)
    await bench.reset(2)
    assert drv.pending == 0 and snk.beats == []
    drv.put(range(50))
    await bench.until(lambda: len(snk.beats) == 50, max_cycles=2000)
    await bench.cycles(10)
    assert snk.beats == list(range(1, 51))


@cocotb.test()
async def speed(dut):
    """Cycles per second of the bench loop at full rate (measured, not asserted)."""
    bench, drv, snk = await _bench(dut, seed=_seed(), poll=128)
    c0 = time.process_time()
    cycles, dt = await _pass_beats(bench, drv, snk, gaps=0.0, stalls=0.0, n=_n(), seed=_seed())
    cpu = time.process_time() - c0
    rate = cycles / dt
    dut._log.info("speed: %d cycles in %.3f s = %.0f cycles/s (%.0f per CPU second)", cycles, dt, rate,
                  cycles / cpu)
    out = os.environ.get("SFX_SIM_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"cycles": cycles, "seconds": dt, "cpu_seconds": cpu, "cycles_per_s": rate}, f)


@cocotb.test(expect_error=StreamProtocolError)
async def detects_fault(dut):
    """Against a faulty AddOne (``drop_valid`` / ``change_payload``): the sink must raise."""
    bench, drv, snk = await _bench(dut, seed=_seed())
    await _pass_beats(bench, drv, snk, gaps=0.0, stalls=0.5, n=200, seed=_seed())

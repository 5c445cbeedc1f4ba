"""StreamSlice (hw/fifo.py): every beat through, in order, with registered handshakes.

MemFIFO is exercised through the accelerator (tests/test_hw_accelerator.py: result rows
under random ``res`` back-pressure)."""
from __future__ import annotations

import pytest
from amaranth.hdl import Fragment, unsigned
from amaranth.lib import data

from superfloat.hw.fifo import StreamSlice

from hw_stream_helpers import check_rejects, make_sim, run_through


def _run(dut, beats, *, stall_in: float, stall_out: float, seed: int):
    return run_through(dut, beats, stall=stall_in, out_stall=stall_out, seed=seed, max_cycles=50 * len(beats) + 20)


@pytest.mark.parametrize("stall_in, stall_out", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (0.4, 0.6), (0.8, 0.2)])
def test_stream_slice_passes_every_beat_in_order(stall_in, stall_out):
    dut = StreamSlice(shape=unsigned(12))
    beats = [(37 * k + 5) % 4096 for k in range(300)]
    got, _ = _run(dut, beats, stall_in=stall_in, stall_out=stall_out, seed=int(10 * stall_in + 100 * stall_out))
    assert got == beats   # the Sink also checks that o holds its payload until taken


def test_stream_slice_full_rate_one_cycle_latency():
    dut = StreamSlice(shape=data.StructLayout({"a": 3, "b": 5}))
    beats = list(range(1, 65))
    got, out = _run(dut, beats, stall_in=0.0, stall_out=0.0, seed=1)
    # the first beat is taken at the first edge and out at the second: one cycle per beat after it
    assert got == beats and out["cycles"] == len(beats) + 1


def test_stream_slice_handshakes_are_registers():
    """No combinational path: within a cycle, i.ready ignores o.ready and o.valid / payload
    ignore i.valid / payload."""
    dut = StreamSlice(shape=unsigned(8))
    sim, _ = make_sim(dut)
    seen = []

    async def tb(ctx):
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload, 0x5A)
        ctx.set(dut.o.ready, 0)
        await ctx.tick()                 # 0x5A into the output register
        ctx.set(dut.i.payload, 0x33)
        await ctx.tick()                 # o stalls: 0x33 into the skid register
        for o_ready, i_valid, i_payload in ((0, 0, 0x11), (1, 1, 0x22), (0, 1, 0x44), (1, 0, 0x66)):
            ctx.set(dut.o.ready, o_ready)
            ctx.set(dut.i.valid, i_valid)
            ctx.set(dut.i.payload, i_payload)
            await ctx.delay(1e-9)
            seen.append((ctx.get(dut.i.ready), ctx.get(dut.o.valid), ctx.get(dut.o.payload), ctx.get(dut.busy)))

    sim.add_testbench(tb)
    sim.run()
    assert seen == [(0, 1, 0x5A, 1)] * 4


def test_stream_slice_rejects_a_bad_shape():
    check_rejects(StreamSlice, {"shape": unsigned(4)}, {"shape": "wide"}, TypeError,
                  r"shape must be shape-castable \(a layout, unsigned\(n\), an int width, \.\.\.\), got str 'wide'")
    dut = StreamSlice(shape=unsigned(4))
    Fragment.get(dut, None)
    assert dut.shape == unsigned(4)

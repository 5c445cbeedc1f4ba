"""Stream drivers for Amaranth simulations of the SFx hardware (async testbenches).

* :func:`put` / :func:`get`: one beat on one stream, with random stalls.
* :class:`Source` / :class:`Sink` + :func:`run_streams`: drive several streams at once
  from one testbench, cycle by cycle, with independent random stalls, and check
  SPEC section 6 on every output stream (``valid`` never drops before the beat is
  taken, the payload does not change meanwhile). One loop for all streams is faster
  than one testbench per stream and makes a synchronous reset mid-stream easy.

Payloads are handled as raw integers (``payload.as_value()``): fast, and exactly what a
Verilog simulator sees.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Callable, Iterable

from amaranth.hdl import ClockDomain, Const, Module, ValueCastable
from amaranth.sim import Simulator

__all__ = ["pack", "raw", "make_sim", "check_multiplier_both_impls", "check_rejects", "ARRAY_PARAM_ERRORS", "put", "get", "Source", "Sink", "run_streams", "run_through", "StreamProtocolError"]


class StreamProtocolError(AssertionError):
    pass


def pack(layout, value) -> int:
    """The integer of a layout constant (``value``: a dict / list for ``layout.const``)."""
    return Const.cast(layout.const(value)).value


def raw(value):
    """The plain :class:`Value` behind a view (payloads are set and read as ints)."""
    return value.as_value() if isinstance(value, ValueCastable) else value


def make_sim(dut, period: float = 1e-6):
    """A :class:`Simulator` for ``dut`` with an explicit ``sync`` domain.

    Returns ``(sim, rst)``: ``rst`` is the domain's synchronous reset, for tests that
    reset the design mid-operation.
    """
    top = Module()
    top.domains.sync = cd = ClockDomain("sync")
    top.submodules.dut = dut
    sim = Simulator(top)
    sim.add_clock(period, domain="sync")
    return sim, cd.rst


#: constructor errors of the array-shaped components (SFxMacArray, SFxAccelerator: the same
#: checks of the shape, widths, depth and DSP budget), for ``rows=2, cols=2`` otherwise valid
ARRAY_PARAM_ERRORS = [
    (dict(rows=0), ValueError, r"rows must be in 1\.\.64, got 0"),
    (dict(cols=65), ValueError, r"cols must be in 1\.\.64, got 65"),
    (dict(rows=2.5), TypeError, r"rows must be an int, got float"),
    (dict(a_bits=17), ValueError, r"a_bits must be in 2\.\.16"),
    (dict(w_bits=1), ValueError, r"w_bits must be in 2\.\.16"),
    (dict(k_max=0), ValueError, r"k_max must be in 1\.\.1048576, got 0"),
    (dict(dsp_pes=5), ValueError, r"dsp_pes must be in 0\.\.4, got 5"),
    (dict(dsp_pes=-1), ValueError, r"dsp_pes must be in 0\.\.4, got -1"),
]


def check_rejects(cls, base: dict, kwargs: dict, exc: type[Exception], match: str) -> None:
    """The keyword-only constructor ``cls(**base)`` with ``kwargs`` changed raises ``exc`` whose
    message matches ``match``."""
    import pytest

    with pytest.raises(exc, match=match):
        cls(**{**base, **kwargs})


def check_multiplier_both_impls(cls, a_values: Iterable[int], b_values: Iterable[int], **kwargs) -> None:
    """Every ``(a, b)`` of ``a_values`` x ``b_values`` on the ``impl="lut"`` and ``impl="dsp"``
    instances of the combinational multiplier ``cls(**kwargs)`` (ports ``a``, ``b``, ``p``):
    both must give ``a * b``."""
    top = Module()
    top.submodules.lut = lut = cls(impl="lut", **kwargs)
    top.submodules.dsp = dsp = cls(impl="dsp", **kwargs)
    a_values, b_values = list(a_values), list(b_values)
    bad = []

    async def tb(ctx):
        for a in a_values:
            for b in b_values:
                for mul in (lut, dsp):
                    ctx.set(mul.a, a)
                    ctx.set(mul.b, b)
                pl, pd = ctx.get(lut.p), ctx.get(dsp.p)
                if pl != a * b or pd != a * b:
                    bad.append((a, b, pl, pd))

    sim = Simulator(top)
    sim.add_testbench(tb)
    sim.run()
    assert not bad, f"{len(bad)} wrong products, first (a, b, lut, dsp): {bad[0]}"


async def put(ctx, stream, payload: int, *, rng: random.Random | None = None, stall: float = 0.0):
    """Transfer one beat into the DUT on ``stream`` (idle cycles first with probability ``stall``)."""
    while rng is not None and rng.random() < stall:
        await ctx.tick()
    ctx.set(stream.valid, 1)
    ctx.set(raw(stream.payload), payload)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


async def get(ctx, stream, *, rng: random.Random | None = None, stall: float = 0.0) -> int:
    """Take one beat from the DUT on ``stream`` (``ready`` low with probability ``stall``)."""
    while True:
        ready = 0 if (rng is not None and rng.random() < stall) else 1
        ctx.set(stream.ready, ready)
        _, _, valid, payload = await ctx.tick().sample(stream.valid, raw(stream.payload))
        if ready and valid:
            ctx.set(stream.ready, 0)
            return payload


class Source:
    """Drives an input stream of the DUT from a queue of integer payloads."""

    def __init__(self, stream, beats: Iterable[int] = (), *, stall: float = 0.0, seed: int = 0, name: str = ""):
        self.stream = stream
        self.queue: deque[int] = deque(beats)
        self.stall = stall
        self.rng = random.Random(seed)
        self.name = name or repr(stream)
        self.current: int | None = None
        self.sent = 0

    def extend(self, beats: Iterable[int]) -> None:
        self.queue.extend(beats)

    def clear(self) -> None:
        self.queue.clear()
        self.current = None

    @property
    def done(self) -> bool:
        return self.current is None and not self.queue

    def drive(self, ctx) -> None:
        if self.current is None and self.queue and not (self.stall and self.rng.random() < self.stall):
            self.current = self.queue.popleft()
            ctx.set(raw(self.stream.payload), self.current)
        ctx.set(self.stream.valid, int(self.current is not None))

    def signals(self):
        return (self.stream.ready,)

    def update(self, ready: int) -> None:
        if self.current is not None and ready:
            self.current = None
            self.sent += 1


class Sink:
    """Takes beats from an output stream of the DUT and checks SPEC section 6."""

    def __init__(self, stream, *, stall: float = 0.0, seed: int = 0, name: str = ""):
        self.stream = stream
        self.stall = stall
        self.rng = random.Random(seed)
        self.name = name or repr(stream)
        self.beats: list[int] = []
        self.pending: int | None = None   # payload offered but not taken at the last edge
        self._ready = 0

    def clear(self) -> None:
        self.pending = None

    def drive(self, ctx) -> None:
        self._ready = 0 if (self.stall and self.rng.random() < self.stall) else 1
        ctx.set(self.stream.ready, self._ready)

    def signals(self):
        return (self.stream.valid, raw(self.stream.payload))

    def update(self, valid: int, payload: int) -> None:
        if self.pending is not None:
            if not valid:
                raise StreamProtocolError(f"{self.name}: valid dropped before the beat {self.pending:#x} was taken")
            if payload != self.pending:
                raise StreamProtocolError(f"{self.name}: payload changed from {self.pending:#x} to {payload:#x} "
                                          f"before it was taken")
        if valid and self._ready:
            self.beats.append(payload)
            self.pending = None
        elif valid:
            self.pending = payload
        else:
            self.pending = None


async def run_streams(ctx, sources: list[Source], sinks: list[Sink], *, until: Callable[[], bool],
                      max_cycles: int, on_cycle: Callable[[int], None] | None = None) -> int:
    """Drive ``sources`` and ``sinks`` every cycle until ``until()`` holds (checked after
    each clock edge). Returns the number of cycles; fails after ``max_cycles``."""
    sampled = []
    for s in (*sources, *sinks):
        sampled.extend(s.signals())
    for cycle in range(1, max_cycles + 1):
        for s in sources:
            s.drive(ctx)
        for s in sinks:
            s.drive(ctx)
        _, _, *values = await ctx.tick().sample(*sampled)
        pos = 0
        for s in sources:
            s.update(values[pos])
            pos += 1
        for s in sinks:
            s.update(values[pos], values[pos + 1])
            pos += 2
        if on_cycle is not None:
            on_cycle(cycle)
        if until():
            for s in sources:
                ctx.set(s.stream.valid, 0)
            for s in sinks:
                ctx.set(s.stream.ready, 0)
            return cycle
    raise AssertionError(f"no completion after {max_cycles} cycles: "
                         + ", ".join(f"{s.name} {len(s.queue)} beats left" for s in sources)
                         + "; " + ", ".join(f"{s.name} {len(s.beats)} beats" for s in sinks))


def run_through(dut, beats: list[int], *, stall: float = 0.0, out_stall: float = 0.0, seed: int = 0,
                max_cycles: int, final: dict | None = None) -> tuple[list[int], dict]:
    """``beats`` into ``dut.i`` and out of ``dut.o`` with random stalls on both sides until
    as many came out. Returns the beats taken and ``{"cycles": n, name: value}`` for each
    signal of ``final``, read one clock edge after the last beat."""
    src = Source(dut.i, beats, stall=stall, seed=seed, name="i")
    snk = Sink(dut.o, stall=out_stall, seed=seed + 1, name="o")
    sim, _ = make_sim(dut)
    info = {}

    async def tb(ctx):
        info["cycles"] = await run_streams(ctx, [src], [snk], until=lambda: len(snk.beats) == len(beats),
                                           max_cycles=max_cycles)
        await ctx.tick()
        info.update({name: ctx.get(sig) for name, sig in (final or {}).items()})

    sim.add_testbench(tb)
    sim.run()
    return snk.beats, info

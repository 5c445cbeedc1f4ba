"""cocotb stream endpoints for Amaranth ``lib.stream`` ports, run by one per-cycle engine.

An Amaranth stream port ``<name>`` appears in Verilog as ``<name>__valid``,
``<name>__ready`` and ``<name>__payload``. A beat transfers when ``valid & ready`` at a
rising clock edge (SPEC section 6).

* :class:`StreamDriver` (modelled on Glasgow's ``stream_put``) offers beats, optionally
  with random gaps between them (``valid`` low), never drops ``valid`` before its beat is
  taken and never changes the payload of an offered beat.
* :class:`StreamSink` (modelled on Glasgow's ``stream_get``) holds ``ready`` low for random
  runs, collects the beats, hands each one to an ``on_beat`` callback (a scoreboard), and
  checks the producer: ``valid`` never drops before its beat is taken, the payload stays
  stable while ``valid & ~ready``, and neither is X/Z (Icarus is 4-state).
* :class:`StreamBench` owns the clock and the reset and runs every endpoint from one
  engine: at each falling edge it applies the transfers of the last rising edge and
  drives new inputs (writes at the falling edge cannot race the rising-edge logic on any
  simulator); in the ``ReadOnly`` phase of that timestep it samples
  ``ready``/``valid``/payloads, which are exactly what the next rising edge sees. Tests
  wait with :meth:`StreamBench.until`.

Speed: the per-cycle Python work dominates a co-simulation, so the engine is two raw GPI
callbacks per cycle (cocotb's task scheduler is entered only when a waiting coroutine
polls, every ``poll`` cycles); payload strings are precomputed when beats are queued;
signals are read and written through the raw GPI handles (no ``LogicArray`` objects); a
signal is written only when its value changes; ``ready`` is read only while a beat is
offered.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import cocotb
from cocotb import simulator as _gpi
from cocotb.clock import Clock
from cocotb.triggers import Timer
from cocotb.utils import get_sim_steps, get_sim_time

__all__ = ["StreamBench", "StreamDriver", "StreamSink", "StreamProtocolError", "read_int"]

_DEPOSIT = 0  # cocotb.handle._GPISetAction.DEPOSIT


class StreamProtocolError(AssertionError):
    """A stream handshake rule was broken (valid dropped, payload changed, X/Z)."""


def _raw(dut: Any, name: str):
    try:
        return getattr(dut, name)
    except AttributeError:
        raise AttributeError(f"the DUT has no signal {name!r} (is the stream port named correctly?)") from None


def read_int(handle: Any) -> int:
    """Value of a DUT signal as an unsigned int; raises if it holds X/Z."""
    s = handle._handle.get_signal_val_binstr()
    try:
        return int(s, 2)
    except ValueError:
        raise StreamProtocolError(f"{handle._name} holds X/Z: {s}") from None


def _bits(h) -> str:
    return h.get_signal_val_binstr()


class _Endpoint:
    bench: "StreamBench | None" = None

    def __init__(self, dut: Any, name: str, seed: int | None):
        self.name = name
        self._valid_h = _raw(dut, f"{name}__valid")
        self._ready_h = _raw(dut, f"{name}__ready")
        self._payload_h = _raw(dut, f"{name}__payload")
        self.width = len(self._payload_h)
        self.valid = self._valid_h._handle
        self.ready = self._ready_h._handle
        self.payload = self._payload_h._handle
        self.rng = random.Random(seed)
        self.transfers = 0  # beats transferred so far
        self.last_transfer_cycle: int | None = None
        self.first_transfer_cycle: int | None = None

    # engine hooks
    def _drive(self, cycle: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sample(self, cycle: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _note(self, cycle: int) -> None:
        self.transfers += 1
        self.last_transfer_cycle = cycle
        if self.first_transfer_cycle is None:
            self.first_transfer_cycle = cycle


class StreamDriver(_Endpoint):
    """Drive the DUT's input stream ``name`` (``<name>__valid/ready/payload``).

    Args:
        dut: the cocotb top-level handle.
        name: stream port name.
        gap_prob: probability of a gap (``valid`` low) before each beat.
        max_gap: a gap lasts 1..``max_gap`` cycles (uniform).
        seed: seed of this endpoint's private ``random.Random``.
    """

    def __init__(self, dut: Any, name: str, *, gap_prob: float = 0.0, max_gap: int = 4, seed: int | None = None):
        super().__init__(dut, name, seed)
        self.gap_prob = float(gap_prob)
        self.max_gap = int(max_gap)
        self._beats: list[str] = []  # binary strings, precomputed
        self._next = 0  # index of the beat being offered / to offer
        self._offered = False  # valid driven high with beat _next
        self._fire = False  # beat _next transfers at the coming rising edge
        self._gap = 0
        self._valid_out = 0
        self._limit = 1 << self.width

    def put(self, words: Iterable[int]) -> None:
        """Queue beats (unsigned ints below ``2**width``); they are sent in order."""
        w = self.width
        fmt = f"0{w}b"
        lim = self._limit
        new = []
        for x in words:
            x = int(x)
            if not 0 <= x < lim:
                raise ValueError(f"{self.name}: beat {x:#x} does not fit the {w}-bit payload")
            new.append(format(x, fmt))
        self._beats.extend(new)

    @property
    def pending(self) -> int:
        """Beats queued but not yet transferred."""
        return len(self._beats) - self._next

    @property
    def idle(self) -> bool:
        return self.pending == 0

    def _init(self) -> None:
        self.valid.set_signal_val_int(_DEPOSIT, 0)
        self._valid_out = 0
        self.payload.set_signal_val_binstr(_DEPOSIT, "0" * self.width)

    def _reset(self) -> None:
        self._beats = []
        self._next = 0
        self._offered = False
        self._fire = False
        self._gap = 0
        if self._valid_out:
            self.valid.set_signal_val_int(_DEPOSIT, 0)
            self._valid_out = 0

    def _drive(self, cycle: int) -> None:
        if self._fire:
            self._fire = False
            self._offered = False
            self._next += 1
            self._note(cycle - 1)
            if self._next == len(self._beats):  # keep memory bounded on long runs
                self._beats = []
                self._next = 0
        if self._offered:
            return  # hold valid and payload until taken
        if self._next < len(self._beats):
            if self._gap:
                self._gap -= 1
            elif self.gap_prob and self.rng.random() < self.gap_prob:
                self._gap = self.rng.randint(1, self.max_gap) - 1
            else:
                self.payload.set_signal_val_binstr(_DEPOSIT, self._beats[self._next])
                if not self._valid_out:
                    self.valid.set_signal_val_int(_DEPOSIT, 1)
                    self._valid_out = 1
                self._offered = True
                return
        if self._valid_out:
            self.valid.set_signal_val_int(_DEPOSIT, 0)
            self._valid_out = 0

    def _sample(self, cycle: int) -> None:
        if self._offered:
            r = self.ready.get_signal_val_binstr()
            if r == "1":
                self._fire = True
            elif r != "0":
                raise StreamProtocolError(f"{self.name}__ready is {r!r} (X/Z) at cycle {cycle}")


class StreamSink(_Endpoint):
    """Accept the DUT's output stream ``name``, collecting beats and checking the producer.

    Args:
        dut: the cocotb top-level handle.
        name: stream port name.
        stall_prob: probability, in a cycle where ``ready`` is high, of starting a stall.
        max_stall: a stall (``ready`` low) lasts 1..``max_stall`` cycles.
        on_beat: called with each beat (an int) as it is taken, e.g. a scoreboard's check.
        keep: keep the beats in :attr:`beats` (default True).
        seed: seed of this endpoint's private ``random.Random``.
    """

    def __init__(self, dut: Any, name: str, *, stall_prob: float = 0.0, max_stall: int = 4,
                 on_beat: Callable[[int], None] | None = None, keep: bool = True, seed: int | None = None):
        super().__init__(dut, name, seed)
        self.stall_prob = float(stall_prob)
        self.max_stall = int(max_stall)
        self.on_beat = on_beat
        self.keep = keep
        self.beats: list[int] = []
        self._stall = 0
        self._ready_out = 0
        self._held: str | None = None  # payload of a beat offered but not taken last cycle

    def _init(self) -> None:
        self.ready.set_signal_val_int(_DEPOSIT, 0)
        self._ready_out = 0

    def _reset(self) -> None:
        self.beats = []
        self._held = None
        self._stall = 0

    def clear(self) -> None:
        """Forget the collected beats."""
        self.beats = []

    def _drive(self, cycle: int) -> None:
        if self._stall:
            self._stall -= 1
            rdy = 0
        elif self.stall_prob and self.rng.random() < self.stall_prob:
            self._stall = self.rng.randint(1, self.max_stall) - 1
            rdy = 0
        else:
            rdy = 1
        if rdy != self._ready_out:
            self.ready.set_signal_val_int(_DEPOSIT, rdy)
            self._ready_out = rdy

    def _sample(self, cycle: int) -> None:
        v = self.valid.get_signal_val_binstr()
        held = self._held
        if v == "1":
            p = self.payload.get_signal_val_binstr()
            if held is not None and p != held:
                raise StreamProtocolError(
                    f"{self.name}: payload changed while valid & ~ready at cycle {cycle}: "
                    f"{_hex(held)} -> {_hex(p)}")
            if self._ready_out:
                self._held = None
                try:
                    word = int(p, 2)
                except ValueError:
                    raise StreamProtocolError(f"{self.name}: payload holds X/Z at cycle {cycle}: {p}") from None
                self._note(cycle)
                if self.keep:
                    self.beats.append(word)
                if self.on_beat is not None:
                    self.on_beat(word)
            else:
                self._held = p
        elif v == "0":
            if held is not None:
                raise StreamProtocolError(
                    f"{self.name}: valid dropped at cycle {cycle} before its beat {_hex(held)} was taken")
        else:
            raise StreamProtocolError(f"{self.name}__valid is {v!r} (X/Z) at cycle {cycle}")


def _hex(bits: str) -> str:
    try:
        return hex(int(bits, 2))
    except ValueError:
        return bits


class _Waiter:
    __slots__ = ("pred", "deadline", "hit", "timed_out")

    def __init__(self, pred, deadline):
        self.pred = pred
        self.deadline = deadline
        self.hit: int | None = None  # cycle whose sample made pred() true
        self.timed_out = False


_ACTIVE: "StreamBench | None" = None


class StreamBench:
    """Clock, reset and the per-cycle engine that runs all stream endpoints.

    Args:
        dut: the cocotb top-level handle.
        clk, rst: names of the clock and (active-high, synchronous) reset inputs.
        period_ns: clock period.
        poll: default number of cycles between two checks of a waiting coroutine
            (:meth:`until`). 1 reacts in the cycle that satisfies the condition; a larger
            value lets the engine run several cycles without entering cocotb's scheduler
            (the condition is still evaluated every cycle and the hit cycle is exact).

    The engine is two raw GPI callbacks per cycle, outside cocotb's scheduler: at the
    falling edge it applies the transfers of the last rising edge and drives new inputs
    (a write at the falling edge cannot race the rising-edge logic on any simulator); in
    the ReadOnly phase of the same timestep it samples ``ready``/``valid``/payloads (what
    the next rising edge will see) and evaluates the waiters' conditions. Waiting
    coroutines wake at a quarter period after a falling edge (after that sample, before
    the next rising edge) and act through the engine (queue beats, request a reset): a
    test never writes DUT signals itself.

    Usage::

        bench = StreamBench(dut)
        drv = bench.add(StreamDriver(dut, "i", gap_prob=0.3))
        snk = bench.add(StreamSink(dut, "o", stall_prob=0.3))
        await bench.start()          # clock, engine, reset
        drv.put(words)
        await bench.until(lambda: len(snk.beats) == len(words), max_cycles=10_000)
    """

    def __init__(self, dut: Any, *, clk: str = "clk", rst: str | None = "rst", period_ns: int = 10,
                 poll: int = 1):
        self.dut = dut
        self.clk = _raw(dut, clk)
        self.rst = _raw(dut, rst)._handle if rst else None
        self.period_ns = period_ns
        self.poll = int(poll)
        self.endpoints: list[_Endpoint] = []
        self.on_cycle: list[Callable[[int], None]] = []  # called in ReadOnly, after the endpoints
        self.cycle = 0  # falling edges handled since start()
        self._waiters: list[_Waiter] = []
        self._reset_left = 0
        self._in_reset = False
        self._error: BaseException | None = None
        self._running = False
        self._task = None
        self._fe_cb = None
        self._ro_cb = None
        self._period_steps = get_sim_steps(period_ns, "ns")

    def add(self, ep: _Endpoint) -> Any:
        ep.bench = self
        self.endpoints.append(ep)
        return ep

    async def start(self, reset_cycles: int = 2) -> None:
        """Start the clock (GPI implementation, no Python per edge), the engine, and reset.

        One bench per test: a second running bench would drive the same clock and signals."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self and _ACTIVE._running:
            raise RuntimeError("another StreamBench is already running in this test; reuse it")
        _ACTIVE = self
        Clock(self.clk, self.period_ns, unit="ns", impl="gpi").start(start_high=False)
        for ep in self.endpoints:  # every input known from time 0 (Icarus is 4-state)
            ep._init()
        if self.rst is not None:
            self.rst.set_signal_val_int(_DEPOSIT, 1)
        self._running = True
        self._fe_cb = _gpi.register_value_change_callback(self.clk._handle, self._on_fall, _gpi.FALLING)
        self._task = cocotb.start_soon(self._keeper())
        if self.rst is not None:
            await self.reset(reset_cycles)

    async def reset(self, cycles: int = 2) -> None:
        """Assert reset for ``cycles`` rising edges; every endpoint forgets its queued and
        collected beats (the DUT returns to idle, SPEC section 6)."""
        if self.rst is None:
            raise RuntimeError("this bench has no reset signal")
        self._raise_if_failed()
        self._reset_left = max(1, int(cycles))
        while self._reset_left or self._in_reset:
            await self._sleep(1)
            self._raise_if_failed()

    async def until(self, pred: Callable[[], bool], *, max_cycles: int, what: str = "",
                    poll: int | None = None) -> int:
        """Wait until ``pred()`` is true (evaluated after every cycle's sample); return the
        number of cycles to the one that made it true. Raise ``AssertionError`` with a state
        summary after ``max_cycles`` cycles (a hung stream)."""
        self._raise_if_failed()
        start = self.cycle
        if pred():
            return 0
        w = _Waiter(pred, self.cycle + int(max_cycles))
        self._waiters.append(w)
        poll = self.poll if poll is None else max(1, int(poll))
        try:
            while w.hit is None and not w.timed_out:
                await self._sleep(poll)
                self._raise_if_failed()
        finally:
            if w in self._waiters:
                self._waiters.remove(w)
        if w.timed_out:
            raise AssertionError(f"timeout after {max_cycles} cycles waiting for {what or pred}: {self.summary()}")
        return w.hit - start

    async def cycles(self, n: int) -> None:
        """Let ``n`` cycles pass (endpoints keep working)."""
        target = self.cycle + int(n)
        await self.until(lambda: self.cycle >= target, max_cycles=int(n) + 1, what=f"{n} cycles")

    def summary(self) -> str:
        parts = [f"cycle {self.cycle}"]
        for ep in self.endpoints:
            if isinstance(ep, StreamDriver):
                parts.append(f"{ep.name}: {ep.transfers} sent, {ep.pending} pending")
            else:
                parts.append(f"{ep.name}: {ep.transfers} received")
        return "; ".join(parts)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def _sleep(self, cycles: int) -> None:
        """Sleep to a quarter period after the ``cycles``-th next falling edge."""
        p = self._period_steps
        now = get_sim_time("step")
        d = (p // 4 - now % p) % p or p
        await Timer(d + (cycles - 1) * p, unit="step")

    async def _keeper(self) -> None:
        """Owns the engine's lifetime (stopped with the test) and reports its errors even
        when no coroutine is waiting on it."""
        try:
            while True:
                await Timer(1024 * self._period_steps, unit="step")
                self._raise_if_failed()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._running = False
        for name in ("_fe_cb", "_ro_cb"):
            cb = getattr(self, name)
            if cb is not None:
                with contextlib.suppress(Exception):
                    cb.deregister()
                setattr(self, name, None)

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._stop()

    # ---- the engine: raw GPI callbacks, they must never raise into the simulator

    def _on_fall(self) -> None:
        self._fe_cb = None
        if not self._running:
            return
        try:
            self.cycle += 1
            cyc = self.cycle
            if self._reset_left:
                if not self._in_reset:
                    self.rst.set_signal_val_int(_DEPOSIT, 1)
                    self._in_reset = True
                for ep in self.endpoints:
                    ep._reset()
                self._reset_left -= 1
            else:
                if self._in_reset:
                    self.rst.set_signal_val_int(_DEPOSIT, 0)
                    self._in_reset = False
                for ep in self.endpoints:
                    ep._drive(cyc)
                self._ro_cb = _gpi.register_readonly_callback(self._on_readonly)
            self._fe_cb = _gpi.register_value_change_callback(self.clk._handle, self._on_fall, _gpi.FALLING)
        except BaseException as e:  # noqa: BLE001 - raised in the waiting coroutine
            self._fail(e)

    def _on_readonly(self) -> None:
        self._ro_cb = None
        if not self._running:
            return
        try:
            cyc = self.cycle
            for ep in self.endpoints:
                ep._sample(cyc)
            for f in self.on_cycle:
                f(cyc)
            if self._waiters:
                for w in self._waiters:
                    if w.hit is None and not w.timed_out:
                        if w.pred():
                            w.hit = cyc
                        elif cyc >= w.deadline:
                            w.timed_out = True
        except BaseException as e:  # noqa: BLE001 - raised in the waiting coroutine
            self._fail(e)


def words_from_hex(seq: Sequence[str]) -> list[int]:
    """Beats stored as hex strings (npz job files) to ints."""
    return [int(s, 16) for s in seq]

"""cocotb bench of the FPGA board top's link (:class:`superfloat.hw.fpga.board_top.UARTBridge`).

The host driver's own protocol object (:class:`superfloat.hw.fpga.host.LinkSession`, the
one :func:`~superfloat.hw.fpga.host.run_linear_uart` runs over pyserial) produces the
bytes; :class:`UartEndpoint` turns them into bits on the bridge's ``rx`` line and decodes
its ``tx`` line back into bytes for the session, at a fast bit time (``divisor`` cycles
per bit). Results are compared with :func:`superfloat.sw.sfx.linear_with_stats`, codes
and saturation count, with zero tolerance. Clock and reset come from
:class:`superfloat.sim.streams.StreamBench`, which runs the endpoint once per cycle.

Environment: ``SFX_BOARD_JOB``, a JSON file ``{"divisor", "idle_timeout", "cases": [{"x",
"w", "kw"}], "out"}``; the bench writes the codes, stats and cycle counts to ``out``.
Run through ``tests/test_fpga_board_sim.py`` (:mod:`superfloat.sim.runner`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import cocotb
import numpy as np

from superfloat.hw.fpga.host import LinkSession
from superfloat.hw.fpga.protocol import HOST, decode_status
from superfloat.sw import sfx

from .streams import StreamBench

_DEPOSIT = 0


class UartEndpoint:
    """A UART at the far end of the bridge's ``rx`` / ``tx`` lines (8N1, ``divisor`` cycles
    per bit), run by :class:`StreamBench` once per cycle.

    ``source()`` is asked for more bytes whenever the line is idle; every byte decoded from
    ``tx`` goes to ``sink(byte)``. A bad stop bit on ``tx`` raises ``AssertionError``.
    """

    def __init__(self, dut, *, divisor: int, source: Callable[[], bytes], sink: Callable[[int], None]):
        self.name = "uart"
        self.d = divisor
        self.rx = dut.rx._handle
        self.tx = dut.tx._handle
        self.source = source
        self.sink = sink
        self.beats: list[int] = []          # bytes received (StreamBench.summary counts them)
        self.sent = 0
        self._bits: list[int] = []          # line levels still to drive, one per cycle
        self._level = -1
        self._rx_start: int | None = None
        self._rx_val = 0

    def _init(self) -> None:     # every input known from time 0 (Icarus is 4-state)
        self._level = -1
        self._set(1)

    def _reset(self) -> None:
        self._bits = []
        self._rx_start = None
        self._set(1)

    def _set(self, v: int) -> None:
        if v != self._level:
            self.rx.set_signal_val_int(_DEPOSIT, v)
            self._level = v

    def _drive(self, cycle: int) -> None:
        if not self._bits:
            data = self.source()
            for b in data:
                for bit in [0] + [(b >> i) & 1 for i in range(8)] + [1]:
                    self._bits += [bit] * self.d
            self.sent += len(data)
        self._set(self._bits.pop(0) if self._bits else 1)

    def _sample(self, cycle: int) -> None:
        v = self.tx.get_signal_val_binstr()
        if v not in ("0", "1"):
            raise AssertionError(f"tx is {v} at cycle {cycle}")
        bit = int(v)
        d = self.d
        if self._rx_start is None:
            if bit == 0:
                self._rx_start = cycle
                self._rx_val = 0
            return
        t = cycle - self._rx_start - d // 2
        if t <= 0 or t % d:
            return
        i = t // d      # 1..8 data bits, 9 stop bit
        if i <= 8:
            self._rx_val |= bit << (i - 1)
            return
        if bit != 1:
            raise AssertionError(f"tx stop bit is 0 at cycle {cycle} (byte 0x{self._rx_val:02x})")
        self._rx_start = None
        self.beats.append(self._rx_val)
        self.sink(self._rx_val)


def _job() -> dict:
    path = os.environ.get("SFX_BOARD_JOB")
    if not path:
        raise RuntimeError("SFX_BOARD_JOB is not set: run this bench through tests/test_fpga_board_sim.py")
    return json.loads(Path(path).read_text())


class _Link:
    """The bench: StreamBench (clock, reset) + a UartEndpoint feeding one session at a time."""

    def __init__(self, dut, job):
        self.job = job
        self.bench = StreamBench(dut)
        self.sess: LinkSession | None = None
        self.raw: bytearray = bytearray()     # outgoing bytes outside a session
        self.got: bytearray = bytearray()     # incoming bytes outside a session
        self.uart = self.bench.add(UartEndpoint(dut, divisor=job["divisor"], source=self._source,
                                                sink=self._sink))

    def _source(self) -> bytes:
        if self.raw:
            out, self.raw = bytes(self.raw), bytearray()
            return out
        return self.sess.take_outgoing() if self.sess is not None else b""

    def _sink(self, b: int) -> None:
        if self.sess is not None:
            self.sess.feed(bytes([b]))
        else:
            self.got.append(b)

    async def session(self, sess: LinkSession, max_cycles: int) -> int:
        self.sess = sess
        self.raw += sess.connect_bytes()
        n = await self.bench.until(lambda: sess.done, max_cycles=max_cycles,
                                   what=f"the session (waiting for {sess.waiting_for})")
        self.sess = None
        return n

    async def raw_exchange(self, data: bytes, reply_len: int, max_cycles: int) -> bytes:
        self.got = bytearray()
        self.raw += data
        await self.bench.until(lambda: len(self.got) >= reply_len, max_cycles=max_cycles,
                               what=f"{reply_len} reply bytes")
        return bytes(self.got)


def _case_session(case) -> tuple[LinkSession, np.ndarray, np.ndarray, dict]:
    x = np.asarray(case["x"], dtype=np.int64)
    w = np.asarray(case["w"], dtype=np.int64)
    kw = dict(case["kw"])
    return LinkSession(x, w, **kw), x, w, kw


def _budget(sess_bytes: int, d: int) -> int:
    return 40 * d * (sess_bytes + 64) + 20000


@cocotb.test()
async def linear_over_uart(dut):
    """Every case of the job through the UART link equals sfx.linear_with_stats."""
    job = _job()
    link = _Link(dut, job)
    await link.bench.start(reset_cycles=3)
    out = []
    for n, case in enumerate(job["cases"]):
        sess, x, w, kw = _case_session(case)
        cycles = await link.session(sess, max_cycles=_budget(case.get("approx_bytes", 4000), job["divisor"]))
        codes, stats = sess.result()
        want, wst = sfx.linear_with_stats(x, w, **kw)
        bad = np.argwhere(codes != want)
        assert bad.size == 0, (f"case {n}: {len(bad)} codes differ, first at [t, n] = {bad[0].tolist()}: "
                               f"board {int(codes[tuple(bad[0])])}, sfx {int(want[tuple(bad[0])])}")
        assert stats.n_saturated == wst.n_saturated, (f"case {n}: sat_count {stats.n_saturated}, "
                                                      f"sfx {wst.n_saturated}")
        out.append({"codes": codes.tolist(), "stats": stats.as_dict(), "cycles": cycles})
    Path(job["out"]).write_text(json.dumps({"cases": out}))


@cocotb.test()
async def link_faults(dut):
    """Unknown frame types and a stalled half frame are flagged (STATUS) and recovered from."""
    job = _job()
    d = job["divisor"]
    link = _Link(dut, job)
    await link.bench.start(reset_cycles=3)

    # An unknown type byte is dropped and flagged.
    rep = await link.raw_exchange(bytes([0x5A, HOST["status"]]), 6, max_cycles=200 * d)
    st = decode_status(rep[1:6])
    assert rep[0] == 0x83 and st["bad_type"] and not st["aborted"], rep.hex()

    # RESET clears the flags.
    rep = await link.raw_exchange(bytes([HOST["reset"], HOST["status"]]), 6, max_cycles=200 * d)
    st = decode_status(rep[1:6])
    assert not any(st[k] for k in ("bad_type", "aborted", "overflow", "framing", "error")), st

    # Half a CMD frame, then silence: the watchdog aborts and flags it.
    link.raw += bytes([HOST["cmd"], 1, 2])
    await link.bench.cycles(40 * d + job["idle_timeout"] + 100)
    rep = await link.raw_exchange(bytes([HOST["status"]]), 6, max_cycles=200 * d)
    st = decode_status(rep[1:6])
    assert st["aborted"] and not st["error"], st

    # A normal session works afterwards (it starts with RESET + INFO).
    case = job["cases"][0]
    sess, x, w, kw = _case_session(case)
    await link.session(sess, max_cycles=_budget(case.get("approx_bytes", 4000), d))
    codes, _ = sess.result()
    assert np.array_equal(codes, sfx.linear(x, w, **kw))

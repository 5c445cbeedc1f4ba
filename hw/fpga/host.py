"""Host driver for the board's UART link: :func:`run_linear_uart`.

The protocol logic is "sans-IO": :class:`LinkSession` turns a LINEAR operation into the
bytes to send and consumes the bytes received, with no knowledge of where they go. The
same object runs over pyserial (:func:`run_linear_uart`) and inside the cocotb bench
(``sim/tb_board.py``), which drives the simulated board's ``rx`` line with exactly these
bytes. The beats themselves are packed by :func:`superfloat.sim.linear.linear_traffic`
(the co-simulation's packer) and unpacked by :func:`superfloat.sim.linear.res_to_codes`:
nothing about the streams is re-derived here, and no SFx arithmetic happens here.

Session, per operation (docs/fpga.md, "UART host protocol"):

1. ``RESET``, ``INFO``: the board resets the accelerator (clears ``sat_count`` and the
   sticky flags) and answers with its parameters; the host checks them against the
   operation and takes ``fifo_depth`` credits.
2. ``CMD``, then per tile ``PAR`` and ``K`` pairs ``ACT``, ``WGT`` (lockstep), each frame
   sent only when the credits cover it; ``CREDIT`` frames add credits; ``RES`` frames
   are collected.
3. After the last ``RES``: ``STATUS``; the reply gives the saturation count and flags.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from superfloat.hw.interface import AccelParams
from superfloat.sw import sfx

from .protocol import (BOARD, HOST, INFO_LEN, PROTOCOL_VERSION, STATUS_LEN, decode_info, decode_status, encode_frame,
                       link_layout)

__all__ = ["LinkError", "LinkSession", "UartStats", "run_linear_uart", "DEFAULT_BAUD", "DEFAULT_PORT"]

DEFAULT_PORT = "/dev/ttyUSB1"    # iCEBreaker / ULX3S: the FTDI's second channel (first: flash / JTAG)
DEFAULT_BAUD = 115200

_BOARD_LEN = {BOARD["credit"]: 1, BOARD["status"]: STATUS_LEN, BOARD["info"]: INFO_LEN}


class LinkError(RuntimeError):
    """The board did not answer, answered something unexpected, or reported a link fault."""


@dataclass
class UartStats:
    """What :func:`run_linear_uart` measured besides the codes."""

    n_saturated: int           # the board's sat_count for this operation
    macs: int                  # T * N * K
    tiles: int
    res_beats: int
    bytes_sent: int
    bytes_received: int
    credit_frames: int
    seconds: float
    status: dict = field(default_factory=dict)
    board: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class Transport(Protocol):  # what run_linear_uart needs from a serial port
    def write(self, data: bytes) -> Any: ...
    def read(self, size: int) -> bytes: ...


class LinkSession:
    """Sans-IO host side of one LINEAR operation over the UART link.

    Use: send :meth:`connect_bytes`; then repeatedly :meth:`feed` the received bytes and
    send :meth:`take_outgoing`, until :attr:`done`; then :meth:`result`. Raises
    :class:`LinkError` on protocol violations (wrong parameters, unknown frame types,
    flags reported by the board) and ``ValueError`` / ``TypeError`` for bad arguments
    (the messages of :func:`superfloat.sw.sfx.linear`).
    """

    def __init__(self, x_codes: Any, w_codes: Any, *, a_bits: int, w_bits: int, out_bits: int, bias: Any = None,
                 shift: Any = 0, relu: bool = False, rounding: str = "nearest_even",
                 k_max: int = sfx.DEFAULT_K_MAX, mult: Any = None, x_exponent: Any = None, xmult: Any = None):
        self.kw = dict(a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, bias=bias, shift=shift, relu=relu,
                       rounding=rounding, k_max=k_max, mult=mult, x_exponent=x_exponent, xmult=xmult)
        self.args = sfx.check_linear_args(x_codes, w_codes, **self.kw)
        self.x_codes, self.w_codes = x_codes, w_codes
        self.phase = "connect"
        self.credits = 0
        self.board: dict = {}
        self.params: AccelParams | None = None
        self._rx = bytearray()
        self._queue: list[bytes] = []
        self._res: list[int] = []
        self._res_expected = 0
        self._res_bytes = 0
        self.status: dict = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.credit_frames = 0
        self.traffic = None

    # ------------------------------------------------------------------ sending
    def connect_bytes(self) -> bytes:
        """RESET then INFO (2 bytes; a fresh or aborted board has room for them)."""
        if self.phase != "connect":
            raise LinkError(f"connect_bytes() called in phase {self.phase!r}")
        self.phase = "sync"
        data = bytes([HOST["reset"], HOST["info"]])
        self.bytes_sent += len(data)
        return data

    def take_outgoing(self) -> bytes:
        """The whole frames that may be sent now (within the credits); may be empty."""
        out = bytearray()
        while self._queue and len(self._queue[0]) <= self.credits:
            f = self._queue.pop(0)
            self.credits -= len(f)
            out += f
        if self.phase == "run" and not self._queue and len(self._res) == self._res_expected \
                and self.credits >= 1:
            out.append(HOST["status"])
            self.credits -= 1
            self.phase = "status"
        self.bytes_sent += len(out)
        return bytes(out)

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def waiting_for(self) -> str:
        """What the session waits for (for timeout messages)."""
        if self.phase == "sync":
            return "the INFO reply"
        if self.phase == "run":
            if self._queue:
                return f"credits ({self.credits} left, next frame {len(self._queue[0])} bytes)"
            return f"RES frames ({len(self._res)} of {self._res_expected} received)"
        if self.phase == "status":
            return "the STATUS reply"
        return self.phase

    # ------------------------------------------------------------------ receiving
    def feed(self, data: bytes) -> None:
        """Consume bytes from the board."""
        self.bytes_received += len(data)
        self._rx += data
        while self._rx:
            t = self._rx[0]
            if t == BOARD["res"]:
                if self.phase == "sync" or self.params is None:
                    raise LinkError("RES frame before the INFO reply: the board is mid-operation; retry")
                n = self._res_bytes
            elif t in _BOARD_LEN:
                n = _BOARD_LEN[t]
            else:
                raise LinkError(f"unexpected byte 0x{t:02x} from the board (not a frame type): wrong baud rate, "
                                f"wrong port, or a bitstream with another protocol")
            if len(self._rx) < 1 + n:
                return
            payload = bytes(self._rx[1:1 + n])
            del self._rx[:1 + n]
            self._frame(t, payload)

    def _frame(self, t: int, payload: bytes) -> None:
        if t == BOARD["info"]:
            if self.phase != "sync":
                raise LinkError(f"unexpected INFO reply in phase {self.phase!r}")
            self._on_info(decode_info(payload))
        elif t == BOARD["credit"]:
            self.credit_frames += 1
            if self.phase != "sync":       # credits before INFO belong to an earlier session
                self.credits += payload[0]
        elif t == BOARD["status"]:
            if self.phase != "status":
                raise LinkError(f"unexpected STATUS reply in phase {self.phase!r}")
            self.status = decode_status(payload)
            self.phase = "done"
        else:  # RES
            if len(self._res) >= self._res_expected:
                raise LinkError(f"more RES frames than the operation has ({self._res_expected})")
            self._res.append(int.from_bytes(payload, "little"))

    def _on_info(self, info: dict) -> None:
        self.board = info
        if info["version"] != PROTOCOL_VERSION:
            raise LinkError(f"the board speaks protocol version {info['version']}, this driver {PROTOCOL_VERSION}")
        for name in ("a_bits", "w_bits", "out_bits"):
            if info[name] != self.kw[name]:
                raise ValueError(f"{name}={self.kw[name]} but the board was built with {name}={info[name]} "
                                 f"(rows={info['rows']}, cols={info['cols']}); rebuild it with sfx build-board")
        p = AccelParams(rows=info["rows"], cols=info["cols"], a_bits=info["a_bits"], w_bits=info["w_bits"],
                        out_bits=info["out_bits"], k_max=info["k_max"], xmult=info.get("xmult", False))
        if self.args.xmult is not None and not p.xmult:
            raise ValueError("this operation carries xmult (per-row activation multipliers, SPEC revision 2) but the "
                             "board's accelerator was built without it: rebuild it with sfx build-board --xmult")
        if info["k_max"] != self.args.k_max:   # the board's limits apply too (K, bias range)
            sfx.check_linear_args(self.x_codes, self.w_codes, **{**self.kw, "k_max": info["k_max"]})
        lay = link_layout(p, fifo_depth=info["fifo_depth"], credit_chunk=info["credit_chunk"])
        from superfloat.sim.linear import linear_traffic

        tr = linear_traffic(self.args, p)
        self.traffic, self.params = tr, p
        nb = lay.payload_bytes

        def frame(kind: str, word: int) -> bytes:
            return encode_frame(lay, kind, word)

        q = [frame("cmd", tr.cmd)]
        k = tr.K
        cols = p.cols
        for i in range(tr.tiles):     # per tile: its cols par beats, then K act/wgt pairs
            q += [frame("par", par) for par in tr.par[i * cols:(i + 1) * cols]]
            for j in range(i * k, (i + 1) * k):
                q += [frame("act", tr.act[j]), frame("wgt", tr.wgt[j])]
        self._queue = q
        self._res_expected = tr.res_beats
        self._res_bytes = nb["res"]
        self.credits = info["fifo_depth"]
        self.phase = "run"

    # ------------------------------------------------------------------ result
    def result(self, seconds: float = 0.0) -> tuple[np.ndarray, UartStats]:
        """``([T, N] codes, stats)``; raises :class:`LinkError` if the board flagged a fault."""
        if not self.done:
            raise LinkError(f"the operation is not finished (waiting for {self.waiting_for})")
        st = self.status
        bad = [n for n in ("error", "overflow", "framing", "bad_type", "aborted") if st.get(n)]
        if bad:
            raise LinkError(f"the board reported {', '.join(bad)} (status {st}); the results are not trusted")
        from superfloat.sim.linear import res_to_codes

        codes, padding = res_to_codes(self._res, self.args.T, self.args.N, self.params)
        if padding:
            raise LinkError(f"{padding} padding lanes of the RES beats are not code 0")
        tr = self.traffic
        stats = UartStats(n_saturated=st["sat_count"], macs=self.args.T * self.args.N * self.args.K,
                          tiles=tr.tiles, res_beats=tr.res_beats, bytes_sent=self.bytes_sent,
                          bytes_received=self.bytes_received, credit_frames=self.credit_frames,
                          seconds=seconds, status=dict(st), board=dict(self.board))
        return codes, stats


def run_linear_uart(x_codes: Any, w_codes: Any, *, a_bits: int, w_bits: int, out_bits: int, bias: Any = None,
                    shift: Any = 0, relu: bool = False, rounding: str = "nearest_even",
                    k_max: int = sfx.DEFAULT_K_MAX, mult: Any = None, x_exponent: Any = None,
                    xmult: Any = None, port: str = DEFAULT_PORT, baud: int = DEFAULT_BAUD, timeout: float = 10.0,
                    transport: Transport | None = None) -> tuple[np.ndarray, UartStats]:
    """:func:`superfloat.sw.sfx.linear` computed by a board running ``sfx build-board``.

    The keywords up to ``xmult`` are those of :func:`~superfloat.sw.sfx.linear` (same
    checks, same messages); the widths must be the board's (``xmult`` needs a board built
    with ``sfx build-board --xmult``). ``port`` / ``baud``: the
    serial port of the board's USB bridge (``baud`` as built). ``timeout``: seconds
    without a byte from the board before :class:`LinkError`. ``transport``: an open
    object with ``write(bytes)`` and ``read(n) -> bytes`` (``read`` returning ``b""``
    after a short wait) to use instead of opening ``port``.

    Returns ``(codes, stats)``: ``[T, N]`` SF``out_bits`` codes and :class:`UartStats`.
    """
    sess = LinkSession(x_codes, w_codes, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, bias=bias, shift=shift,
                       relu=relu, rounding=rounding, k_max=k_max, mult=mult, x_exponent=x_exponent, xmult=xmult)
    own = transport is None
    if own:
        try:
            import serial
        except ImportError as e:  # pragma: no cover
            raise LinkError("pyserial is needed: pip install pyserial") from e
        try:
            transport = serial.Serial(port, baudrate=baud, timeout=0.05)
        except (serial.SerialException, OSError, ValueError) as e:
            raise LinkError(f"cannot open {port} at {baud} baud: {e}") from None
        transport.reset_input_buffer()
    t0 = time.perf_counter()
    try:
        transport.write(sess.connect_bytes())
        last = time.perf_counter()
        while not sess.done:
            out = sess.take_outgoing()
            if out:
                transport.write(out)
            data = transport.read(4096)
            now = time.perf_counter()
            if data:
                sess.feed(data)
                last = now
            elif now - last > timeout:
                raise LinkError(f"no byte from the board on {port if own else 'the transport'} for {timeout:g} s "
                                f"(waiting for {sess.waiting_for}); is the bitstream loaded and the baud rate "
                                f"{baud}?")
    finally:
        if own:
            transport.close()
    return sess.result(seconds=time.perf_counter() - t0)


def link_cost(t: int, n: int, k: int, *, rows: int, cols: int, a_bits: int, w_bits: int | None = None,
              out_bits: int | None = None, k_max: int = sfx.DEFAULT_K_MAX, baud: int, seed: int = 0) -> dict:
    """What one LINEAR operation of ``[t, k] x [n, k]`` costs over the UART link of a board
    built with these parameters, counted from the protocol itself.

    A :class:`LinkSession` is given the board's INFO reply (:func:`.protocol.encode_info`)
    and builds every host frame of the operation (random codes: frame sizes do not depend on
    the values); the board's frames are its INFO and STATUS replies, one RES frame per
    ``res`` beat and one CREDIT frame per ``credit_chunk`` bytes consumed. The line carries
    ``baud / 10`` bytes/s each way (8N1); both directions run at once, so the operation
    takes at least ``max(bytes to the board, bytes from the board) / (baud / 10)`` seconds
    (the accelerator itself is thousands of times faster than the line).

    Returns ``bytes_to_board``, ``bytes_from_board``, ``frames`` (per kind), ``payload_bytes``
    (the beats' own bytes), ``line_bytes_per_s``, ``seconds``, ``macs`` and ``macs_per_s``.
    """
    from .protocol import encode_info, link_layout

    w_bits = a_bits if w_bits is None else w_bits
    out_bits = a_bits if out_bits is None else out_bits
    if isinstance(baud, bool) or not isinstance(baud, int) or baud <= 0:
        raise ValueError(f"baud must be a positive int, got {baud!r}")
    p = AccelParams(rows=rows, cols=cols, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max)
    lay = link_layout(p)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 1 << a_bits, (t, k))
    w = rng.integers(0, 1 << w_bits, (n, k))
    sess = LinkSession(x, w, a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, k_max=k_max)
    up = len(sess.connect_bytes())
    sess.feed(bytes([BOARD["info"]]) + encode_info(lay))
    frames = {"cmd": 0, "par": 0, "act": 0, "wgt": 0}
    payload = 0
    for f in sess._queue:
        kind = next(name for name, code in HOST.items() if code == f[0])
        frames[kind] += 1
        payload += len(f) - 1
        up += len(f)
    up += 1                                   # STATUS request
    consumed = up - 2                         # RESET and INFO are not credited
    credits = consumed // lay.credit_chunk
    res = sess._res_expected
    down = (1 + INFO_LEN) + res * lay.res_frame + credits * 2 + (1 + STATUS_LEN)
    rate = baud / 10
    seconds = max(up, down) / rate
    return {"t": t, "n": n, "k": k, "rows": rows, "cols": cols, "baud": baud, "line_bytes_per_s": rate,
            "bytes_to_board": up, "bytes_from_board": down, "frames": {**frames, "res": res, "credit": credits},
            "payload_bytes": payload, "frame_bytes": dict(lay.payload_bytes), "seconds": seconds,
            "macs": t * n * k, "macs_per_s": t * n * k / seconds}

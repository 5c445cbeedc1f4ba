"""The UART host link's framing protocol, shared by the board bridge (RTL) and the host driver.

Full description with examples: docs/fpga.md, "UART host protocol". In short:

* 8N1 bytes. A frame is one type byte followed by a fixed number of payload bytes that
  depends only on the type and the accelerator's generation parameters. Multi-byte
  fields are little-endian; a stream beat's payload is the Amaranth payload integer
  (first field / lane in the least significant bits, as :mod:`superfloat.hw.interface`
  packs it) written in ``ceil(width / 8)`` bytes, least significant byte first, the
  unused high bits of the last byte zero.
* Host -> board: ``CMD``, ``PAR``, ``ACT``, ``WGT`` (one stream beat each), ``STATUS``
  and ``INFO`` (requests, no payload), ``RESET`` (resets the accelerator and clears the
  sticky status; no payload).
* Board -> host: ``RES`` (one ``res`` beat), ``CREDIT`` (1 byte: that many bytes of the
  receive FIFO were freed), ``STATUS`` (flags, saturation count), ``INFO`` (parameters).
* Flow control: credits. The board's receive FIFO holds ``fifo_depth`` bytes. After an
  ``INFO`` reply the host may have ``fifo_depth`` bytes outstanding; each ``CREDIT n``
  allows ``n`` more. The board sends ``CREDIT`` whenever ``credit_chunk`` bytes have been
  consumed. The board -> host direction has no flow control (the host always reads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from superfloat.hw.interface import AccelParams, act_layout, cmd_layout, par_layout, res_layout, wgt_layout

__all__ = ["PROTOCOL_VERSION", "HOST", "BOARD", "STATUS_FLAGS", "LinkLayout", "link_layout", "encode_info",
           "decode_info", "decode_status", "encode_frame", "INFO_LEN", "STATUS_LEN"]

#: 2: one ``par`` beat (frame) per output channel, ``cols`` per tile (1: one per tile).
PROTOCOL_VERSION = 2

#: Frame types sent by the host.
HOST = {"cmd": 0x01, "par": 0x02, "act": 0x03, "wgt": 0x04, "status": 0x05, "info": 0x06, "reset": 0x07}
#: Frame types sent by the board.
BOARD = {"res": 0x81, "credit": 0x82, "status": 0x83, "info": 0x84}

#: Bits of the STATUS flags byte.
STATUS_FLAGS = {
    "busy": 0,          # the accelerator has an operation or result in flight
    "error": 1,         # the accelerator's sticky error (malformed command, bias or shift out of range)
    "overflow": 2,      # a byte arrived while the receive FIFO was full (the host broke the credit rule)
    "framing": 3,       # a byte had a bad stop bit
    "bad_type": 4,      # an unknown frame type byte was received (and dropped)
    "aborted": 5,       # the link stalled mid-frame for the idle timeout: the bridge reset itself
}

#: Payload bytes of the INFO and STATUS replies.
INFO_LEN = 13
STATUS_LEN = 5

#: Host frames with no payload.
_EMPTY = ("status", "info", "reset")


@dataclass(frozen=True)
class LinkLayout:
    """Frame sizes of one accelerator configuration, and the receive FIFO."""

    params: AccelParams
    payload_bytes: dict      # stream name -> payload bytes (cmd, par, act, wgt, res)
    payload_bits: dict       # stream name -> payload width in bits
    fifo_depth: int          # bytes
    credit_chunk: int        # bytes freed per CREDIT frame

    def frame_len(self, kind: str) -> int:
        """Total bytes (type byte included) of a host frame ``kind``."""
        if kind in _EMPTY:
            return 1
        return 1 + self.payload_bytes[kind]

    @property
    def max_host_frame(self) -> int:
        return max(self.frame_len(k) for k in ("cmd", "par", "act", "wgt"))

    @property
    def res_frame(self) -> int:
        return 1 + self.payload_bytes["res"]


def link_layout(p: AccelParams, *, fifo_depth: int | None = None, credit_chunk: int | None = None) -> LinkLayout:
    """The :class:`LinkLayout` of ``p``. Defaults: ``credit_chunk = 32``; ``fifo_depth`` the
    smallest power of two >= 512 that holds a largest host frame plus a chunk (512 bytes
    is one iCE40 block RAM)."""
    layouts = {"cmd": cmd_layout(p), "par": par_layout(p), "act": act_layout(p), "wgt": wgt_layout(p),
               "res": res_layout(p)}
    bits = {k: v.size for k, v in layouts.items()}
    nbytes = {k: math.ceil(v / 8) for k, v in bits.items()}
    chunk = 32 if credit_chunk is None else credit_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 255:
        raise ValueError(f"credit_chunk must be an int in 1..255, got {credit_chunk!r}")
    biggest = 1 + max(nbytes[k] for k in ("cmd", "par", "act", "wgt"))
    need = biggest + chunk
    if fifo_depth is None:
        fifo_depth = max(512, 1 << math.ceil(math.log2(need)))
    if isinstance(fifo_depth, bool) or not isinstance(fifo_depth, int) or fifo_depth < need or fifo_depth > 65535:
        raise ValueError(f"fifo_depth must be an int in {need}..65535 (a largest host frame of {biggest} bytes "
                         f"plus a credit chunk of {chunk}), got {fifo_depth!r}")
    return LinkLayout(p, nbytes, bits, fifo_depth, chunk)


def encode_frame(lay: LinkLayout, kind: str, word: int = 0) -> bytes:
    """A host frame: the type byte of ``kind``, then the beat ``word`` (for cmd, par, act,
    wgt) in ``payload_bytes[kind]`` bytes, least significant first."""
    if kind not in HOST:
        raise ValueError(f"unknown host frame {kind!r}: choose one of {', '.join(HOST)}")
    if kind in _EMPTY:
        return bytes([HOST[kind]])
    word = int(word)
    if not 0 <= word < (1 << lay.payload_bits[kind]):
        raise ValueError(f"{kind} word 0x{word:x} does not fit its {lay.payload_bits[kind]} bits")
    return bytes([HOST[kind]]) + word.to_bytes(lay.payload_bytes[kind], "little")


def encode_info(lay: LinkLayout) -> bytes:
    """The INFO payload: version, rows, cols, a_bits, w_bits, out_bits, k_max (3 bytes),
    fifo_depth (2 bytes), credit_chunk, features (bit 0: the accelerator has ``xmult``, SPEC
    revision 2; the other bits 0; boards built before it send 0 there)."""
    p = lay.params
    return bytes([PROTOCOL_VERSION, p.rows, p.cols, p.a_bits, p.w_bits, p.out_bits]) \
        + p.k_max.to_bytes(3, "little") + lay.fifo_depth.to_bytes(2, "little") \
        + bytes([lay.credit_chunk, int(p.xmult)])


def decode_info(payload: bytes) -> dict:
    if len(payload) != INFO_LEN:
        raise ValueError(f"INFO payload must be {INFO_LEN} bytes, got {len(payload)}")
    return {"version": payload[0], "rows": payload[1], "cols": payload[2], "a_bits": payload[3],
            "w_bits": payload[4], "out_bits": payload[5], "k_max": int.from_bytes(payload[6:9], "little"),
            "fifo_depth": int.from_bytes(payload[9:11], "little"), "credit_chunk": payload[11],
            "xmult": bool(payload[12] & 1)}


def decode_status(payload: bytes) -> dict:
    """STATUS payload: flags byte (:data:`STATUS_FLAGS`), sat_count (4 bytes)."""
    if len(payload) != STATUS_LEN:
        raise ValueError(f"STATUS payload must be {STATUS_LEN} bytes, got {len(payload)}")
    out = {name: bool(payload[0] >> bit & 1) for name, bit in STATUS_FLAGS.items()}
    out["sat_count"] = int.from_bytes(payload[1:5], "little")
    return out

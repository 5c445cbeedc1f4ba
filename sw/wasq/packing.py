"""Bit packing of quantization codes: the bytes a 4-bit checkpoint really needs.

SPEC section 1 stores SFx codes one per ``uint8``/``uint16`` element; packing several
codes into bytes is a storage concern only (never an arithmetic one). This module
packs any ``bits``-wide unsigned codes (2..16 bits) densely, **LSB first**:

    code i occupies bits [i*bits, (i+1)*bits) of the stream;
    bit j of the stream is bit (j % 8) of byte j // 8.

So at 4 bits, byte 0 holds code 0 in its low nibble and code 1 in its high nibble; at
8 bits the stream is the codes themselves; at 3 bits eight codes fill three bytes.
The last byte is zero-padded. :func:`unpack_codes` inverts :func:`pack_codes` exactly
(``tests/test_wasq_formats.py`` checks every width and ragged lengths).

:func:`save_packed` / :func:`load_packed` write and read a *packed* PTQ checkpoint
(one ``safetensors`` file): per quantized layer its packed codes, scales, zero points
and exponents, plus every other tensor of the model; the file size on disk is the
memory that ``results/ptq_methods.md`` reports.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

__all__ = ["pack_codes", "unpack_codes", "packed_nbytes", "save_packed", "load_packed", "PACKED_FORMAT",
           "PACKED_VERSION", "memory_report", "float_bytes"]

PACKED_FORMAT = "superfloat-ptq-packed"
PACKED_VERSION = 1
_CHUNK = 1 << 20  # codes per chunk (a multiple of 8, so every chunk ends on a byte boundary)


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 16:
        raise ValueError(f"bits must be an int in 2..16, got {bits!r}")
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take when packed (``ceil(count * bits / 8)``)."""
    bits = _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    return (int(count) * bits + 7) // 8


def pack_codes(codes: Any, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide codes (any shape; flattened in C order) into a ``uint8`` array
    of :func:`packed_nbytes` bytes (see the module docstring for the bit order).

    Raises:
        ValueError: bits outside 2..16, a negative code or a code ``>= 2**bits`` (names the first).
        TypeError: float codes.
    """
    bits = _check_bits(bits)
    arr = np.asarray(codes)
    if arr.dtype.kind == "f" or arr.dtype.kind == "b":
        raise TypeError(f"codes must be unsigned integers, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= (1 << bits):
            bad = (flat < 0) | (flat >= (1 << bits))
            i = int(np.argmax(bad))
            raise ValueError(f"codes must be in [0, {1 << bits}) for {bits}-bit packing: {int(bad.sum())} value(s) "
                             f"are not, the first {int(flat[i])} at flat index {i}")
    out = np.zeros(packed_nbytes(flat.size, bits), dtype=np.uint8)
    if bits == 8:
        out[:] = flat.astype(np.uint8)
        return out
    if bits == 16:
        out[:] = flat.astype("<u2").view(np.uint8)
        return out
    shifts = np.arange(bits, dtype=np.uint32)
    for s in range(0, flat.size, _CHUNK):
        c = flat[s:s + _CHUNK].astype(np.uint32)
        bitmat = ((c[:, None] >> shifts) & 1).astype(np.uint8)  # [n, bits], LSB first
        packed = np.packbits(bitmat.reshape(-1), bitorder="little")
        b0 = s * bits // 8  # s is a multiple of 8: byte aligned
        out[b0:b0 + packed.size] = packed
    return out


def unpack_codes(data: Any, bits: int, count: int | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes (or ``prod(shape)``, reshaped) as
    ``uint8`` (bits <= 8) or ``uint16``.

    Raises:
        ValueError: ``data`` holds fewer than ``packed_nbytes(count, bits)`` bytes, or
            neither/both of ``count`` and ``shape`` are given inconsistently.
    """
    bits = _check_bits(bits)
    buf = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data, dtype=np.uint8).reshape(-1)
    if shape is not None:
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        if count is not None and count != n:
            raise ValueError(f"count {count} does not match shape {list(shape)} ({n} codes)")
        count = n
    if count is None:
        raise ValueError("unpack_codes needs count or shape")
    need = packed_nbytes(count, bits)
    if buf.size < need:
        raise ValueError(f"packed data has {buf.size} bytes, {count} codes of {bits} bits need {need}")
    dt = np.uint8 if bits <= 8 else np.uint16
    if bits == 8:
        out = buf[:count].copy()
    elif bits == 16:
        out = buf[:2 * count].copy().view("<u2").astype(np.uint16)
    else:
        out = np.empty(count, dtype=dt)
        weights = (1 << np.arange(bits, dtype=np.uint32))
        for s in range(0, count, _CHUNK):
            n = min(_CHUNK, count - s)
            b0 = s * bits // 8
            nb = packed_nbytes(n, bits)
            bitv = np.unpackbits(buf[b0:b0 + nb], bitorder="little")[: n * bits].reshape(n, bits)
            out[s:s + n] = (bitv.astype(np.uint32) @ weights).astype(dt)
    return out.reshape(shape) if shape is not None else out


# --------------------------------------------------------------------------- packed checkpoint file


def save_packed(model, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> dict[str, int]:
    """Write ``model`` (after :func:`superfloat.sw.wasq.quantize_`, any format) as one packed
    ``safetensors`` file, atomically (temporary name, then rename).

    For every :class:`~superfloat.sw.wasq.SFxLinear` ``<name>``: ``<name>.packed``
    (uint8, codes packed at the layer's bits), ``<name>.scale`` / ``.exponent`` /
    ``.zero_point`` (as the quantizer stores them: float64 per-channel SFx scales,
    float32 integer and per-group scales, int8 exponents, int32 zero points) and
    ``<name>.bias``; every other tensor of the state dict under its own name (tied
    tensors once). The header metadata holds the format name and version and, per
    layer, kind, bits, shape and group size.

    Returns ``{"file_bytes", "quantized_bytes", "codes_bytes", "other_bytes"}``:
    the real file size and the bytes of its parts.
    """
    import torch
    from safetensors.torch import save_file

    from .layers import distinct_tensors, quantized_layers

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_packed: the model has no SFxLinear layers; run superfloat.sw.wasq.quantize_ first")
    tensors: dict[str, torch.Tensor] = {}
    meta_layers: dict[str, Any] = {}
    codes_bytes = quant_bytes = 0
    for name, layer in layers.items():
        qw = layer.stored_weight()
        packed = pack_codes(qw.codes, qw.bits)
        tensors[f"{name}.packed"] = torch.from_numpy(packed)
        codes_bytes += packed.nbytes
        quant_bytes += packed.nbytes
        for key, arr in qw.side_tensors().items():
            tensors[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(arr))
            quant_bytes += arr.nbytes
        if layer.bias is not None:
            b = layer.bias.detach().cpu().contiguous().clone()
            tensors[f"{name}.bias"] = b
            quant_bytes += b.numel() * b.element_size()
        meta_layers[name] = qw.describe_storage()
    others, aliases = distinct_tensors(model, lambda key: any(key.startswith(n + ".") for n in layers))
    tensors.update({key: t.cpu().contiguous().clone() for key, t in others.items()})
    other = sum(t.numel() * t.element_size() for t in others.values())
    meta = {"format": PACKED_FORMAT, "format_version": str(PACKED_VERSION),
            "layers": json.dumps(meta_layers), "aliases": json.dumps(aliases),
            "extra": json.dumps(metadata or {}, default=str)}
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file_bytes": target.stat().st_size, "quantized_bytes": quant_bytes, "codes_bytes": codes_bytes,
            "other_bytes": other}


def load_packed(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a file written by :func:`save_packed`.

    Returns ``(layers, tensors)``: ``{name: QuantizedWeight}`` (codes unpacked, with
    their scales, exponents and zero points) and every other tensor by name (biases of
    quantized layers under ``<name>.bias``; aliases resolved).

    Raises:
        ValueError: not a packed PTQ file, unknown version, or a layer whose tensors are
            missing or have the wrong size (names the tensor).
    """
    from safetensors import safe_open

    from .formats import QuantizedWeight

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"packed checkpoint {p} does not exist")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != PACKED_FORMAT:
            raise ValueError(f"{p} is not a packed PTQ checkpoint (format {meta.get('format')!r}, expected "
                             f"{PACKED_FORMAT!r})")
        if meta.get("format_version") != str(PACKED_VERSION):
            raise ValueError(f"{p}: unknown packed format version {meta.get('format_version')!r} (this version reads "
                             f"{PACKED_VERSION})")
        specs = json.loads(meta["layers"])
        aliases = json.loads(meta.get("aliases", "{}"))
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    layers = {}
    for name, spec in specs.items():
        key = f"{name}.packed"
        if key not in tensors:
            raise ValueError(f"{p}: tensor {key!r} is missing")
        data = tensors.pop(key).numpy()
        shape = tuple(spec["shape"])
        try:
            codes = unpack_codes(data, spec["bits"], shape=shape)
        except ValueError as e:
            raise ValueError(f"{p}: tensor {key!r}: {e}") from None
        side = {}
        for k in spec.get("side", []):
            tk = f"{name}.{k}"
            if tk not in tensors:
                raise ValueError(f"{p}: tensor {tk!r} is missing")
            side[k] = tensors.pop(tk).numpy()
        layers[name] = QuantizedWeight.from_storage(spec, codes, side)
    for key, ref in aliases.items():
        tensors[key] = tensors[ref]
    return layers, tensors


def _unique_tensors(model: nn.Module, skip_prefixes: set[str]) -> int:
    from .layers import distinct_tensors

    tensors, _ = distinct_tensors(model, lambda key: any(key.startswith(p + ".") for p in skip_prefixes))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def float_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor of a (float) model as held (tied tensors once)."""
    return _unique_tensors(model, set())


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of a quantized model as stored by :func:`.packing.save_packed` (without the file header):
    ``codes_packed`` (really packed), ``side`` (scales, exponents, zero points),
    ``bias``, ``unquantized`` (embeddings, norms, skipped layers), ``total``, plus
    ``weight_params`` and ``bits_per_weight`` (codes + side tensors)."""
    from .layers import quantized_layers

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("memory_report: the model has no SFxLinear layers")
    codes = side = bias = params = 0
    for l in layers.values():
        qw = l.stored_weight()
        codes += pack_codes(qw.codes, qw.bits).nbytes
        side += sum(np.asarray(a).nbytes for a in qw.side_tensors().values())
        if l.bias is not None:
            bias += l.bias.numel() * l.bias.element_size()
        params += qw.codes.size
    other = _unique_tensors(model, set(layers))
    return {"codes_packed": codes, "side": side, "bias": bias, "unquantized": other,
            "total": codes + side + bias + other, "weight_params": params,
            "bits_per_weight": 8.0 * (codes + side) / params if params else 0.0}

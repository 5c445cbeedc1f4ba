"""WASQ checkpoints (SPEC section 7, revision 2): what is streamed into the accelerator.

A checkpoint is a directory::

    model.safetensors     <name>.codes         uint8/uint16 [N, K]  SFx codes of layer <name>
                          <name>.exponent      int8 [N] or []       power-of-two exponents
                          <name>.scale         float64 [N] or []    float scales (scale_kind "float" only)
                          <name>.bias          float [N]            (layers with a bias)
                          <name>.out_exponent  int8 [N]             static output exponents Eo[n] (rev. 2,
                                                                    layers that have them)
                          ...                   every unquantized tensor under its state-dict name
    sfx_config.json       format name and version, tool version, rounding, bits and
                          activation settings per layer (``act_bits``, ``act_exponent``
                          "dynamic"/"static", ``act_amax``; rev. 2: ``out_bits``,
                          ``out_exponent``), the WASQConfig, the base model's config and
                          architecture (to rebuild it offline), memory in bytes; rev. 2:
                          ``sha256`` ``{tensor: hex digest of its bytes in the file}`` and
                          ``tokenizer_files`` ``{file: hex digest}``
    tokenizer files       (when a tokenizer is given)
    config.json           the base model's Hugging Face config with a ``quantization_config``
                          (``quant_method`` ``"superfloat"``): ``AutoModelForCausalLM.from_pretrained``
                          loads the checkpoint through :mod:`superfloat.sw.wasq.hf` (docs/huggingface.md);
                          derived from ``sfx_config.json``, which stays the reference (the loaders
                          ignore it; the Hugging Face path checks it against ``base_model``)
    generation_config.json  (models that generate) as ``save_pretrained`` writes it

``real[n, k] = value(codes[n, k]) * 2**exponent[n] * scale[n]`` (scale 1 when absent).
For float scales ``exponent`` is 0 and the accelerator gets ``scale`` through
``sfx.fold_scale`` (:meth:`ExportedLinear.fold`). Tensors that share storage (tied
embeddings) are stored once; ``sfx_config.json["aliases"]`` maps the others to it.

Writing is atomic: everything goes to a hidden temporary directory beside the target
(``.NAME.tmp-PID-HEX``), ``sfx_config.json`` last, then one ``rename`` (an existing
checkpoint is first renamed to ``.NAME.old-PID-HEX`` and removed after the swap). An
interrupted save leaves no directory under the target name (and a temporary one has no
complete ``sfx_config.json``); the leftovers of a killed save are removed by the next
save to the same target (a warning names any it cannot remove).

Loading checks everything and raises :class:`CheckpointError` (one line naming the file,
tensor or field, and what to do) on any damage: the safetensors header, every field of
``sfx_config.json`` the loader uses, missing files (weights, config, tokenizer), SHA-256
of every tensor (rev. 2), NaN/inf in float tensors, per-layer metadata against the
tensors (shape, dtype, the code width ``bits``, exponents, output exponents).
Revision-1 checkpoints (no digests) still load.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__, sfx
from . import hooks
from .config import WASQConfig
from .layers import distinct_tensors
from .qlinear import ExportedLinear
from .quantize import quantize_, quantized_layers, wasq_config_of

__all__ = ["save_checkpoint", "load_checkpoint", "load_into", "read_checkpoint_info", "CheckpointError",
           "stale_save_dirs", "reseal_checkpoint", "HF_CONFIG_FILE", "GENERATION_CONFIG_FILE",
           "FORMAT_NAME", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "CONFIG_FILE", "WEIGHTS_FILE"]

FORMAT_NAME = "superfloat-wasq-checkpoint"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
CONFIG_FILE = "sfx_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: files of a target directory that ``save_checkpoint(keep_other_files=True)`` does not carry over (the
#: checkpoint writes its own; weights of an earlier float save would shadow or contradict it)
_STALE_WEIGHTS_RE = re.compile(r"^(model|pytorch_model|tf_model|flax_model|adapter_model)([-.].*)?\.(safetensors|bin|h5|msgpack)"
                               r"(\.index\.json)?$")

#: what to do about a damaged checkpoint (appended to most load errors)
_REDO = "restore the checkpoint from a copy or re-create it with sfx quantize"
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
              "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
#: a tokenizer directory has at least one of these (its vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "sentencepiece.bpe.model")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (one line naming the file, tensor or field, and what to do)."""


def _one_line(e: BaseException | str) -> str:
    """The first non-empty line of an exception's text (library errors are often multi-line)."""
    text = str(e).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__ if isinstance(e, BaseException) else ""


def _sha256_file_range(f, lo: int, hi: int) -> str:
    h = hashlib.sha256()
    f.seek(lo)
    left = hi - lo
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_file_range(f, 0, path.stat().st_size)


def _tensor_digests(path: Path, header: tuple[dict[str, Any], int] | None = None) -> dict[str, str]:
    """``{tensor: SHA-256 of its bytes}`` as they lie in the safetensors file ``path`` (``header``:
    its checked header and data start, when already read)."""
    header, start = header or _safetensors_header(path, with_start=True)
    out = {}
    with open(path, "rb") as f:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            lo, hi = meta["data_offsets"]
            out[name] = _sha256_file_range(f, start + lo, start + hi)
    return out

def _canonical_sha(v: Any) -> str:
    return hashlib.sha256(json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=True,
                                     default=_json_default).encode()).hexdigest()


def _config_digests(info: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each part of ``sfx_config.json`` that changes what the model computes:
    ``layers[NAME]`` (one per layer), ``base_model`` (its config, architecture and model
    type), ``quant_config``, ``aliases``, ``settings`` (dtype, rounding, activations).
    Informational fields (note, source, created, tool version, memory) are not covered."""
    base = info.get("base_model") or {}
    out = {f"layers[{n!r}]": _canonical_sha(spec) for n, spec in (info.get("layers") or {}).items()}
    out["base_model"] = _canonical_sha({k: base.get(k) for k in ("config", "architecture", "model_type")})
    out["quant_config"] = _canonical_sha(info.get("quant_config"))
    out["aliases"] = _canonical_sha(info.get("aliases", {}))
    out["settings"] = _canonical_sha({k: info.get(k) for k in ("dtype", "rounding", "activations")})
    return out


# --------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _quantized_keys(layers) -> set[str]:
    """The state-dict keys of the quantized layers' weights and biases (stored as codes, not as floats)."""
    return {f"{name}.{p}" for name in layers for p in ("weight", "bias")}


def _base_model_info(model: nn.Module, source: str | None, note: str | None) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(f"save_checkpoint needs a transformers model (with .config), got {type(model).__name__}")
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    arch = type(model).__name__
    d["architectures"] = [arch]
    return {"architecture": arch, "model_type": d.get("model_type"), "config": d, "source": source, "note": note}


_STALE_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{12}$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier, failed save (we are not saving it now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def stale_save_dirs(directory: str | os.PathLike) -> list[Path]:
    """The leftovers of interrupted saves to ``directory``: ``.NAME.tmp-*`` (a save killed
    while writing) and ``.NAME.old-*`` (killed between the two renames: the previous
    checkpoint) beside it, whose saving process is gone (a folder of a save still running
    in another process is not listed)."""
    target = Path(directory).expanduser()
    parent = target.parent
    if not parent.is_dir():
        return []
    out = []
    for p in sorted(parent.iterdir()):
        m = _STALE_RE.match(p.name)
        if m is None or m.group("name") != target.name or not p.is_dir():
            continue
        pid = m.group("pid")
        if pid is not None and _pid_alive(int(pid)):
            continue
        out.append(p)
    return out


def _remove_stale(target: Path) -> list[str]:
    """Remove the leftovers of interrupted saves to ``target``; returns (and warns about) those
    that could not be removed."""
    failed = []
    for p in stale_save_dirs(target):
        try:
            shutil.rmtree(p)
        except OSError as e:
            failed.append(f"{p} ({e.strerror or e})")
    if failed:
        warnings.warn(f"save_checkpoint: could not remove {len(failed)} leftover folder(s) of an interrupted save "
                      f"beside {target}: {'; '.join(failed)}; remove them by hand", RuntimeWarning, stacklevel=3)
    return failed


def _layer_out_fields(layer: nn.Module, name: str, n: int) -> tuple[np.ndarray | None, int | None]:
    """The revision-2 output fields of a quantized layer (``out_exponent`` int8 [N], ``out_bits``),
    ``None`` where the layer has none."""
    oe = getattr(layer, "out_exponent", None)
    ob = getattr(layer, "out_bits", None)
    if ob is not None:
        try:
            ob = sfx.check_bits(ob, f"layer {name}: out_bits")
        except (TypeError, ValueError) as e:
            raise ValueError(f"save_checkpoint: {e}") from None
    if oe is not None:
        if isinstance(oe, torch.Tensor):
            oe = oe.detach().cpu().numpy()
        arr = np.asarray(oe)
        if arr.shape != (n,) or arr.dtype.kind not in "iu":
            raise ValueError(f"save_checkpoint: layer {name}: out_exponent must be an integer array of shape [{n}], "
                             f"got {arr.dtype} {list(arr.shape)}")
        if arr.size and (int(arr.min()) < sfx.INT8_MIN or int(arr.max()) > sfx.INT8_MAX):
            raise ValueError(f"save_checkpoint: layer {name}: out_exponent must be in the int8 range")
        oe = arr.astype(np.int8)
    return oe, ob


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                    overwrite: bool = False, source: str | None = None, note: str | None = None,
                    keep_other_files: bool = False) -> dict[str, Any]:
    """Write the quantized ``model`` as a WASQ checkpoint directory, atomically.

    Besides ``model.safetensors`` and ``sfx_config.json`` it writes ``config.json`` (the
    base model's Hugging Face config with a ``quantization_config``, so that
    ``AutoModelForCausalLM.from_pretrained`` loads it: :mod:`superfloat.sw.wasq.hf`) and,
    for models that generate, ``generation_config.json``.

    Args:
        model: a transformers model after :func:`quantize_` (method ``"sfx"``).
        directory: target directory; must not exist, be empty, or (with ``overwrite``)
            be an existing WASQ checkpoint.
        tokenizer: saved alongside (``save_pretrained``) so the checkpoint is self-contained.
        source, note: recorded in ``sfx_config.json["base_model"]`` (e.g. the model spec and
            the Q4_1 caveat of smollm2-135m).
        keep_other_files: ``save_pretrained`` semantics (what the model's ``save_pretrained``
            uses): the target may be any directory; the files and folders in it that the
            checkpoint does not write (a tokenizer, a README, ...) are kept (hard links into
            the new directory, which still replaces the old one atomically), except weight
            files of an earlier save (``model*.safetensors``, ``pytorch_model*.bin``, their
            indexes), which would contradict the checkpoint.

    Leftover folders of earlier interrupted saves to the same target (``.NAME.tmp-*``,
    ``.NAME.old-*``) are removed first (a ``RuntimeWarning`` names any that cannot be).

    Returns:
        The ``memory`` summary: real file bytes of ``model.safetensors`` and of the whole
        directory, bytes of the codes as stored (one uint8/uint16 per code) and if packed
        at ``bits`` per code, and the float32 bytes the quantized weights replace.

    Raises:
        ValueError: no quantized layers, an integer-RTN layer, NaN/inf in a float tensor
            (the message names it: such a checkpoint would not load).
        FileExistsError: the target exists and is not an empty directory or (with
            ``overwrite``) a WASQ checkpoint.
    """
    target = Path(directory).expanduser()
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_checkpoint: the model has no SFxLinear layers; call quantize_ first")
    config = wasq_config_of(model) or WASQConfig()
    for name, layer in layers.items():
        if layer.method != "sfx":
            raise ValueError(f"save_checkpoint: layer {name} uses method 'int' (the integer RTN baseline), which has "
                             f"no SFx codes; checkpoints hold SFx models only")
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if keep_other_files:
            pass  # save_pretrained semantics: write into any directory, keep what the checkpoint does not write
        elif any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True (CLI: --overwrite) to "
                                  f"replace a checkpoint")
        elif any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
            raise FileExistsError(f"{target} is not empty and is not a WASQ checkpoint; refusing to replace it")

    tensors: dict[str, torch.Tensor] = {}
    layer_info: dict[str, Any] = {}
    codes_bytes = packed_bits = float_bytes = 0
    for name, layer in layers.items():
        ex = layer.export()
        tensors[f"{name}.codes"] = torch.from_numpy(np.ascontiguousarray(ex.codes))
        tensors[f"{name}.exponent"] = torch.from_numpy(np.array(ex.exponent, dtype=np.int8))
        if ex.scale is not None:
            tensors[f"{name}.scale"] = torch.from_numpy(np.array(ex.scale, dtype=np.float64))
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous().clone()
        out_exp, out_bits = _layer_out_fields(layer, name, layer.out_features)
        if layer.act_bits is not None and layer.act_exponent == "static" and layer.act_amax is None:
            raise ValueError(f"save_checkpoint: layer {name}: the static activation exponent is not calibrated; run "
                             f"superfloat.sw.wasq.calibrate_(model, batches) first (CLI: --calib-tokens N > 0) or use "
                             f"act_exponent='dynamic'")
        if layer.act_amax is not None and not (math.isfinite(float(layer.act_amax)) and layer.act_amax >= 0):
            raise ValueError(f"save_checkpoint: layer {name}: calibrated act_amax is {layer.act_amax}; calibrate "
                             f"again on finite activations")
        if out_exp is not None:
            tensors[f"{name}.out_exponent"] = torch.from_numpy(np.ascontiguousarray(out_exp))
        codes_bytes += ex.codes.nbytes
        packed_bits += ex.codes.size * ex.bits
        float_bytes += ex.codes.size * 4
        layer_info[name] = {
            "bits": ex.bits, "source": layer.source, "in_features": layer.in_features,
            "out_features": layer.out_features, "bias": layer.bias is not None, "method": layer.method,
            "weight_scale": layer.weight_scale, "scale_kind": layer.scale_kind, "rounding": ex.rounding,
            "act_bits": layer.act_bits, "act_exponent": layer.act_exponent if layer.act_bits is not None else None,
            "act_amax": layer.act_amax, "act_exponent_value": layer.static_act_exponent,
            "out_bits": out_bits, "out_exponent": out_exp is not None,
        }

    # (a float tensor tied to a quantized layer's shadow weight, e.g. the embedding of a
    # quantized lm_head, is stored as float under its own name)
    floats, aliases = distinct_tensors(model, _quantized_keys(layers).__contains__)
    tensors.update({key: t.cpu().contiguous().clone() for key, t in floats.items()})
    for key, t in tensors.items():
        if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"save_checkpoint: tensor {key!r} holds {bad} NaN/inf value(s); such a checkpoint "
                             f"would not load: fix the model (e.g. a diverged fine-tune) before saving")

    dtypes = {str(p.dtype).replace("torch.", "") for p in model.parameters()}
    info: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": "superfloat",
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "value": "real[n,k] = value(codes[n,k]) * 2**exponent[n] * scale[n]; value(c) = (-1)**(c>>M) * (c & (2**M-1)) * 2**-M",
        "rounding": config.rounding,
        "quant_config": config.to_dict(),
        "activations": {
            "bits": config.act_bits,
            "exponent": config.act_exponent if config.act_bits is not None else None,
            "static_exponents": {n: v["act_exponent_value"] for n, v in layer_info.items()
                                 if v["act_exponent"] == "static"},
        },
        "layers": layer_info,
        "aliases": aliases,
        "dtype": sorted(dtypes)[0] if len(dtypes) == 1 else "float32",
        "base_model": _base_model_info(model, source, note),
        "tokenizer": tokenizer is not None,
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "superfloat": FORMAT_NAME,
                                                             "format_version": str(FORMAT_VERSION)})
        _fsync_file(tmp / WEIGHTS_FILE)
        info["sha256"] = _tensor_digests(tmp / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            info["tokenizer_files"] = {f.name: _sha256_file(f) for f in sorted(tmp.iterdir())
                                       if f.is_file() and f.name != WEIGHTS_FILE}
        hooks.run(hooks.CHECKPOINT_FILES, model, tmp, info)  # config.json for from_pretrained (wasq.hf)
        if keep_other_files and target.is_dir():
            _carry_over(target, tmp)
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
        info["memory"] = {
            "model_safetensors_bytes": file_bytes,
            "codes_bytes": codes_bytes,
            "codes_packed_bytes": (packed_bits + 7) // 8,
            "quantized_float32_bytes": float_bytes,
            "quantized_layer_bytes": int(sum(t.numel() * t.element_size() for k, t in tensors.items()
                                             if k.rsplit(".", 1)[0] in layers)),
            "unquantized_bytes": int(sum(t.numel() * t.element_size() for k, t in tensors.items()
                                         if k.rsplit(".", 1)[0] not in layers)),
            "quantized_params": int(sum(layer.weight.numel() for layer in layers.values())),
            "total_params": int(sum(p.numel() for p in model.parameters())),
        }
        info["config_sha256"] = _config_digests(info)
        _write_config(tmp, info)
        info["memory"]["directory_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdir/safetensors may create private modes: apply the user's umask
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink() and f.stat().st_nlink == 1:  # (not the carried-over hard links)
                os.chmod(f, 0o666 & ~umask)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                warnings.warn(f"save_checkpoint: could not remove the previous checkpoint's folder {old}; remove it "
                              f"by hand", RuntimeWarning, stacklevel=2)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info["memory"]


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` every entry of the directory ``old`` that ``new`` does
    not have, except weight files of an earlier save and leftovers of ours."""
    for p in sorted(old.iterdir()):
        dst = new / p.name
        if dst.exists() or dst.is_symlink() or _STALE_WEIGHTS_RE.match(p.name) or p.name == CONFIG_FILE + ".part":
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), dst)
        elif p.is_dir():
            shutil.copytree(p, dst, symlinks=True, copy_function=_link_or_copy)
        elif p.is_file():
            _link_or_copy(str(p), str(dst))


def reseal_checkpoint(directory: str | os.PathLike) -> None:
    """Accept deliberate edits of a checkpoint: recompute the revision-2 digests of
    ``sfx_config.json`` (``sha256`` of every tensor, ``tokenizer_files``, ``config_sha256``)
    from the files as they are now, and rewrite it atomically (a revision-1 checkpoint
    becomes revision 2). The edited checkpoint must still pass every other check at load."""
    d = Path(directory).expanduser()
    path = d / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON: {_one_line(e)}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a WASQ checkpoint configuration")
    files = [d / WEIGHTS_FILE] if (d / WEIGHTS_FILE).is_file() else _index_files(d)
    info["sha256"] = {k: v for f in files for k, v in _tensor_digests(f).items()}
    if info.get("tokenizer"):
        old = info.get("tokenizer_files")
        names = list(old) if isinstance(old, dict) else [f.name for f in sorted(d.iterdir()) if f.is_file() and f.name
                                                         not in (WEIGHTS_FILE, CONFIG_FILE, INDEX_FILE,
                                                                 HF_CONFIG_FILE, GENERATION_CONFIG_FILE)
                                                         and not f.name.endswith(".safetensors")]
        info["tokenizer_files"] = {n: _sha256_file(d / n) for n in names if (d / n).is_file()}
    info["format_version"] = FORMAT_VERSION
    info["config_sha256"] = _config_digests(info)
    _write_config(d, info)


def _write_config(d: Path, info: dict[str, Any]) -> None:
    """Write ``d/sfx_config.json`` atomically (through ``sfx_config.json.part``, synced)."""
    part = d / (CONFIG_FILE + ".part")
    part.write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    _fsync_file(part)
    os.replace(part, d / CONFIG_FILE)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# --------------------------------------------------------------------------- load: sfx_config.json


def _type_name(v: Any, article: bool = False) -> str:
    name = "null" if v is None else {"str": "string", "dict": "object", "list": "array", "bool": "boolean",
                                     "int": "integer", "float": "number"}.get(type(v).__name__, type(v).__name__)
    if not article or name == "null":
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _got(v: Any) -> str:
    return "got null" if v is None else f"got {_type_name(v)} {_short(v)}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed access to one object of ``sfx_config.json``; every error names the field."""

    def __init__(self, path: Path, obj: Any, where: str) -> None:
        self.path, self.where = path, where
        if not isinstance(obj, dict):
            raise self.error(None, f"must be a JSON object, {_got(obj)}")
        self.obj = obj

    def error(self, key: str | None, msg: str, hint: str = _REDO) -> CheckpointError:
        field = self.where if key is None else (f"{self.where}.{key}" if self.where else key)
        if not field:
            return CheckpointError(f"{self.path}: the file {msg}; {hint}")
        return CheckpointError(f"{self.path}: field {field} {msg}; {hint}")

    def get(self, key: str, kinds: tuple, default: Any = None, *, required: bool = False, choices=None) -> Any:
        if key not in self.obj:
            if required:
                raise self.error(key, "is missing")
            return default
        v = self.obj[key]
        ok = any((k is None and v is None) or (k is int and _is_int(v)) or (k is float and _is_int(v))
                 or (k is float and isinstance(v, float)) or (k not in (None, int, float) and isinstance(v, k))
                 for k in kinds)
        if not ok:
            want = " or ".join(_type_name(k(), article=True) if k is not None else "null" for k in kinds)
            raise self.error(key, f"must be {want}, {_got(v)}")
        if choices is not None and v is not None and v not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, got {_short(v)}")
        return v

    def bits(self, key: str, *, required: bool = False, optional: bool = False) -> int | None:
        v = self.get(key, (int, None) if optional else (int,), required=required)
        if v is None:
            return None
        if not sfx.MIN_BITS <= v <= sfx.MAX_BITS:
            raise self.error(key, f"must be in {sfx.MIN_BITS}..{sfx.MAX_BITS} (SFx widths), got {v}")
        return v

    def digests(self, key: str, *, required: bool, files: bool = False) -> None:
        """Check ``{name: SHA-256 hex digest}`` (``files``: every name a plain file name)."""
        for k, v in (self.get(key, (dict,), required=required) or {}).items():
            if files and (not k or "/" in k or "\\" in k or k in (".", "..")):
                raise self.error(f"{key}[{k!r}]", "must be a plain file name")
            if not (isinstance(v, str) and _SHA_RE.match(v)):
                raise self.error(f"{key}[{k!r}]", f"must be a SHA-256 hex digest (64 lower-case hex digits), got "
                                                  f"{_short(v)}")


def _short(v: Any) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_layer_spec(path: Path, name: str, spec: Any) -> None:
    f = _Fields(path, spec, f"layers[{name!r}]")
    bits = f.bits("bits", required=True)
    for key in ("in_features", "out_features"):
        v = f.get(key, (int,), required=True)
        if v < 1:
            raise f.error(key, f"must be a positive integer, got {v}")
    f.get("bias", (bool,))
    f.get("method", (str,))
    f.get("source", (str, None))
    f.get("weight_scale", (str,), choices=("channel", "tensor"))
    f.get("scale_kind", (str,), choices=("float", "pow2"))
    f.get("rounding", (str,), choices=sfx.ROUNDINGS)
    act_bits = f.bits("act_bits", optional=True)
    mode = f.get("act_exponent", (str, None), choices=("dynamic", "static"))
    amax = f.get("act_amax", (float, None))
    if amax is not None and not (math.isfinite(amax) and amax >= 0):
        raise f.error("act_amax", f"must be a finite number >= 0 (the calibrated max |input|), got {amax}")
    ev = f.get("act_exponent_value", (int, None))
    if ev is not None and not sfx.INT8_MIN <= ev <= sfx.INT8_MAX:
        raise f.error("act_exponent_value", f"must be in the int8 range, got {ev}")
    if act_bits is not None and mode == "static" and amax is not None:
        want = int(sfx.choose_exponent(np.float64(amax), act_bits))
        if ev is not None and ev != want:
            raise f.error("act_exponent_value", f"is {ev} but act_amax {amax} at act_bits {act_bits} gives exponent "
                                                f"{want}: the two fields contradict each other")
    if act_bits is not None and mode == "static" and amax is None:
        raise f.error("act_amax", "is null but act_exponent is 'static': the layer was never calibrated; re-create "
                                  "the checkpoint with calibration (sfx quantize --act-exponent static --calib-tokens N)",
                      "or use act_exponent 'dynamic'")
    if act_bits is None and mode is not None:
        raise f.error("act_exponent", f"is {mode!r} but act_bits is null (a weight-only layer has no activation mode)")
    f.bits("out_bits", optional=True)
    f.get("out_exponent", (bool,))
    del bits


def _check_info(path: Path, info: Any) -> dict[str, Any]:
    top = _Fields(path, info, "")
    fmt = top.get("format", (str, None))
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{path}: format is {fmt!r}, expected {FORMAT_NAME!r}; this is not a WASQ checkpoint "
                              f"configuration")
    ver = info.get("format_version")
    if not _is_int(ver) or ver not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: unknown format_version {ver!r}; superfloat {__version__} reads "
                              f"format version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade superfloat or "
                              f"re-create the checkpoint")
    layers = top.get("layers", (dict,), required=True)
    if not layers:
        raise top.error("layers", "is empty: a WASQ checkpoint has at least one quantized layer")
    for name, spec in layers.items():
        _check_layer_spec(path, name, spec)
    base = _Fields(path, top.get("base_model", (dict,), required=True), "base_model")
    base.get("config", (dict,), required=True)
    base.get("architecture", (str,), required=True)
    base.get("model_type", (str, None))
    base.get("source", (str, None))
    base.get("note", (str, None))
    top.get("quant_config", (dict,), required=True)
    aliases = top.get("aliases", (dict,), {})
    for k, v in aliases.items():
        if not isinstance(v, str):
            raise top.error(f"aliases[{k!r}]", f"must be a tensor name (a string), {_got(v)}")
    top.get("dtype", (str,), choices=_FLOAT_DTYPES)
    top.get("rounding", (str,), choices=sfx.ROUNDINGS)
    tok = top.get("tokenizer", (bool,), False)
    acts = top.get("activations", (dict, None))
    if acts is not None:
        se = _Fields(path, acts, "activations").get("static_exponents", (dict,), {})
        for n, e in se.items():
            spec = layers.get(n)
            if spec is None:
                raise top.error(f"activations.static_exponents[{n!r}]", "names no layer of 'layers'")
            if e != spec.get("act_exponent_value"):
                raise top.error(f"activations.static_exponents[{n!r}]",
                                f"is {_short(e)} but layers[{n!r}].act_exponent_value is "
                                f"{_short(spec.get('act_exponent_value'))}: the two fields contradict each other")
    if ver >= 2:
        top.digests("sha256", required=True)
        cd = top.get("config_sha256", (dict,))  # absent: the user accepted hand edits by deleting it
        if cd is not None:
            want = _config_digests(info)
            for part in sorted(set(want) | set(cd)):
                if part not in cd:
                    raise top.error(f"config_sha256", f"has no digest for {part} (a layer added after the save?); "
                                    f"delete field config_sha256 to accept hand edits", _REDO)
                if part not in want:
                    raise top.error(f"config_sha256[{part!r}]", f"names a part of {CONFIG_FILE} that is missing "
                                    f"(a layer removed after the save?)")
                if cd[part] != want[part]:
                    raise CheckpointError(f"{path}: field {part} was changed since the save (it fails its SHA-256 "
                                          f"in field config_sha256); {_REDO}, or delete field config_sha256 to "
                                          f"accept a deliberate edit")
        top.digests("tokenizer_files", required=tok, files=True)
    return info


def read_checkpoint_info(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``sfx_config.json`` (format name and version, and the type and range of
    every field the loader uses). Raises :class:`CheckpointError` naming the field."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        old = [p for p in stale_save_dirs(d) if ".old-" in p.name and (p / CONFIG_FILE).is_file()]
        if old and not d.exists():
            raise CheckpointError(f"checkpoint directory {d} does not exist: a save to it was interrupted between "
                                  f"its two renames; the previous checkpoint is {old[-1]}: rename it to {d}")
        if d.exists():
            raise CheckpointError(f"{d} is a file, not a checkpoint directory")
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    path = d / CONFIG_FILE
    if not path.is_file():
        if (d / WEIGHTS_FILE).is_file() and _is_wasq_weights(d / WEIGHTS_FILE):
            raise CheckpointError(f"{path} is missing ({WEIGHTS_FILE} beside it holds WASQ checkpoint tensors, "
                                  f"but without {CONFIG_FILE} they cannot be loaded); {_REDO}")
        raise CheckpointError(f"{d} is not a WASQ checkpoint: it has no {CONFIG_FILE}")
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {_one_line(e)}; {_REDO}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    return _check_info(path, info)


def _is_wasq_weights(path: Path) -> bool:
    """``model.safetensors`` written by :func:`save_checkpoint` (its metadata says so)."""
    try:
        header = _safetensors_header(path)
    except CheckpointError:
        return False
    meta = header.get("__metadata__") or {}
    return meta.get("superfloat") == FORMAT_NAME or any(k.endswith(".codes") for k in header)


# --------------------------------------------------------------------------- load: tensors


def _safetensors_header(path: Path, *, with_start: bool = False):
    """Read and check the header: every entry an object with a known dtype, a shape and
    ``data_offsets`` that match, inside the file, not overlapping (names the tensor)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header; {_REDO}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path} is truncated: its header claims {n} bytes but the file has {size}; "
                                      f"{_REDO}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header: {_one_line(e)}; {_REDO}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: it is a JSON {_type_name(header)}, not an "
                              f"object; {_REDO}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path} has a corrupt safetensors header: '__metadata__' must be an object of "
                              f"strings; {_REDO}")
    end = 8 + n
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        bad = f"{path} has a corrupt safetensors header: tensor {name!r}"
        if not isinstance(meta, dict):
            raise CheckpointError(f"{bad} is a JSON {_type_name(meta)}, not an object; {_REDO}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in meta:
                raise CheckpointError(f"{bad} has no {key!r}; {_REDO}")
        dt, shape, offs = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_DTYPES:
            raise CheckpointError(f"{bad} has dtype {_short(dt)}, not one of {', '.join(_ST_DTYPES)}; {_REDO}")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise CheckpointError(f"{bad} has shape {_short(shape)}, not a list of non-negative integers; {_REDO}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{bad} has data_offsets {_short(offs)}, not [begin, end] with 0 <= begin <= end; "
                                  f"{_REDO}")
        nbytes = math.prod(shape) * _ST_DTYPES[dt]
        if offs[1] - offs[0] != nbytes:
            raise CheckpointError(f"{bad}: data_offsets {offs} span {offs[1] - offs[0]} bytes but dtype {dt} shape "
                                  f"{shape} needs {nbytes}; {_REDO}")
        spans.append((offs[0], offs[1], name))
    beyond = sorted((end + lo, name, end + hi) for lo, hi, name in spans if end + hi > size)
    if beyond:
        _, name, need = beyond[0]
        more = f" (and {len(beyond) - 1} more tensor(s))" if len(beyond) > 1 else ""
        raise CheckpointError(f"{path} is truncated ({size} of at least {need} bytes): tensor {name!r} lies beyond "
                              f"the end of the file{more}; {_REDO}")
    spans.sort()
    for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise CheckpointError(f"{path} has a corrupt safetensors header: tensors {a!r} and {b!r} overlap (bytes "
                                  f"{lo0}..{hi0} and {lo1}..{hi1}); {_REDO}")
    return (header, end) if with_start else header


def _index_files(d: Path) -> list[Path]:
    path = d / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {_one_line(e)}; {_REDO}") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v and "/" not in v for v in wm.values()):
        raise CheckpointError(f"{path}: field weight_map must be an object of tensor name -> shard file name; "
                              f"{_REDO}")
    return sorted({d / f for f in wm.values()})


class _Tensors:
    """Lazy access to the checkpoint's tensors (one file or shards with an index), every
    header checked and (format revision 2) every tensor's SHA-256 verified."""

    def __init__(self, d: Path, info: dict[str, Any] | None = None) -> None:
        from safetensors import safe_open

        self.dir = d
        self.files: dict[str, int] = {}
        if (d / WEIGHTS_FILE).is_file():
            files = [d / WEIGHTS_FILE]
        elif (d / INDEX_FILE).is_file():
            files = _index_files(d)
        else:
            raise CheckpointError(f"{d} has no {WEIGHTS_FILE} (nor {INDEX_FILE}): the checkpoint's tensors are "
                                  f"missing; {_REDO}")
        self.where = files[0].name if len(files) == 1 else f"{INDEX_FILE} (and its shards)"
        self.handles = []
        self.paths: list[Path] = []
        headers = []
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{d}: shard {path.name} is missing; {_REDO}")
            header = _safetensors_header(path, with_start=True)
            for name in header[0]:
                if name != "__metadata__":
                    if name in self.files:
                        raise CheckpointError(f"{path}: tensor {name!r} is also in {self.paths[self.files[name]]}; "
                                              f"{_REDO}")
                    self.files[name] = len(self.paths)
            self.paths.append(path)
            headers.append(header)
        digests = (info or {}).get("sha256")
        if digests is not None:
            self._verify(digests, headers)
        for path in self.paths:
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"could not open {path}: {_one_line(e)}; {_REDO}") from None
            self.handles.append(h)

    def _verify(self, digests: dict[str, str], headers) -> None:
        cfg = self.dir / CONFIG_FILE
        unlisted = sorted(set(self.files) - set(digests))
        if unlisted:
            raise CheckpointError(f"{cfg}: field sha256 has no digest for tensor {unlisted[0]!r} of "
                                  f"{self.paths[self.files[unlisted[0]]].name}"
                                  + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
                                  + f": the tensor was added after the save or the field was edited; {_REDO}")
        absent = sorted(set(digests) - set(self.files))
        if absent:
            raise CheckpointError(f"checkpoint {self.dir}: {self.where} is missing tensor {absent[0]!r} (field sha256 of "
                                  f"{CONFIG_FILE} lists it)" + (f" and {len(absent) - 1} more" if len(absent) > 1
                                                                 else "") + f"; {_REDO}")
        for path, header in zip(self.paths, headers):
            try:
                got = _tensor_digests(path, header)
            except OSError as e:
                raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
            bad = [n for n in got if got[n] != digests[n]]
            if bad:
                raise CheckpointError(f"{path}: tensor {bad[0]!r} fails its SHA-256 check (its bytes, or its digest in "
                                      f"field sha256 of {CONFIG_FILE}, changed since the save: a corrupt or edited "
                                      f"file); {_REDO}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self):
        return self.files.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.dir}: {self.where} is missing tensor {name!r}; {_REDO}")
        try:
            return self.handles[self.files[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {self.dir}: could not read tensor {name!r}: {_one_line(e)}; "
                                  f"{_REDO}") from None


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], d: Path) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint {d}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}; "
                              f"{_REDO}")
    if t.dtype not in dtypes:
        raise CheckpointError(f"checkpoint {d}: tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}, "
                              f"expected {' or '.join(str(x).replace('torch.', '') for x in dtypes)}; {_REDO}")


def _check_finite(t: torch.Tensor, name: str, d: Path) -> None:
    if t.dtype.is_floating_point and t.numel():
        ok = torch.isfinite(t)
        if not bool(ok.all()):
            bad = ~ok
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise CheckpointError(f"checkpoint {d}: tensor {name!r} holds {int(bad.sum())} NaN/inf value(s) (the "
                                  f"first at index {first}); {_REDO}")


def _build_model(info: dict[str, Any], path: Path) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = info["base_model"]
    cfg_dict = dict(base["config"])
    model_type = cfg_dict.get("model_type") or base.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{path}: field base_model.config.model_type is {_short(model_type)}, a model type "
                              f"unknown to transformers {transformers.__version__}; upgrade transformers or {_REDO}")
    arch = base.get("architecture")
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CheckpointError(f"{path}: field base_model.architecture is {arch!r}, not a model class of "
                              f"transformers {transformers.__version__} (e.g. LlamaForCausalLM); {_REDO}")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
    except Exception as e:  # noqa: BLE001 - transformers validates configs with many error types
        raise CheckpointError(f"{path}: field base_model.config is not a valid {model_type} config: "
                              f"{_one_line(e)}; {_REDO}") from None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    try:
        with no_init_weights():
            if hasattr(cls, "_from_config"):
                model = cls._from_config(config)
            else:  # pragma: no cover
                model = AutoModelForCausalLM.from_config(config)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: could not build {arch} from field base_model.config: "
                              f"{type(e).__name__}: {_one_line(e)}; {_REDO}") from None
    return model


def _load_tokenizer(d: Path, info: dict[str, Any]):
    from transformers import AutoTokenizer

    files = info.get("tokenizer_files")
    if files is not None:  # revision 2: the files and their digests
        for name, digest in files.items():
            p = d / name
            if not p.is_file():
                raise CheckpointError(f"checkpoint {d}: tokenizer file {name} is missing ({CONFIG_FILE} lists "
                                      f"{', '.join(files)}); copy it from the base model's tokenizer or {_REDO}")
            if _sha256_file(p) != digest:
                raise CheckpointError(f"checkpoint {d}: tokenizer file {name} fails its SHA-256 check (changed since "
                                      f"the save); {_REDO}")
    else:
        if not any((d / v).is_file() for v in TOKENIZER_FILES):
            raise CheckpointError(f"checkpoint {d}: its tokenizer files are missing ({CONFIG_FILE} says a tokenizer "
                                  f"was saved, but there is no tokenizer.json / vocab.json); copy the base model's "
                                  f"tokenizer files into {d} or {_REDO}")
    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - tokenizers fail in many ways
        raise CheckpointError(f"checkpoint {d}: its tokenizer does not load: {_one_line(e)}; copy the base model's "
                              f"tokenizer files into {d} or {_REDO}") from None


def load_checkpoint(directory: str | os.PathLike, *, device: str | torch.device | None = None,
                    return_info: bool = False):
    """Rebuild the quantized model of a WASQ checkpoint, offline.

    The model has the same :class:`SFxLinear` layers with the same codes (``export()``
    returns the stored tensors) and gives the same logits as the model that was saved.
    Revision-2 layer fields are set back on each layer: ``out_exponent`` (int8 numpy
    ``[N]`` or ``None``) and ``out_bits`` (int or ``None``).

    Returns:
        the model (eval mode), or ``(model, tokenizer or None, info)`` with ``return_info``.

    Raises:
        CheckpointError (a ``ValueError``), one line: unknown format version, a malformed
            field of ``sfx_config.json``, a corrupt safetensors header, a missing file, a
            tensor failing its SHA-256, NaN/inf in a float tensor, missing/unexpected
            tensor, wrong shape or dtype, code outside ``[0, 2**bits)``, ``bits`` that
            contradicts the codes, non-positive scale, truncated file; the message names
            the file, field or tensor.
    """
    d = Path(directory).expanduser()
    return _guarded(d, lambda: _load(d, device, return_info))


def _guarded(d: Path, load):
    """``load()``, any error other than :class:`CheckpointError` turned into one (one line, never a traceback)."""
    try:
        return load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the last resort
        raise CheckpointError(f"checkpoint {d} could not be loaded: {type(e).__name__}: {_one_line(e)} (if the "
                              f"checkpoint is intact, this is a bug in superfloat: please report it)") from e


def load_into(model: nn.Module, directory: str | os.PathLike) -> dict[str, Any]:
    """Fill ``model`` (a float transformers model of the checkpoint's base architecture,
    built from the same config, e.g. by ``from_pretrained``) with the checkpoint in
    ``directory``, in place: exactly what :func:`load_checkpoint` does after building the
    model (every check, the digests, the quantized layers with their codes, activation and
    output settings, the unquantized tensors, the stored dtype). Used by the Hugging Face
    integration (:mod:`superfloat.sw.wasq.hf`). Returns the checkpoint's ``sfx_config.json``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    d = Path(directory).expanduser()
    return _guarded(d, lambda: _read_into(model, d))[1]


def _quant_config(info: dict[str, Any], cfg_path: Path) -> WASQConfig:
    try:
        return WASQConfig.from_dict(info["quant_config"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{cfg_path}: field quant_config is invalid: {_one_line(e)}; {_REDO}") from None


def _read_into(model: nn.Module | None, d: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Check ``d`` and fill ``model`` (``None``: built from ``base_model``) with it: ``(model, info)``."""
    info = read_checkpoint_info(d)
    store = _Tensors(d, info)
    config = _quant_config(info, d / CONFIG_FILE)
    if model is None:
        model = _build_model(info, d / CONFIG_FILE)
    _populate(model, d, info, store, config)
    return model, info


def _load(d: Path, device, return_info: bool):
    model, info = _read_into(None, d)
    if device is not None:
        model = model.to(device)
    model.eval()
    hooks.run(hooks.AFTER_QUANTIZE, model)
    tok = _load_tokenizer(d, info) if info.get("tokenizer") else None
    return (model, tok, info) if return_info else model


def _populate(model: nn.Module, d: Path, info: dict[str, Any], store: "_Tensors", config: WASQConfig) -> None:
    """Everything :func:`load_checkpoint` does once the base model is built (in place)."""
    cfg_path = d / CONFIG_FILE
    model.to(getattr(torch, info.get("dtype", "float32")))
    layer_specs: dict[str, Any] = info["layers"]
    try:
        quantize_(model, config, layers=list(layer_specs))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {d}: field layers of {CONFIG_FILE} does not match the base model "
                              f"built from 'base_model': {_one_line(e)}; {_REDO}") from None
    layers = quantized_layers(model)
    missing = [n for n in layer_specs if n not in layers]
    if missing:
        raise CheckpointError(f"{cfg_path}: field layers names {missing[0]!r}, which the base model does not "
                              f"quantize; {_REDO}")
    aliases: dict[str, str] = info.get("aliases", {})
    # host rotations of rotated models (``<layer>.online_rotation.signs/factorI``): re-attached from
    # the stored factors, then expected and loaded like every other float tensor
    rot = {k: store.get(aliases.get(k, k)) for k in sorted({*store.keys(), *aliases})
           if ".online_rotation." in k and aliases.get(k, k) in store}
    if rot:
        from .ptq.rotation import restore_online_rotations

        try:
            restore_online_rotations(model, rot)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {d}: its online rotation tensors ({next(iter(rot))!r}, ...) do not "
                                  f"fit the base model: {_one_line(e)}; {_REDO}") from None

    # Unquantized tensors: every state-dict entry that is not a quantized layer's weight/bias.
    q_keys = _quantized_keys(layers)
    expected = {k: v for k, v in model.state_dict().items() if k not in q_keys}
    for key in aliases:
        if key not in expected:
            raise CheckpointError(f"{cfg_path}: field aliases names {key!r}, which is no unquantized tensor of the "
                                  f"base model; {_REDO}")
    float_sd = {}
    for key, ref in expected.items():
        src = aliases.get(key, key)
        if src not in store:
            if src != key:
                raise CheckpointError(f"checkpoint {d}: {store.where} is missing tensor {src!r} (field aliases[{key!r}] of "
                                      f"{CONFIG_FILE} says {key!r} is stored under that name); {_REDO}")
            raise CheckpointError(f"checkpoint {d}: {store.where} is missing tensor {key!r} (and field aliases of {CONFIG_FILE} "
                                  f"names no stored tensor it is tied to); {_REDO}")
        t = store.get(src)
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"checkpoint {d}: tensor {src!r} has shape {list(t.shape)}, the model expects "
                                  f"{list(ref.shape)} (built from 'base_model' of {CONFIG_FILE}); {_REDO}")
        if ref.dtype.is_floating_point and not t.dtype.is_floating_point:
            raise CheckpointError(f"checkpoint {d}: tensor {src!r} has dtype {t.dtype}, expected a float tensor; "
                                  f"{_REDO}")
        if not ref.dtype.is_floating_point and t.dtype != ref.dtype:
            raise CheckpointError(f"checkpoint {d}: tensor {src!r} has dtype {t.dtype}, expected {ref.dtype}; "
                                  f"{_REDO}")
        _check_finite(t, src, d)
        float_sd[key] = t

    known = {aliases.get(k, k) for k in float_sd}
    for name, spec in layer_specs.items():
        layer = layers[name]
        bits = spec["bits"]
        where = f"{cfg_path}: field layers[{name!r}]"
        n, k = layer.out_features, layer.in_features
        if (spec["out_features"], spec["in_features"]) != (n, k):
            raise CheckpointError(f"{cfg_path}: layer {name!r} is [{spec['out_features']}, {spec['in_features']}] "
                                  f"but the base model's is [{n}, {k}]; {_REDO}")
        cname = f"{name}.codes"
        codes = store.get(cname)
        _expect(codes, cname, (n, k), (torch.uint8,) if bits <= 8 else (torch.uint16,), d)
        codes_np = codes.numpy()
        try:
            sfx.check_codes(codes_np, bits, cname)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {d}: tensor {cname!r} holds codes outside [0, 2**{bits}) for "
                                  f"SF{bits}: {e}; fix {where}.bits or {_REDO}") from None
        mag = codes_np & ((1 << (bits - 1)) - 1)
        if int(np.count_nonzero(mag)) >= 64 and not bool((codes_np >> (bits - 1)).any()):
            top = int(codes_np.max())
            raise CheckpointError(f"{where}.bits is {bits}, but no code of tensor {cname!r} has the SF{bits} sign bit "
                                  f"(bit {bits - 1}) set: its codes are {top.bit_length()}-bit codes (largest {top}), "
                                  f"so bits contradicts the codes; fix the field or {_REDO}")
        ename = f"{name}.exponent"
        exp = store.get(ename)
        per_channel = spec.get("weight_scale", "channel") == "channel"
        _expect(exp, ename, (n,) if per_channel else (), (torch.int8,), d)
        scale = None
        sname = f"{name}.scale"
        if spec.get("scale_kind", config.scale_kind) == "float":
            st = store.get(sname)
            _expect(st, sname, (n,) if per_channel else (), (torch.float64, torch.float32), d)
            scale = st.to(torch.float64).numpy()
            if not np.all(np.isfinite(scale) & (scale > 0)):
                raise CheckpointError(f"checkpoint {d}: tensor {sname!r} must hold positive finite scales; {_REDO}")
            if bool((exp != 0).any()):
                raise CheckpointError(f"checkpoint {d}: tensor {ename!r} must be all 0 for a layer with float scales "
                                      f"(scale_kind 'float': the scale is in {sname!r}), got "
                                      f"{int((exp != 0).sum())} non-zero exponent(s); {_REDO}")
            known.add(sname)
        elif sname in store:
            raise CheckpointError(f"checkpoint {d}: unexpected tensor {sname!r}: layer {name!r} has power-of-two "
                                  f"exponents (scale_kind 'pow2'); {_REDO}")
        bias = None
        bname = f"{name}.bias"
        has_bias = spec.get("bias", layer.bias is not None)
        if has_bias != (layer.bias is not None):
            raise CheckpointError(f"{where}.bias is {str(has_bias).lower()} but the base model's layer "
                                  f"{'has no' if layer.bias is None else 'has a'} bias; {_REDO}")
        if has_bias:
            bt = store.get(bname)
            _expect(bt, bname, (n,), (torch.float32, torch.float16, torch.bfloat16, torch.float64), d)
            _check_finite(bt, bname, d)
            bias = bt.to(torch.float32).numpy()
            known.add(bname)
        oname = f"{name}.out_exponent"
        out_exp = None
        if spec.get("out_exponent", False):
            ot = store.get(oname)
            _expect(ot, oname, (n,), (torch.int8,), d)
            out_exp = ot.numpy().copy()
            known.add(oname)
        elif oname in store:
            raise CheckpointError(f"checkpoint {d}: unexpected tensor {oname!r}: {where}.out_exponent is not true; "
                                  f"{_REDO}")
        known.update({cname, ename})
        layer.weight_scale = spec.get("weight_scale", layer.weight_scale)
        layer.scale_kind = spec.get("scale_kind", layer.scale_kind)
        layer.act_bits = spec.get("act_bits", layer.act_bits)
        layer.act_exponent = spec.get("act_exponent") or layer.act_exponent
        layer.act_amax = spec.get("act_amax")
        layer.out_exponent = out_exp
        layer.out_bits = spec.get("out_bits")
        ex = ExportedLinear(bits, codes_np.astype(sfx.code_dtype(bits), copy=False), exp.numpy(), scale, bias,
                            spec.get("rounding", config.rounding))
        layer.load_exported(ex)
        if not bool(torch.isfinite(layer.weight).all()):
            raise CheckpointError(f"checkpoint {d}: layer {name!r}: tensors {ename!r}"
                                  f"{f' and {sname!r}' if scale is not None else ''} scale the codes beyond the "
                                  f"{str(layer.weight.dtype).replace('torch.', '')} range (the weights decode to "
                                  f"inf); {_REDO}")

    extra = sorted(set(store.keys()) - known)
    if extra:
        raise CheckpointError(f"checkpoint {d}: unexpected tensor {extra[0]!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + f": it matches no quantized layer and no parameter of the base model; {_REDO}")
    model.load_state_dict(float_sd, strict=False)  # quantized layers were set by load_exported
    model.eval()

"""WASQ checkpoints (SPEC section 7): what is streamed into the accelerator.

A checkpoint is a directory::

    model.safetensors     <name>.codes     uint8/uint16 [N, K]   SFx codes of layer <name>
                          <name>.exponent  int8 [N] or []        power-of-two exponents
                          <name>.scale     float64 [N] or []     float scales (scale_kind "float" only)
                          <name>.bias      float [N]             (layers with a bias)
                          ...               every unquantized tensor under its state-dict name
    sfx_config.json       format name and version, tool version, rounding, bits and
                          activation settings per layer, the WASQConfig, the base model's
                          config and architecture (to rebuild it offline), memory in bytes
    tokenizer files       (when a tokenizer is given)

``real[n, k] = value(codes[n, k]) * 2**exponent[n] * scale[n]`` (scale 1 when absent).
For float scales ``exponent`` is 0 and the accelerator gets ``scale`` through
``sfx.fold_scale`` (:meth:`ExportedLinear.fold`). Tensors that share storage (tied
embeddings) are stored once; ``sfx_config.json["aliases"]`` maps the others to it.

Writing is atomic: everything goes to a hidden temporary directory beside the target,
``sfx_config.json`` last, then one ``rename``; an interrupted save leaves no directory
under the target name (and a temporary one has no complete ``sfx_config.json``).
Loading checks everything and names the tensor in every error.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__, sfx
from .config import WASQConfig
from .qlinear import ExportedLinear
from .quantize import quantize_, quantized_layers, wasq_config_of

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_info", "CheckpointError",
           "FORMAT_NAME", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE"]

FORMAT_NAME = "superfloat-wasq-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
CONFIG_FILE = "sfx_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (the message names the file or tensor)."""


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


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def _base_model_info(model: nn.Module, source: str | None, note: str | None) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(f"save_checkpoint needs a transformers model (with .config), got {type(model).__name__}")
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    arch = type(model).__name__
    d["architectures"] = [arch]
    return {"architecture": arch, "model_type": d.get("model_type"), "config": d, "source": source, "note": note}


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                    overwrite: bool = False, source: str | None = None, note: str | None = None) -> dict[str, Any]:
    """Write the quantized ``model`` as a WASQ checkpoint directory, atomically.

    Args:
        model: a transformers model after :func:`quantize_` (method ``"sfx"``).
        directory: target directory; must not exist, be empty, or (with ``overwrite``)
            be an existing WASQ checkpoint.
        tokenizer: saved alongside (``save_pretrained``) so the checkpoint is self-contained.
        source, note: recorded in ``sfx_config.json["base_model"]`` (e.g. the model spec and
            the Q4_1 caveat of smollm2-135m).

    Returns:
        The ``memory`` summary: real file bytes of ``model.safetensors`` and of the whole
        directory, bytes of the codes as stored (one uint8/uint16 per code) and if packed
        at ``bits`` per code, and the float32 bytes the quantized weights replace.
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
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True (CLI: --overwrite) to "
                                  f"replace a checkpoint")
        if any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
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
        codes_bytes += ex.codes.nbytes
        packed_bits += ex.codes.size * ex.bits
        float_bytes += ex.codes.size * 4
        layer_info[name] = {
            "bits": ex.bits, "source": layer.source, "in_features": layer.in_features,
            "out_features": layer.out_features, "bias": layer.bias is not None, "method": layer.method,
            "weight_scale": layer.weight_scale, "scale_kind": layer.scale_kind, "rounding": ex.rounding,
            "act_bits": layer.act_bits, "act_exponent": layer.act_exponent if layer.act_bits is not None else None,
            "act_amax": layer.act_amax, "act_exponent_value": layer.static_act_exponent,
        }

    skip_keys = set()
    for name in layers:
        skip_keys.update({f"{name}.weight", f"{name}.bias"})
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key in skip_keys:
            continue
        t = t.detach()
        sk = _storage_key(t)
        if sk in seen:
            aliases[key] = seen[sk]
            continue
        seen[sk] = key
        # (a float tensor tied to a quantized layer's shadow weight, e.g. the embedding
        # of a quantized lm_head, is stored as float under its own name)
        tensors[key] = t.cpu().contiguous().clone()

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
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "superfloat": FORMAT_NAME,
                                                             "format_version": str(FORMAT_VERSION)})
        _fsync_file(tmp / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
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
        cfg_tmp = tmp / (CONFIG_FILE + ".part")
        cfg_tmp.write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
        _fsync_file(cfg_tmp)
        os.replace(cfg_tmp, tmp / CONFIG_FILE)
        info["memory"]["directory_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdir/safetensors may create private modes: apply the user's umask
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return info["memory"]


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


# --------------------------------------------------------------------------- load


def read_checkpoint_info(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``sfx_config.json`` (format name and version)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{d} is not a WASQ checkpoint: it has no {CONFIG_FILE}")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: format is {info.get('format') if isinstance(info, dict) else None!r}, "
                              f"expected {FORMAT_NAME!r}")
    ver = info.get("format_version")
    if ver not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: unknown format_version {ver!r}; superfloat {__version__} reads "
                              f"format version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    for key in ("layers", "base_model", "quant_config"):
        if key not in info:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return info


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Read the header and check every tensor lies inside the file (names the first truncated one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated: its header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
    end = 8 + n
    bad = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        if end + hi > size:
            bad.append((end + lo, name, end + hi))
    if bad:
        bad.sort()
        _, name, need = bad[0]
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise CheckpointError(f"{path} is truncated ({size} of at least {need} bytes): tensor {name!r} lies beyond "
                              f"the end of the file{more}")
    return header


class _Tensors:
    """Lazy access to the checkpoint's tensors (one file or shards with an index)."""

    def __init__(self, d: Path) -> None:
        from safetensors import safe_open

        self.dir = d
        self.files: dict[str, Path] = {}
        if (d / WEIGHTS_FILE).is_file():
            files = [d / WEIGHTS_FILE]
        elif (d / INDEX_FILE).is_file():
            try:
                index = json.loads((d / INDEX_FILE).read_text())
                files = sorted({d / f for f in index["weight_map"].values()})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{d / INDEX_FILE} is not a valid shard index: {e}") from None
        else:
            raise CheckpointError(f"{d} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")
        self.handles = []
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{d}: shard {path.name} is missing")
            header = _safetensors_header(path)
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"could not open {path}: {e}") from None
            self.handles.append(h)
            for name in header:
                if name != "__metadata__":
                    self.files[name] = len(self.handles) - 1

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self):
        return self.files.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.dir} is missing tensor {name!r}")
        try:
            return self.handles[self.files[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {self.dir}: could not read tensor {name!r}: {e}") from None


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], d: Path) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint {d}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype not in dtypes:
        raise CheckpointError(f"checkpoint {d}: tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}, "
                              f"expected {' or '.join(str(x).replace('torch.', '') for x in dtypes)}")


def _build_model(info: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = info["base_model"]
    cfg_dict = dict(base["config"])
    model_type = cfg_dict.get("model_type") or base.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"base model type {model_type!r} is unknown to transformers {transformers.__version__}")
    config = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
    arch = base.get("architecture")
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    return model


def load_checkpoint(directory: str | os.PathLike, *, device: str | torch.device | None = None,
                    return_info: bool = False):
    """Rebuild the quantized model of a WASQ checkpoint, offline.

    The model has the same :class:`SFxLinear` layers with the same codes (``export()``
    returns the stored tensors) and gives the same logits as the model that was saved.

    Returns:
        the model (eval mode), or ``(model, tokenizer or None, info)`` with ``return_info``.

    Raises:
        CheckpointError (a ``ValueError``): unknown format version, missing/unexpected
            tensor, wrong shape or dtype, code outside ``[0, 2**bits)``, non-positive
            scale, truncated file; the message names the tensor (or file).
    """
    d = Path(directory).expanduser()
    info = read_checkpoint_info(d)
    store = _Tensors(d)
    try:
        config = WASQConfig.from_dict(info["quant_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: invalid quant_config: {e}") from None
    model = _build_model(info)
    dtype = getattr(torch, str(info.get("dtype", "float32")), torch.float32)
    model = model.to(dtype)
    layer_specs: dict[str, Any] = info["layers"]
    try:
        quantize_(model, config, layers=list(layer_specs))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {d}: the base model does not match the layer list: {e}") from None
    layers = quantized_layers(model)

    # Unquantized tensors: every state-dict entry that is not a quantized layer's weight/bias.
    q_keys = set()
    for name in layers:
        q_keys.update({f"{name}.weight", f"{name}.bias"})
    expected = {k: v for k, v in model.state_dict().items() if k not in q_keys}
    aliases: dict[str, str] = info.get("aliases", {})
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{d / CONFIG_FILE}: 'aliases' must be an object")
    float_sd = {}
    for key, ref in expected.items():
        src = aliases.get(key, key)
        t = store.get(src)
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"checkpoint {d}: tensor {src!r} has shape {list(t.shape)}, the model expects "
                                  f"{list(ref.shape)}")
        if ref.dtype.is_floating_point and not t.dtype.is_floating_point:
            raise CheckpointError(f"checkpoint {d}: tensor {src!r} has dtype {t.dtype}, expected a float tensor")
        float_sd[key] = t

    known = {aliases.get(k, k) for k in float_sd}
    for name, spec in layer_specs.items():
        layer = layers[name]
        bits = spec.get("bits")
        try:
            bits = sfx.check_bits(bits, f"layers[{name!r}].bits")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{d / CONFIG_FILE}: {e}") from None
        n, k = layer.out_features, layer.in_features
        if (spec.get("out_features"), spec.get("in_features")) != (n, k):
            raise CheckpointError(f"{d / CONFIG_FILE}: layer {name!r} is [{spec.get('out_features')}, "
                                  f"{spec.get('in_features')}] but the base model's is [{n}, {k}]")
        cname = f"{name}.codes"
        codes = store.get(cname)
        _expect(codes, cname, (n, k), (torch.uint8,) if bits <= 8 else (torch.uint16,), d)
        codes_np = codes.numpy()
        try:
            sfx.check_codes(codes_np, bits, cname)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {d}: tensor {cname!r} holds codes outside [0, 2**{bits}) for "
                                  f"SF{bits}: {e}") from None
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
                raise CheckpointError(f"checkpoint {d}: tensor {sname!r} must hold positive finite scales")
            known.add(sname)
        elif sname in store:
            raise CheckpointError(f"checkpoint {d}: unexpected tensor {sname!r}: layer {name!r} has power-of-two "
                                  f"exponents (scale_kind 'pow2')")
        bias = None
        bname = f"{name}.bias"
        if spec.get("bias", layer.bias is not None):
            if layer.bias is None:
                raise CheckpointError(f"checkpoint {d}: layer {name!r} has a bias in the checkpoint but not in "
                                      f"the base model")
            bt = store.get(bname)
            _expect(bt, bname, (n,), (torch.float32, torch.float16, torch.bfloat16, torch.float64), d)
            bias = bt.to(torch.float32).numpy()
            known.add(bname)
        known.update({cname, ename})
        layer.weight_scale = spec.get("weight_scale", layer.weight_scale)
        layer.scale_kind = spec.get("scale_kind", layer.scale_kind)
        layer.act_bits = spec.get("act_bits", layer.act_bits)
        layer.act_exponent = spec.get("act_exponent") or layer.act_exponent
        layer.act_amax = spec.get("act_amax")
        ex = ExportedLinear(bits, codes_np.astype(sfx.code_dtype(bits), copy=False), exp.numpy(), scale, bias,
                            spec.get("rounding", config.rounding))
        layer.load_exported(ex)

    extra = sorted(set(store.keys()) - known)
    if extra:
        raise CheckpointError(f"checkpoint {d}: unexpected tensor {extra[0]!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + ": it matches no quantized layer and no parameter of the base model")
    model.load_state_dict(float_sd, strict=False)  # quantized layers were set by load_exported
    if device is not None:
        model = model.to(device)
    model.eval()
    tok = None
    if info.get("tokenizer"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d))
    return (model, tok, info) if return_info else model


"""Hugging Face ``transformers`` integration of WASQ checkpoints (``docs/huggingface.md``).

Importing this module registers the quantization method ``"superfloat"`` with
transformers' own extension points (``transformers.quantizers.register_quantization_config``
and ``register_quantizer``, the machinery of torchao's ``TorchAoConfig``)::

    import superfloat.sw.wasq.hf                       # registers quant_method "superfloat"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("build/sf8")   # a WASQ checkpoint directory
    model.save_pretrained("build/sf8-copy")                     # writes a WASQ checkpoint again
    model.push_to_hub("me/sf8")                                 # the same files, uploaded

* A WASQ checkpoint (SPEC section 7; :func:`~superfloat.sw.wasq.checkpoint.save_checkpoint`)
  has a ``config.json``: the base model's config plus ``quantization_config``
  (:class:`SuperfloatConfig`, ``quant_method: "superfloat"``). ``sfx_config.json`` stays the
  reference; ``config.json`` is derived from it (:func:`hf_config`).
* ``from_pretrained`` builds the base model from ``config.json`` (which must agree with
  ``sfx_config.json``'s ``base_model``), lets transformers load what it can, then
  :class:`SuperfloatHfQuantizer` fills the model with
  :func:`~superfloat.sw.wasq.checkpoint.load_into`: the code of ``load_checkpoint`` (every
  digest and field checked, :class:`~superfloat.sw.wasq.qlinear.SFxLinear` layers with the
  stored codes, activation settings, ``out_bits`` / ``out_exponent``). The logits equal
  ``load_checkpoint``'s.
* Every quantized transformers model (``quantize_``, ``load_checkpoint``,
  ``from_pretrained``) gets :func:`attach`-ed: ``model.config.quantization_config``,
  ``model.hf_quantizer`` and a ``save_pretrained`` that writes a WASQ checkpoint (with
  ``save_pretrained`` semantics: other files in the directory are kept) or raises (a layer
  that has no SFx codes); it never writes the float shadow weights. ``push_to_hub`` goes
  through it.
* ``from_pretrained(float_model, quantization_config=SuperfloatConfig(weight_bits=8))``
  quantizes a float model while loading (round to nearest, the methods that need no
  calibration data).

transformers has no entry point for quantizers: the registration happens when this module
is imported (:func:`register`; ``quantize_`` and ``load_checkpoint`` import it too).
Needs transformers 5.
"""
from __future__ import annotations

import os
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as _auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import hooks
from .checkpoint import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, GENERATION_CONFIG_FILE, HF_CONFIG_FILE,
                         WEIGHTS_FILE, CheckpointError, load_into,
                         read_checkpoint_info, save_checkpoint)
from .config import WASQConfig

__all__ = ["QUANT_METHOD", "SuperfloatConfig", "SuperfloatHfQuantizer", "register", "attach", "hf_config",
           "write_hf_config", "save_pretrained"]

#: the ``quant_method`` of a WASQ checkpoint's ``config.json``
QUANT_METHOD = "superfloat"

#: ``config.json`` keys that may differ from ``sfx_config.json``'s ``base_model.config`` (bookkeeping, or what
#: the caller of ``from_pretrained`` chose: dtype, attention implementation)
_CONFIG_IGNORED = frozenset({"quantization_config", "_name_or_path", "name_or_path", "transformers_version",
                             "architectures", "dtype", "torch_dtype", "_commit_hash", "attn_implementation"})


class SuperfloatConfig(QuantizationConfigMixin):
    """``quantization_config`` of a WASQ checkpoint (``quant_method: "superfloat"``).

    In a checkpoint's ``config.json`` it names the format (``format``, ``format_version``,
    ``config_file``: ``sfx_config.json``, which holds the per-layer settings) and repeats the
    :class:`~superfloat.sw.wasq.WASQConfig` (``quant_config``) for people reading it. Given to
    ``from_pretrained`` of a *float* model it quantizes while loading::

        SuperfloatConfig(weight_bits=8)                  # WASQConfig keywords
        SuperfloatConfig(WASQConfig(weight_bits=4, act_bits=8))

    Raises:
        ValueError: ``quant_method`` other than ``"superfloat"``, an invalid WASQConfig, or both
            a ``quant_config`` and WASQConfig keywords.
    """

    def __init__(self, quant_config: WASQConfig | dict[str, Any] | None = None, *, format: str = FORMAT_NAME,
                 format_version: int = FORMAT_VERSION, config_file: str = CONFIG_FILE,
                 quant_method: str = QUANT_METHOD, **wasq_kwargs: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"SuperfloatConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if quant_config is not None and wasq_kwargs:
            raise ValueError(f"SuperfloatConfig: give either quant_config or WASQConfig keywords "
                             f"({', '.join(sorted(wasq_kwargs))}), not both")
        if isinstance(quant_config, WASQConfig):
            wasq = quant_config
        elif quant_config is None:
            wasq = WASQConfig(**wasq_kwargs)
        elif isinstance(quant_config, dict):
            wasq = WASQConfig.from_dict(quant_config)
        else:
            raise TypeError(f"SuperfloatConfig: quant_config must be a WASQConfig or a dict, got "
                            f"{type(quant_config).__name__}")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_version = format_version
        self.config_file = config_file
        self.quant_config = wasq.to_dict()

    @property
    def wasq_config(self) -> WASQConfig:
        """The :class:`~superfloat.sw.wasq.WASQConfig` (a fresh object)."""
        return WASQConfig.from_dict(self.quant_config)


class SuperfloatHfQuantizer(HfQuantizer):
    """The transformers quantizer of ``quant_method: "superfloat"`` (see the module docstring).

    Pre-quantized (a WASQ checkpoint): before the weights load, it reads and checks
    ``sfx_config.json`` beside the weights, checks ``config.json`` against it and tells
    transformers which stored tensors (codes, exponents, scales, output exponents) and which
    missing float weights to expect; after, :func:`~superfloat.sw.wasq.checkpoint.load_into`
    fills the model. Not pre-quantized: :func:`~superfloat.sw.wasq.quantize_` after loading.
    Loads onto one device (a ``device_map`` over several is refused).
    """

    requires_calibration = False

    def __init__(self, quantization_config: SuperfloatConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_dir: Path | None = None
        self.info: dict[str, Any] | None = None
        self.requested_dtype: torch.dtype | None = None

    # ---------------------------------------------------------------- before loading

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict):
            devices = {str(v) for v in device_map.values()}
            if len(devices) > 1 or "disk" in devices:
                raise ValueError(f"superfloat: a WASQ model loads onto one device, got a device_map over "
                                 f"{sorted(devices)}; pass device_map=None (then model.to(device)) or one device")
        if not self.pre_quantized:
            cfg = self.quantization_config.wasq_config
            if cfg.needs_calibration:
                raise ValueError(f"superfloat: method {cfg.method!r} needs calibration data, which from_pretrained "
                                 f"cannot give; load the float model, then call superfloat.sw.wasq.quantize_(model, "
                                 f"config, calibration=batches) (CLI: sfx quantize)")

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        self.requested_dtype = dtype
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> PreTrainedModel:
        if not self.pre_quantized:
            return model
        if not checkpoint_files:
            raise CheckpointError(f"superfloat: from_pretrained found no weight files of the WASQ checkpoint "
                                  f"{model.config.name_or_path!r}; load it from its directory")
        d = _checkpoint_dir(Path(checkpoint_files[0]).parent, model.config.name_or_path)
        info = read_checkpoint_info(d)
        _check_config(model.config, info, d)
        self.checkpoint_dir, self.info = d, info
        # Silence transformers' report: the stored tensors of quantized layers and host rotations are
        # not parameters, their float weights are not stored (load_into builds them from the codes).
        names = "|".join(re.escape(n) for n in info["layers"])
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            rf"^({names})\.(codes|exponent|scale|out_exponent)$", r"\.online_rotation\.(signs|factor\d+)$"}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {
            rf"^({names})\.weight$"}
        return model

    # ---------------------------------------------------------------- after loading

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        from .quantize import quantize_

        if self.pre_quantized:
            info = load_into(model, self.checkpoint_dir)
            want = self.requested_dtype
            saved = info.get("dtype", "float32")
            if isinstance(want, torch.dtype) and want != getattr(torch, saved):
                warnings.warn(f"superfloat: a WASQ checkpoint loads in the dtype it was saved in ({saved}), not "
                              f"{str(want).replace('torch.', '')}: the logits then equal load_checkpoint's; cast the "
                              f"model afterwards (model.to(dtype)) if you want another", UserWarning, stacklevel=2)
        else:
            quantize_(model, self.quantization_config.wasq_config)
        model.eval()
        attach(model, self)
        return model

    # ---------------------------------------------------------------- what transformers asks

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # quantization-aware training through SFxLinear's straight-through estimator

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        raise RuntimeError("superfloat: transformers' own save_pretrained would write the float shadow weights of "
                           "a WASQ model; call model.save_pretrained(...) (installed by superfloat.sw.wasq.hf."
                           "attach) or superfloat.sw.wasq.save_checkpoint(model, directory)")

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        raise NotImplementedError("superfloat: a WASQ model is dequantized already in float arithmetic (its "
                                  "SFxLinear layers hold the decoded weights); use it as it is")


def _checkpoint_dir(d: Path, name_or_path: str) -> Path:
    """The local directory of the checkpoint: beside the weights; for a hub repository in the
    cache, ``sfx_config.json`` is fetched into the same snapshot first."""
    if (d / CONFIG_FILE).is_file():
        return d
    parts = d.parts  # a hub cache: CACHE/models--ORG--NAME/snapshots/REVISION/
    if len(parts) >= 4 and parts[-2] == "snapshots" and not Path(name_or_path).expanduser().is_dir():
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(repo_id=name_or_path, filename=CONFIG_FILE, revision=parts[-1],
                            cache_dir=str(Path(*parts[:-3])))
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            raise CheckpointError(f"superfloat: {CONFIG_FILE} of the WASQ checkpoint {name_or_path!r} could not be "
                                  f"fetched ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                                  f"; the repository must hold every file save_pretrained wrote") from None
        if (d / CONFIG_FILE).is_file():
            return d
    raise CheckpointError(f"{d / CONFIG_FILE} is missing: config.json says quant_method {QUANT_METHOD!r} (a WASQ "
                          f"checkpoint) but its {CONFIG_FILE} is not beside the weights; copy the whole checkpoint "
                          f"directory or re-create it with sfx quantize")


def _check_config(config: PretrainedConfig, info: dict[str, Any], d: Path) -> None:
    """``config.json`` must build the model ``sfx_config.json`` describes."""
    base = info["base_model"]
    want = dict(base["config"])
    if base["architecture"] not in (config.architectures or [base["architecture"]]):
        raise CheckpointError(f"{d / 'config.json'}: architectures {config.architectures} disagree with "
                              f"{CONFIG_FILE} ({base['architecture']}); rewrite it with "
                              f"superfloat.sw.wasq.hf.write_hf_config({str(d)!r})")
    try:
        ref = type(config).from_dict(want).to_dict()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{d / CONFIG_FILE}: field base_model.config is not a valid {config.model_type} "
                              f"config: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    got = config.to_dict()
    for key in sorted(set(ref) | set(got)):
        if key in _CONFIG_IGNORED or key.startswith("_"):
            continue
        if ref.get(key) != got.get(key):
            raise CheckpointError(f"{d / 'config.json'}: {key} is {got.get(key)!r} but {CONFIG_FILE} (the reference, "
                                  f"field base_model.config) says {ref.get(key)!r}; rewrite config.json with "
                                  f"superfloat.sw.wasq.hf.write_hf_config({str(d)!r}) or re-create the checkpoint")


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register ``quant_method "superfloat"`` (:class:`SuperfloatConfig`,
    :class:`SuperfloatHfQuantizer`) with transformers; idempotent. Done on import."""
    for mapping, cls in ((_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, SuperfloatConfig),
                         (_auto.AUTO_QUANTIZER_MAPPING, SuperfloatHfQuantizer)):
        have = mapping.get(QUANT_METHOD)
        if have is cls:
            continue
        if have is not None and (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RuntimeError(f"superfloat: transformers already has a quantization method {QUANT_METHOD!r} "
                               f"({have.__module__}.{have.__qualname__}); cannot register {cls.__qualname__}")
        mapping[QUANT_METHOD] = cls  # (a reloaded module replaces its own earlier class)


register()


# --------------------------------------------------------------------------- config.json


def hf_config(info: dict[str, Any]) -> PretrainedConfig:
    """The ``config.json`` of a checkpoint as a transformers config: ``sfx_config.json``'s
    ``base_model.config`` with its dtype and a :class:`SuperfloatConfig`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    base = info["base_model"]
    cfg_dict = dict(base["config"])
    model_type = cfg_dict.get("model_type") or base.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model type {model_type!r} is unknown to this transformers; cannot write config.json")
    cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
    cfg.architectures = [base["architecture"]]
    cfg.dtype = info.get("dtype", "float32")
    cfg.quantization_config = SuperfloatConfig(quant_config=info["quant_config"]).to_dict()
    return cfg


def write_hf_config(directory: str | os.PathLike) -> Path:
    """Write (or rewrite) ``config.json`` of the WASQ checkpoint in ``directory`` from its
    ``sfx_config.json``, atomically: for checkpoints saved before config.json existed
    (revision 1, or revision 2 before superfloat 0.1's Hugging Face integration) or with a
    hand-edited one. ``sfx_config.json`` and its digests are not touched. Returns the path."""
    d = Path(directory).expanduser()
    info = read_checkpoint_info(d)
    path = d / "config.json"
    part = d / ".config.json.part"
    hf_config(info).to_json_file(str(part), use_diff=True)
    os.replace(part, path)
    return path


# --------------------------------------------------------------------------- quantized models


def attach(model: nn.Module, quantizer: SuperfloatHfQuantizer | None = None) -> nn.Module:
    """Give a quantized transformers model its Hugging Face identity (in place; other modules
    are returned unchanged): ``config.quantization_config`` (:class:`SuperfloatConfig`),
    ``hf_quantizer``, ``is_quantized`` and ``quantization_method`` (as ``from_pretrained`` of a
    quantized model sets them) and a ``save_pretrained`` that writes a
    WASQ checkpoint (:func:`save_pretrained`). Called by ``quantize_``, ``load_checkpoint``
    and ``from_pretrained``."""
    from .quantize import wasq_config_of

    if not isinstance(model, PreTrainedModel):
        return model
    wasq = wasq_config_of(model) or WASQConfig()
    if quantizer is None:
        quantizer = getattr(model, "hf_quantizer", None)
        if not isinstance(quantizer, SuperfloatHfQuantizer):
            quantizer = SuperfloatHfQuantizer(SuperfloatConfig(quant_config=wasq), pre_quantized=True)
    else:
        quantizer.quantization_config.quant_config = wasq.to_dict()
    model.hf_quantizer = quantizer
    model.is_quantized = True  # (what transformers' preprocess_model sets)
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = quantizer.quantization_config
    model.save_pretrained = types.MethodType(save_pretrained, model)
    return model


def save_pretrained(self: PreTrainedModel, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False, max_shard_size: Any = None,
                    variant: str | None = None, token: str | bool | None = None, *, tokenizer: Any = None,
                    **kwargs: Any) -> None:
    """``save_pretrained`` of a quantized model (installed by :func:`attach`): a WASQ checkpoint
    in ``save_directory`` (:func:`~superfloat.sw.wasq.checkpoint.save_checkpoint` with
    ``keep_other_files``: other files there, e.g. a tokenizer, are kept), and with
    ``push_to_hub`` those files uploaded like transformers does. ``tokenizer`` (an extra
    keyword) is saved into the checkpoint. One ``model.safetensors`` whatever
    ``max_shard_size`` says.

    Raises:
        ValueError: a layer without SFx codes (integer baselines, per-group scales, static
            float activation scales), an uncalibrated static layer, NaN/inf weights, or
            options a WASQ checkpoint cannot honour (``state_dict``, ``variant``,
            ``safe_serialization=False``, ``distributed_checkpoint``).
    """
    for key in ("save_peft_format", "save_original_format"):
        kwargs.pop(key, None)
    if state_dict is not None:
        raise ValueError("superfloat: save_pretrained(state_dict=...) is not supported: a WASQ checkpoint is written "
                         "from the model's quantized layers (their codes), not from a state dict")
    if variant is not None:
        raise ValueError(f"superfloat: save_pretrained(variant={variant!r}) is not supported: a WASQ checkpoint has "
                         f"one {WEIGHTS_FILE}")
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("superfloat: a WASQ checkpoint is always safetensors; drop safe_serialization=False")
    if kwargs.pop("distributed_checkpoint", False):
        raise ValueError("superfloat: distributed_checkpoint=True is not supported; save from one process")
    if not is_main_process:
        return None
    d = Path(save_directory).expanduser()
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} is a file, not a directory")
    source = getattr(self.config, "_name_or_path", None) or None
    if not push_to_hub:
        if kwargs:
            raise TypeError(f"superfloat save_pretrained: unexpected keyword argument(s) {', '.join(sorted(kwargs))}")
        save_checkpoint(self, d, tokenizer=tokenizer, overwrite=True, keep_other_files=True, source=source)
        return None
    from transformers.utils import hub as _hub

    commit_message = kwargs.pop("commit_message", None)
    repo_id = kwargs.pop("repo_id", d.name)
    create_pr = kwargs.pop("create_pr", False)
    if token is not None:
        kwargs["token"] = token
    repo_id = _hub.hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id
    files_timestamps = self._get_files_timestamps(d) if d.is_dir() else {}
    save_checkpoint(self, d, tokenizer=tokenizer, overwrite=True, keep_other_files=True, source=source)
    card = _hub.create_and_tag_model_card(repo_id, self.model_tags, token=token)
    card.save(os.path.join(d, "README.md"))
    self._upload_modified_files(d, repo_id, files_timestamps, commit_message=commit_message, token=token,
                                create_pr=create_pr)
    return None



def write_checkpoint_files(model: nn.Module, tmp: Path, info: dict[str, Any]) -> None:
    """``config.json`` (from ``info``, with the ``quantization_config``) and, for a model that
    generates, ``generation_config.json``: what ``from_pretrained`` reads besides the weights
    (a :data:`superfloat.sw.wasq.hooks.CHECKPOINT_FILES` hook of ``save_checkpoint``)."""
    hf_config(info).to_json_file(str(Path(tmp) / HF_CONFIG_FILE), use_diff=True)
    gen = getattr(model, "generation_config", None)
    can = getattr(model, "can_generate", None)
    if gen is not None and callable(can) and can():
        gen.save_pretrained(str(tmp))


hooks.AFTER_QUANTIZE.append(attach)
hooks.CHECKPOINT_FILES.append(write_checkpoint_files)

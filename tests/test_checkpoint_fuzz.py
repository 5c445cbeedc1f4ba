"""Property-based fuzzing of WASQ checkpoint loading (issue 17, SPEC section 7 revision 2).

Small checkpoints of micro models built from a config (GPT-2 with Conv1D, biases, float
scales, static SF8 activations and a tokenizer; Llama with tied embeddings, power-of-two
exponents and dynamic activations) are damaged one way at a time by hypothesis:

* the safetensors header (an entry, a field of an entry, the whole header),
* any field of ``sfx_config.json`` (deleted, or replaced by any JSON value),
* any file (deleted, truncated, a flipped byte, trailing garbage),
* tensor values that no checkpoint may hold (NaN/inf, codes outside ``[0, 2**bits)``,
  a non-zero exponent beside float scales), written with the digests recomputed so that
  the checks behind the SHA-256 are reached.

Property: ``load_checkpoint`` either returns a model that computes exactly the logits
(and exports exactly the codes) of the saved one, or raises ``CheckpointError`` with one
line that names what was damaged (the tensor, the field or the file). Any other
exception, a multi-line message, the loader's last-resort "bug in superfloat" message or
a model that loads but differs fails the test.

``SFX_FUZZ_EXAMPLES`` (default 40) sets the examples per property; the defaults are
derandomized so that the suite is reproducible.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from superfloat.sw.wasq import WASQConfig, calibrate_, quantize_, quantized_layers  # noqa: E402
from superfloat.sw.wasq.checkpoint import (CheckpointError, load_checkpoint, reseal_checkpoint,  # noqa: E402
                                           save_checkpoint)
from superfloat.sw.wasq.models import byte_tokenizer  # noqa: E402

EXAMPLES = int(os.environ.get("SFX_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="SFX_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture], database=None)
IDS = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(1))


def _micro(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=256,
                         eos_token_id=256, pad_token_id=256)
    else:
        cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=True, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if kind == "gpt2":
        quantize_(model, WASQConfig(weight_bits=4, act_bits=8, act_exponent="static"))
        calibrate_(model, [IDS])
    else:
        quantize_(model, WASQConfig(weight_bits=6, act_bits=8, scale_kind="pow2"))
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for kind in ("gpt2", "llama"):
        model = _micro(kind)
        d = tmp_path_factory.mktemp(kind) / "ck"
        save_checkpoint(model, d, tokenizer=byte_tokenizer() if kind == "gpt2" else None)
        with torch.no_grad():
            logits = model(IDS).logits
        codes = {n: l.export().codes.copy() for n, l in quantized_layers(model).items()}
        out[kind] = (d, logits, codes)
    return out


# --------------------------------------------------------------------------- helpers


def _header(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _event(what: str) -> None:
    try:
        event(what)  # --hypothesis-show-statistics: what the examples reached
    except hypothesis.errors.InvalidArgument:  # outside a hypothesis test
        pass


def _check(d: Path, ref, names: set[str]) -> str:
    """The property. Returns what happened ('same' or 'error') for statistics."""
    logits, codes = ref
    try:
        model = load_checkpoint(d)
    except CheckpointError as e:
        msg = str(e)
        assert "\n" not in msg, f"multi-line message: {msg!r}"
        assert "bug in superfloat" not in msg, f"the loader's last resort was reached: {msg}"
        assert any(n in msg for n in names), f"the message names none of {sorted(names)[:6]}: {msg}"
        _event("error: " + re.sub(r"'[^']*'|\S*/\S*|\d+", "_", msg.split("; ")[0])[:70])
        return "error"
    with torch.no_grad():
        out = model(IDS).logits
    assert torch.equal(out, logits), "loaded, but the logits differ from the saved model's"
    got = {n: l.export().codes for n, l in quantized_layers(model).items()}
    assert set(got) == set(codes) and all(np.array_equal(got[n], codes[n]) for n in codes), "the codes differ"
    _event("loads identically")
    return "same"


class _Copy:
    def __init__(self, src: Path) -> None:
        self.src = src

    def __enter__(self) -> Path:
        self.tmp = tempfile.mkdtemp(prefix="sfx-fuzz-")
        d = Path(self.tmp) / "ck"
        shutil.copytree(self.src, d)
        return d

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fuzz(expect: str | None = None):
    """A property test: ``damage(d, src, data)`` damages ``d``, a throwaway copy of the checkpoint
    ``src`` (each kind), drawing from ``data``, and returns the names the load error may name
    (None: nothing to check in this example); then :func:`_check` (which must give ``expect``)."""
    def wrap(damage):
        @FUZZ
        @given(kind=kinds, data=st.data())
        def test(ckpts, kind, data):
            src, *ref = ckpts[kind]
            with _Copy(src) as d:
                named = damage(d, src, data)
                if named is not None:
                    got = _check(d, ref, named)
                    assert expect is None or got == expect, got

        test.__name__, test.__doc__ = damage.__name__, damage.__doc__
        return test
    return wrap


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.integers(-3, 300)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["float32", "channel", "pow2", "static", "dynamic", "sfx", "U8", "F32", "I8"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
kinds = st.sampled_from(["gpt2", "llama"])


# --------------------------------------------------------------------------- properties


@_fuzz()
def test_fuzz_safetensors_header(d, src, data):
    path = d / "model.safetensors"
    header, body = _header(path)
    names = sorted(header)
    what = data.draw(st.sampled_from(["entry", "field", "drop-field", "rename", "whole", "add"]))
    named = {"model.safetensors"}
    if what == "whole":
        header = data.draw(json_values)
    elif what == "add":
        key = data.draw(st.text(min_size=1, max_size=8))
        header[key] = data.draw(json_values)
        named.add(key)
    else:
        name = data.draw(st.sampled_from(names))
        named.add(name)
        if what == "entry":
            header[name] = data.draw(json_values)
        elif what == "rename":
            new = data.draw(st.text(min_size=1, max_size=12))
            header[new] = header.pop(name)
            named.add(new)
        elif isinstance(header[name], dict) and header[name]:
            field = data.draw(st.sampled_from(sorted(header[name])))
            if what == "drop-field":
                del header[name][field]
            else:
                header[name][field] = data.draw(json_values)
    _write_header(path, header, body)
    return named


@_fuzz()
def test_fuzz_sfx_config_fields(d, src, data):
    path = d / "sfx_config.json"
    info = json.loads(path.read_text())
    paths = [p for p in _paths(info) if p]
    p = data.draw(st.sampled_from(paths))
    parent = info
    for k in p[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        del parent[p[-1]]
    else:
        parent[p[-1]] = data.draw(json_values)
    path.write_text(json.dumps(info))
    named = {str(k) for k in p if not isinstance(k, int)}
    if p[0] in ("dtype", "rounding", "activations"):
        named.add("settings")  # their digest part in config_sha256
    return named


@_fuzz()
def test_fuzz_files(d, src, data):
    f = data.draw(st.sampled_from(sorted(p.name for p in d.iterdir())))
    path = d / f
    raw = path.read_bytes()
    what = data.draw(st.sampled_from(["delete", "truncate", "flip", "append"]))
    if what == "delete":
        path.unlink()
    elif what == "truncate":
        path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    elif what == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        bit = data.draw(st.integers(0, 7))
        b = bytearray(raw)
        b[i] ^= 1 << bit
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=64)))
    named = {f}
    if f == "model.safetensors":
        named |= set(_header(src / f)[0])  # or the tensor it damaged
    return named


@_fuzz(expect="error")
def test_fuzz_impossible_tensor_values(d, src, data):
    """Values no checkpoint may hold, written as a deliberate edit (digests recomputed)."""
    from safetensors.torch import load_file, save_file

    info = json.loads((d / "sfx_config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    what = data.draw(st.sampled_from(["nonfinite", "code", "float-exponent", "scale"]))
    layers = info["layers"]
    if what == "nonfinite":
        name = data.draw(st.sampled_from(sorted(k for k, t in tensors.items() if t.dtype.is_floating_point)))
        value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    elif what == "code":
        layer = data.draw(st.sampled_from(sorted(layers)))
        name, bits = f"{layer}.codes", layers[layer]["bits"]
        value = data.draw(st.integers(1 << bits, 255 if bits <= 8 else 65535))
    else:
        fl = sorted(n for n, s in layers.items() if s["scale_kind"] == "float")
        if not fl:
            return None  # (pow2 layers: every int8 exponent and positive scale is a legal edit)
        layer = data.draw(st.sampled_from(fl))
        if what == "float-exponent":
            name, value = f"{layer}.exponent", data.draw(st.integers(-128, 127).filter(bool))
        else:
            name = f"{layer}.scale"
            value = data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -1e-300]))
    t = tensors[name]
    idx = tuple(data.draw(st.integers(0, s - 1)) for s in t.shape)
    t[idx] = value
    save_file(tensors, d / "model.safetensors")
    reseal_checkpoint(d)
    return {name}


def test_fuzz_reference_checkpoints_load_identically(ckpts):
    """The undamaged copies load and match (the property's 'same' branch can be reached)."""
    for kind in ckpts:
        src, *ref = ckpts[kind]
        with _Copy(src) as d:
            assert _check(d, ref, set()) == "same"


"""WASQ checkpoints (SPEC section 7): round trip, atomic writes, and named errors on damage."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from superfloat.sw.wasq import WASQConfig, calibrate_, quantize_, quantized_layers
from superfloat.sw.wasq.checkpoint import CheckpointError, _tensor_digests, load_checkpoint, save_checkpoint
from superfloat.sw.wasq.models import byte_tokenizer, load_model, tiny_model



LAYER = "model.layers.1.self_attn.q_proj"  # a layer of tiny-llama


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 24), generator=g)


def _quantized(arch="tiny-llama", **kw):
    model = tiny_model(arch)
    quantize_(model, WASQConfig(**kw))
    return model


@pytest.mark.parametrize("arch, kw", [
    ("tiny-gpt2", {"weight_bits": 4}),
    ("tiny-opt", {"weight_bits": 12, "scale_kind": "pow2", "act_bits": 8}),
    ("tiny-llama", {"weight_bits": 3, "weight_scale": "tensor", "rounding": "toward_zero", "skip": ()}),
    ("tiny-llama", {"weight_bits": 6, "layer_bits": {"*mlp*": 4}, "scale_kind": "pow2"}),
])
def test_round_trip_same_codes_same_logits(tmp_path, arch, kw):
    model = _quantized(arch, **kw)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    mem = save_checkpoint(model, tmp_path / "ck", tokenizer=byte_tokenizer(), source=arch)
    loaded, tok, info = load_checkpoint(tmp_path / "ck", return_info=True)
    with torch.no_grad():
        out = loaded(ids).logits
    assert torch.equal(out, ref)
    q0, q1 = quantized_layers(model), quantized_layers(loaded)
    assert list(q0) == list(q1)
    for name in q0:
        a, b = q0[name].export(), q1[name].export()
        assert a.bits == b.bits
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.exponent, b.exponent)
        assert (a.scale is None) == (b.scale is None)
        if a.scale is not None:
            np.testing.assert_array_equal(a.scale, b.scale)
    assert tok is not None and tok.decode(tok("to be")["input_ids"]) == "to be"
    assert info["format_version"] == 2 and info["base_model"]["architecture"] == type(model).__name__
    assert mem["model_safetensors_bytes"] == os.path.getsize(tmp_path / "ck" / "model.safetensors")
    assert mem["codes_bytes"] == sum(l.weight.numel() * (1 if l.bits <= 8 else 2) for l in q0.values())
    # saving the loaded model again writes the same tensors
    save_checkpoint(loaded, tmp_path / "ck2")
    t1, t2 = load_file(tmp_path / "ck" / "model.safetensors"), load_file(tmp_path / "ck2" / "model.safetensors")
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_file_layout_follows_spec_7(tmp_path):
    model = _quantized(weight_bits=4, act_bits=8, act_exponent="static")
    calibrate_(model, [_ids()])
    save_checkpoint(model, tmp_path / "ck")
    t = load_file(tmp_path / "ck" / "model.safetensors")
    assert t[f"{LAYER}.codes"].dtype == torch.uint8 and tuple(t[f"{LAYER}.codes"].shape) == (128, 128)
    assert t[f"{LAYER}.exponent"].dtype == torch.int8 and tuple(t[f"{LAYER}.exponent"].shape) == (128,)
    assert t[f"{LAYER}.scale"].dtype == torch.float64
    assert f"{LAYER}.weight" not in t and "model.embed_tokens.weight" in t and "lm_head.weight" not in t
    info = json.loads((tmp_path / "ck" / "sfx_config.json").read_text())
    assert info["layers"][LAYER]["bits"] == 4 and info["rounding"] == "nearest_even"
    assert info["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    e = info["activations"]["static_exponents"][LAYER]
    assert e == quantized_layers(model)[LAYER].static_act_exponent and isinstance(e, int)
    assert info["tool"] == "superfloat" and info["tool_version"]
    loaded = load_checkpoint(tmp_path / "ck")
    assert quantized_layers(loaded)[LAYER].static_act_exponent == e
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)


def test_sf16_codes_are_uint16(tmp_path):
    save_checkpoint(_quantized(weight_bits=16), tmp_path / "ck")
    assert load_file(tmp_path / "ck" / "model.safetensors")[f"{LAYER}.codes"].dtype == torch.uint16
    load_checkpoint(tmp_path / "ck")


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    model = _quantized(weight_bits=4)
    target = tmp_path / "ck"
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no half-written directory left
    monkeypatch.undo()
    save_checkpoint(model, target)
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        save_checkpoint(model, target)
    save_checkpoint(model, target, overwrite=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a WASQ checkpoint; refusing"):
        save_checkpoint(model, other, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "notes"]


def test_save_errors():
    with pytest.raises(ValueError, match="no SFxLinear layers; call quantize_ first"):
        save_checkpoint(tiny_model("tiny-llama"), "/nonexistent/x")
    with pytest.raises(ValueError, match=r"uses method 'int' \(the integer RTN baseline\)"):
        save_checkpoint(_quantized(method="int"), "/nonexistent/x")


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "ck"
    save_checkpoint(_quantized(weight_bits=4), d)
    return d


def _damaged(good, tmp_path, edit_tensors=None, edit_config=None, reseal=True):
    """A copy of ``good`` with its tensors and/or config edited. ``reseal``: the SHA-256 digests are
    recomputed after a tensor edit (a consistent but wrong checkpoint, to reach the checks behind them)."""
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(good, d)
    if edit_tensors:
        t = load_file(d / "model.safetensors")
        edit_tensors(t)
        save_file(t, d / "model.safetensors")
        if reseal:
            info = json.loads((d / "sfx_config.json").read_text())
            info["sha256"] = _tensor_digests(d / "model.safetensors")
            (d / "sfx_config.json").write_text(json.dumps(info))
    if edit_config:
        info = json.loads((d / "sfx_config.json").read_text())
        edit_config(info)
        (d / "sfx_config.json").write_text(json.dumps(info))
    return d


@pytest.mark.parametrize("edit, msg", [
    (lambda t: t.pop(f"{LAYER}.codes"), rf"is missing tensor '{LAYER}\.codes'"),
    (lambda t: t.pop(f"{LAYER}.exponent"), rf"is missing tensor '{LAYER}\.exponent'"),
    (lambda t: t.pop(f"{LAYER}.scale"), rf"is missing tensor '{LAYER}\.scale'"),
    (lambda t: t.pop("model.norm.weight"), r"is missing tensor 'model\.norm\.weight'"),
    (lambda t: t.update({f"{LAYER}.codes": t[f"{LAYER}.codes"][:, :64].contiguous()}),
     rf"tensor '{LAYER}\.codes' has shape \[128, 64\], expected \[128, 128\]"),
    (lambda t: t.update({f"{LAYER}.exponent": torch.zeros(3, dtype=torch.int8)}),
     rf"tensor '{LAYER}\.exponent' has shape \[3\], expected \[128\]"),
    (lambda t: t.update({"model.norm.weight": torch.ones(7)}),
     r"tensor 'model\.norm\.weight' has shape \[7\], the model expects \[128\]"),
    (lambda t: t.update({f"{LAYER}.codes": t[f"{LAYER}.codes"].to(torch.int32)}),
     rf"tensor '{LAYER}\.codes' has dtype int32, expected uint8"),
    (lambda t: t[f"{LAYER}.codes"].__setitem__((5, 7), 16),
     rf"tensor '{LAYER}\.codes' holds codes outside \[0, 2\*\*4\) for SF4: .*1 value\(s\) above, the first 16 at "
     rf"index \(5, 7\)"),
    (lambda t: t[f"{LAYER}.scale"].__setitem__(0, -1.0), rf"tensor '{LAYER}\.scale' must hold positive finite"),
    (lambda t: t.update({"extra.tensor": torch.zeros(2)}), r"unexpected tensor 'extra\.tensor'"),
])
def test_damaged_tensor_errors_name_the_tensor(good_ckpt, tmp_path, edit, msg):
    d = _damaged(good_ckpt, tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(d)


@pytest.mark.parametrize("edit, msg", [
    (lambda c: c.update(format_version=7), r"unknown format_version 7; superfloat .* reads format version\(s\) 1, 2"),
    (lambda c: c.update(format="something"), r"format is 'something', expected 'superfloat-wasq-checkpoint'"),
    (lambda c: c["layers"][LAYER].update(bits=1), rf"layers\['{LAYER}'\]\.bits must be in 2\.\.16"),
    (lambda c: c["layers"].update({"model.nope": dict(c["layers"][LAYER])}), r"layer 'model\.nope' does not exist"),
])
def test_damaged_config_errors(good_ckpt, tmp_path, edit, msg):
    d = _damaged(good_ckpt, tmp_path, edit_config=edit)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(d)


def test_truncated_file_names_the_tensor(good_ckpt, tmp_path):
    d = _damaged(good_ckpt, tmp_path)
    path = d / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated \(\d+ of at least \d+ bytes\): "
                                              r"tensor '[\w.]+' lies beyond the end of the file"):
        load_checkpoint(d)
    with open(path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(CheckpointError, match=r"is truncated: 4 bytes, not even a safetensors header"):
        load_checkpoint(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"is not a WASQ checkpoint: it has no sfx_config\.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "sfx_config.json").write_text('{"format": "superfloat-wasq-checkpoint", "format_')
    with pytest.raises(CheckpointError, match=r"is not valid JSON \(truncated\?\)"):
        load_checkpoint(tmp_path)


def test_load_model_opens_a_checkpoint(tmp_path):
    model = _quantized(weight_bits=5)
    save_checkpoint(model, tmp_path / "ck", tokenizer=byte_tokenizer())
    lm = load_model(str(tmp_path / "ck"))
    assert lm.kind == "checkpoint" and lm.tokenizer is not None
    assert [l.bits for l in quantized_layers(lm.model).values()] == [5] * 28
    with torch.no_grad():
        assert torch.equal(lm.model(_ids()).logits, model(_ids()).logits)

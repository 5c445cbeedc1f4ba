"""WASQ checkpoints (SPEC section 7): round trip, atomic writes, and named errors on damage."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from superfloat.sw.wasq import WASQConfig, calibrate_, quantize_, quantized_layers
from superfloat.sw.wasq.checkpoint import (CheckpointError, _config_digests, _tensor_digests, load_checkpoint,
                                           save_checkpoint)
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
    """A copy of ``good`` with its tensors and/or config edited. ``reseal``: the SHA-256 digests
    (``sha256``, ``config_sha256``) are recomputed after the edit (a consistent but wrong checkpoint,
    to reach the checks behind them)."""
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
        if reseal and "config_sha256" in info:
            info["config_sha256"] = _config_digests(info)
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


# --------------------------------------------------------------------------- format revision 2 (SPEC section 7)


def _edit_config(d, edit):
    info = json.loads((d / "sfx_config.json").read_text())
    edit(info)
    (d / "sfx_config.json").write_text(json.dumps(info))


def _flip_byte(d, tensor, offset=0):
    import struct

    path = d / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    lo = json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[8 + n + lo + offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_rev2_records_a_sha256_of_every_tensor(good_ckpt):
    import hashlib

    info = json.loads((good_ckpt / "sfx_config.json").read_text())
    tensors = load_file(good_ckpt / "model.safetensors")
    assert info["format_version"] == 2 and set(info["sha256"]) == set(tensors)
    t = tensors[f"{LAYER}.codes"].numpy()
    assert info["sha256"][f"{LAYER}.codes"] == hashlib.sha256(t.tobytes()).hexdigest()


@pytest.mark.parametrize("tensor, offset", [(f"{LAYER}.codes", 77), ("model.embed_tokens.weight", 1001),
                                            (f"{LAYER}.exponent", 3)])
def test_flipped_byte_fails_the_sha256_naming_the_tensor(good_ckpt, tmp_path, tensor, offset):
    d = _damaged(good_ckpt, tmp_path)
    _flip_byte(d, tensor, offset)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(tensor)}' fails its SHA-256 "
                                              rf"check \(its bytes, or its digest in field sha256 of sfx_config\.json, changed"):
        load_checkpoint(d)


def test_sha256_field_must_cover_exactly_the_tensors(good_ckpt, tmp_path):
    d = _damaged(good_ckpt, tmp_path, edit_config=lambda c: c["sha256"].pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"field sha256 has no digest for tensor 'model\.norm\.weight'"):
        load_checkpoint(d)
    d2 = _damaged(good_ckpt, tmp_path / "2", edit_config=lambda c: c["sha256"].update({"ghost.weight": "0" * 64}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing tensor .ghost\.weight. \(field sha256 of sfx_config\.json"):
        load_checkpoint(d2)
    d3 = _damaged(good_ckpt, tmp_path / "3", edit_config=lambda c: c["sha256"].update({"model.norm.weight": "xyz"}))
    with pytest.raises(CheckpointError, match=r"field sha256\['model\.norm\.weight'\] must be a SHA-256 hex digest"):
        load_checkpoint(d3)
    d4 = _damaged(good_ckpt, tmp_path / "4", edit_config=lambda c: c.pop("sha256"))
    with pytest.raises(CheckpointError, match=r"field sha256 is missing"):
        load_checkpoint(d4)


def _as_rev1(c):
    c["format_version"] = 1
    c.pop("sha256")
    c.pop("config_sha256")
    c.pop("tokenizer_files", None)
    for spec in c["layers"].values():
        spec.pop("out_bits")
        spec.pop("out_exponent")


def test_revision_1_checkpoints_still_load(good_ckpt, tmp_path):
    d = _damaged(good_ckpt, tmp_path, edit_config=_as_rev1)
    ref = load_checkpoint(good_ckpt)
    model, _, info = load_checkpoint(d, return_info=True)
    assert info["format_version"] == 1
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, ref(_ids()).logits)
    assert quantized_layers(model)[LAYER].out_exponent is None and quantized_layers(model)[LAYER].out_bits is None
    # without digests, the other checks still apply
    d1 = _damaged(good_ckpt, tmp_path / "1", edit_config=_as_rev1,
                  edit_tensors=lambda t: t["model.norm.weight"].__setitem__(5, float("nan")), reseal=False)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' holds 1 NaN/inf value\(s\) \(the first "
                                              r"at index \(5,\)\)"):
        load_checkpoint(d1)


@pytest.mark.parametrize("tensor, index, value", [
    ("model.embed_tokens.weight", (3, 3), float("nan")),
    ("model.norm.weight", (0,), float("inf")),
    (f"{LAYER}.scale", (2,), float("nan")),
])
def test_nan_or_inf_in_a_float_tensor_is_rejected_naming_it(good_ckpt, tmp_path, tensor, index, value):
    d = _damaged(good_ckpt, tmp_path, edit_tensors=lambda t: t[tensor].__setitem__(index, value))  # digests resealed
    msg = (rf"tensor '{re.escape(tensor)}' must hold positive finite scales" if tensor.endswith(".scale") else
           rf"tensor '{re.escape(tensor)}' holds 1 NaN/inf value\(s\) \(the first at index {re.escape(str(index))}\)")
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(d)


def test_save_refuses_nan(tmp_path):
    model = _quantized(weight_bits=4)
    with torch.no_grad():
        model.model.norm.weight[1] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' holds 1 NaN/inf value\(s\); such a checkpoint "
                                         r"would not load"):
        save_checkpoint(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, msg", [
    # bits that contradict the codes: SF4 codes declared SF8 (never a sign bit at bit 7)
    (lambda c: c["layers"][LAYER].update(bits=8), rf"field layers\['{LAYER}'\]\.bits is 8, but no code of tensor "
                                                  rf"'{LAYER}\.codes' has the SF8 sign bit \(bit 7\) set: its codes are "
                                                  rf"4-bit codes"),
    (lambda c: c["layers"][LAYER].update(bits=5), rf"\.bits is 5, but no code .* sign bit \(bit 4\)"),
    (lambda c: c["layers"][LAYER].update(out_features=64), rf"layer '{LAYER}' is \[64, 128\] but the base model's is "
                                                           rf"\[128, 128\]"),
    (lambda c: c["layers"][LAYER].update(act_bits=8, act_exponent="static", act_amax=3.0, act_exponent_value=9),
     rf"act_exponent_value is 9 but act_amax 3\.0 at act_bits 8 gives exponent 2: the two fields contradict"),
    (lambda c: c["layers"][LAYER].update(act_exponent="static"), rf"act_exponent is 'static' but act_bits is null"),
    (lambda c: c["layers"][LAYER].update(bias=True), rf"\.bias is true but the base model's layer has no bias"),
    (lambda c: c["layers"][LAYER].update(out_exponent=True), rf"is missing tensor '{LAYER}\.out_exponent'"),
    (lambda c: c["layers"][LAYER].update(out_bits=17), rf"\.out_bits must be in 2\.\.16"),
])
def test_layer_metadata_is_cross_checked(good_ckpt, tmp_path, edit, msg):
    d = _damaged(good_ckpt, tmp_path, edit_config=edit)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(d)


def test_exponents_of_a_float_scale_layer_must_be_zero(good_ckpt, tmp_path):
    d = _damaged(good_ckpt, tmp_path, edit_tensors=lambda t: t[f"{LAYER}.exponent"].__setitem__(0, 100))
    with pytest.raises(CheckpointError, match=rf"tensor '{LAYER}\.exponent' must be all 0 for a layer with float "
                                              rf"scales .* got 1 non-zero exponent"):
        load_checkpoint(d)


def test_out_exponent_and_out_bits_round_trip(tmp_path):
    model = _quantized(weight_bits=4, act_bits=8)
    layers = quantized_layers(model)
    eo = np.arange(-64, 64, dtype=np.int8)
    layers[LAYER].out_exponent = eo
    layers[LAYER].out_bits = 12
    save_checkpoint(model, tmp_path / "ck")
    t = load_file(tmp_path / "ck" / "model.safetensors")
    assert t[f"{LAYER}.out_exponent"].dtype == torch.int8 and f"model.layers.0.mlp.up_proj.out_exponent" not in t
    info = json.loads((tmp_path / "ck" / "sfx_config.json").read_text())
    assert info["layers"][LAYER]["out_bits"] == 12 and info["layers"][LAYER]["out_exponent"] is True
    assert info["layers"]["model.layers.0.mlp.up_proj"]["out_exponent"] is False
    back = quantized_layers(load_checkpoint(tmp_path / "ck"))
    assert back[LAYER].out_exponent.dtype == np.int8 and np.array_equal(back[LAYER].out_exponent, eo)
    assert back[LAYER].out_bits == 12 and back[LAYER].act_bits == 8 and back[LAYER].act_exponent == "dynamic"
    assert back["model.layers.0.mlp.up_proj"].out_exponent is None
    assert back["model.layers.0.mlp.up_proj"].out_bits is None
    layers[LAYER].out_exponent = np.zeros(5, dtype=np.int8)
    with pytest.raises(ValueError, match=rf"layer {LAYER}: out_exponent must be an integer array of shape \[128\]"):
        save_checkpoint(model, tmp_path / "ck2")
    # an out_exponent tensor the layer list does not announce is unexpected
    layers[LAYER].out_exponent = eo
    save_checkpoint(model, tmp_path / "ck3")
    d = _damaged(tmp_path / "ck3", tmp_path / "x", edit_config=lambda c: c["layers"][LAYER].update(out_exponent=False))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{LAYER}\.out_exponent'"):
        load_checkpoint(d)


# --------------------------------------------------------------------------- missing files


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "ck"
    save_checkpoint(_quantized("tiny-gpt2", weight_bits=4), d, tokenizer=byte_tokenizer(), source="tiny-gpt2")
    return d


@pytest.mark.parametrize("missing, msg", [
    ("tokenizer.json", r"tokenizer file tokenizer\.json is missing \(sfx_config\.json lists tokenizer\.json, "
                       r"tokenizer_config\.json\); copy it from the base model's tokenizer"),
    ("tokenizer_config.json", r"tokenizer file tokenizer_config\.json is missing"),
    ("sfx_config.json", r"sfx_config\.json is missing \(model\.safetensors beside it holds WASQ checkpoint tensors"),
    ("model.safetensors", r"has no model\.safetensors \(nor model\.safetensors\.index\.json\): the checkpoint's "
                          r"tensors are missing"),
])
def test_missing_file_is_named_by_load_model(tok_ckpt, tmp_path, missing, msg):
    d = _damaged(tok_ckpt, tmp_path)
    (d / missing).unlink()
    with pytest.raises(ValueError, match=msg) as ei:
        load_model(str(d))
    assert "\n" not in str(ei.value)


def test_rev1_missing_tokenizer_and_changed_tokenizer(tok_ckpt, tmp_path):
    d = _damaged(tok_ckpt, tmp_path, edit_config=_as_rev1)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"its tokenizer files are missing \(sfx_config\.json says a tokenizer "
                                              r"was saved, but there is no tokenizer\.json / vocab\.json\)"):
        load_checkpoint(d)
    d2 = _damaged(tok_ckpt, tmp_path / "2")
    (d2 / "tokenizer.json").write_text((d2 / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|end|>"'))
    with pytest.raises(CheckpointError, match=r"tokenizer file tokenizer\.json fails its SHA-256 check"):
        load_checkpoint(d2)


def test_checkpoint_without_tokenizer_of_a_tiny_model_gets_the_byte_tokenizer(tmp_path):
    save_checkpoint(_quantized("tiny-gpt2", weight_bits=4), tmp_path / "ck", source="tiny-gpt2")
    lm = load_model(str(tmp_path / "ck"))
    assert lm.tokenizer is not None and lm.tokenizer.decode(lm.tokenizer("ab")["input_ids"]) == "ab"


def test_load_model_names_missing_files_of_a_local_model(tmp_path):
    d = tmp_path / "hf"
    tiny_model("tiny-gpt2").save_pretrained(d)
    with pytest.raises(ValueError, match=r"has no tokenizer files \(tokenizer\.json, tokenizer\.model, vocab\.json"):
        load_model(str(d))
    byte_tokenizer().save_pretrained(d)
    assert load_model(str(d)).kind == "local"
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match=r"is not a model directory: it has no config\.json \(a Hugging Face model\) "
                                         r"nor sfx_config\.json"):
        load_model(str(d))
    e = tmp_path / "empty-weights"
    e.mkdir()
    (e / "config.json").write_text((tmp_path / "hf" / "tokenizer_config.json").read_text())
    with pytest.raises(ValueError, match=r"has a config\.json but no weights"):
        load_model(str(e))


@pytest.mark.parametrize("name, msg", [("tiny-gtp2", r"unknown model 'tiny-gtp2' \(did you mean tiny-gpt2\?\)"),
                                       ("tiny-nosuch", r"unknown model 'tiny-nosuch'.*offline choices: smollm2-135m"),
                                       ("smollm3", r"unknown model 'smollm3' \(did you mean smollm2\?\)")])
def test_unknown_model_names(name, msg):
    with pytest.raises(ValueError, match=msg):
        load_model(name)


# --------------------------------------------------------------------------- leftovers of killed saves


def test_next_save_removes_leftovers_of_interrupted_saves(tmp_path, monkeypatch):
    from superfloat.sw.wasq import checkpoint as ck

    model = _quantized(weight_bits=4)
    target = tmp_path / "ck"
    stale = [tmp_path / ".ck.tmp-0123456789ab", tmp_path / f".ck.old-999999999-{'a' * 12}"]
    for p in stale:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".ck.tmp-{os.getppid()}-{'b' * 12}"  # a save still running in a live process: kept
    alive.mkdir()
    other = tmp_path / f".other.tmp-{'c' * 12}"  # another target's: kept
    other.mkdir()
    assert ck.stale_save_dirs(target) == sorted(stale)
    save_checkpoint(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", alive.name, other.name])
    # leftovers that cannot be removed are reported
    (tmp_path / ".ck.tmp-dddddddddddd").mkdir()
    real = shutil.rmtree

    def rmtree(p, *a, **k):
        if ".tmp-dddd" in str(p):
            raise PermissionError(13, "Permission denied")
        return real(p, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", rmtree)
    with pytest.warns(RuntimeWarning, match=r"could not remove 1 leftover folder\(s\) of an interrupted save beside "
                                            r".*\.ck\.tmp-dddddddddddd \(Permission denied\); remove them by hand"):
        save_checkpoint(model, target, overwrite=True)
    load_checkpoint(target)


_KILL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
import safetensors.torch as st
from superfloat.sw.wasq import WASQConfig, quantize_
from superfloat.sw.wasq import checkpoint as ck
from superfloat.sw.wasq.models import tiny_model

target, where, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
model = tiny_model("tiny-llama")
quantize_(model, WASQConfig(weight_bits=4))
if where == "between-renames":
    ck.save_checkpoint(model, target)
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if Path(src) == target:  # the old checkpoint moved aside, the new one not yet in place
            ready.write_text("x"); time.sleep(120)
    ck.os.replace = replace
else:
    real = st.save_file
    def save_file(*a, **k):
        real(*a, **k)
        ready.write_text("x"); time.sleep(120)
    st.save_file = save_file
ck.save_checkpoint(model, target, overwrite=True)
"""


@pytest.mark.parametrize("where", ["writing", "between-renames"])
def test_a_save_killed_by_sigkill_leaves_nothing_after_the_next_save(tmp_path, where):
    import signal
    import subprocess
    import sys
    import time

    target, ready = tmp_path / "ck", tmp_path.parent / f"{tmp_path.name}.ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target), where, str(ready)])
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert proc.poll() is None, f"the saving process ended early (status {proc.returncode})"
            assert time.monotonic() - t0 < 120, "the saving process never reached the kill point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from superfloat.sw.wasq.checkpoint import stale_save_dirs

    left = stale_save_dirs(target)
    kinds = [".tmp-"] if where == "writing" else [".old-", ".tmp-"]  # between renames: the old one and the new one
    assert [k for k in kinds if any(k in p.name for p in left)] == kinds and len(left) == len(kinds)
    assert all(f"-{proc.pid}-" in p.name for p in left)
    if where == "between-renames":
        assert not target.exists()
        with pytest.raises(CheckpointError, match=r"a save to it was interrupted between its two renames; the previous "
                                                  r"checkpoint is .*\.ck\.old-.*: rename it to"):
            load_checkpoint(target)
        from superfloat.sw.wasq import load_model

        with pytest.raises(CheckpointError, match=r"interrupted between its two renames; the previous checkpoint"):
            load_model(str(target))  # what sfx eval / generate call: the same message, not 'no such model'
    else:
        assert not target.exists()
    model = _quantized(weight_bits=4)
    save_checkpoint(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    load_checkpoint(target)


@pytest.mark.parametrize("edit, part", [
    (lambda c: c["layers"][LAYER].update(act_bits=6), f"layers['{LAYER}']"),
    (lambda c: c["layers"][LAYER].update(rounding="toward_zero"), f"layers['{LAYER}']"),
    (lambda c: c["base_model"]["config"].update(rms_norm_eps=1e-3), "base_model"),
    (lambda c: c["quant_config"].update(weight_bits=6), "quant_config"),
    (lambda c: c.update(dtype="float64"), "settings"),
])
def test_a_config_edit_that_changes_the_model_fails_its_digest(good_ckpt, tmp_path, edit, part):
    d = _damaged(good_ckpt, tmp_path, edit_config=edit, reseal=False)
    with pytest.raises(CheckpointError, match=rf"sfx_config\.json: field {re.escape(part)} was changed since the save "
                                              rf"\(it fails its SHA-256 in field config_sha256\); .* or delete field "
                                              rf"config_sha256 to accept a deliberate edit"):
        load_checkpoint(d)
    # informational fields are not covered; deleting config_sha256 accepts a deliberate edit
    load_checkpoint(_damaged(good_ckpt, tmp_path / "note", edit_config=lambda c: c["base_model"].update(note="mine"),
                             reseal=False))
    _edit_config(d, lambda c: c.pop("config_sha256"))
    load_checkpoint(d)


def test_uncalibrated_static_layers_are_refused(good_ckpt, tmp_path):
    with pytest.raises(ValueError, match=rf"layer model\.layers\.0\.self_attn\.q_proj: the static activation exponent is "
                                         rf"not calibrated; run "
                                         rf"superfloat\.sw\.wasq\.calibrate_"):
        save_checkpoint(_quantized(weight_bits=4, act_bits=8, act_exponent="static"), tmp_path / "ck")
    d = _damaged(good_ckpt, tmp_path, edit_config=lambda c: c["layers"][LAYER].update(act_bits=8, act_exponent="static"))
    with pytest.raises(CheckpointError, match=rf"act_amax is null but act_exponent is 'static': the layer was never "
                                              rf"calibrated"):
        load_checkpoint(d)

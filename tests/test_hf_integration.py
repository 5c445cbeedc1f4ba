"""Hugging Face integration (superfloat.sw.wasq.hf, docs/huggingface.md): a WASQ checkpoint loads
with ``AutoModelForCausalLM.from_pretrained`` (identical logits to ``load_checkpoint``), a quantized
model's ``save_pretrained`` / ``push_to_hub`` write WASQ checkpoints (never float weights), offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from superfloat.sw.wasq import SFxLinear, WASQConfig, calibrate_, quantize_, quantized_layers
from superfloat.sw.wasq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from superfloat.sw.wasq.hf import QUANT_METHOD, SuperfloatConfig, write_hf_config
from superfloat.sw.wasq.models import byte_tokenizer, tiny_model

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
LLAMA_LAYER = "model.layers.1.self_attn.q_proj"


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _quantized(arch, **kw):
    model = tiny_model(arch)
    quantize_(model, WASQConfig(**kw))
    return model


def _same_layers(a, b):
    qa, qb = quantized_layers(a), quantized_layers(b)
    assert list(qa) == list(qb)
    for name in qa:
        la, lb = qa[name], qb[name]
        assert isinstance(lb, SFxLinear)
        ea, eb = la.export(), lb.export()
        assert ea.bits == eb.bits and np.array_equal(ea.codes, eb.codes) and np.array_equal(ea.exponent, eb.exponent)
        assert (la.act_bits, la.act_exponent, la.act_amax, la.out_bits) == (lb.act_bits, lb.act_exponent, lb.act_amax,
                                                                             lb.out_bits)
        assert (la.out_exponent is None) == (lb.out_exponent is None)
        if la.out_exponent is not None:
            assert lb.out_exponent.dtype == np.int8 and np.array_equal(la.out_exponent, lb.out_exponent)


@pytest.mark.parametrize("arch, kw", [
    ("tiny-gpt2", {"weight_bits": 4}),
    ("tiny-opt", {"weight_bits": 12, "scale_kind": "pow2", "act_bits": 8}),
    ("tiny-llama", {"weight_bits": 6, "scale_kind": "pow2", "act_bits": 8, "act_exponent": "static"}),
])
def test_from_pretrained_equals_load_checkpoint(tmp_path, arch, kw):
    model = _quantized(arch, **kw)
    if kw.get("act_exponent") == "static":
        calibrate_(model, [IDS])
    if arch == "tiny-llama":  # static output exponents (rev. 2) must come back too
        layer = quantized_layers(model)[LLAMA_LAYER]
        layer.out_exponent, layer.out_bits = np.arange(-64, 64, dtype=np.int8), 12
    ck = tmp_path / "ck"
    save_checkpoint(model, ck, tokenizer=byte_tokenizer())
    hf = json.loads((ck / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == QUANT_METHOD == "superfloat"
    assert hf["architectures"] == [type(model).__name__]
    ref = load_checkpoint(ck)
    got = AutoModelForCausalLM.from_pretrained(ck)
    assert type(got) is type(model) and got.is_quantized and not got.training
    assert isinstance(got.config.quantization_config, SuperfloatConfig)
    assert torch.equal(_logits(got), _logits(ref))
    assert torch.equal(_logits(got), _logits(model))
    _same_layers(ref, got)
    _same_layers(model, got)
    if arch == "tiny-gpt2":
        with pytest.warns(UserWarning, match=r"loads in the dtype it was saved in \(float32\), not bfloat16"):
            again = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16)
        assert torch.equal(_logits(again), _logits(ref))


def test_save_pretrained_of_a_quantized_model_writes_a_wasq_checkpoint(tmp_path):
    model = _quantized("tiny-gpt2", weight_bits=4, scale_kind="pow2")
    assert model.is_quantized and model.quantization_method == "superfloat"
    assert model.config.quantization_config.quant_config["weight_bits"] == 4
    ref = _logits(model)
    model.save_pretrained(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "sfx_config.json"]
    t = load_file(tmp_path / "a" / "model.safetensors")
    assert "transformer.h.0.attn.c_attn.codes" in t and "transformer.h.0.attn.c_attn.weight" not in t  # no float
    assert torch.equal(_logits(load_checkpoint(tmp_path / "a")), ref)
    # the model from_pretrained returns saves again, the same tensors
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    back.save_pretrained(tmp_path / "b")
    t2 = load_file(tmp_path / "b" / "model.safetensors")
    assert set(t) == set(t2) and all(torch.equal(t[k], t2[k]) for k in t)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b")), ref)
    # load_checkpoint's model too
    load_checkpoint(tmp_path / "a").save_pretrained(tmp_path / "c")
    assert torch.equal(_logits(load_checkpoint(tmp_path / "c")), ref)


def test_save_pretrained_keeps_other_files_and_drops_old_weights(tmp_path):
    d = tmp_path / "out"
    byte_tokenizer().save_pretrained(d)  # the usual order: tokenizer first, into the same directory
    (d / "pytorch_model.bin").write_bytes(b"stale float weights")
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("kept")
    model = _quantized("tiny-llama", weight_bits=8)
    model.save_pretrained(d, tokenizer=None)
    names = {p.name for p in d.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "notes", "sfx_config.json", "config.json"} <= names
    assert "pytorch_model.bin" not in names and (d / "notes" / "a.txt").read_text() == "kept"
    model.save_pretrained(d)  # again: replaces the checkpoint, keeps the rest
    assert (d / "tokenizer.json").is_file() and (d / "notes" / "a.txt").is_file()
    assert torch.equal(_logits(load_checkpoint(d)), _logits(model))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(d)
    assert tok.decode(tok("to be")["input_ids"]) == "to be"


def test_save_pretrained_never_writes_float_weights(tmp_path):
    model = _quantized("tiny-llama", weight_bits=4, codes="int")
    with pytest.raises(ValueError, match=r"uses method 'int' \(the integer RTN baseline\), which has no SFx codes"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model = _quantized("tiny-llama", weight_bits=4)
    with pytest.raises(ValueError, match=r"save_pretrained\(state_dict=\.\.\.\) is not supported"):
        model.save_pretrained(tmp_path / "y", state_dict=model.state_dict())
    with pytest.raises(ValueError, match=r"variant='fp16'\) is not supported: a WASQ checkpoint has one"):
        model.save_pretrained(tmp_path / "y", variant="fp16")
    with pytest.raises(RuntimeError, match=r"transformers' own save_pretrained would write the float shadow weights"):
        PreTrainedModel.save_pretrained(model, tmp_path / "z")  # the class method, bypassing ours
    assert not (tmp_path / "z" / "model.safetensors").exists() and not (tmp_path / "y").exists()
    import io  # a pickled model loses the bound save_pretrained, keeps the quantizer: still no float weights

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with pytest.raises(RuntimeError, match=r"own save_pretrained would write the float shadow weights"):
        torch.load(buf, weights_only=False).save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p" / "model.safetensors").exists()
    model.save_pretrained(tmp_path / "w", is_main_process=False)  # other ranks write nothing
    assert not (tmp_path / "w").exists()


def test_config_json_is_checked_against_sfx_config(tmp_path):
    model = _quantized("tiny-gpt2", weight_bits=6)
    save_checkpoint(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 0.1  # same shapes, other logits: must not load silently
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: layer_norm_epsilon is 0\.1 but sfx_config\.json "
                                              r"\(the reference, field base_model\.config\) says 1e-05"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    write_hf_config(tmp_path / "ck")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), _logits(model))
    (tmp_path / "ck" / "sfx_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"sfx_config\.json is missing: config\.json says quant_method "
                                              r"'superfloat' \(a WASQ checkpoint\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


def test_older_checkpoint_without_config_json(tmp_path):
    model = _quantized("tiny-opt", weight_bits=8)
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()  # as saved before the integration
    with pytest.raises(Exception, match=r"config\.json|model_type"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    write_hf_config(tmp_path / "ck")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), _logits(model))
    assert torch.equal(_logits(load_checkpoint(tmp_path / "ck")), _logits(model))  # digests untouched


def test_quantize_while_loading_a_float_model(tmp_path):
    float_model = tiny_model("tiny-llama")
    float_model.save_pretrained(tmp_path / "float")
    assert not (tmp_path / "float" / "sfx_config.json").exists()  # a float model saves as float
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=SuperfloatConfig(weight_bits=6))
    want = _quantized("tiny-llama", weight_bits=6)
    assert torch.equal(_logits(got), _logits(want))
    _same_layers(want, got)
    got.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(load_checkpoint(tmp_path / "q")), _logits(want))
    with pytest.raises(ValueError, match=r"method 'awq' needs calibration data, which from_pretrained cannot give"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                             quantization_config=SuperfloatConfig(weight_bits=4, act_bits=8,
                                                                                  method="awq"))
    with pytest.raises(ValueError, match=r"give either quant_config or WASQConfig keywords \(weight_bits\)"):
        SuperfloatConfig({"weight_bits": 4}, weight_bits=4)


class _FakeHub:
    """What push_to_hub calls on the hub, recorded offline: the repository and the uploaded files."""

    def __init__(self, store: Path) -> None:
        self.store, self.repos = store, []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return type("Repo", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            dst = self.store / op.path_in_repo
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, dst)
        return "commit"

    def create_branch(self, **kwargs):
        pass


def test_push_to_hub_uploads_the_wasq_checkpoint_offline(tmp_path, monkeypatch):
    from transformers.utils import hub

    fake = _FakeHub(tmp_path / "uploaded")
    monkeypatch.setattr(hub, "hf_api", lambda: fake)
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda repo_id, tags=None, token=None: __import__("huggingface_hub").ModelCard("---\n---\n# m\n"))
    model = _quantized("tiny-llama", weight_bits=5, scale_kind="pow2")
    ref = _logits(model)
    model.push_to_hub("me/sf5")
    up = tmp_path / "uploaded"
    assert fake.repos == ["me/sf5"]
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                    "model.safetensors", "sfx_config.json"]
    assert torch.equal(_logits(load_checkpoint(up)), ref)
    # save_pretrained(push_to_hub=True) uploads what it wrote
    shutil.rmtree(up)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/sf5b")
    assert fake.repos[-1] == "me/sf5b" and (up / "sfx_config.json").is_file() and (up / "model.safetensors").is_file()
    # a hub download (the cache layout, offline) loads by repository id
    snap = tmp_path / "cache" / "models--me--sf5b" / "snapshots" / ("0" * 40)
    shutil.copytree(up, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    got = AutoModelForCausalLM.from_pretrained("me/sf5b", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(_logits(got), ref)


def test_docs_example_runs():
    import doctest
    import re

    path = Path(__file__).resolve().parent.parent / "docs" / "huggingface.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, path.name, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_importing_wasq_after_transformers_registers_the_quantizer():
    import subprocess
    import sys

    code = ("import transformers, superfloat.sw.wasq\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "assert 'superfloat' in AUTO_QUANTIZER_MAPPING\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0

"""WASQ methods (sw/wasq/methods.py): vanilla, fpm, opt, fasteropt, lth on tiny models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from superfloat.sw.wasq import methods
from superfloat.sw.wasq.checkpoint import load_checkpoint, save_checkpoint
from superfloat.sw.wasq.config import WASQConfig
from superfloat.sw.wasq.models import tiny_model
from superfloat.sw.wasq.quantize import quantize_, quantized_layers
from superfloat.sw.wasq.train import TrainConfig, evaluate_loss, make_blocks



def _blocks(n_blocks=4, context=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(32, 127, (41,), generator=g)
    ids = base.repeat(n_blocks * context // 41 + 2)[: n_blocks * context]
    return make_blocks(ids, context, 0)


CFG4 = WASQConfig(weight_bits=4)


def _fast(**kw):
    base = dict(epochs=2, lr=3e-3, scheduler="constant", progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch, method", [(a, m) for a in ("tiny-gpt2", "tiny-opt", "tiny-llama")
                                          for m in ("fpm", "opt", "fasteropt")]
                         + [("tiny-llama", "vanilla"), ("tiny-llama", "lth")])
def test_every_method_runs(arch, method):
    blocks = _blocks()
    model = tiny_model(arch)
    kw = {"rounds": 1, "prune": 0.3} if method == "lth" else {}
    res = methods.run_method(method, model, blocks, CFG4, _fast(), **kw)
    assert res.method == method and res.model is model and quantized_layers(model)
    if method == "vanilla":
        assert res.train is None
        return
    assert res.train.steps == 8 and res.train.last_loss < res.train.first_loss
    if method in ("opt", "fasteropt"):
        n = len(quantized_layers(model))
        assert len(res.trained_layers) == -(-n // 4)  # ceil(0.25 n)


def test_fpm_trains_every_parameter_and_exports_the_grid(tmp_path):
    model = tiny_model("tiny-llama")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    res = methods.fpm(model, _blocks(), CFG4, _fast(epochs=1))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert res.train.trainable_params == sum(p.numel() for p in model.parameters())
    # the saved checkpoint holds the weights re-projected onto the SFx grid of the trained weights
    save_checkpoint(model, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    for name, layer in quantized_layers(model).items():
        torch.testing.assert_close(quantized_layers(back)[name].weight.detach(), layer.qweight(), rtol=0, atol=1e-7)
    ids = _blocks().input_ids[:1]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_opt_trains_only_the_chosen_layers():
    model = tiny_model("tiny-opt")
    ref = quantize_(copy.deepcopy(model), CFG4)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    chosen = ["model.decoder.layers.2.fc1", "model.decoder.layers.3.self_attn.v_proj"]
    res = methods.opt(model, _blocks(), CFG4, _fast(), layers=chosen)
    assert res.trained_layers == chosen
    after = model.state_dict()
    for k, v in before.items():
        trained = any(k.startswith(c + ".") for c in chosen)
        assert torch.equal(after[k], v) != trained, k  # chosen ones moved, everything else is bit for bit the same


def test_opt_uses_the_analysis_ranking():
    blocks = _blocks()
    model = tiny_model("tiny-llama")
    res = methods.opt(model, blocks, CFG4, _fast(max_steps=1), fraction=0.1)
    an = res.extra["analysis"]
    ranked = [s.layer for s in an.ranked()]
    assert res.trained_layers == ranked[: len(res.trained_layers)] and len(res.trained_layers) == 3
    res2 = methods.opt(tiny_model("tiny-llama"), blocks, CFG4, _fast(max_steps=1), analysis=an, fraction="cluster")
    assert res2.trained_layers == an.critical()
    with pytest.raises(ValueError, match="is not a quantized layer of this model"):
        methods.opt(tiny_model("tiny-llama"), blocks, CFG4, _fast(), layers=["model.embed_tokens"])
    with pytest.raises(ValueError, match="the list of layers to train is empty"):
        methods.opt(tiny_model("tiny-llama"), blocks, CFG4, _fast(), layers=[])


@pytest.mark.parametrize("arch, layers, first", [
    ("tiny-llama", ["model.layers.2.mlp.down_proj", "model.layers.3.self_attn.q_proj"], 2),
    ("tiny-gpt2", ["transformer.h.3.mlp.c_fc"], 3),
])
def test_fasteropt_equals_opt_bit_for_bit(arch, layers, first):
    """Same trained layers, same data, same batch shapes: the cached prefix outputs are the
    very tensors opt recomputes each step, so the results are identical (CPU)."""
    blocks = _blocks(n_blocks=5)
    cfg = _fast(epochs=3, batch_size=2)
    a, b = tiny_model(arch), tiny_model(arch)
    ra = methods.opt(a, blocks, CFG4, cfg, layers=layers)
    rb = methods.fasteropt(b, blocks, CFG4, cfg, layers=layers)
    assert rb.extra["first_trained_block"] == first and rb.extra["cache_seconds"] > 0
    assert ra.train.losses == rb.train.losses
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    # the prefix blocks are back in place afterwards
    assert type(methods.decoder_blocks(b)[1][0]).__name__ == type(methods.decoder_blocks(a)[1][0]).__name__


def test_lth_masks_stay_zero_through_qat_and_export(tmp_path):
    model = tiny_model("tiny-llama")
    blocks = _blocks()
    evals = []
    res = methods.lth(model, blocks, CFG4, _fast(epochs=1), rounds=2, prune=0.3,
                      eval_fn=lambda m: evals.append(evaluate_loss(m, blocks)[0]) or evals[-1])
    rounds = res.extra["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and len(evals) == 3
    assert rounds[0]["sparsity"] == 0.0
    assert rounds[1]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert rounds[2]["sparsity"] == pytest.approx(1 - 0.7 ** 2, abs=0.01)
    masks = res.extra["masks"]
    save_checkpoint(model, tmp_path / "ck")
    back = quantized_layers(load_checkpoint(tmp_path / "ck"))
    for name, layer in quantized_layers(model).items():
        dead = ~masks[name]
        assert dead.any()
        assert bool((layer.weight.detach()[dead] == 0).all()), name          # shadow weights
        assert bool((layer.qweight()[dead] == 0).all()), name                # the QAT forward's grid
        codes = layer.export().codes
        assert bool(np.all(codes[dead.numpy()] == 0)), name                  # exported SFx codes: canonical zero
        assert bool((back[name].weight.detach()[dead] == 0).all()), name     # reloaded checkpoint


def test_lth_resume_continues_the_rounds(tmp_path):
    blocks = _blocks()
    cfg = _fast(epochs=1)
    full = tiny_model("tiny-llama")
    ra = methods.lth(full, blocks, CFG4, cfg, rounds=1, prune=0.3, state_dir=tmp_path / "a")
    part = tiny_model("tiny-llama")

    class Stop(Exception):
        pass

    calls = []

    def stop(step, loss):
        calls.append(step)
        if len(calls) == 6:  # round 0 has 4 steps: stop in the middle of round 1
            raise Stop

    with pytest.raises(Stop):
        methods.lth(part, blocks, CFG4, TrainConfig(**{**cfg.to_dict(), "save_every": 1}), rounds=1, prune=0.3,
                    state_dir=tmp_path / "b", callback=stop)
    again = tiny_model("tiny-llama")
    rb = methods.lth(again, blocks, CFG4, TrainConfig(**{**cfg.to_dict(), "save_every": 1}), rounds=1, prune=0.3,
                     state_dir=tmp_path / "b", resume=True)
    assert [r["sparsity"] for r in rb.extra["rounds"]] == [r["sparsity"] for r in ra.extra["rounds"]]
    for (k, x), (_, y) in zip(full.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("kwargs, msg", [
    ({"rounds": -1}, "lth: rounds must be an int >= 0"),
    ({"prune": 1.0}, r"lth: prune must be a fraction in \(0, 1\)"),
])
def test_lth_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        methods.lth(tiny_model("tiny-llama"), _blocks(), CFG4, _fast(), **kwargs)


def test_method_errors():
    m = quantize_(tiny_model("tiny-llama"), CFG4)
    with pytest.raises(ValueError, match="fpm: the model is already quantized; pass the float model"):
        methods.fpm(m, _blocks(), CFG4)
    with pytest.raises(ValueError, match="method must be one of vanilla, fpm, opt, fasteropt, lth, got 'gptq'"):
        methods.run_method("gptq", tiny_model("tiny-llama"), _blocks(), CFG4)
    with pytest.raises(ValueError, match="method 'fpm' trains: it needs calibration blocks"):
        methods.run_method("fpm", tiny_model("tiny-llama"), None, CFG4)
    with pytest.raises(ValueError, match="cannot find the transformer blocks"):
        methods.decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))

"""Rotations (sw/wasq/ptq/rotation.py): Hadamard construction, the rotated float model computes
the same function (tiny Llama, SmolLM2's first blocks), the pipeline's presets, the online
host rotation on both backends, errors."""
from __future__ import annotations

import copy

import pytest
import torch

from superfloat.sw.wasq import WASQConfig, quantize_, quantize_report, quantized_layers
from superfloat.sw.wasq.models import tiny_model
from superfloat.sw.wasq.ptq import Calibration
from superfloat.sw.wasq.ptq.rotation import (OnlineRotation, hadamard, hadamard_factors, make_rotation,
                                             online_rotations, restore_online_rotations, rotate_)
from superfloat.sw.wasq.quantize import candidate_layers


@pytest.mark.parametrize("n, factors", [(12, [12]), (20, [20]), (48, [12, 4]), (128, [128]), (352, [44, 8]),
                                        (576, [12, 12, 4]), (1536, [12, 128])])
def test_hadamard_matrices_exact(n, factors):
    assert hadamard_factors(n) == factors
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_rotations_orthogonal_deterministic_and_fallback():
    for n, kind in ((576, "hadamard"), (9, "hadamard"), (18, "hadamard"), (40, "random")):
        r = make_rotation(n, kind, seed=3)
        q = r.matrix()
        assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
        x = torch.randn(7, n, dtype=torch.float64)
        assert torch.allclose(r.apply(x), x @ q, atol=1e-12)
        assert torch.equal(make_rotation(n, kind, seed=3).matrix(), q)
        assert not torch.equal(make_rotation(n, kind, seed=4).matrix(), q)
    assert make_rotation(576).label == "randomized Hadamard 12 x 12 x 4"
    assert make_rotation(18).label == "randomized Hadamard 2 x random orthogonal 9 (no Hadamard of order 18)"
    assert make_rotation(576).matrix().abs().max() == pytest.approx(576 ** -0.5)  # every channel spread evenly
    assert hadamard_factors(9) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order 9"):
        hadamard(9)
    with pytest.raises(ValueError, match="rotation kind must be one of 'hadamard', 'random'"):
        make_rotation(8, "givens")


def _model():
    m = tiny_model("tiny-llama")
    with torch.no_grad():  # non-trivial norm scales and outlier channels
        for name, mod in m.named_modules():
            if "norm" in name and getattr(mod, "weight", None) is not None:
                mod.weight.mul_(0.5 + torch.rand(mod.weight.shape, generator=torch.Generator().manual_seed(1)))
                mod.weight[::37] *= 20.0
    return m


def _batches(n=4, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("kind, online, heads", [("hadamard", "host", True), ("hadamard", "none", False),
                                                 ("random", "host", True)])
def test_rotated_tiny_llama_computes_the_same_function(kind, online, heads):
    m = _model()
    ids = torch.cat(_batches(2, 40, seed=3))
    with torch.no_grad():
        ref = m(ids).logits
    rep = rotate_(m, kind=kind, online=online, heads=heads)
    with torch.no_grad():
        out = m(ids).logits
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), float((out - ref).abs().max())
    assert rep["untied"] and m.lm_head.weight is not m.model.embed_tokens.weight
    assert m.config.tie_word_embeddings is False
    assert all(bool((mod.weight == 1).all()) for n, mod in m.named_modules() if n.endswith("norm"))
    assert (len(online_rotations(m)) == 4) == (online == "host")
    assert (rep["heads"] is not None) == heads
    # the rotation really changed the weights the accelerator gets
    assert not torch.allclose(m.model.layers[0].self_attn.q_proj.weight, _model().model.layers[0].self_attn.q_proj.weight)


def test_rotated_smollm2_first_blocks_compute_the_same_function():
    from wasq_helpers import smollm2_first_blocks

    lm, ids = smollm2_first_blocks(2)
    m = lm.model
    with torch.no_grad():
        ref = m(ids).logits
    rep = rotate_(m)
    assert (rep["residual"], rep["down"], rep["heads"]) == ("randomized Hadamard 12 x 12 x 4",
                                                            "randomized Hadamard 12 x 128", "randomized Hadamard 64")
    with torch.no_grad():
        out = m(ids).logits
    assert float((out - ref).abs().max()) < 1e-3 * float(ref.abs().max())


def test_rotate_presets_lower_the_w4a4_error_and_run_on_the_accelerator():
    from superfloat.sw.wasq.accelerator import accelerator_stats, calibrate_outputs_, set_backend

    m0 = _model()
    ids = torch.cat(_batches(2, 40, seed=5))
    with torch.no_grad():
        ref = m0(ids).logits
    err, models = {}, {}
    for method, a in (("rtn", 4), ("rotate", 4), ("rotate", None), ("rotate-gptq", None), ("rotate-gptq", 4)):
        m = copy.deepcopy(m0)
        quantize_(m, WASQConfig(weight_bits=4, act_bits=a, method=method), calibration=_batches(8))
        with torch.no_grad():
            err[method, a] = float((m(ids).logits - ref).pow(2).mean())
        models[method, a] = m
    assert err["rotate", 4] < 0.8 * err["rtn", 4], err  # rotation: 4-bit activations
    assert err["rotate-gptq", None] < 0.8 * err["rotate", None], err  # GPTQ: 4-bit weights
    # (at A4 the accelerator's 16-bit outputs flip some 4-bit roundings of the next layer, so the two
    # backends differ by about as much as each differs from float; weight-only they agree closely)
    m = models["rotate-gptq", None]
    rep = quantize_report(m)
    assert rep.groups["_rotation"]["online_layers"] == 4 and "rotation" in rep.seconds
    # the host rotation survives the conversion to SFxLinear and runs in front of both backends
    down = m.model.layers[0].mlp.down_proj
    assert type(down).__name__ == "SFxLinear" and isinstance(down.online_rotation, OnlineRotation)
    assert len(quantized_layers(m)) == 28  # the rotation is no quantized layer: it is host float
    with torch.no_grad():
        fake = m(ids).logits
    calibrate_outputs_(m, _batches(2, 48, seed=9))
    set_backend(m, "accelerator")
    seen = []
    h = down.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        acc = m(ids).logits
    h.remove()
    assert accelerator_stats(m)["rows"] > 0
    assert float((acc - fake).pow(2).mean()) < 1e-4 * float(fake.pow(2).mean())
    assert len(seen) == 1 and seen[0].shape[-1] == 352
    # a state dict carries the rotation: restore it onto a freshly converted copy
    state = m.state_dict()
    assert any(".online_rotation.factor0" in k for k in state)
    bare = copy.deepcopy(m)
    for name in online_rotations(bare):
        mod = bare.get_submodule(name)
        mod._superfloat_online_rotation.remove()
        del mod.online_rotation
    assert restore_online_rotations(bare, state) == sorted(online_rotations(m))


def test_rotation_errors():
    with pytest.raises(ValueError, match="rotations support Llama-style models with RMSNorm"):
        rotate_(tiny_model("tiny-opt"))
    m = _model()
    with pytest.raises(ValueError, match="online rotation must be one of 'host', 'none'"):
        rotate_(m, online="fpga")
    calib = Calibration.collect(m, _batches(2), list(candidate_layers(m, WASQConfig())))
    with pytest.raises(ValueError, match="rotates the model before calibrating it: pass token batches"):
        quantize_(m, WASQConfig(weight_bits=4, method="rotate-gptq"), calibration=calib)
    with pytest.raises(ValueError, match="method option rotate must be one of 'hadamard', 'random'"):
        WASQConfig(weight_bits=4, method="gptq", method_options={"rotate": "givens"}).options


def test_rotated_checkpoint_with_host_rotation_round_trips_on_both_backends(tmp_path):
    """``--method rotate-gptq`` with the default host rotation: the checkpoint stores the rotation's
    factors (aliases: every down_proj shares them) and the loader re-attaches them."""
    import json

    from superfloat.sw.wasq.accelerator import calibrate_outputs_, set_backend
    from superfloat.sw.wasq.checkpoint import CheckpointError, load_checkpoint, reseal_checkpoint, save_checkpoint

    m = _model()
    quantize_(m, WASQConfig(weight_bits=4, method="rotate-gptq"), calibration=_batches(2))
    calibrate_outputs_(m, _batches(2, 48, seed=9))
    save_checkpoint(m, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    assert sorted(online_rotations(back)) == sorted(online_rotations(m)) and len(online_rotations(back)) == 4
    ids = torch.cat(_batches(2, 40, seed=5))
    for backend in ("fake", "accelerator"):
        set_backend(m, backend)
        set_backend(back, backend)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, m(ids).logits), backend
    from transformers import AutoModelForCausalLM  # the Hugging Face path loads the same way

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    set_backend(m, "fake")
    set_backend(back, "fake")
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, m(ids).logits)
    # without the rotation the loaded model would compute another function
    down = back.model.layers[1].mlp.down_proj
    down._superfloat_online_rotation.remove()
    with torch.no_grad():
        assert not torch.equal(back(ids).logits, m(ids).logits)
    # a damaged rotation (one of its buffers gone) is named
    cfg = tmp_path / "ck" / "sfx_config.json"
    info = json.loads(cfg.read_text())
    del info["aliases"]["model.layers.1.mlp.down_proj.online_rotation.signs"]
    cfg.write_text(json.dumps(info))
    reseal_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"online rotation tensors .* do not fit the base model: online rotation "
                                              r"of model.layers.1.mlp.down_proj: incomplete buffers"):
        load_checkpoint(tmp_path / "ck")

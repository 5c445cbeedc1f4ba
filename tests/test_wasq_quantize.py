"""WASQ core: WASQConfig, quantize_, SFxLinear (STE, caching, export), the integer RTN baseline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from superfloat.sw import sfx
from superfloat.sw.wasq import (DEFAULT_SKIP, SFxLinear, WASQConfig, calibrate_, float_scale, quantize_,
                                quantized_layers)
from superfloat.sw.wasq.models import tiny_model



ARCHS = ["tiny-gpt2", "tiny-opt", "tiny-llama"]
# quantized Linear/Conv1D per decoder layer (4 layers each): GPT-2 c_attn, c_proj, c_fc, c_proj;
# OPT q, k, v, out, fc1, fc2; Llama q, k, v, o, gate, up, down
EXPECTED_LAYERS = {"tiny-gpt2": 16, "tiny-opt": 24, "tiny-llama": 28}


def _layer(bits=8, n=24, k=40, seed=0, **kw) -> SFxLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():  # rows with very different ranges, one all-zero row
        lin.weight.mul_(torch.logspace(-3, 2, n).reshape(-1, 1))
        lin.weight[3] = 0
    return SFxLinear.from_float(lin, WASQConfig(weight_bits=bits, **kw), "test.layer").eval()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"weight_bits": 1}, ValueError, r"weight_bits must be in 2\.\.16"),
    ({"weight_bits": 17}, ValueError, r"weight_bits must be in 2\.\.16"),
    ({"weight_bits": 8.0}, TypeError, r"weight_bits must be an int"),
    ({"act_bits": 20}, ValueError, r"act_bits must be in 2\.\.16"),
    ({"weight_scale": "row"}, ValueError, r"weight_scale must be one of 'channel', 'tensor', got 'row'"),
    ({"scale_kind": "log"}, ValueError, r"scale_kind must be one of 'pow2', 'float'"),
    ({"act_exponent": "auto"}, ValueError, r"act_exponent must be one of 'dynamic', 'static'"),
    ({"rounding": "up"}, ValueError, r"rounding must be one of 'nearest_even', 'toward_zero'"),
    ({"method": "nosuch"}, ValueError, r"method must be one of .*'vanilla'.*got 'nosuch'"),
    ({"method": "int", "rounding": "toward_zero"}, ValueError, r"'nearest_even' for codes='int'"),
    ({"skip": "lm_head"}, TypeError, r"skip must be a sequence of glob patterns, got the string 'lm_head'"),
    ({"layer_bits": {"*mlp*": 1}}, ValueError, r"layer_bits\['\*mlp\*'\] must be in 2\.\.16"),
])
def test_config_validation_messages(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        WASQConfig(**kwargs)


def test_config_defaults_and_round_trip():
    c = WASQConfig()
    assert (c.weight_bits, c.act_bits, c.weight_scale, c.scale_kind, c.act_exponent, c.rounding, c.codes,
            c.method) == (8, None, "channel", "float", "dynamic", "nearest_even", "sfx", "rtn")
    assert c.skip == DEFAULT_SKIP
    # legacy code-family spellings of method (format-1 checkpoints store them)
    assert (WASQConfig(method="vanilla").codes, WASQConfig(method="vanilla").method) == ("sfx", "rtn")
    assert WASQConfig(method="rtn-int").codes == "int"
    assert WASQConfig.from_dict({"weight_bits": 4, "method": "int"}) == WASQConfig(weight_bits=4, codes="int")
    with pytest.raises(ValueError, match="method='int' means codes='int' but codes='int_asym' was given"):
        WASQConfig(method="int", codes="int_asym")
    # presets set the formats they imply, and refuse a contradiction
    assert WASQConfig(method="awq-g128").group_size == 128
    assert WASQConfig(method="asym").codes == "int_asym"
    with pytest.raises(ValueError, match=r"method='awq-g128' implies group_size=128, got 64"):
        WASQConfig(method="awq-g128", group_size=64)
    with pytest.raises(ValueError, match=r"unknown method option\(s\) alpha"):
        WASQConfig(method="smoothquant", method_options={"alpha": 0.5})
    with pytest.raises(ValueError, match=r"method option smoothquant \(alpha\) must be a number in \[0, 1\]"):
        WASQConfig(method="smoothquant", method_options={"smoothquant": 2.0})
    c2 = WASQConfig(weight_bits=4, act_bits=8, layer_bits={"*down_proj": 6}, skip=("lm_head",))
    assert WASQConfig.from_dict(c2.to_dict()) == c2
    assert c2.bits_for("model.layers.0.mlp.down_proj") == 6 and c2.bits_for("model.layers.0.mlp.up_proj") == 4
    with pytest.raises(ValueError, match="unknown WASQConfig field"):
        WASQConfig.from_dict({"weight_bit": 4})


# --------------------------------------------------------------------------- quantize_


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_swaps_layers_shapes_and_dtypes(arch):
    from transformers.pytorch_utils import Conv1D

    model = tiny_model(arch)
    before = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_(model, WASQConfig(weight_bits=16))
    q = quantized_layers(model)
    assert len(q) == EXPECTED_LAYERS[arch]
    for name, layer in q.items():
        old = before[name]
        if isinstance(old, Conv1D):
            assert layer.source == "conv1d"
            assert tuple(layer.weight.shape) == tuple(old.weight.shape[::-1])  # [out, in]
        else:
            assert layer.source == "linear" and layer.weight is old.weight  # same Parameter
        assert layer.weight.dtype == torch.float32
        assert layer.qweight().dtype == torch.float32 and layer.qweight().shape == layer.weight.shape
    # skipped by default: lm_head (tied), embeddings, norms
    assert not any(n == "lm_head" or "embed" in n or n.endswith(("wte", "wpe")) for n in q)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # SF16 is a fine grid: the quantized model stays close to the float one
    assert torch.allclose(out, ref, atol=2e-3), (out - ref).abs().max()


def test_skip_patterns_and_errors():
    model = tiny_model("tiny-llama")
    quantize_(model, WASQConfig(skip=("lm_head", "*mlp*")))
    names = list(quantized_layers(model))
    assert len(names) == 16 and all("self_attn" in n for n in names)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, WASQConfig())
    with pytest.raises(ValueError, match=r"nothing to quantize in LlamaForCausalLM"):
        quantize_(tiny_model("tiny-llama"), WASQConfig(skip=("*",)))
    with pytest.raises(ValueError, match=r"layer 'model.norm' is a LlamaRMSNorm, not an nn.Linear"):
        quantize_(tiny_model("tiny-llama"), WASQConfig(), layers=["model.norm"])
    m = tiny_model("tiny-llama")
    quantize_(m, WASQConfig(weight_bits=4, layer_bits={"*down_proj": 6}, skip=()))
    q = quantized_layers(m)
    assert "lm_head" in q and q["model.layers.1.mlp.down_proj"].bits == 6 and q["model.layers.1.mlp.up_proj"].bits == 4


# --------------------------------------------------------------------------- STE and caching


@pytest.mark.parametrize("act_bits", [None, 6])
def test_gradients_flow_straight_through(act_bits):
    layer = _layer(bits=4, act_bits=act_bits).train()
    x = torch.randn(5, 7, 40, requires_grad=True)
    r = torch.randn(5, 7, 24)
    (layer(x) * r).sum().backward()
    wq = layer.qweight()
    xq = layer._quantize_input(x.detach()) if act_bits else x.detach()
    # d/dW of sum(r * (xq @ wq.T + b)) with an identity STE is r^T xq; d/dx is r @ wq
    want_w = torch.einsum("btn,btk->nk", r, xq)
    assert torch.allclose(layer.weight.grad, want_w, atol=1e-4)
    assert torch.allclose(x.grad, r @ wq, atol=1e-5)
    assert torch.allclose(layer.bias.grad, r.sum((0, 1)), atol=1e-5)


def test_gradients_reach_every_quantized_layer_of_a_model():
    model = tiny_model("tiny-opt")
    quantize_(model, WASQConfig(weight_bits=4, act_bits=8))
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    for name, layer in quantized_layers(model).items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name


def test_training_requantizes_after_optimizer_step_and_eval_caches():
    layer = _layer(bits=4).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(8, 40)
    layer(x).pow(2).sum().backward()
    before = layer.qweight().clone()
    opt.step()
    after = layer.qweight()
    assert not torch.equal(before, after)
    assert torch.equal(after, _layer_like(layer).qweight())  # the new weights' quantization
    # eval: computed once, reused, invalidated by an in-place update
    layer.eval()
    a = layer.qweight()
    assert layer.qweight() is a
    with torch.no_grad():
        layer.weight.mul_(1.5)
    b = layer.qweight()
    assert b is not a and torch.equal(b, _layer_like(layer).qweight())
    # writes through .data bypass the version counter: invalidate_cache() is the documented remedy
    layer.weight.data.mul_(2.0)
    layer.invalidate_cache()
    assert torch.equal(layer.qweight(), _layer_like(layer).qweight())


def _layer_like(layer: SFxLinear) -> SFxLinear:
    lin = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
    return SFxLinear.from_float(lin, WASQConfig(weight_bits=layer.bits, scale_kind=layer.scale_kind)).eval()


# --------------------------------------------------------------------------- export == numpy model


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("scale_kind", ["pow2", "float"])
@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"])
def test_export_is_the_numpy_model(bits, scale_kind, weight_scale, rounding):
    layer = _layer(bits=bits, scale_kind=scale_kind, weight_scale=weight_scale, rounding=rounding, seed=bits)
    w = layer.weight.detach().numpy()
    ex = layer.export()
    assert ex.codes.dtype == sfx.code_dtype(bits) and ex.codes.shape == (24, 40)
    assert ex.exponent.dtype == np.int8
    if scale_kind == "pow2":
        if weight_scale == "channel":
            e = sfx.choose_exponent(w, bits, axis=0)
            want = sfx.encode(w, bits, e.reshape(-1, 1), rounding)
        else:
            e = np.int8(sfx.choose_exponent(w, bits))
            want = sfx.encode(w, bits, e, rounding)
        np.testing.assert_array_equal(ex.exponent, e)
        assert ex.scale is None
    else:
        m = bits - 1
        w64 = w.astype(np.float64)
        amax = np.abs(w64).max(axis=1) if weight_scale == "channel" else np.abs(w64).max()
        s = np.where(amax > 0, amax / (1 - 2.0 ** -m), 1.0)
        want = sfx.encode(w64 / (s.reshape(-1, 1) if s.ndim else s), bits, 0, rounding)
        np.testing.assert_array_equal(ex.scale, s)
        assert not ex.exponent.any()
    np.testing.assert_array_equal(ex.codes, want)
    # the forward pass uses exactly these values
    np.testing.assert_array_equal(layer.qweight().numpy(), ex.dequantize().astype(np.float32))
    # the all-zero row encodes to code 0 (never negative zero)
    assert not ex.codes[3].any()
    mult, shift = ex.fold()
    assert mult.shape == shift.shape == (24,) and ((mult >= 1 << 15) & (mult < 1 << 16)).all()


def test_float_scale_helper_matches_between_numpy_and_torch():
    w = torch.randn(6, 9, dtype=torch.float32)
    np.testing.assert_array_equal(float_scale(w, 5).numpy(), float_scale(w.numpy(), 5))
    assert float_scale(np.zeros((2, 3)), 8).tolist() == [1.0, 1.0]


def test_nan_weight_error_names_the_layer():
    layer = _layer()
    with torch.no_grad():
        layer.weight[2, 5] = float("nan")
    layer.invalidate_cache()
    with pytest.raises(ValueError, match=r"layer test.layer: weight: values contains 1 NaN value\(s\); the first is at index \(2, 5\)"):
        layer(torch.randn(2, 40))
    with pytest.raises(ValueError, match=r"layer test.layer: weight: values contains 1 NaN"):
        layer.export()


# --------------------------------------------------------------------------- activations


def test_dynamic_activation_quantization_is_per_token_sfx():
    layer = _layer(bits=8, act_bits=6)
    x = torch.randn(3, 5, 40) * torch.logspace(-2, 3, 5).reshape(1, 5, 1)
    xq = layer._quantize_input(x).numpy()
    flat = x.reshape(-1, 40).numpy()
    e = sfx.choose_exponent(flat, 6, axis=0)  # one exponent per token
    want = sfx.fake_quantize(flat, 6, e.reshape(-1, 1)).astype(np.float32).reshape(3, 5, 40)
    np.testing.assert_array_equal(xq, want)
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(torch.from_numpy(want), layer.qweight(), layer.bias))


def test_static_activation_exponent_needs_calibration():
    model = tiny_model("tiny-llama")
    quantize_(model, WASQConfig(act_bits=8, act_exponent="static"))
    ids = torch.randint(0, 256, (1, 16))
    with pytest.raises(RuntimeError, match=r"layer model.layers.0.self_attn.q_proj: static activation exponent is "
                                           r"not calibrated"):
        model(ids)
    amax = calibrate_(model, [ids, ids[0, :8]])
    layer = quantized_layers(model)["model.layers.0.mlp.down_proj"]
    assert amax["model.layers.0.mlp.down_proj"] == layer.act_amax > 0
    assert layer.static_act_exponent == sfx.choose_exponent(np.float64(layer.act_amax), 8)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate_(model, [])


# --------------------------------------------------------------------------- integer RTN baseline


@pytest.mark.parametrize("bits", [4, 8])
def test_int_baseline_is_torch_fake_quantize_per_channel_affine(bits):
    layer = _layer(bits=bits, method="int")
    w = layer.weight.detach()
    amax = w.abs().amax(dim=1)
    qmax = 2 ** (bits - 1) - 1
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    want = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(24, dtype=torch.int32), 0, -qmax - 1, qmax)
    assert torch.equal(layer.qweight(), want)
    assert layer.qweight().unique().numel() > 2
    with pytest.raises(ValueError, match=r"int codes \(a software baseline\) cannot be executed by the SFx accelerator"):
        layer.export()
    # the absmax integer grid is the SFx float-scale grid (only float32 vs float64 arithmetic differs)
    sfx_layer = _layer(bits=bits, scale_kind="float")
    assert torch.allclose(layer.qweight(), sfx_layer.qweight(), rtol=1e-5, atol=1e-7)


def test_int_baseline_dynamic_activations_per_token():
    layer = _layer(bits=8, method="int", act_bits=8)
    x = torch.randn(4, 40) * torch.tensor([[0.01], [1.0], [30.0], [0.0]])
    xq = layer._quantize_input(x)
    amax = x.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    want = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(4, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(xq, want)

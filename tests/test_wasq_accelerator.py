"""Accelerator-exact execution (sw/wasq/accelerator.py, SPEC section 8): every layer call of
real models, on the accelerator backend, equals ``sfx.linear`` code for code (zero tolerance),
the mapping computes the layer's function, static output exponents, statistics, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from superfloat.sw import sfx, sfx_torch
from superfloat.sw.wasq import WASQConfig, quantize_, quantized_layers
from superfloat.sw.wasq.accelerator import (AcceleratorError, accelerator_stats, backend_of, bias_to_accumulator,
                                            calibrate_outputs_, output_exponent_rule, reset_accelerator_stats,
                                            set_backend)
from superfloat.sw.wasq.models import tiny_model

CONFIGS = {
    "w8a8": WASQConfig(weight_bits=8, act_bits=8),
    "w4a8-pow2": WASQConfig(weight_bits=4, act_bits=8, scale_kind="pow2"),
    "w8-weight-only": WASQConfig(weight_bits=8),
    "w6a6-static-tz": WASQConfig(weight_bits=6, act_bits=6, act_exponent="static", rounding="toward_zero"),
    "w8a8-xmult": WASQConfig(weight_bits=8, act_bits=8, act_scale="float"),
    "w4a4-xmult-pow2-tz": WASQConfig(weight_bits=4, act_bits=4, act_scale="float", scale_kind="pow2",
                                     rounding="toward_zero"),
    # activation clipping: each row's scale is 0.8 of its max / (1 - 2**-M); the largest values saturate
    "w4a4-xmult-clip": WASQConfig(weight_bits=4, act_bits=4, act_scale="float", act_clip_ratio=0.8),
}


def _batches(n=3, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, t), generator=g) for _ in range(n)]


def reference_codes(prog, x: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """The numpy model on the rows as streamed: per-row exponents (and multipliers in xmult
    mode; clamped into the range the shifts allow), codes, one LINEAR per row scale when the
    layer has a bias."""
    lo, hi = prog.x_exponent_range
    xm = None
    if prog.act_mode == "static":
        ea = np.full(x.shape[0], prog.act_exponent, dtype=np.int64)
    elif prog.act_mode == "xmult":
        _, ea, xm = sfx.encode_rows_scaled(x, prog.a_bits, sfx.default_row_scale(x, prog.a_bits) * prog.act_clip_ratio,
                                           rounding=prog.rounding)
    else:
        _, ea = sfx.encode_rows(x, prog.a_bits, prog.rounding)
    ea = np.clip(ea.astype(np.int64), lo, hi)
    if xm is None:
        xc = sfx.encode(x, prog.a_bits, ea[:, None], prog.rounding)
        key = ea
    else:
        xc, _, _ = sfx.encode_rows_scaled(x, prog.a_bits, np.ldexp(xm.astype(np.float64), (ea - 16).astype(np.int32)),
                                          rounding=prog.rounding)
        key = ea * (1 << 20) + xm
    out = np.zeros((x.shape[0], prog.N), dtype=np.int64)
    sat = 0
    groups = [np.arange(x.shape[0])] if prog.bias is None else [np.flatnonzero(key == k) for k in np.unique(key)]
    for rows in groups:
        r0 = rows[0]
        bias = None if prog.bias is None else bias_to_accumulator(
            prog.bias, frac_bits=prog.frac_bits, a_exponent=int(ea[r0]), w_shift=prog.w_shift, mult=prog.mult,
            xmult=None if xm is None else int(xm[r0]))
        codes, st = sfx.linear_with_stats(xc[rows], prog.w_codes, a_bits=prog.a_bits, w_bits=prog.w_bits,
                                          out_bits=prog.out_bits, bias=bias, shift=prog.shift, mult=prog.mult,
                                          x_exponent=ea[rows], xmult=None if xm is None else xm[rows],
                                          rounding=prog.rounding)
        out[rows] = codes
        sat += st.n_saturated
    return out, sat, ea


def _check_every_call(model, ids) -> int:
    """Run ``model`` on the accelerator backend, recompute every layer call with the numpy
    model, compare codes, saturation counts and outputs; also hold each output close to the
    fake-quantized layer's (the mapping computes the layer's function). Returns the calls checked."""
    calls = []

    def hook(mod, inp, out):
        calls.append((mod, inp[0].detach().reshape(-1, inp[0].shape[-1]).clone(), out.detach()))

    layers = quantized_layers(model)
    hs = [m.register_forward_hook(hook) for m in layers.values()]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hs:
            h.remove()
    assert len(calls) >= len(layers)
    for mod, x, out in calls:
        prog = mod.accelerator_program()
        want, want_sat, _ = reference_codes(prog, x.numpy())
        got, _, nsat = prog.codes(x)
        assert np.array_equal(got.numpy(), want), mod.layer_name
        assert int(nsat) == want_sat, mod.layer_name
        y = sfx.decode(want.astype(sfx.code_dtype(prog.out_bits)), prog.out_bits, prog.out_exponent[None, :])
        assert np.array_equal(out.reshape(-1, prog.N).numpy(), y.astype(np.float32)), mod.layer_name
        # the function: close to the fake-quantized layer where nothing saturated
        mod.backend = "fake"
        with torch.no_grad():
            fake = mod(x).numpy().astype(np.float64)
        mod.backend = "accelerator"
        step = np.exp2(prog.out_exponent - (prog.out_bits - 1))[None, :]
        ok = np.abs(want) < (1 << (prog.out_bits - 1)) - 1
        tol = step + 1e-3 * np.abs(fake).max() + 1e-6
        assert np.all(np.abs(y - fake)[ok] <= np.broadcast_to(tol, y.shape)[ok]), mod.layer_name
    return len(calls)


# xmult with a bias is one LINEAR operation per row (the bias is in the row's units): slow, one
# biased architecture (tiny-opt) covers it
CASES = [(a, c) for c in CONFIGS for a in ("tiny-llama", "tiny-opt", "tiny-gpt2")
         if "xmult" not in c or a == "tiny-llama" or (a == "tiny-opt" and c == "w8a8-xmult")]


@pytest.mark.parametrize("arch, cfg", CASES, ids=str)
def test_every_layer_call_equals_sfx_linear(arch, cfg):
    m = tiny_model(arch)
    quantize_(m, CONFIGS[cfg], calibration=_batches())
    calibrate_outputs_(m, _batches(seed=1), out_bits=None if cfg != "w4a8-pow2" else 8)
    set_backend(m, "accelerator")
    assert backend_of(m) == "accelerator"
    assert _check_every_call(m, torch.cat(_batches(2, 24, seed=7))) >= 7


def test_smollm2_layer_calls_equal_sfx_linear():
    """Real SmolLM2-135M layers (first two decoder blocks), W8A8 and SF4 weight-only."""
    from wasq_helpers import smollm2_first_blocks

    lm, ids = smollm2_first_blocks(2)
    m = lm.model
    calib = [lm.tokenizer("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to "
                          "praise him. The evil that men do lives after them.", return_tensors="pt").input_ids]
    import copy

    for cfg in (WASQConfig(weight_bits=8, act_bits=8), WASQConfig(weight_bits=4)):
        q = copy.deepcopy(m)
        quantize_(q, cfg)
        calibrate_outputs_(q, calib)
        set_backend(q, "accelerator")
        assert _check_every_call(q, ids) == 14


def test_output_exponents_rule_headroom_and_saturation_counted():
    assert output_exponent_rule([0.0, 1.0, 3.0], 8, headroom=1.0).tolist() == [0, 1, 2]
    assert output_exponent_rule([1.0, 3.0], 8, headroom=1.5).tolist() == [1, 3]
    with pytest.raises(ValueError, match="headroom must be a finite number >= 1"):
        output_exponent_rule([1.0], 8, headroom=0.5)
    m = tiny_model("tiny-llama")
    quantize_(m, WASQConfig(weight_bits=8, act_bits=8))
    calibrate_outputs_(m, _batches(), out_bits=8, headroom=1.0)
    set_backend(m, "accelerator")
    with torch.no_grad():
        m(torch.cat(_batches(2, 32, seed=9)) * 0 + 7)  # one token repeated: outputs the calibration never saw
    st = accelerator_stats(m)
    assert st["rows"] > 0 and st["outputs"] > st["saturated"] >= 0
    assert all(v["rows"] > 0 for v in st["layers"].values())
    reset_accelerator_stats(m)
    assert accelerator_stats(m)["saturated"] == 0


def test_saturation_is_counted_exactly():
    m = tiny_model("tiny-opt")
    quantize_(m, WASQConfig(weight_bits=8, act_bits=8))
    calibrate_outputs_(m, _batches(), out_bits=8)
    layer = next(iter(quantized_layers(m).values()))
    layer.out_exponent = (layer.out_exponent.astype(np.int64) - 3).astype(np.int8)  # 8x too small: saturates
    set_backend(m, "accelerator")
    x = torch.randn(20, layer.in_features) * 4
    prog = layer.accelerator_program()
    codes, _, nsat = prog.codes(x)
    _, want_sat, _ = reference_codes(prog, x.numpy())
    assert int(nsat) == want_sat > 0
    lim = (1 << 7) - 1
    assert int(((codes & lim) == lim).sum()) >= want_sat


def test_errors_name_the_layer_and_say_what_to_do():
    m = tiny_model("tiny-llama")
    quantize_(m, WASQConfig(weight_bits=8, act_bits=8))
    with pytest.raises(AcceleratorError, match=r"layer model\.layers\.0\.self_attn\.q_proj: no calibrated output "
                                               r"exponents .*calibrate_outputs_"):
        set_backend(m, "accelerator")
    with pytest.raises(ValueError, match="backend must be one of 'fake', 'accelerator'"):
        set_backend(m, "fpga")
    with pytest.raises(AcceleratorError, match=r"layer model\.layers\.0\.self_attn\.q_proj: saw 3 calibration rows, "
                                               r"fewer than 16: the calibration text is too short"):
        calibrate_outputs_(m, [torch.tensor([[1, 2, 3]])])
    with pytest.raises(AcceleratorError, match="the model has no quantized layers"):
        set_backend(tiny_model("tiny-llama"), "accelerator")
    g = tiny_model("tiny-gpt2")
    quantize_(g, WASQConfig(weight_bits=4, group_size=32))
    with pytest.raises(AcceleratorError, match=r"layer transformer\.h\.0\.attn\.c_attn: SF4 g32 .*not executable by "
                                               r"the SFx accelerator \(software only\)"):
        calibrate_outputs_(g, _batches())


def test_row_bias_linear_op_equals_the_model():
    """LinearOp's per-call bias (a layer with a bias: one operation per activation exponent)."""
    rng = np.random.default_rng(3)
    for a, w, o in ((8, 8, 16), (4, 4, 8), (16, 8, 16), (16, 16, 16)):
        wc = rng.integers(0, 2 ** w, (12, 33)).astype(sfx.code_dtype(w))
        xc = rng.integers(0, 2 ** a, (9, 33)).astype(sfx.code_dtype(a))
        mult, sh = rng.integers(2 ** 15, 2 ** 16, 12), rng.integers(-3, 3, 12)
        op = sfx_torch.LinearOp(wc, w_bits=w, a_bits=a, out_bits=o, shift=sh, mult=mult, row_bias=True)
        blim = (1 << (sfx.accumulator_bits(a, w) - 2)) - 1
        for b in (rng.integers(-blim, blim, 12), np.full(12, blim), np.full(12, -blim)):
            xe = rng.integers(-2, 3, 9)
            got, ns = op(torch.as_tensor(xc.astype(np.int64)), torch.as_tensor(xe), bias=b)
            want, st = sfx.linear_with_stats(xc, wc, a_bits=a, w_bits=w, out_bits=o, bias=b, shift=sh, mult=mult,
                                             x_exponent=xe)
            assert np.array_equal(got.numpy(), want) and int(ns) == st.n_saturated
    with pytest.raises(ValueError, match=r"bias must be <= "):
        op.check_bias(np.full(12, blim + 1))
    plain = sfx_torch.LinearOp(wc, w_bits=w, a_bits=a, out_bits=o, shift=sh, mult=mult)
    with pytest.raises(ValueError, match="built with row_bias=False"):
        plain(torch.as_tensor(xc.astype(np.int64)), 0, bias=np.zeros(12, dtype=np.int64))


@pytest.mark.parametrize("cfg", ["w8a8", "w8a8-xmult", "w6a6-static-tz"])
def test_operations_are_what_the_layer_computes(cfg):
    """LayerProgram.operations(): the LINEAR operations an executor (RTL, board) runs; sfx.linear
    of each fills exactly the rows of the layer's codes."""
    m = tiny_model("tiny-opt")  # biased layers: one operation per row scale
    quantize_(m, CONFIGS[cfg], calibration=_batches())
    calibrate_outputs_(m, _batches(seed=1))
    prog = m.model.decoder.layers[0].self_attn.q_proj.accelerator_program()
    x = torch.randn(9, prog.K) * torch.exp(torch.linspace(-3, 3, 9))[:, None]
    ops = prog.operations(x)
    st = prog.stream(x)
    scales = set(zip(st.x_exponent.tolist(), st.xmult.tolist() if st.xmult is not None else [0] * 9))
    assert len(ops) == len(scales)  # one operation per row scale (biased layers)
    assert len(ops) >= (1 if prog.act_mode == "static" else 2) and sum(len(op["rows"]) for op in ops) == 9
    got = np.zeros((9, prog.N), dtype=np.int64)
    for op in ops:
        op = dict(op)
        rows = op.pop("rows")
        got[rows] = sfx.linear(**op)
    codes, _, _ = prog.codes(x)
    np.testing.assert_array_equal(got, codes.numpy())


def test_training_on_the_accelerator_backend_is_straight_through():
    """With gradients on, the accelerator backend's values are the hardware's and its gradients
    those of the fake-quantized layer (QAT on the accelerator's arithmetic); the program follows
    the weights after an optimizer step."""
    m = tiny_model("tiny-llama")
    quantize_(m, CONFIGS["w8a8"])
    calibrate_outputs_(m, _batches(seed=1))
    layer = m.model.layers[0].mlp.down_proj
    x = torch.randn(6, layer.in_features, requires_grad=True)
    layer.backend = "fake"
    yf = layer(x)
    gf = torch.autograd.grad(yf.sum(), [x, layer.weight])
    layer.backend = "accelerator"
    ya = layer(x)
    with torch.no_grad():
        want = layer.accelerator_program().forward(x)
    assert torch.equal(ya.detach(), want) and not torch.equal(ya.detach(), yf.detach())
    ga = torch.autograd.grad(ya.sum(), [x, layer.weight])
    assert all(torch.equal(a, b) for a, b in zip(ga, gf))
    before = layer.accelerator_program()
    with torch.no_grad():
        layer.weight.mul_(1.5)
    assert layer.accelerator_program() is not before


def test_activation_clip_ratio_scales_saturate_and_survive_a_checkpoint(tmp_path):
    """act_clip_ratio: the streamed row scales are the ratio times the unclipped ones (rounded
    to 16 bits), the largest activations saturate at the top code in both backends, and a
    checkpoint keeps the ratio (same accelerator codes after loading)."""
    from superfloat.sw.wasq import load_checkpoint, save_checkpoint
    from superfloat.sw.wasq.formats import ActQuantizer

    m = tiny_model("tiny-llama")
    cfg = WASQConfig(weight_bits=4, act_bits=4, act_scale="float", act_clip_ratio=0.5)
    quantize_(m, cfg)
    calibrate_outputs_(m, _batches(seed=1))
    name, layer = next(iter(quantized_layers(m).items()))
    assert layer.act_clip_ratio == 0.5 and "clip 0.5" in cfg.describe()
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    prog = layer.accelerator_program()
    st = prog.stream(x)
    _, xe_full, xm_full = sfx.encode_rows_scaled(x.numpy(), 4)
    # half the scale: the same 16-bit multipliers, exponents one lower
    assert np.array_equal(st.xmult.numpy(), xm_full) and np.array_equal(st.x_exponent.numpy(), xe_full - 1)
    codes = st.codes.numpy().astype(np.int64)
    assert ((codes & 7) == 7).sum(axis=1).min() >= 1   # every row has saturated values
    q = ActQuantizer("sfx", 4, "dynamic", scale_kind="float", clip_ratio=0.5)(x.float())
    assert torch.allclose(q.abs().amax(dim=1).double(), x.abs().amax(dim=1) * 0.5, rtol=1e-3)
    ids = torch.cat(_batches(1, 24, seed=3))
    set_backend(m, "accelerator")
    with torch.no_grad():
        before = m(ids).logits
    save_checkpoint(m, tmp_path / "ck", overwrite=True)
    m2 = load_checkpoint(tmp_path / "ck")
    assert quantized_layers(m2)[name].act_clip_ratio == 0.5
    set_backend(m2, "accelerator")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, before)

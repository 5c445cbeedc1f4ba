"""GPTQ on the SFx grid (sw/wasq/ptq/gptq.py): lower output error than round to nearest,
codes on the exact grid that SFxLinear.export writes, the integer baseline, a tiny model
end to end (checkpoint round trip, accelerator-exact backend)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from superfloat.sw import sfx
from superfloat.sw.wasq import SFxLinear, WASQConfig, quantize_, quantize_report, quantized_layers
from superfloat.sw.wasq.formats import WeightFormat, quantize_levels, quantize_weight, weight_grid
from superfloat.sw.wasq.models import tiny_model
from superfloat.sw.wasq.ptq.config import MethodOptions
from superfloat.sw.wasq.ptq.gptq import gptq_levels, hessian, mse_clip


def _layer(n=48, k=80, t=400, seed=0):
    """Correlated inputs with a few loud channels (what makes GPTQ's feedback pay)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(t, k, generator=g) @ (0.4 * torch.randn(k, k, generator=g) + torch.eye(k))
    x[:, ::9] *= 6.0
    return w, x


def _out_err(wq, w, x):
    return float(((wq.double() - w.double()) @ x.double().t()).pow(2).sum())


@pytest.mark.parametrize("fmt", [WeightFormat("sfx", 4, "float"), WeightFormat("sfx", 4, "pow2"),
                                 WeightFormat("sfx", 3, "float"), WeightFormat("int", 4),
                                 WeightFormat("int_asym", 4), WeightFormat("sfx", 4, "float", 32)],
                         ids=lambda f: f.label().replace(" ", "-"))
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(fmt, act_order):
    w, x = _layer()
    grid = weight_grid(w, fmt)
    q, st = gptq_levels(w, x, grid, act_order=act_order)
    qw = quantize_levels(q, grid)
    rtn = quantize_weight(w, fmt)
    e_gptq, e_rtn = _out_err(qw.dequantize(), w, x), _out_err(rtn.dequantize(), w, x)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    assert st["error"] <= st["error_rtn"] and st["rows_improved"] > 0.9
    assert st["error"] == pytest.approx(e_gptq / _out_err(torch.zeros_like(w), w, x), rel=1e-6)
    assert float(hessian(x)[0, 0]) == pytest.approx(2 * float(x[:, 0].double().pow(2).mean()))
    lo, hi = fmt.qrange()
    assert int(q.min()) >= lo and int(q.max()) <= hi


@pytest.mark.parametrize("scale_kind", ["float", "pow2"])
def test_gptq_codes_are_the_exported_codes_and_reencode_identically(scale_kind):
    w, x = _layer(32, 64, 256, seed=1)
    fmt = WeightFormat("sfx", 4, scale_kind)
    clip = mse_clip(w, fmt)
    assert clip.shape == (32,) and bool(((clip > 0) & (clip <= 1)).all()) and bool((clip < 1).any())
    grid = weight_grid(w, fmt, clip)
    q, _ = gptq_levels(w, x, grid)
    qw = quantize_levels(q, grid)
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SFxLinear.from_float(lin, WASQConfig(weight_bits=4, scale_kind=scale_kind), "l")
    layer.load_quantized(qw)
    ex = layer.export()
    assert np.array_equal(ex.codes, qw.codes)
    # the exported values re-encode to the same codes with the numpy model (the hardware's grid)
    if scale_kind == "float":
        again = sfx.encode(ex.dequantize() / ex.scale.reshape(-1, 1), 4)
    else:
        again = sfx.encode(ex.dequantize(), 4, ex.exponent.reshape(-1, 1))
    assert np.array_equal(again, ex.codes)
    assert np.array_equal(sfx.decode(ex.codes, 4, 3).astype(np.int64), q.numpy())  # levels = signed magnitudes
    assert torch.equal(layer.qweight(), qw.dequantize())


def test_gptq_dead_columns_and_errors():
    w, x = _layer(16, 24, 100, seed=2)
    x[:, 5] = 0.0
    grid = weight_grid(w, WeightFormat("sfx", 4))
    q, st = gptq_levels(w, x, grid)
    assert st["error"] <= st["error_rtn"]
    with pytest.raises(ValueError, match=r"GPTQ damp must be a number in \(0, 1\]"):
        gptq_levels(w, x, grid, damp=0.0)
    with pytest.raises(ValueError, match="GPTQ block must be a positive int"):
        gptq_levels(w, x, grid, block=0)
    with pytest.raises(ValueError, match=r"w \[N, K\] and x \[T, K\] must agree"):
        gptq_levels(w, x[:, :10], grid)
    with pytest.raises(ValueError, match=r"the grid is for \[16, 24\] weights"):
        gptq_levels(w[:, :20], x[:, :20], grid)
    with pytest.raises(ValueError, match="method options gptq and adaround both choose the rounding"):
        MethodOptions(gptq=True, adaround=True)
    with pytest.raises(ValueError, match=r"method option gptq_damp must be a number in \(0, 1\]"):
        WASQConfig(weight_bits=4, method="gptq", method_options={"gptq_damp": 2.0}).options


def _batches(n=6, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, t), generator=g) for _ in range(n)]


def _model():
    m = tiny_model("tiny-llama")
    with torch.no_grad():
        for name, mod in m.named_modules():
            if "norm" in name and getattr(mod, "weight", None) is not None:
                mod.weight[::37] *= 20.0
    return m


def test_gptq_tiny_model_end_to_end(tmp_path):
    from superfloat.sw.wasq.accelerator import calibrate_outputs_, set_backend
    from superfloat.sw.wasq.checkpoint import load_checkpoint, save_checkpoint

    m0 = _model()
    ids = torch.cat(_batches(2, 40, seed=5))
    with torch.no_grad():
        ref = m0(ids).logits
    errs = {}
    models = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(m0)
        quantize_(m, WASQConfig(weight_bits=4, method=method), calibration=_batches())
        with torch.no_grad():
            errs[method] = float((m(ids).logits - ref).pow(2).mean())
        models[method] = m
    assert errs["gptq"] < 0.6 * errs["rtn"], errs
    m = models["gptq"]
    rep = quantize_report(m)
    assert len(rep.layers) == 28 and all("gptq" in v for v in rep.layers.values())
    assert m.model.layers[0].mlp.down_proj.weight_format().label() == "SF4"
    # hardware-executable: checkpoint round trip, accelerator backend
    with torch.no_grad():
        out = m(ids).logits
    save_checkpoint(m, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, out)
    for name, layer in quantized_layers(back).items():
        assert np.array_equal(layer.export().codes, quantized_layers(m)[name].stored_weight().codes)
    calibrate_outputs_(m, _batches(2, 48, seed=9))
    set_backend(m, "accelerator")
    with torch.no_grad():
        acc = m(ids).logits
    assert float((acc - out).pow(2).mean()) < 0.05 * float(out.pow(2).mean())


def test_gptq_integer_baseline_is_software_only():
    m = _model()
    cfg = WASQConfig(weight_bits=4, method="gptq", codes="int")
    quantize_(m, cfg, calibration=_batches(3))
    assert not cfg.hardware_executable
    assert m.model.layers[0].self_attn.q_proj.weight_format().label() == "int4"

"""The formats of sw/wasq/formats.py and packing.py: weight quantizers (SFx, int, asymmetric int, per group), activation
quantizers, bit packing and the packed checkpoint file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from superfloat.sw import sfx
from superfloat.sw.wasq import SFxLinear, WASQConfig
from superfloat.sw.wasq import asymmetric
from superfloat.sw.wasq.formats import (ActQuantizer, WeightFormat, fake_quant_weight, quantize_levels, quantize_weight,
                                        weight_grid)
from superfloat.sw.wasq.packing import pack_codes, packed_nbytes, unpack_codes


def _w(n=24, k=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n).reshape(-1, 1)
    w[3] = 0  # an all-zero row
    w[5, 7] = 40.0  # an outlier
    return w


FORMATS = [WeightFormat(kind, bits, sk, gs) for kind in ("sfx", "int", "int_asym") for bits in (2, 4, 8, 12)
           for sk in (("float", "pow2") if kind == "sfx" else ("float",)) for gs in (None, 16)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label().replace(" ", "-"))
def test_stored_codes_dequantize_to_the_fake_quantized_weights(fmt):
    w = _w()
    qw = quantize_weight(w, fmt)
    assert qw.codes.shape == w.shape and qw.codes.dtype == (np.uint8 if fmt.bits <= 8 else np.uint16)
    assert int(qw.codes.max()) < 2 ** fmt.bits
    assert torch.equal(qw.dequantize(), fake_quant_weight(w, fmt))
    # levels -> codes -> levels is exact
    again = quantize_levels(qw.levels(), qw.grid())
    assert np.array_equal(again.codes, qw.codes)
    if fmt.kind == "sfx":
        sfx.check_codes(qw.codes, fmt.bits)
        assert torch.equal(qw.dequantize()[3], torch.zeros(w.shape[1]))


@pytest.mark.parametrize("scale_kind", ["float", "pow2"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_sfx_per_channel_rtn_equals_wasq_sfxlinear(scale_kind, bits):
    """Same codes, exponents/scales and values as the colleague's SFxLinear export."""
    w = _w()
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SFxLinear.from_float(lin, WASQConfig(weight_bits=bits, scale_kind=scale_kind), "t").eval()
    ex = layer.export()
    qw = quantize_weight(w, WeightFormat("sfx", bits, scale_kind))
    assert np.array_equal(qw.codes, ex.codes)
    mine = qw.to_exported(None)
    assert np.array_equal(mine.exponent, ex.exponent)
    assert (mine.scale is None) == (ex.scale is None)
    if ex.scale is not None:
        assert np.array_equal(mine.scale, ex.scale)
    assert torch.equal(qw.dequantize(), layer.qweight())


def test_int_symmetric_matches_the_wasq_baseline():
    from superfloat.sw.wasq.baselines import int_fake_quantize

    w = _w()
    for bits in (3, 4, 8):
        assert torch.equal(fake_quant_weight(w, WeightFormat("int", bits)), int_fake_quantize(w, bits, axis=0))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [None, 8])
def test_asymmetric_matches_torch_fake_quantize_per_channel_affine(bits, group):
    w = _w() + 0.3  # off-centre rows
    qmin, qmax = 0, 2 ** bits - 1
    fmt = WeightFormat("int_asym", bits, group_size=group)
    qw = quantize_weight(w, fmt)
    wg = w if group is None else w.reshape(w.shape[0] * (w.shape[1] // group), group)
    lo = torch.clamp(wg.amin(1), max=0)
    hi = torch.clamp(wg.amax(1), min=0)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    zp = torch.where((hi - lo) > 0, zp, torch.zeros_like(zp))
    ref = torch.fake_quantize_per_channel_affine(wg, scale, zp, 0, qmin, qmax).reshape(w.shape)
    assert torch.equal(qw.dequantize(), ref)
    assert qw.zero_point is not None and int(qw.zero_point.max()) <= qmax
    # the notes' formulas: r = s (q - z)
    q = qw.levels().reshape(wg.shape).float()
    assert torch.equal(((q - zp.reshape(-1, 1)) * scale.reshape(-1, 1)).reshape(w.shape), ref)
    # zero is exact; asymmetric beats symmetric on off-centre rows
    assert float((qw.dequantize() - w).pow(2).sum()) < float((fake_quant_weight(w, WeightFormat("int", bits))
                                                             - w).pow(2).sum())


def test_asymmetric_helpers_and_errors():
    s, z = asymmetric.scale_zero_point(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 3.0]), 4)
    assert s.tolist() == [1.0, pytest.approx(4.0 / 15)] and z.tolist() == [0, 4]  # z = round(0 + 1 / (4/15))
    with pytest.raises(ValueError, match="asymmetric integer bits must be an int in 2..16"):
        asymmetric.qrange(1)
    x = torch.randn(6, 10) + 2
    out = asymmetric.fake_quantize_rows(x, 8)
    assert float((out - x).abs().max()) < float((x.amax(1) - x.amin(1).clamp(max=0)).max()) / 255


def test_clip_ratios_shrink_the_range_and_saturate():
    w = _w()
    fmt = WeightFormat("sfx", 4)
    full = quantize_weight(w, fmt)
    half = quantize_weight(w, fmt, clip=0.5)
    assert float(half.dequantize()[5].abs().max()) < float(full.dequantize()[5].abs().max())
    assert np.all(half.scale <= full.scale)
    with pytest.raises(ValueError, match=r"clip ratios must be in \(0, 1\]"):
        weight_grid(w, fmt, clip=1.5)


def test_format_validation_messages():
    with pytest.raises(ValueError, match="WeightFormat.kind must be one of 'sfx', 'int', 'int_asym', got 'fp4'"):
        WeightFormat("fp4")
    with pytest.raises(ValueError, match="WeightFormat.bits must be in 2..16, got 17"):
        WeightFormat("sfx", 17)
    with pytest.raises(ValueError, match="group_size must be None or a positive int"):
        WeightFormat("sfx", 4, group_size=0)
    with pytest.raises(ValueError, match="rounding must be 'nearest_even' for kind 'int'"):
        WeightFormat("int", 4, rounding="toward_zero")
    with pytest.raises(ValueError, match="weights must be a 2-D"):
        quantize_weight(torch.zeros(3), WeightFormat())
    assert WeightFormat("sfx", 4).hardware_executable
    assert not WeightFormat("sfx", 4, group_size=64).hardware_executable
    assert not WeightFormat("int", 4).hardware_executable


# --------------------------------------------------------------------------- activations


def test_activation_quantizers():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) * torch.logspace(-2, 2, 5).reshape(1, -1, 1)
    dyn = ActQuantizer("sfx", 8)
    flat = x.reshape(-1, 32)
    e = sfx.choose_exponent(flat.numpy(), 8, axis=0, keepdims=True)
    assert np.array_equal(dyn(x).reshape(-1, 32).numpy(), sfx.fake_quantize(flat.numpy(), 8, e).astype(np.float32))
    st = ActQuantizer("sfx", 4, "static", threshold=3.0)
    assert st.exponent == 2 and float(st(x).abs().max()) == (1 - 2 ** -3) * 4  # saturates at (1 - 2**-M) 2**E
    stf = ActQuantizer("sfx", 4, "static", threshold=3.0, scale_kind="float")
    assert float(stf(x).abs().max()) == pytest.approx(3.0)
    si = ActQuantizer("int", 4, "static", threshold=3.0)
    assert float(si(x).abs().max()) == pytest.approx(24 / 7, rel=1e-6)  # level -8 of scale 3/7
    sa = ActQuantizer("int_asym", 4, "static", threshold=(-1.0, 3.0))
    step = 4.0 / 15  # the zero point is rounded, so the range moves by less than one step
    assert -1.0 - step <= float(sa(x).min()) < -1.0 + step and 3.0 - step < float(sa(x).max()) <= 3.0 + step
    with pytest.raises(RuntimeError, match="static activation quantizer is not calibrated"):
        ActQuantizer("sfx", 4, "static")(x)
    with pytest.raises(ValueError, match="activation clip threshold must be non-negative and finite, got -1.0"):
        ActQuantizer("sfx", 4, "static", threshold=-1.0)
    z = ActQuantizer("sfx", 4, "static", threshold=0.0)  # a calibrated all-zero input: exponent 0, as choose_exponent
    assert z.exponent == 0 and z.saturation_range() == (-0.875, 0.875)
    with pytest.raises(ValueError, match="act mode must be one of 'dynamic', 'static'"):
        ActQuantizer("sfx", 4, "token")


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", list(range(2, 17)))
def test_pack_round_trip_every_width(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1000):
        codes = rng.integers(0, 2 ** bits, size=n).astype(sfx.code_dtype(bits))
        packed = pack_codes(codes, bits)
        assert packed.dtype == np.uint8 and packed.size == packed_nbytes(n, bits) == (n * bits + 7) // 8
        assert np.array_equal(unpack_codes(packed, bits, n), codes)
        assert np.array_equal(unpack_codes(packed.tobytes(), bits, n), codes)


def test_pack_bit_order_and_shapes():
    assert pack_codes(np.array([0x1, 0xF, 0x3], dtype=np.uint8), 4).tolist() == [0xF1, 0x03]
    assert pack_codes(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [0xD1, 0x58, 0x1F]
    rng = np.random.default_rng(1)
    for bits in (3, 5, 7, 11, 13):  # code i at bits [i*bits, (i+1)*bits) of a little-endian stream
        codes = rng.integers(0, 2 ** bits, size=37)
        stream = int.from_bytes(pack_codes(codes, bits).tobytes(), "little")
        assert stream == sum(int(c) << (bits * i) for i, c in enumerate(codes))
    codes = np.arange(60, dtype=np.uint8).reshape(6, 10) % 8
    back = unpack_codes(pack_codes(codes, 3), 3, shape=(6, 10))
    assert back.shape == (6, 10) and np.array_equal(back, codes)
    big = np.random.default_rng(0).integers(0, 8, size=(1 << 20) + 13).astype(np.uint8)  # crosses a chunk
    assert np.array_equal(unpack_codes(pack_codes(big, 3), 3, big.size), big)


def test_pack_errors():
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\) for 4-bit packing: 1 value\(s\) are not, the "
                                         r"first 16 at flat index 2"):
        pack_codes(np.array([1, 2, 16]), 4)
    with pytest.raises(TypeError, match="codes must be unsigned integers, got dtype float"):
        pack_codes(np.array([1.0]), 4)
    with pytest.raises(ValueError, match="bits must be an int in 2..16"):
        pack_codes(np.array([1]), 1)
    with pytest.raises(ValueError, match="packed data has 1 bytes, 3 codes of 4 bits need 2"):
        unpack_codes(np.zeros(1, dtype=np.uint8), 4, 3)
    with pytest.raises(ValueError, match="unpack_codes needs count or shape"):
        unpack_codes(np.zeros(1, dtype=np.uint8), 4)


def test_row_scaled_fake_quantize_is_the_accelerators_xmult_rows():
    import numpy as np
    import torch

    from superfloat.sw import sfx
    from superfloat.sw.wasq.formats import ActQuantizer, row_scaled_fake_quantize

    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 33)) * np.exp(rng.uniform(-5, 5, (7, 1)))
    x[3] = 0.0
    for bits in (2, 4, 8):
        codes, xe, xm = sfx.encode_rows_scaled(x, bits)
        s = np.ldexp(xm.astype(np.float64), (xe - 16).astype(np.int32))
        want = sfx.decode(codes, bits) * s[:, None]
        got = row_scaled_fake_quantize(torch.tensor(x), bits)
        np.testing.assert_array_equal(got.numpy(), want)
        q = ActQuantizer("sfx", bits, "dynamic", scale_kind="float")
        assert q.uses_xmult and "xmult" in q.describe()
        np.testing.assert_array_equal(q(torch.tensor(x)).numpy(), want)

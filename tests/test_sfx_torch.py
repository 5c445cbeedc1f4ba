"""The torch twin (superfloat.sw.sfx_torch) is bit-identical to the numpy model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from superfloat.sw import sfx
from superfloat.sw import sfx_torch as sft

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROUNDINGS = ["nearest_even", "toward_zero"]


def _values(seed, n=4000):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.standard_normal(n) * np.exp(rng.uniform(-6, 6, n)), [0.0, -0.0, np.inf, -np.inf]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", range(2, 17))
def test_encode_decode_fake_quantize_equal_numpy(bits, device):
    v = _values(bits)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.tensor(v, dtype=dtype, device=device)
        ref_in = t.double().cpu().numpy()
        for e in (0, 3, -5, 127, -128):
            for rounding in ROUNDINGS:
                want = sfx.encode(ref_in, bits, e, rounding)
                got = sft.encode(t, bits, e, rounding)
                assert got.dtype == torch.int32
                np.testing.assert_array_equal(got.cpu().numpy(), want)
                np.testing.assert_array_equal(sft.decode(got, bits, e).cpu().numpy(), sfx.decode(want, bits, e))
                fq = sft.fake_quantize(t, bits, e, rounding)
                assert fq.dtype == dtype
                want_fq = torch.tensor(sfx.decode(want, bits, e)).to(dtype).double().numpy()
                np.testing.assert_array_equal(fq.double().cpu().numpy(), want_fq)


@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_and_per_token_exponents(device):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)) * np.exp(rng.uniform(-5, 5, (16, 1)))
    for bits in (4, 8):
        e_np = sfx.choose_exponent(w, bits, axis=0, keepdims=True)
        tw = torch.tensor(w, dtype=torch.float32, device=device)
        e_t = sft.choose_exponent(tw, bits, axis=0, keepdims=True)
        assert e_t.dtype == torch.int8
        np.testing.assert_array_equal(e_t.cpu().numpy(), sfx.choose_exponent(w.astype(np.float32), bits, axis=0, keepdims=True))
        np.testing.assert_array_equal(sft.encode(tw, bits, e_t).cpu().numpy(), sfx.encode(w.astype(np.float32), bits, e_np))
        assert sft.choose_exponent(tw, bits) == sfx.choose_exponent(w.astype(np.float32), bits)
        np.testing.assert_array_equal(sft.choose_exponent(tw, bits, axis=1).cpu().numpy(),
                                      sfx.choose_exponent(w.astype(np.float32), bits, axis=1))


@pytest.mark.parametrize("device", DEVICES)
def test_integer_datapath_equal_numpy(device):
    rng = np.random.default_rng(1)
    for a_bits, w_bits, o_bits in [(8, 8, 8), (8, 4, 8), (16, 16, 16), (4, 2, 6)]:
        t, n, k = 7, 5, 33
        x = rng.integers(0, 1 << a_bits, (t, k))
        w = rng.integers(0, 1 << w_bits, (n, k))
        f = a_bits + w_bits - 2
        for use_mult in (False, True):
            ff = f + (16 if use_mult else 0)
            kw = dict(a_bits=a_bits, w_bits=w_bits, out_bits=o_bits, bias=rng.integers(-900, 900, n),
                      shift=rng.integers(ff - o_bits - 20, ff - o_bits - 3, n),
                      mult=rng.integers(1, 1 << 16, n) if use_mult else None, x_exponent=rng.integers(-2, 3, t))
            for relu in (False, True):
                for rounding in ROUNDINGS:
                    want = sfx.linear(x, w, relu=relu, rounding=rounding, **kw)
                    got = sft.linear(torch.tensor(x, device=device), torch.tensor(w, device=device), relu=relu,
                                     rounding=rounding, **kw)
                    np.testing.assert_array_equal(got.cpu().numpy(), want)
        acc = sft.matmul_acc(torch.tensor(x, device=device), torch.tensor(w, device=device), a_bits=a_bits,
                             w_bits=w_bits, bias=torch.tensor(rng.integers(-9, 9, n)))
        assert acc.dtype == torch.int64


def test_requantize_equal_numpy_with_counts():
    rng = np.random.default_rng(2)
    acc = rng.integers(-(1 << 40), 1 << 40, (50, 9))
    for rounding in ROUNDINGS:
        for mult in (None, rng.integers(1, 1 << 16, 9)):
            want = sfx.requantize(acc, frac_bits=30, shift=rng.integers(-4, 4, 9) * 0, out_bits=8, rounding=rounding,
                                  mult=mult, relu=False)
            got = sft.requantize(torch.tensor(acc), frac_bits=30, shift=torch.zeros(9, dtype=torch.int64),
                                 out_bits=8, rounding=rounding, mult=None if mult is None else torch.tensor(mult))
            np.testing.assert_array_equal(got[0].numpy(), want[0])
            assert got[1] == want[1]


def test_errors_match_numpy_wording():
    v = torch.zeros(2, 3)
    v[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"values contains 1 NaN value\(s\); the first is at index \(1, 1\)"):
        sft.encode(v, 8)
    with pytest.raises(ValueError, match=r"bits must be in 2\.\.16"):
        sft.encode(torch.zeros(2), 17)
    with pytest.raises(ValueError, match=r"exponent must be in -128\.\.127"):
        sft.encode(torch.zeros(2), 8, torch.tensor([300, 0]))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\) for SF4"):
        sft.decode(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"K=5 exceeds k_max=4"):
        sft.matmul_acc(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), a_bits=8, w_bits=8,
                       k_max=4)
    with pytest.raises(ValueError, match=r"rounding must be one of"):
        sft.fake_quantize(torch.zeros(2), 8, rounding="nearest")

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
                    op = sft.LinearOp(torch.tensor(w, device=device), a_bits=a_bits, w_bits=w_bits, out_bits=o_bits,
                                      bias=kw["bias"], shift=kw["shift"], mult=kw["mult"], relu=relu,
                                      rounding=rounding)
                    got, _ = op(torch.tensor(x, device=device), torch.tensor(kw["x_exponent"], device=device))
                    np.testing.assert_array_equal(got.cpu().numpy(), want)


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
        sft.LinearOp(torch.zeros(1, 5, dtype=torch.long), a_bits=8, w_bits=8, out_bits=8, k_max=4)
    with pytest.raises(ValueError, match=r"rounding must be one of"):
        sft.fake_quantize(torch.zeros(2), 8, rounding="nearest")


# --------------------------------------------------------------------------- per-token rows and LinearOp

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _rows(seed, t=9, k=70):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)) * np.exp(rng.uniform(-10, 10, (t, 1)))
    x[1] = 0.0
    x[2, :3] = [np.inf, -np.inf, 0.0]
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
def test_rows_helpers_equal_numpy(bits, device):
    x = _rows(bits)
    for rounding in ROUNDINGS:
        for dtype in (torch.float32, torch.float64):
            xt = torch.tensor(x, dtype=dtype, device=device)
            xn = xt.cpu().numpy()
            codes, e = sft.encode_rows(xt, bits, rounding)
            wc, we = sfx.encode_rows(xn, bits, rounding)
            np.testing.assert_array_equal(codes.cpu().numpy(), wc)
            np.testing.assert_array_equal(e.cpu().numpy(), we)
            q, _ = sft.encode_rows(xt, bits, rounding, signed=True)
            np.testing.assert_array_equal(q.cpu().numpy(), sfx._signed_from_codes(wc.astype(np.int64), bits))
            qf, _ = sft.encode_rows(xt, bits, rounding, signed=True, dtype=torch.float32)
            assert qf.dtype == torch.float32 and torch.equal(qf, q.to(torch.float32))
            assert not torch.signbit(qf[qf == 0]).any()  # no negative zero
            finite = torch.tensor(np.where(np.isfinite(x), x, 0.0), dtype=dtype, device=device)
            sc, se, sm = sft.encode_rows_scaled(finite, bits, rounding=rounding)
            nc, ne, nm = sfx.encode_rows_scaled(finite.cpu().numpy(), bits, rounding=rounding)
            np.testing.assert_array_equal(sc.cpu().numpy(), nc)
            np.testing.assert_array_equal(se.cpu().numpy(), ne)
            np.testing.assert_array_equal(sm.cpu().numpy(), nm)
    s = np.exp(np.random.default_rng(3).uniform(-80, 80, 500))
    m, e = sft.fold_row_scale(torch.tensor(s))
    nm, ne = sfx.fold_row_scale(s)
    np.testing.assert_array_equal(m.numpy(), nm)
    np.testing.assert_array_equal(e.numpy(), ne)
    with pytest.raises(ValueError, match=r"a float dtype holds signed integers only"):
        sft.encode_rows(torch.zeros(2, 2), 8, dtype=torch.float32)


MATMUL_MODES = ["auto", "int8", "float32", "float64"]


@st.composite
def op_case(draw):
    a_bits, w_bits, o_bits = draw(st.integers(2, 16)), draw(st.integers(2, 16)), draw(st.integers(2, 16))
    t, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    k = draw(st.sampled_from([1, 3, 17, 64, 300, 1100, 2100]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    extreme = draw(st.booleans())  # every code at its largest magnitude: the exactness bounds
    if extreme:
        sa, sw = rng.integers(0, 2, (t, k)), rng.integers(0, 2, (n, k))
        x = (sa << (a_bits - 1)) | ((1 << (a_bits - 1)) - 1)
        w = (sw << (w_bits - 1)) | ((1 << (w_bits - 1)) - 1)
    else:
        x, w = rng.integers(0, 1 << a_bits, (t, k)), rng.integers(0, 1 << w_bits, (n, k))
    use_mult, use_xmult = draw(st.booleans()), draw(st.booleans())
    f = a_bits + w_bits - 2 + 16 * use_mult + 16 * use_xmult
    base = f - (o_bits - 1)
    xexp = rng.integers(-3, 4, t)
    shift = rng.integers(max(base - 60, -124), min(base - 3, 124) + 1, n)
    blim = (1 << (sfx.accumulator_bits(a_bits, w_bits) - 2)) - 1
    bias = rng.integers(-blim, blim + 1, n) if draw(st.booleans()) else None
    return dict(x=x, w=w, a_bits=a_bits, w_bits=w_bits, out_bits=o_bits, bias=bias, shift=shift,
                relu=draw(st.booleans()), rounding=draw(st.sampled_from(ROUNDINGS)),
                mult=rng.integers(1, 1 << 16, n) if use_mult else None, x_exponent=xexp,
                xmult=rng.integers(1, 1 << 16, t) if use_xmult else None)


@settings(max_examples=60, deadline=None)
@given(case=op_case(), matmul=st.sampled_from(MATMUL_MODES))
def test_linear_op_equal_numpy(case, matmul):
    """LinearOp (every matmul and requantization strategy) returns sfx.linear's codes and count."""
    c = dict(case)
    x, w, xexp, xmult = c.pop("x"), c.pop("w"), c.pop("x_exponent"), c.pop("xmult")
    want, stats = sfx.linear_with_stats(x, w, x_exponent=xexp, xmult=xmult, **c)
    op = sft.LinearOp(torch.tensor(w), xmult=xmult is not None, matmul=matmul, **c)
    got, nsat = op(torch.tensor(x), torch.tensor(xexp), None if xmult is None else torch.tensor(xmult))
    np.testing.assert_array_equal(got.numpy(), want)
    assert int(nsat) == stats.n_saturated
    signed = sfx._signed_from_codes(want.astype(np.int64), c["out_bits"])
    q, _ = op(torch.tensor(sfx._signed_from_codes(x, c["a_bits"])), torch.tensor(xexp),
              None if xmult is None else torch.tensor(xmult), signed=True, out="signed")
    np.testing.assert_array_equal(q.numpy(), signed)
    scale = torch.exp2(torch.arange(w.shape[0], dtype=torch.float64) - 3)
    v, _ = op(torch.tensor(x), torch.tensor(xexp), None if xmult is None else torch.tensor(xmult),
              out="values", out_scale=scale)
    np.testing.assert_array_equal(v.numpy(), signed * scale.numpy()[None, :])


@pytest.mark.parametrize("matmul", MATMUL_MODES)
def test_linear_op_row_bias_and_float_inputs(matmul):
    rng = np.random.default_rng(11)
    w = rng.integers(0, 1 << 8, (5, 700))
    x = rng.integers(0, 1 << 16, (4, 700))
    kw = dict(a_bits=16, w_bits=8, out_bits=12, shift=rng.integers(0, 20, 5), mult=rng.integers(1 << 15, 1 << 16, 5))
    op = sft.LinearOp(torch.tensor(w), row_bias=True, matmul=matmul, **kw)
    for b in (rng.integers(-(1 << 30), 1 << 30, 5), np.zeros(5, dtype=np.int64)):
        want = sfx.linear(x, w, bias=b, **kw)
        got, _ = op(torch.tensor(x), bias=op.check_bias(b))
        np.testing.assert_array_equal(got.numpy(), want)
        xs = torch.tensor(sfx._signed_from_codes(x, 16), dtype=torch.float64)
        got2, _ = op(xs, signed=True, bias=op.check_bias(b))
        np.testing.assert_array_equal(got2.numpy(), want)


def test_linear_op_errors():
    w = torch.zeros(3, 4, dtype=torch.int64)
    op = sft.LinearOp(w, a_bits=8, w_bits=8, out_bits=8, shift=0)
    with pytest.raises(TypeError, match=r"x_codes must be an integer tensor of SF8 codes, got torch.float32"):
        op(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must hold integers"):
        op(torch.full((2, 4), 0.5), signed=True)
    with pytest.raises(ValueError, match=r"x_codes must hold SF8 codes in 0\.\.255, got values in 0\.\.256"):
        op(torch.tensor([[0, 0, 0, 256]]))
    with pytest.raises(ValueError, match=r"x_codes must be \[T, K=4\]"):
        op(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x_exponent must be in"):
        op(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([100]))
    with pytest.raises(ValueError, match=r"xmult given but this LinearOp was built with xmult=False"):
        op(torch.zeros(1, 4, dtype=torch.int64), xmult=torch.tensor([1 << 15]))
    with pytest.raises(ValueError, match=r"out must be 'codes', 'signed' or 'values'"):
        op(torch.zeros(1, 4, dtype=torch.int64), out="floats")
    with pytest.raises(ValueError, match=r"out='values' needs out_scale"):
        op(torch.zeros(1, 4, dtype=torch.int64), out="values")
    with pytest.raises(ValueError, match=r"matmul must be one of"):
        sft.LinearOp(w, a_bits=8, w_bits=8, out_bits=8, matmul="bf16")
    with pytest.raises(ValueError, match=r"bias given to a call but this LinearOp was built with row_bias=False"):
        op(torch.zeros(1, 4, dtype=torch.int64), bias=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("matmul", MATMUL_MODES)
@pytest.mark.parametrize("a_bits,w_bits", [(16, 8), (8, 16), (16, 16), (12, 12), (8, 8), (4, 16), (2, 2)])
def test_linear_op_exact_at_the_bounds(a_bits, w_bits, matmul):
    """Long reductions of largest-magnitude codes (every partial sum at its bound; the
    float strategies split into digits and K-chunks), and random codes; all output widths."""
    rng = np.random.default_rng(a_bits * 100 + w_bits)
    t, n, k = 3, 4, 2100
    for extreme in (True, False):
        if extreme:
            x = (rng.integers(0, 2, (t, k)) << (a_bits - 1)) | ((1 << (a_bits - 1)) - 1)
            w = (rng.integers(0, 2, (n, k)) << (w_bits - 1)) | ((1 << (w_bits - 1)) - 1)
            x[0] = x[0] & ((1 << (a_bits - 1)) - 1)  # one row and one channel all positive: |acc| at its max
            w[0] = w[0] & ((1 << (w_bits - 1)) - 1)
        else:
            x, w = rng.integers(0, 1 << a_bits, (t, k)), rng.integers(0, 1 << w_bits, (n, k))
        f = a_bits + w_bits - 2
        for o_bits in (16, 4):
            # shifts that keep the low bits of the accumulator (r small): an inexact sum changes codes
            kw = dict(a_bits=a_bits, w_bits=w_bits, out_bits=o_bits, shift=np.full(n, f - (o_bits - 1)),
                      x_exponent=np.zeros(t, dtype=np.int64))
            want, st_ = sfx.linear_with_stats(x, w, **kw)
            op = sft.LinearOp(torch.tensor(w), matmul=matmul, **{k_: v for k_, v in kw.items() if k_ != "x_exponent"})
            got, nsat = op(torch.tensor(x))
            np.testing.assert_array_equal(got.numpy(), want)
            assert int(nsat) == st_.n_saturated
            # the exact accumulator itself, through a shift that keeps every bit at 16-bit output
            acc = sfx.matmul_acc(x, w, a_bits=a_bits, w_bits=w_bits)
            assert op._matmul(torch.tensor(sfx._signed_from_codes(x, a_bits))).to(torch.float64).numpy().tolist() \
                == acc.astype(np.float64).tolist()

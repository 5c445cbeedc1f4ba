"""The numpy SFx model against SPEC.md: exhaustive code tables, a rational scalar
reference (tests/sfx_reference.py), an external oracle (torch's fake quantize), and
every error path with its message."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sfx_reference as ref
from superfloat.sw import sfx

ALL_BITS = list(range(2, 17))
ROUNDINGS = ["nearest_even", "toward_zero"]


def all_codes(bits):
    return np.arange(1 << bits, dtype=np.int64)


def canonical_codes(bits):
    c = all_codes(bits)
    return c[c != (1 << (bits - 1))]  # drop negative zero


# --------------------------------------------------------------------------- format tables


@pytest.mark.parametrize("bits", ALL_BITS)
def test_decode_is_exact_for_every_code(bits):
    got = sfx.decode(all_codes(bits), bits)
    assert got.dtype == np.float64
    want = [ref.value(int(c), bits) for c in all_codes(bits)]
    assert all(Fraction(float(g)) == w for g, w in zip(got, want))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_encode_decode_roundtrip_every_canonical_code(bits, rounding):
    c = canonical_codes(bits)
    for e in (0, 5, -7):
        back = sfx.encode(sfx.decode(c, bits, e), bits, e, rounding)
        assert back.dtype == sfx.code_dtype(bits)
        np.testing.assert_array_equal(back.astype(np.int64), c)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_negative_zero_decodes_to_positive_zero_and_reencodes_canonically(bits):
    negzero = 1 << (bits - 1)
    v = sfx.decode(np.array([negzero]), bits)
    assert v[0] == 0.0 and not np.signbit(v[0])
    assert sfx.encode(v, bits)[0] == 0


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_encode_never_produces_negative_zero(bits, rounding):
    step = 2.0 ** -(bits - 1)
    v = -np.array([0.0, -0.0, 1e-300, step / 2, step / 4, step * 0.999 if rounding == "toward_zero" else step / 2])
    v = np.concatenate([v, -np.abs(v)])
    codes = sfx.encode(v, bits, rounding=rounding)
    assert not np.any(codes == (1 << (bits - 1)))


def test_dtypes_of_codes():
    assert sfx.encode([0.5], 8).dtype == np.uint8
    assert sfx.encode([0.5], 9).dtype == np.uint16
    assert sfx.encode([0.5], 16).dtype == np.uint16


def test_sf4_table_matches_docs():
    # The 16 SF4 codes (docs/sfx-format.md): sign bit 3, magnitude bits 2..0, step 1/8.
    want = [0, 1, 2, 3, 4, 5, 6, 7, 0, -1, -2, -3, -4, -5, -6, -7]
    np.testing.assert_array_equal(sfx.decode(all_codes(4), 4) * 8, want)


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("bits", ALL_BITS)
def test_ties_go_to_even(bits):
    m = bits - 1
    lim = (1 << m) - 1
    n = np.arange(-lim, lim)  # ties between n and n+1
    v = (n + 0.5) * 2.0 ** -m
    got = sfx.decode(sfx.encode(v, bits), bits) * 2 ** m
    want = np.where(n % 2 == 0, n, n + 1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_toward_zero_truncates(bits):
    m = bits - 1
    lim = (1 << m) - 1
    n = np.arange(-lim + 1, lim)
    for frac in (0.25, 0.5, 0.75, 0.999):
        v = (n + np.sign(n) * frac) * 2.0 ** -m
        got = sfx.decode(sfx.encode(v, bits, rounding="toward_zero"), bits) * 2 ** m
        np.testing.assert_array_equal(got, n)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", ALL_BITS)
def test_saturation_and_infinities(bits, rounding):
    lim = 1 - 2.0 ** -(bits - 1)
    v = np.array([1.0, 2.0, 1e300, np.inf, -1.0, -3.5, -np.inf])
    got = sfx.decode(sfx.encode(v, bits, rounding=rounding), bits)
    np.testing.assert_array_equal(got, [lim, lim, lim, lim, -lim, -lim, -lim])


def test_exponent_scales_by_powers_of_two():
    v = np.array([3.0, -100.0, 0.001])
    for e in range(-10, 10):
        np.testing.assert_array_equal(sfx.encode(v, 8, e), sfx.encode(v * 2.0 ** -e, 8, 0))


def test_broadcast_per_channel_exponent():
    w = np.array([[0.5, -0.25], [3.0, 1.5]])
    e = np.array([[0], [2]])
    got = sfx.encode(w, 8, e)
    np.testing.assert_array_equal(got[0], sfx.encode(w[0], 8, 0))
    np.testing.assert_array_equal(got[1], sfx.encode(w[1], 8, 2))


# --------------------------------------------------------------------------- input dtypes


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
def test_float_input_dtypes_agree(bits):
    rng = np.random.default_rng(bits)
    v64 = rng.standard_normal(5000) * 2
    for e in (0, 1, -4, 127, -128):
        for np_dt in (np.float16, np.float32):
            v = v64.astype(np_dt)
            np.testing.assert_array_equal(sfx.encode(v, bits, e), sfx.encode(v.astype(np.float64), bits, e))
        tb = torch.tensor(v64, dtype=torch.bfloat16)
        np.testing.assert_array_equal(sfx.encode(tb, bits, e), sfx.encode(tb.double().numpy(), bits, e))
        t32 = torch.tensor(v64, dtype=torch.float32)
        np.testing.assert_array_equal(sfx.encode(t32, bits, e), sfx.encode(t32.numpy().astype(np.float64), bits, e))


def test_float32_extremes_agree_with_float64():
    tiny = np.array([1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38, np.float32(2.0 ** -130)], dtype=np.float32)
    for bits in (2, 8, 16):
        for e in (-128, 0, 127):
            np.testing.assert_array_equal(sfx.encode(tiny, bits, e), sfx.encode(tiny.astype(np.float64), bits, e))


def test_large_input_uses_chunked_path_identically():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(1 << 19) * 0.3).astype(np.float32)
    big = sfx.encode(v, 8)
    pieces = np.concatenate([sfx.encode(p, 8) for p in np.array_split(v, 7)])
    np.testing.assert_array_equal(big, pieces)


# --------------------------------------------------------------------------- property tests vs the rational reference

floats = st.floats(allow_nan=False, allow_infinity=True, width=64)


@settings(max_examples=400, deadline=None)
@given(v=floats, bits=st.integers(2, 16), e=st.integers(-128, 127), rounding=st.sampled_from(ROUNDINGS))
def test_encode_matches_rational_reference(v, bits, e, rounding):
    assert int(sfx.encode(np.array([v]), bits, e, rounding)[0]) == ref.encode(v, bits, e, rounding)


@settings(max_examples=300, deadline=None)
@given(acc=st.integers(-(1 << 44), 1 << 44), bits=st.integers(2, 16), shift=st.integers(-40, 40),
       f=st.integers(2, 30), relu=st.booleans(), rounding=st.sampled_from(ROUNDINGS),
       mult=st.one_of(st.none(), st.integers(1, (1 << 16) - 1)),
       xmult=st.one_of(st.none(), st.integers(1, (1 << 16) - 1)))
def test_requantize_matches_rational_reference(acc, bits, shift, f, relu, rounding, mult, xmult):
    r = f + (16 if mult is not None else 0) + (16 if xmult is not None else 0) - (bits - 1) - shift
    if not 0 <= r <= 63:
        return
    code, nsat = sfx.requantize(np.array([acc]), frac_bits=f, shift=shift, out_bits=bits, relu=relu,
                                rounding=rounding, mult=mult, xmult=xmult)
    want, sat = ref.requantize(acc, f, shift, bits, relu, rounding, mult, xmult)
    assert (int(code[0]), nsat) == (want, int(sat))


@settings(max_examples=300, deadline=None)
@given(acc=st.one_of(st.integers(-(1 << 63), (1 << 63) - 1),
                     st.sampled_from([-(1 << 63), (1 << 63) - 1, -(1 << 62), 1 << 62, -1, 1, 0])),
       bits=st.integers(2, 16), r=st.integers(0, 63), relu=st.booleans(), rounding=st.sampled_from(ROUNDINGS))
def test_requantize_whole_int64_range(acc, bits, r, relu, rounding):
    """Every int64 accumulator (SPEC section 4; the issue-17 audit found -2**63 toward zero wrong)."""
    f = r + bits - 1
    code, nsat = sfx.requantize(np.array([acc], dtype=np.int64), frac_bits=f, out_bits=bits, relu=relu,
                                rounding=rounding)
    want, sat = ref.requantize(acc, f, 0, bits, relu, rounding)
    assert (int(code[0]), nsat) == (want, int(sat))


def test_requantize_smallest_int64_toward_zero():
    code, nsat = sfx.requantize(np.array([-2 ** 63]), frac_bits=10, out_bits=8, rounding="toward_zero")
    assert (int(code[0]), nsat) == (255, 1)


@st.composite
def linear_case(draw):
    a_bits, w_bits, o_bits = draw(st.integers(2, 16)), draw(st.integers(2, 16)), draw(st.integers(2, 16))
    t, n, k = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    x = draw(st.lists(st.lists(st.integers(0, (1 << a_bits) - 1), min_size=k, max_size=k), min_size=t, max_size=t))
    w = draw(st.lists(st.lists(st.integers(0, (1 << w_bits) - 1), min_size=k, max_size=k), min_size=n, max_size=n))
    use_mult, use_xmult = draw(st.booleans()), draw(st.booleans())
    f = a_bits + w_bits - 2 + (16 if use_mult else 0) + (16 if use_xmult else 0)
    mult = draw(st.lists(st.integers(1, 65535), min_size=n, max_size=n)) if use_mult else None
    xmult = draw(st.lists(st.integers(1, 65535), min_size=t, max_size=t)) if use_xmult else None
    # pick shifts so that r = F - Mo - shift - xexp stays in 0..63
    base = f - (o_bits - 1)
    xexp = draw(st.lists(st.integers(-3, 3), min_size=t, max_size=t))
    shift = draw(st.lists(st.integers(max(base - 60, -124), min(base - 3, 124)), min_size=n, max_size=n))
    blim = (1 << (sfx.accumulator_bits(a_bits, w_bits) - 2)) - 1  # SPEC 3: |bias| < 2**(A-2)
    bias = draw(st.lists(st.integers(-blim, blim), min_size=n, max_size=n))
    return dict(x=x, w=w, a_bits=a_bits, w_bits=w_bits, out_bits=o_bits, bias=bias, shift=shift,
                relu=draw(st.booleans()), rounding=draw(st.sampled_from(ROUNDINGS)), mult=mult, xexp=xexp,
                xmult=xmult)


@settings(max_examples=150, deadline=None)
@given(case=linear_case())
def test_linear_matches_rational_reference(case):
    c = case
    got = sfx.linear(np.array(c["x"]), np.array(c["w"]), a_bits=c["a_bits"], w_bits=c["w_bits"],
                     out_bits=c["out_bits"], bias=c["bias"], shift=c["shift"], relu=c["relu"],
                     rounding=c["rounding"], mult=c["mult"], x_exponent=c["xexp"], xmult=c["xmult"])
    want = ref.linear(c["x"], c["w"], c["a_bits"], c["w_bits"], c["out_bits"], c["bias"], c["shift"], c["relu"],
                      c["rounding"], c["mult"], c["xexp"], c["xmult"])
    assert got.tolist() == want


# --------------------------------------------------------------------------- requantize tables


@pytest.mark.parametrize("use_mult", [False, True])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_requantize_ties_at_every_shift(rounding, use_mult):
    out_bits = 16
    mo = out_bits - 1
    for r in range(1, 48 if use_mult else 64):
        f = mo + r  # shift = 0 -> right shift r
        mult = 1 << 15 if use_mult else None  # exactly 0.5: scale the accumulator by 2**15, F by 16
        for q in (0, 1, 2, 3, 100, 101, -1, -2, -101):
            base = q << r
            for acc in (base + (1 << (r - 1)), base - (1 << (r - 1)), base + 1, base - 1):
                a = acc * 2 if use_mult else acc  # times mult (2**15) / 2**16 -> back to acc
                if use_mult and abs(a) >= 1 << 47:
                    continue
                if abs(a) >= 1 << 62:
                    continue
                code, _ = sfx.requantize(np.array([a]), frac_bits=f, out_bits=out_bits, rounding=rounding,
                                         mult=mult)
                want, _ = ref.requantize(acc, f, 0, out_bits, False, rounding, None)
                assert int(code[0]) == want, (r, acc)


def test_requantize_ties_table_small():
    # acc / 2**2 with F = Mo + 2: ties at .5
    acc = np.array([-10, -6, -2, 2, 6, 10, 1, 3, -3, 5])
    codes, _ = sfx.requantize(acc, frac_bits=7 + 2, out_bits=8)
    q = sfx.decode(codes, 8) * 128
    np.testing.assert_array_equal(q, [-2, -2, 0, 0, 2, 2, 0, 1, -1, 1])
    codes, _ = sfx.requantize(acc, frac_bits=7 + 2, out_bits=8, rounding="toward_zero")
    np.testing.assert_array_equal(sfx.decode(codes, 8) * 128, [-2, -1, 0, 0, 1, 2, 0, 0, 0, 1])


def test_requantize_relu_and_saturation_count():
    acc = np.array([-1000, 1000, 50, -50, 0])
    codes, nsat = sfx.requantize(acc, frac_bits=7, out_bits=4, relu=True)
    np.testing.assert_array_equal(sfx.decode(codes, 4) * 8, [0, 7, 3, 0, 0])  # 50/16 = 3.125 -> 3
    assert nsat == 1
    codes, nsat = sfx.requantize(acc, frac_bits=7, out_bits=4)
    assert nsat == 2


def test_requantize_negative_values_rounding_to_zero_give_code_zero():
    codes, _ = sfx.requantize(np.array([-1, -2, -3]), frac_bits=10, out_bits=8)
    np.testing.assert_array_equal(codes, [0, 0, 0])
    codes, _ = sfx.requantize(np.array([-7]), frac_bits=10, out_bits=8, rounding="toward_zero")
    assert codes[0] == 0


def test_requantize_shift_zero_right_shift_zero_is_identity():
    acc = np.arange(-127, 128)
    codes, nsat = sfx.requantize(acc, frac_bits=7, out_bits=8)
    np.testing.assert_array_equal(sfx.decode(codes, 8) * 128, acc)
    assert nsat == 0


# --------------------------------------------------------------------------- linear


def _random_linear_case(rng, t=9, n=11, k=37, a_bits=8, w_bits=4, out_bits=8, mult=True):
    x = rng.integers(0, 1 << a_bits, (t, k))
    w = rng.integers(0, 1 << w_bits, (n, k))
    f = a_bits + w_bits - 2 + (16 if mult else 0)
    kw = dict(a_bits=a_bits, w_bits=w_bits, out_bits=out_bits, bias=rng.integers(-5000, 5000, n),
              shift=rng.integers(f - out_bits - 20, f - out_bits - 4, n), mult=rng.integers(1 << 15, 1 << 16, n) if mult else None,
              x_exponent=rng.integers(-3, 3, t), rounding="nearest_even")
    return x, w, kw


def test_linear_invariant_under_splitting_t_and_n():
    rng = np.random.default_rng(3)
    x, w, kw = _random_linear_case(rng)
    full = sfx.linear(x, w, **kw)
    for ts in (slice(0, 4), slice(4, 9)):
        for ns in (slice(0, 5), slice(5, 11)):
            part = sfx.linear(x[ts], w[ns], **{**kw, "bias": kw["bias"][ns], "shift": kw["shift"][ns],
                                               "mult": kw["mult"][ns], "x_exponent": kw["x_exponent"][ts]})
            np.testing.assert_array_equal(part, full[ts, ns])


def test_linear_invariant_under_splitting_k():
    rng = np.random.default_rng(4)
    x, w, kw = _random_linear_case(rng, k=50)
    full = sfx.linear(x, w, **kw)
    acc = sum(sfx.matmul_acc(x[:, s:s + 7], w[:, s:s + 7], a_bits=8, w_bits=4) for s in range(0, 50, 7))
    acc = acc + kw["bias"][None, :]
    codes, _ = sfx.requantize(acc, frac_bits=8 - 1 + 4 - 1, shift=kw["shift"][None, :] + kw["x_exponent"][:, None],
                              out_bits=8, mult=kw["mult"][None, :])
    np.testing.assert_array_equal(codes, full)


def test_matmul_acc_exact_at_the_extremes():
    # All-max magnitudes, K = k_max = 16384, SF16 x SF16: sum = 16384 * (2**15-1)**2, beyond 2**43.
    k = 16384
    x = np.full((2, k), (1 << 15) - 1)
    w = np.full((3, k), (1 << 16) - 1)  # negative max
    acc = sfx.matmul_acc(x, w, a_bits=16, w_bits=16)
    assert acc.dtype == np.int64
    assert (acc == -k * ((1 << 15) - 1) ** 2).all()


def test_matmul_acc_chunks_beyond_float64_exactness():
    # k_max large enough that K * max product exceeds 2**53: the chunked path must stay exact.
    k = 1 << 20
    x = np.full((1, k), (1 << 15) - 1, dtype=np.uint16)
    w = np.full((1, k), (1 << 15) - 1, dtype=np.uint16)
    acc = sfx.matmul_acc(x, w, a_bits=16, w_bits=16, k_max=k)
    assert int(acc[0, 0]) == k * ((1 << 15) - 1) ** 2


def test_linear_scalar_and_per_channel_parameters_agree():
    rng = np.random.default_rng(5)
    x, w, kw = _random_linear_case(rng, mult=False)
    a = sfx.linear(x, w, a_bits=8, w_bits=4, out_bits=8, shift=3, bias=7)
    b = sfx.linear(x, w, a_bits=8, w_bits=4, out_bits=8, shift=np.full(11, 3), bias=np.full(11, 7),
                   x_exponent=np.zeros(9, dtype=np.int8))
    np.testing.assert_array_equal(a, b)


def test_linear_with_stats_counts_saturation():
    x = np.full((2, 4), 16)  # 0.125
    w = np.full((3, 4), 16)
    codes, stats = sfx.linear_with_stats(x, w, a_bits=8, w_bits=8, out_bits=8)  # 4 * 0.125**2 = 0.0625
    assert stats.n_saturated == 0 and stats.macs == 24 and (codes == 8).all()
    codes, stats = sfx.linear_with_stats(x, w, a_bits=8, w_bits=8, out_bits=8, shift=4)  # 1.0 saturates
    assert stats.n_saturated == 6 and (codes == 127).all()


# --------------------------------------------------------------------------- choose_exponent and fold_scale


@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_choose_exponent_is_the_smallest_that_fits(bits):
    rng = np.random.default_rng(bits)
    v = rng.standard_normal((20, 30)) * np.exp(rng.uniform(-8, 8, (20, 1)))
    e = sfx.choose_exponent(v, bits, axis=0)
    assert e.dtype == np.int8 and e.shape == (20,)
    lim = 1 - 2.0 ** -(bits - 1)
    amax = np.abs(v).max(axis=1)
    assert (amax <= lim * 2.0 ** e.astype(float)).all()
    assert (amax > lim * 2.0 ** (e.astype(float) - 1)).all()


def test_choose_exponent_boundary_exact():
    # max|v| exactly (1 - 2**-M) * 2**E must give E, one ulp more gives E + 1.
    m = 7
    edge = (1 - 2.0 ** -m) * 4
    assert sfx.choose_exponent(np.array([edge]), 8) == 2
    assert sfx.choose_exponent(np.array([np.nextafter(edge, 10)]), 8) == 3
    assert sfx.choose_exponent(np.zeros(5), 8) == 0
    assert sfx.choose_exponent(np.array([1e-300]), 8) == -128
    assert sfx.choose_exponent(np.array([np.inf]), 8) == 127


def test_choose_exponent_axes_and_keepdims():
    v = np.array([[0.1, 5.0], [0.0, 0.0], [-300.0, 1.0]])
    np.testing.assert_array_equal(sfx.choose_exponent(v, 8, axis=0), [3, 0, 9])
    np.testing.assert_array_equal(sfx.choose_exponent(v, 8, axis=1), [9, 3])
    assert sfx.choose_exponent(v, 8, axis=0, keepdims=True).shape == (3, 1)
    assert sfx.choose_exponent(v, 8) == 9


def test_fold_scale_is_exact_to_16_significant_bits():
    rng = np.random.default_rng(0)
    s = np.exp(rng.uniform(-30, 30, 2000))
    mult, shift = sfx.fold_scale(s)
    assert ((mult >= 1 << 15) & (mult < 1 << 16)).all()
    for si, mi, hi in zip(s, mult, shift):
        f = Fraction(float(si))
        e = math.floor(math.log2(f)) if f >= 1 else -math.ceil(-math.log2(f))
        # reference: round f to 16 significant bits, half to even
        while f >= Fraction(2) ** (e + 1):
            e += 1
        while f < Fraction(2) ** e:
            e -= 1
        want = round(f / Fraction(2) ** (e - 15))
        we = e + 1
        if want == 1 << 16:
            want, we = 1 << 15, we + 1
        assert (int(mi), int(hi)) == (want, we)


def test_fold_scale_scalar_and_carry():
    assert sfx.fold_scale(1.0) == (1 << 15, 1)
    assert sfx.fold_scale(0.75) == (3 << 14, 0)
    # 1 - 2**-20 rounds up to 1.0: the carry gives mult 2**15 with the exponent bumped
    assert sfx.fold_scale(1 - 2.0 ** -20) == (1 << 15, 1)


# --------------------------------------------------------------------------- external oracle


@pytest.mark.parametrize("bits", ALL_BITS)
def test_matches_torch_fake_quantize_per_tensor_affine(bits):
    rng = np.random.default_rng(bits)
    t = torch.tensor(np.concatenate([rng.standard_normal(20000) * 0.6, rng.uniform(-1.2, 1.2, 20000),
                                     (np.arange(-(1 << (bits - 1)), 1 << (bits - 1)) + 0.5) * 2.0 ** -(bits - 1)]),
                     dtype=torch.float32)
    lim = (1 << (bits - 1)) - 1
    oracle = torch.fake_quantize_per_tensor_affine(t, 2.0 ** -(bits - 1), 0, -lim, lim)
    ours = sfx.decode(sfx.encode(t, bits), bits)
    np.testing.assert_array_equal(ours, oracle.double().numpy())


# --------------------------------------------------------------------------- errors


def test_error_nan_count_and_first_index():
    v = np.zeros((3, 4))
    v[1, 2] = np.nan
    v[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"values contains 2 NaN value\(s\); the first is at index \(1, 2\)"):
        sfx.encode(v, 8)
    with pytest.raises(ValueError, match=r"values contains 2 NaN"):
        sfx.choose_exponent(v, 8)


@pytest.mark.parametrize("bits,exc,msg", [(1, ValueError, r"bits must be in 2\.\.16.*got 1"),
                                          (17, ValueError, r"bits must be in 2\.\.16.*got 17"),
                                          (8.0, TypeError, r"bits must be an int"),
                                          (True, TypeError, r"bits must be an int")])
def test_error_bits(bits, exc, msg):
    with pytest.raises(exc, match=msg):
        sfx.encode([0.5], bits)
    with pytest.raises(exc, match=msg):
        sfx.decode([0], bits)


def test_error_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must be <= 15: 1 value\(s\) above, the first 16 at index \(2,\)"):
        sfx.decode(np.array([0, 3, 16]), 4)
    with pytest.raises(ValueError, match=r"codes must be >= 0"):
        sfx.decode(np.array([-1]), 4)
    with pytest.raises(TypeError, match=r"codes must be an integer array of SF4 codes"):
        sfx.decode(np.array([0.5]), 4)
    with pytest.raises(ValueError, match=r"x_codes must be <= 255"):
        sfx.linear(np.array([[256]]), np.array([[1]]), a_bits=8, w_bits=8, out_bits=8)


def test_error_k_exceeds_k_max():
    with pytest.raises(ValueError, match=r"K=17 exceeds k_max=16"):
        sfx.matmul_acc(np.zeros((1, 17), int), np.zeros((1, 17), int), a_bits=8, w_bits=8, k_max=16)
    with pytest.raises(ValueError, match=r"K=17 exceeds k_max=16"):
        sfx.linear(np.zeros((1, 17), int), np.zeros((1, 17), int), a_bits=8, w_bits=8, out_bits=8, k_max=16)


def test_error_bias_out_of_range():
    a = sfx.accumulator_bits(8, 8, 16)  # 14 + 4 + 2 = 20
    assert a == 20
    ok = (1 << 18) - 1
    sfx.linear(np.zeros((1, 2), int), np.zeros((1, 2), int), a_bits=8, w_bits=8, out_bits=8, k_max=16, bias=-ok,
               shift=-20)
    with pytest.raises(ValueError, match=r"bias must be <= 262143"):
        sfx.linear(np.zeros((1, 2), int), np.zeros((1, 2), int), a_bits=8, w_bits=8, out_bits=8, k_max=16,
                   bias=ok + 1)


def test_error_shapes():
    with pytest.raises(ValueError, match=r"x_codes is \[T=2, K=3\] but w_codes is \[N=4, K=5\]"):
        sfx.linear(np.zeros((2, 3), int), np.zeros((4, 5), int), a_bits=8, w_bits=8, out_bits=8)
    with pytest.raises(ValueError, match=r"x_codes must be a 2-D matrix, got shape \[3\]"):
        sfx.matmul_acc(np.zeros(3, int), np.zeros((4, 3), int), a_bits=8, w_bits=8)
    with pytest.raises(ValueError, match=r"shift must be a scalar or have shape \[4\]"):
        sfx.linear(np.zeros((2, 3), int), np.zeros((4, 3), int), a_bits=8, w_bits=8, out_bits=8, shift=[1, 2])
    with pytest.raises(ValueError, match=r"x_exponent must be a scalar or have shape \[2\]"):
        sfx.linear(np.zeros((2, 3), int), np.zeros((4, 3), int), a_bits=8, w_bits=8, out_bits=8, x_exponent=[1])


def test_error_right_shift_out_of_range():
    with pytest.raises(ValueError, match=r"right shift r = frac_bits - \(out_bits - 1\) - shift = -1 is outside 0\.\.63"):
        sfx.requantize(np.array([1]), frac_bits=7, out_bits=8, shift=1)
    with pytest.raises(ValueError, match=r"right shift r .* = 64 .* outside 0\.\.63"):
        sfx.linear(np.zeros((1, 1), int), np.zeros((1, 1), int), a_bits=8, w_bits=8, out_bits=8, shift=-57)
    with pytest.raises(ValueError, match=r"outside 0\.\.63"):
        sfx.linear(np.zeros((1, 1), int), np.zeros((1, 1), int), a_bits=8, w_bits=8, out_bits=8, shift=0,
                   x_exponent=[10])


def test_error_other_arguments():
    with pytest.raises(ValueError, match=r"rounding must be one of 'nearest_even', 'toward_zero', got 'up'"):
        sfx.encode([0.1], 8, rounding="up")
    with pytest.raises(ValueError, match=r"exponent must be <= 127"):
        sfx.encode([0.1], 8, exponent=200)
    with pytest.raises(TypeError, match=r"exponent must hold integers"):
        sfx.encode([0.1], 8, exponent=0.5)
    with pytest.raises(ValueError, match=r"mult must be >= 1"):
        sfx.requantize(np.array([1]), frac_bits=30, out_bits=8, mult=0)
    with pytest.raises(ValueError, match=r"mult must be <= 65535"):
        sfx.linear(np.zeros((1, 1), int), np.zeros((1, 1), int), a_bits=8, w_bits=8, out_bits=8, mult=65536)
    with pytest.raises(ValueError, match=r"scale must be positive and finite: 1 value\(s\) are not, the first -1\.0"):
        sfx.fold_scale([1.0, -1.0])
    with pytest.raises(ValueError, match=r"scale contains 1 NaN"):
        sfx.fold_scale([np.nan])
    with pytest.raises(ValueError, match=r"k_max must be in 1\.\."):
        sfx.matmul_acc(np.zeros((1, 1), int), np.zeros((1, 1), int), a_bits=8, w_bits=8, k_max=0)
    with pytest.raises(ValueError, match=r"K must be at least 1"):
        sfx.linear(np.zeros((1, 0), int), np.zeros((1, 0), int), a_bits=8, w_bits=8, out_bits=8)
    with pytest.raises(TypeError, match=r"relu must be a bool"):
        sfx.linear(np.zeros((1, 1), int), np.zeros((1, 1), int), a_bits=8, w_bits=8, out_bits=8, relu="yes")


# --------------------------------------------------------------------------- per-token activation scales (rev. 2)


@settings(max_examples=200, deadline=None)
@given(scale=st.floats(min_value=2.0 ** -120, max_value=2.0 ** 120, allow_nan=False, allow_infinity=False))
def test_fold_row_scale_is_the_scale_to_16_significant_bits(scale):
    xm, xe = sfx.fold_row_scale(np.array([scale]))
    m, e = int(xm[0]), int(xe[0])
    assert (1 << 15) <= m < (1 << 16)
    got = Fraction(m) * Fraction(2) ** (e - 16)
    # nearest-even rounding to 16 significant bits: the error is at most half a unit of the 16th bit
    assert abs(got - Fraction(scale)) <= Fraction(2) ** (e - 17)


def test_fold_row_scale_and_encode_rows_scaled_errors():
    with pytest.raises(ValueError, match=r"scale must be positive and finite: 1 value\(s\) are not, the first -1.0"):
        sfx.fold_row_scale(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"scale gives an exponent outside int8"):
        sfx.fold_row_scale(np.array([2.0 ** 200]))
    with pytest.raises(ValueError, match=r"scale must have shape \[2\] \(one per row of x\), got \[3\]"):
        sfx.encode_rows_scaled(np.ones((2, 4)), 8, np.ones(3))
    with pytest.raises(ValueError, match=r"x must be a 2-D \[T, K\] matrix"):
        sfx.encode_rows(np.ones(4), 8)


def test_encode_rows_scaled_is_encode_of_the_row_over_its_applied_scale():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 40)) * np.exp(rng.uniform(-8, 8, (6, 1)))
    x[2] = 0.0
    for bits in (2, 4, 8, 16):
        codes, xe, xm = sfx.encode_rows_scaled(x, bits)
        s = np.ldexp(xm.astype(np.float64), (xe - 16).astype(np.int32))
        np.testing.assert_array_equal(codes, sfx.encode(x / s[:, None], bits))
        # the default scale maps each row's largest magnitude to (about) the largest code
        assert all(int((codes[t] & ((1 << (bits - 1)) - 1)).max()) >= (1 << (bits - 1)) - 2 for t in (0, 1, 3))
        assert not codes[2].any() and xm[2] == 1 << 15 and xe[2] == 1  # an all-zero row: scale 1.0
        c2, e2 = sfx.encode_rows(x, bits)
        np.testing.assert_array_equal(c2, sfx.encode(x, bits, e2[:, None]))
        np.testing.assert_array_equal(e2, sfx.choose_exponent(x, bits, axis=0))

"""``superfloat.sim.cosim`` without a simulator: the checkpoint -> accelerator mapping (bias,
shift, multiplier, output exponents) exact against ``sfx`` on hand cases, layer selection,
and the errors raised before any simulator build (damaged or mismatched checkpoints).

``tests/test_cosim_sim.py`` runs the same flow on Verilator and Icarus."""
from __future__ import annotations

import json
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from superfloat.sim import cosim as cs
from superfloat.sw import sfx

VOCAB = 257


# --------------------------------------------------------------------------- helpers (also used by test_cosim_sim)


def micro_model(kind: str, seed: int = 0):
    """A ~40k parameter Llama or OPT (hidden 32, 2 layers, K <= 64) built from a config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    special = VOCAB - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "llama":
            cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                              tie_word_embeddings=True, bos_token_id=special, eos_token_id=special,
                              pad_token_id=special)
            model = LlamaForCausalLM(cfg)
        elif kind == "opt":
            cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                            max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=special,
                            eos_token_id=special, pad_token_id=special)
            model = OPTForCausalLM(cfg)
            with torch.no_grad():  # visible biases, so that the bias path matters
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0.0, 0.5)
        else:
            raise ValueError(kind)
    return model.eval()


def micro_checkpoint(directory: Path, kind: str = "llama", **config) -> Path:
    """Quantize a micro model with ``WASQConfig(**config)`` and save it (with the byte tokenizer)."""
    from superfloat.sw.wasq import WASQConfig, quantize_, save_checkpoint
    from superfloat.sw.wasq.models import byte_tokenizer

    model = micro_model(kind)
    quantize_(model, WASQConfig(**config))
    save_checkpoint(model, directory, tokenizer=byte_tokenizer(), overwrite=True)
    return Path(directory)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosim-ckpt")
    return {
        "llama8": micro_checkpoint(root / "llama8", "llama", weight_bits=8),
        "opt4": micro_checkpoint(root / "opt4", "opt", weight_bits=4, act_bits=8, scale_kind="pow2"),
    }


def exported(codes_values, bits, *, exponent=0, scale=None, bias=None):
    """An ExportedLinear from exact real weight values (codes by sfx.encode)."""
    from superfloat.sw.wasq import ExportedLinear

    w = np.asarray(codes_values, dtype=np.float64)
    n = w.shape[0]
    e = np.full(n, exponent, dtype=np.int8)
    sc = None if scale is None else np.asarray(scale, dtype=np.float64)
    codes = sfx.encode(w / (1.0 if sc is None else sc[:, None]), bits, e[:, None].astype(np.int64))
    return ExportedLinear(bits, codes, e, sc, None if bias is None else np.asarray(bias, dtype=np.float32))


def layer(ex, act_bits=8, mode="dynamic", exponent=None, name="hand"):
    return cs.LayerQuant(name, ex, act_bits, mode, exponent, "test", "nearest_even")


def run_reference(call: cs.LayerCall) -> np.ndarray:
    eng = cs.ReferenceEngine()
    results = [eng.submit(op).result() for op in call.ops]
    return call.decode(call.assemble(results))


# --------------------------------------------------------------------------- bias and shift conversion


def test_bias_to_accumulator_power_of_two_is_specs_formula():
    f = 14  # SF8 x SF8
    b = np.array([0.25, -0.25, 2.5 * 2.0 ** -14, 3.5 * 2.0 ** -14, -2.5 * 2.0 ** -14, 0.0])
    got = cs.bias_to_accumulator(b, frac_bits=f, a_exponent=0, w_shift=0)
    assert got.tolist() == [4096, -4096, 2, 4, -2, 0]  # ties to even
    # SPEC 3: round(b * 2**(F - Ea - Ew)), nearest even, for random biases and exponents
    rng = np.random.default_rng(1)
    b = rng.standard_normal(200).astype(np.float32)
    ea, ew = 3, rng.integers(-6, 2, 200)
    got = cs.bias_to_accumulator(b, frac_bits=f, a_exponent=ea, w_shift=ew)
    want = np.rint(b.astype(np.float64) * np.ldexp(1.0, f - ea - ew)).astype(np.int64)
    assert np.array_equal(got, want)


def test_bias_to_accumulator_with_folded_scale_divides_by_the_hardware_scale():
    mult, w_shift = sfx.fold_scale(np.array([1.5, 0.75]))  # 1.5 = 49152 * 2**(1 - 16)
    assert mult.tolist() == [49152, 49152] and w_shift.tolist() == [1, 0]
    unit = 2.0 ** -14  # 2**(Ea - F) with Ea = 0, F = 14
    b = np.array([3 * unit, 0.75 * 0.5 * unit])
    assert cs.bias_to_accumulator(b, frac_bits=14, a_exponent=0, w_shift=w_shift, mult=mult).tolist() == [2, 0]
    # 2.25 * unit / 1.5 = 1.5 -> 2 (ties to even); -0.75 * unit / 1.5 = -0.5 -> 0
    b = np.array([2.25 * unit, -0.75 * unit])
    got = cs.bias_to_accumulator(b, frac_bits=14, a_exponent=0, w_shift=[1, 1], mult=[49152, 49152])
    assert got.tolist() == [2, 0]
    # exact rationals: any float bias, any mult
    rng = np.random.default_rng(2)
    b = rng.standard_normal(50)
    m = rng.integers(1 << 15, 1 << 16, 50)
    sh = rng.integers(-4, 4, 50)
    got = cs.bias_to_accumulator(b, frac_bits=14, a_exponent=2, w_shift=sh, mult=m)
    for i in range(50):
        q = Fraction(float(b[i])) / (Fraction(2) ** (2 - 14 + int(sh[i]) - 16) * int(m[i]))
        assert got[i] == round(q)


def test_bias_to_accumulator_rejects_nan():
    with pytest.raises(ValueError, match="NaN/inf"):
        cs.bias_to_accumulator([np.nan], frac_bits=14, a_exponent=0, w_shift=0)


@pytest.mark.parametrize("scale", [None, [0.75, 1.25]], ids=["pow2", "float-scale"])
def test_hand_case_is_exact_through_sfx_linear(scale):
    """y = x @ W.T + b with values on every grid: the decoded integer result is exactly y."""
    w = np.array([[0.5, 0.25], [-0.5, 0.125]])
    b = np.array([0.25, -0.5])
    x = np.array([[0.5, 0.5], [-0.25, 0.75]])
    s = np.ones(2) if scale is None else np.array(scale)
    y = x @ (w * s[:, None]).T + b
    ex = exported(w * s[:, None], 8, scale=scale, bias=b)
    lq = layer(ex)
    arr = cs.ArrayConfig(rows=2, cols=2, k_max=16)
    call = cs.layer_ops(lq, x, y, arr)
    out = run_reference(call)
    assert np.array_equal(out, y)
    # the parameters the accelerator gets
    mult, w_shift = cs.weight_scale_params(ex)
    op = call.ops[0]
    assert np.array_equal(op.args.shift, w_shift - call.out_exponent)
    assert (mult is None) == (scale is None) and (op.args.mult is None) == (scale is None)
    f = 14 + (16 if scale is not None else 0)
    r = f - 7 - (op.args.shift[None, :] + op.args.x_exponent[:, None])
    assert r.min() >= 0 and r.max() <= 63


def test_bias_with_per_token_exponents_runs_one_operation_per_exponent():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 16)) * 0.1
    b = rng.standard_normal(5)
    u = rng.standard_normal((6, 16))
    x = 0.9 * u / np.abs(u).max(axis=1, keepdims=True) * np.array([1, 8, 64, 1, 8, 64])[:, None]
    lq = layer(exported(w, 8, exponent=-1, bias=b))
    y = x @ sfx.fake_quantize(w, 8, -1).T + b
    call = cs.layer_ops(lq, x, y, cs.ArrayConfig(rows=2, cols=2, k_max=16))
    assert call.x_exponent.tolist() == [0, 3, 6, 0, 3, 6] and len(call.ops) == 3
    assert sorted(np.concatenate([op.rows_index for op in call.ops]).tolist()) == list(range(6))
    for op in call.ops:  # each group: constant exponent, bias in that exponent's units
        e = int(op.args.x_exponent[0])
        assert np.all(op.args.x_exponent == e)
        assert np.array_equal(op.args.bias, cs.bias_to_accumulator(b, frac_bits=14, a_exponent=e, w_shift=-1))
    out = run_reference(call)
    step = np.ldexp(1.0, call.out_exponent - 7)  # output grid of each channel
    assert np.all(np.abs(out - y) <= step[None, :] * 1.5 + np.abs(y) * 2.0 ** -6)


def test_output_exponent_keeps_the_right_shift_in_range():
    y = np.array([[1e-9, 100.0], [0.0, -3.0]])
    eo, clamped = cs.output_exponent(y, 8, w_shift=[0, 0], x_exponent=[0, 5], frac_bits=14)
    assert eo.tolist()[1] == 7  # 100 <= (1 - 2**-7) * 2**7
    r = 14 - 7 - (np.array([0, 0])[None, :] - eo[None, :] + np.array([0, 5])[:, None])
    assert r.min() >= 0 and r.max() <= 63 and clamped == 1  # channel 0 wanted 2**-29: clamped up
    with pytest.raises(ValueError, match="per-token exponents span too much"):
        cs.output_exponent(y, 8, w_shift=[0, 0], x_exponent=[-40, 40], frac_bits=14)
    et, _ = cs.output_exponent(y, 8, w_shift=[0, 0], x_exponent=[0, 0], frac_bits=14, per="tensor")
    assert et.tolist() == [7, 7]


def test_narrower_codes_are_widened_exactly():
    c4 = np.arange(16, dtype=np.uint8)
    c8 = cs.widen_codes(c4, 4, 8)
    assert np.array_equal(sfx.decode(c8, 8), sfx.decode(c4, 4))
    with pytest.raises(ValueError, match="cannot narrow"):
        cs.widen_codes(c8, 8, 4)


# --------------------------------------------------------------------------- selection, Fmax


def test_select_layers():
    names = [f"model.layers.{i}.{b}.{p}" for i in range(2) for b, ps in (("self_attn", ("q_proj", "k_proj")),
                                                                         ("mlp", ("up_proj", "down_proj")))
             for p in ps]
    assert cs.select_layers(names, "all") == (names, "all")
    assert cs.select_layers(names, "model.layers.1.mlp.up_proj") == (["model.layers.1.mlp.up_proj"], "layer")
    assert cs.select_layers(names, "model.layers.0.mlp")[0] == ["model.layers.0.mlp.up_proj",
                                                                "model.layers.0.mlp.down_proj"]
    with pytest.raises(cs.CosimError, match=r"no quantized layer or block named 'model.layers.0.q_proj'.*Did you "
                                            r"mean model.layers.0.self_attn.q_proj.*Valid layers \(8 in total\)"):
        cs.select_layers(names, "model.layers.0.q_proj")


def test_find_fmax(monkeypatch, tmp_path):
    base = {"target": "ecp5-25k", "kind": "accel", "rows": 2, "cols": 2, "a_bits": 8, "w_bits": 8, "out_bits": 8,
            "k_max": 16384, "fmax_mhz": 100.0, "fits": True}
    other = dict(base, rows=4, cols=4, fmax_mhz=90.0)
    narrow = dict(base, rows=8, cols=8, a_bits=2, w_bits=2, out_bits=2, fmax_mhz=150.0)
    (tmp_path / "a.json").write_text(json.dumps([base, other, narrow, dict(base, target="ice40-up5k", fmax_mhz=40.0)]))
    import superfloat.sim.fmax as fmax

    monkeypatch.setattr(fmax, "fmax_sources", lambda: [tmp_path / "a.json"])
    arr = cs.ArrayConfig(rows=4, cols=4)
    f = cs.find_fmax(arr, "ecp5-25k")
    assert (f["fmax_mhz"], f["match"]) == (90.0, "exact")
    f = cs.find_fmax(cs.ArrayConfig(rows=8, cols=8), "ecp5-25k")
    assert (f["fmax_mhz"], f["match"], f["config"]) == (90.0, "nearest", "4x4 a8w8o8 k_max=16384")  # widths first
    f = cs.find_fmax(cs.ArrayConfig(rows=8, cols=8, w_bits=4), "ecp5-25k")
    assert f["config"] == "4x4 a8w8o8 k_max=16384"
    assert cs.find_fmax(arr, "ice40-up5k")["fmax_mhz"] == 40.0
    none = cs.find_fmax(arr, "nowhere")
    assert none["fmax_mhz"] is None and "sfx synth --target nowhere --rows 4" in none["source"]
    assert cs.find_fmax(arr, "nowhere", fmax_mhz=50)["match"] == "given"


# --------------------------------------------------------------------------- the dry run (no simulator)


def test_reference_engine_dry_run_end_to_end(ckpts):
    rep = cs.cosim(ckpts["opt4"], "all", engine="reference", rows=4, cols=4, k_max=64, w_bits=8, tokens=5)
    assert rep["mismatches"] == 0 and rep["forward"]["logits_identical"] and rep.bit_exact
    assert rep["codes_compared"] == sum(l["T"] * l["N"] for l in rep["layers"]) and rep["layers_simulated"] == 12
    assert rep["cosine"] > 0.999 and rep["forward"]["rtl_vs_software"]["argmax_agreement"] == 1.0
    assert any("widened" in n for n in rep["notes"])  # SF4 codes on an 8-bit weight array
    assert all(l["activation_source"] == "checkpoint" and l["bias"] for l in rep["layers"])


# --------------------------------------------------------------------------- errors before any build


@pytest.fixture
def no_build(monkeypatch, tmp_path):
    """Fail the test if a simulator build starts; the build folder must stay empty."""
    import superfloat.sim.linear as lin

    build_dir = tmp_path / "simbuild"
    monkeypatch.setenv("SFX_SIM_BUILD_DIR", str(build_dir))

    def boom(*a, **k):
        raise AssertionError("a simulator build was started")

    monkeypatch.setattr(lin, "build_accelerator", boom)
    import superfloat.sim.engines as engines

    monkeypatch.setattr(engines, "RTLSession", boom)
    yield build_dir
    assert not build_dir.exists() or not any(build_dir.iterdir())


def _damage_codes(ckpt: Path, tensor: str, value: int) -> None:
    """Overwrite the first byte of a uint8 tensor in model.safetensors."""
    path = ckpt / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    lo, _ = header[tensor]["data_offsets"]
    raw[8 + n + lo] = value
    path.write_bytes(bytes(raw))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["codes-out-of-range", "truncated", "unknown-version"])
def test_damaged_checkpoint_is_rejected_before_any_build(ckpts, tmp_path, no_build, case):
    ck = _copy(ckpts["opt4"], tmp_path / "bad")
    if case == "codes-out-of-range":
        _damage_codes(ck, "model.decoder.layers.0.fc1.codes", 0xF3)  # 243 is not an SF4 code
        match = r"model.decoder.layers.0.fc1.codes.*fails its SHA-256 check"  # format rev. 2: digests first
    elif case == "truncated":
        p = ck / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-1000])
        match = r"truncated"
    else:
        cfg = json.loads((ck / "sfx_config.json").read_text())
        cfg["format_version"] = 99
        (ck / "sfx_config.json").write_text(json.dumps(cfg))
        match = r"unknown format_version 99"
    with pytest.raises(cs.CosimError, match=r"cannot co-simulate this checkpoint: .*" + match):
        cs.cosim(ck, "all", rows=4, cols=4, k_max=64)


MISMATCHES = [
    (dict(layer="model.layers.0.mlp.up_proj", w_bits=4),
     r"layer model.layers.0.mlp.up_proj: the checkpoint holds SF8 weight codes but the array takes SF4 weights "
     r"\(--w-bits 4\)"),
    (dict(ckpt="opt4", layer="model.decoder.layers.1", a_bits=6),
     r"layer model.decoder.layers.1.self_attn.k_proj: the checkpoint quantizes activations to SF8 but the array "
     r"takes SF6 activations \(--a-bits 6\)"),
    (dict(layer="model.layers.0.mlp.down_proj", k_max=32),
     r"layer model.layers.0.mlp.down_proj: K=64 exceeds the array's k_max=32"),
    (dict(layer="model.layers.0.attn.q_proj"),
     r"no quantized layer or block named 'model.layers.0.attn.q_proj'.*model.layers.0.self_attn.q_proj"),
    (dict(layer="all", rows=0), r"array: rows must be in 1..64, got 0"),
    (dict(layer="all", simulator="modelsim"), r"simulator must be one of 'verilator', 'icarus'"),
]


@pytest.mark.parametrize("kw,match", MISMATCHES, ids=["w-bits", "a-bits", "k-max", "name", "rows", "simulator"])
def test_mismatched_checkpoint_is_rejected_before_any_build(ckpts, no_build, kw, match):
    kw = dict(kw)
    layer_name = kw.pop("layer")
    ck = ckpts[kw.pop("ckpt", "llama8")]
    kw.setdefault("rows", 4)
    kw.setdefault("cols", 4)
    kw.setdefault("k_max", 64)
    with pytest.raises(cs.CosimError, match=match):
        cs.cosim(ck, layer_name, **kw)


def test_a_bias_out_of_the_accumulator_range_is_rejected_before_any_build(ckpts, tmp_path, no_build):
    import torch
    from safetensors.torch import load_file, save_file

    ck = _copy(ckpts["opt4"], tmp_path / "bigbias")
    t = load_file(str(ck / "model.safetensors"))
    t["model.decoder.layers.0.fc2.bias"] = torch.full_like(t["model.decoder.layers.0.fc2.bias"], 3e8)
    save_file(t, str(ck / "model.safetensors"))
    from superfloat.sw.wasq.checkpoint import reseal_checkpoint

    reseal_checkpoint(ck)  # a deliberate edit (format rev. 2 checks every tensor's SHA-256)
    with pytest.raises(cs.CosimError, match=r"layer model.decoder.layers.0.fc2: bias must be <= "):
        cs.cosim(ck, "model.decoder.layers.0.fc2", rows=4, cols=4, k_max=64, w_bits=8)


def test_cli_errors_and_list_layers(ckpts, no_build, capsys):
    from superfloat.cli import main

    assert main(["cosim", "-c", str(ckpts["llama8"]), "--list-layers"]) == 0
    out = capsys.readouterr().out
    assert "14 quantized layer(s)" in out and "model.layers.1.mlp.down_proj" in out and "model.layers.0.mlp" in out
    assert main(["cosim", "-c", str(ckpts["llama8"]), "--layer", "model.layers.0.mlp", "--w-bits", "4",
                 "--rows", "4", "--cols", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "sfx cosim: error: layer model.layers.0.mlp.gate_proj: the checkpoint holds SF8 weight codes" in err
    assert main(["cosim", "-c", str(ckpts["llama8"]), "--no-progress"]) == 2
    assert "--layer is required" in capsys.readouterr().err


def test_docs_examples():
    """The Python examples of docs/cosim.md run as doctests."""
    import doctest
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "cosim.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, "cosim.md", "docs/cosim.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_demo_quick_and_summary(ckpts, capsys):
    """``sfx demo --quick`` (software only) and the demo's summary on a dry-run report."""
    from superfloat.cli import demo
    from superfloat.cli import main

    assert main(["demo", "--quick"]) == 0
    assert "SF8 x SF8 -> SF8 linear" in capsys.readouterr().out
    rep = cs.cosim(ckpts["llama8"], "model.layers.0.self_attn.q_proj", engine="reference", rows=4, cols=4,
                   k_max=64, tokens=4, fmax_mhz=50.0)
    lines = demo.summary_lines({"report": rep, "checkpoint": "CK", "verilog": "V.v", "config": "SF8 float/channel",
                                "memory": {"model_safetensors_bytes": 10 ** 6}, "wall_s": 1.0})
    text = "\n".join(lines)
    assert "bit-exact    YES: 0 of 128 output codes differ from sfx.linear" in text
    assert "at 50 MHz on ecp5-25k (given Fmax from --fmax (given))" in text and "V.v" in text

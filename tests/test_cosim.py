"""``superfloat.sim.cosim`` without a simulator: layer programs -> accelerator operations (equal,
by construction, to the accelerator-exact backend and checked against ``sfx.linear``), static
output exponents from the checkpoint (never from the output being computed), the perplexity
mode, layer selection, and the errors raised before any simulator build (uncalibrated,
damaged or mismatched checkpoints).

``tests/test_cosim_sim.py`` runs the same flow on Verilator and Icarus."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from superfloat.sim import cosim as cs
from superfloat.sw import sfx

VOCAB = 257
CALIB_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
              "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 2


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


def micro_checkpoint(directory: Path, kind: str = "llama", *, calibrate: bool = True, out_bits: int | None = 8,
                     **config) -> Path:
    """Quantize a micro model with ``WASQConfig(**config)``, calibrate its static output exponents
    (``out_bits``) on :data:`CALIB_TEXT` unless ``calibrate=False``, and save it (byte tokenizer)."""
    import torch

    from superfloat.sw.wasq import WASQConfig, quantize_, save_checkpoint
    from superfloat.sw.wasq.accelerator import calibrate_outputs_
    from superfloat.sw.wasq.models import byte_tokenizer

    model = micro_model(kind)
    quantize_(model, WASQConfig(**config))
    if calibrate:
        ids = torch.tensor(list(CALIB_TEXT.encode()[:60]), dtype=torch.long).reshape(1, -1)
        calibrate_outputs_(model, [ids], out_bits=out_bits)
    save_checkpoint(model, directory, tokenizer=byte_tokenizer(), overwrite=True)
    return Path(directory)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosim-ckpt")
    return {
        "llama8": micro_checkpoint(root / "llama8", "llama", weight_bits=8, act_bits=8),  # float scales: mult
        "llama-wo": micro_checkpoint(root / "llama-wo", "llama", weight_bits=8, out_bits=None),  # weight-only
        "opt4": micro_checkpoint(root / "opt4", "opt", weight_bits=4, act_bits=8, scale_kind="pow2"),  # bias
        "raw": micro_checkpoint(root / "raw", "llama", calibrate=False, weight_bits=8, act_bits=8),
    }


def _program_and_input(ck: Path, name: str, x_scales=(1, 8, 64, 1, 8, 64, 2)):
    """A layer's program from a calibrated checkpoint and float rows with several exponents."""
    import torch

    from superfloat.sw.wasq import load_checkpoint, quantized_layers

    model = load_checkpoint(ck)
    prog = quantized_layers(model)[name].accelerator_program()
    rng = np.random.default_rng(3)
    u = rng.standard_normal((len(x_scales), prog.K))
    x = 0.9 * u / np.abs(u).max(axis=1, keepdims=True) * np.asarray(x_scales, dtype=np.float64)[:, None]
    return prog, torch.tensor(x, dtype=torch.float32)


def _reference_codes(call) -> np.ndarray:
    eng = cs.ReferenceEngine()
    return call.assemble([eng.submit(op).result() for op in call.ops])


# --------------------------------------------------------------------------- layer program -> operations


def test_operations_are_the_programs_and_equal_the_backend(ckpts):
    """shift, mult, codes, row exponents come from the LayerProgram; sfx.linear on the operations
    gives the backend's codes (float-scale layer: the multiplier path)."""
    prog, x = _program_and_input(ckpts["llama8"], "model.layers.0.mlp.gate_proj")
    call = cs.program_ops("gate", prog, x, cs.ArrayConfig(rows=4, cols=4, a_bits=8, w_bits=8, out_bits=8, k_max=64))
    assert len(call.ops) == 1 and call.shape == (7, prog.N, prog.K)
    op = call.ops[0]
    xc, ea, _ = prog.stream_rows(x)
    assert np.array_equal(op.args.x, xc.numpy()) and np.array_equal(op.args.x_exponent, ea.numpy())
    assert np.array_equal(op.args.shift, prog.w_shift - prog.out_exponent) and np.array_equal(op.args.mult, prog.mult)
    assert np.array_equal(op.args.w, prog.w_codes) and op.args.bias is None or not np.any(op.args.bias)
    got = _reference_codes(call)
    want, _, _ = prog.codes(x)
    assert np.array_equal(got, want.numpy())
    y = call.decode(got, x)
    assert y.dtype == x.dtype and np.array_equal(y.numpy(), prog.forward(x).numpy())


def test_bias_groups_and_widened_codes_equal_the_backend(ckpts):
    """OPT, SF4 pow2 weights with biases, on an 8-bit weight array: one operation per row exponent,
    each with the bias in that exponent's accumulator units, scaled exactly by the widening."""
    from superfloat.sw.wasq.accelerator import bias_to_accumulator

    prog, x = _program_and_input(ckpts["opt4"], "model.decoder.layers.0.fc1")
    arr = cs.ArrayConfig(rows=4, cols=4, a_bits=8, w_bits=8, out_bits=8, k_max=64)
    call = cs.program_ops("fc1", prog, x, arr)
    exps = sorted(set(call.x_exponent.tolist()))
    assert len(exps) >= 3 and len(call.ops) == len(exps)
    assert sorted(np.concatenate([op.rows_index for op in call.ops]).tolist()) == list(range(7))
    for op in call.ops:
        e = int(op.args.x_exponent[0])
        assert np.all(op.args.x_exponent == e)
        want = bias_to_accumulator(prog.bias, frac_bits=prog.frac_bits, a_exponent=e, w_shift=prog.w_shift)
        assert np.array_equal(op.args.bias, want * 16)  # SF4 -> SF8 weights: F grows by 4
        assert np.array_equal(sfx.decode(op.args.w, 8), sfx.decode(prog.w_codes, 4))
    assert np.array_equal(_reference_codes(call), prog.codes(x)[0].numpy())


def test_layer_does_not_fit_the_array(ckpts):
    prog, _ = _program_and_input(ckpts["opt4"], "model.decoder.layers.0.fc1")
    kw = dict(rows=4, cols=4, k_max=64, simulator="verilator")
    with pytest.raises(cs.CosimError, match=r"layer L: the checkpoint holds SF4 weight codes but the array takes SF2"):
        cs.resolve_array("L", prog, w_bits=2, **kw)
    with pytest.raises(cs.CosimError, match=r"layer L: its static output exponents are calibrated for SF8 outputs "
                                            r"but the array produces SF16 \(--out-bits 16\).*--calibrate-outputs"):
        cs.resolve_array("L", prog, out_bits=16, **kw)
    assert cs.resolve_array("L", prog, **kw).name == "4x4 a8w4o8 k_max=64"


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
    assert rep["calls_differing_from_accelerator"] == 0 and rep["output_exponents"] == "static, calibrated (checkpoint)"
    assert rep["codes_compared"] == sum(l["T"] * l["N"] for l in rep["layers"]) and rep["layers_simulated"] == 12
    assert rep["cosine"] > 0.99 and rep["forward"]["accelerator_vs_software"]["cosine"] > 0.99
    assert any("widened" in n for n in rep["notes"])  # SF4 codes on an 8-bit weight array
    assert all(l["activation_source"] == "layer" and l["bias"] and l["equal_to_accelerator"] for l in rep["layers"])


def test_perplexity_mode_equals_the_backend_bit_for_bit(ckpts):
    rep = cs.cosim(ckpts["llama8"], "all", engine="reference", rows=4, cols=4, k_max=64, data="shakespeare",
                   max_tokens=24)
    pp = rep["perplexity"]
    assert pp["identical"] and pp["rtl"]["perplexity"] == pp["accelerator"]["perplexity"] and rep.bit_exact
    assert pp["rtl"]["tokens"] == 23 and pp["context"] == 24 and rep["layers"][0]["T"] == 23
    assert pp["fake"]["perplexity"] > 1 and "shakespeare" in pp["data"]
    rep = cs.cosim(ckpts["llama8"], "model.layers.1.mlp", engine="reference", rows=4, cols=4, k_max=64,
                   data="shakespeare", max_tokens=24, context=10)
    assert rep["perplexity"]["identical"] and rep["perplexity"]["rtl"]["windows"] == 3 and rep["layer_calls"] == 9


def test_uncalibrated_checkpoint_is_an_error_or_calibrated_when_asked(ckpts, no_build):
    with pytest.raises(cs.CosimError, match=r"layer model.layers.0.self_attn.q_proj \(and 13 more layer\(s\)\) has "
                                            r"no calibrated static output exponents.*--calibrate-outputs.*"
                                            r"sfx quantize \.\.\. --calib-tokens N.*calibrate_outputs_"):
        cs.cosim(ckpts["raw"], "all", engine="reference", rows=4, cols=4, k_max=64)
    rep = cs.cosim(ckpts["raw"], "model.layers.0.mlp", engine="reference", rows=4, cols=4, k_max=64,
                   calibrate_outputs=True, calib_tokens=256, out_bits=8, tokens=6)
    assert rep.bit_exact and rep["calibration"]["tokens"] == 256 and rep["output_exponents"] == "static, calibrated here"
    assert rep["arrays"] == ["4x4 a8w8o8 k_max=64"]
    with pytest.raises(cs.CosimError, match=r"--calib-tokens must be an int >= 2, got 1"):
        cs.cosim(ckpts["raw"], "all", engine="reference", rows=4, cols=4, k_max=64, calibrate_outputs=True,
                 calib_tokens=1)


def test_weight_only_layers_stream_sf16_activations(ckpts):
    rep = cs.cosim(ckpts["llama-wo"], "model.layers.0.self_attn", engine="reference", rows=4, cols=4, k_max=64,
                   tokens=4)
    assert rep.bit_exact and rep["arrays"] == ["4x4 a16w8o16 k_max=64"]
    assert any("weight-only layer: SF16 per-token activations" in n for n in rep["notes"])


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
    monkeypatch.setattr(lin, "build_harness", boom)
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
     r"layer model.decoder.layers.1.self_attn.k_proj: the layer streams SF8 activations \(layer\) but the array "
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
    with pytest.raises(cs.CosimError, match=r"the accelerator backend cannot run this checkpoint: layer "
                                            r"model.decoder.layers.0.fc2: bias with activation exponent -?\d+: bias "
                                            r"must be <= "):
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


def test_bad_fmax_target_float_model_and_positions_are_errors(ckpts, no_build):
    """Issue 17: each a CosimError naming the option, before any simulator build (llama8: 64 positions)."""
    ck, kw = ckpts["llama8"], dict(engine="reference", rows=4, cols=4, k_max=64)
    for bad in (-5, 0, float("nan"), float("inf")):
        with pytest.raises(cs.CosimError, match=r"^--fmax must be a positive number of MHz, got "):
            cs.cosim(ck, "all", fmax_mhz=bad, **kw)
    with pytest.raises(cs.CosimError, match=r"unknown FPGA target 'nosuch' for --target: choose one of .*--fmax MHZ"):
        cs.cosim(ck, "all", target="nosuch", **kw)
    assert cs.cosim(ck, "all", target="nosuch", fmax_mhz=50.0, tokens=4, **kw).bit_exact  # a label with --fmax
    with pytest.raises(cs.CosimError, match=r"^--float-model tiny-nosuch: unknown model 'tiny-nosuch'"):
        cs.cosim(ck, "all", float_model="tiny-nosuch", tokens=4, **kw)
    with pytest.raises(cs.CosimError, match=r"^70 tokens exceed the model's 64 positions \(max_position_embeddings\): "
                                            r"give --tokens 64 or fewer"):
        cs.cosim(ck, "all", prompt="x" * 80, tokens=70, **kw)
    with pytest.raises(cs.CosimError, match=r"^--context 100 exceeds the model's 64 positions"):
        cs.cosim(ck, "all", data="shakespeare", max_tokens=16, context=100, **kw)
    with pytest.raises(cs.CosimError, match=r"^--max-tokens 100 is one window longer than the model's 64 positions "
                                            r"\(max_position_embeddings\): add --context 64 or less"):
        cs.cosim(ck, "all", data="shakespeare", max_tokens=100, **kw)


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


@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_per_row_float_activation_scales_map_to_an_xmult_array(tmp_path, no_build, clip):
    """act_scale='float' layers stream a 16-bit multiplier per row (SPEC revision 2): their
    operations carry xmult and run on an array generated with it, also with activation
    clipping (act_clip_ratio: the clipped scales are streamed); dry run, no build."""
    ck = micro_checkpoint(tmp_path / "xmult", "llama", weight_bits=8, act_bits=8, act_scale="float",
                          act_clip_ratio=clip)
    rep = cs.cosim(ck, "all", rows=4, cols=4, k_max=64, engine="reference", tokens=4)
    assert rep["arrays"] == ["4x4 a8w8o8 k_max=64 xmult"] and rep["bit_exact"]
    prog, x = _program_and_input(ck, "model.layers.0.self_attn.q_proj")
    from superfloat.sim import layer_call

    call = layer_call(prog, x, rows=4, cols=4, k_max=64)
    assert call.array.xmult and all(op.args.xmult is not None for op in call.ops)
    assert all(kw["xmult"] is not None for kw in call.linear_kwargs())


# --------------------------------------------------------------------------- NaN: reported as NaN, never as a mismatch


@pytest.fixture
def inject_nan(monkeypatch):
    """``inject_nan(fn)``: every model that ``load_checkpoint`` returns gets ``fn(model)`` applied
    in memory (a checkpoint with a NaN in a float tensor cannot be loaded: the loader rejects it)."""
    import superfloat.sw.wasq.checkpoint as ckmod

    def use(fn):
        orig = ckmod.load_checkpoint

        def patched(*a, **kw):
            out = orig(*a, **kw)
            fn(out[0] if isinstance(out, tuple) else out)
            return out

        monkeypatch.setattr(ckmod, "load_checkpoint", patched)

    return use


def test_nan_in_the_embedding_is_reported_as_nan_with_its_source(ckpts, inject_nan, no_build, capsys):
    import torch

    from superfloat.cli import main

    def embed(model):
        with torch.no_grad():
            model.model.embed_tokens.weight[ord("q")] = float("nan")  # 'q' of "quick", the 5th token

    inject_nan(embed)
    with pytest.raises(cs.CosimNaN, match=r"NaN/infinity in the model's forward pass, not an RTL mismatch \(nothing "
                                          r"was compared\): first produced by model\.embed_tokens \(output of shape "
                                          r"\[1, 8, 32\]: 32 NaN of 256 values, the first at index \[0, 4, 0\]\); "
                                          r"the pass then stopped: ValueError: layer model\.layers\.0\.self_attn\."
                                          r"q_proj: input: values contains 32 NaN"):
        cs.cosim(ckpts["llama8"], "all", engine="reference", rows=4, cols=4, k_max=64)
    assert main(["cosim", "-c", str(ckpts["llama8"]), "--layer", "all", "--engine", "reference", "--rows", "4",
                 "--cols", "4", "--k-max", "64", "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("sfx cosim: NaN: NaN/infinity in the model's forward pass, not an RTL mismatch") \
        and "first produced by model.embed_tokens" in err and "bit-exact: NO" not in err


def test_nan_in_the_activations_after_the_last_layer_is_reported_as_nan(ckpts, inject_nan, no_build, capsys):
    import torch

    from superfloat.cli import main

    def norm(model):  # NaN in the activations of the final norm (no quantized layer after it to refuse them)
        def hook(module, args, out):
            out = out.clone()
            out[0, 3, 5] = float("nan")
            return out

        model.model.norm.register_forward_hook(hook)

    inject_nan(norm)
    rep = cs.cosim(ckpts["llama8"], "all", engine="reference", rows=4, cols=4, k_max=64, tokens=6)
    assert rep["nan"]["in"] == ["accelerator backend logits", "RTL forward logits", "fake-quantized logits"]
    assert rep["nan"]["source"]["module"] == "model.norm" and rep["nan"]["source"]["first_index"] == [0, 3, 5]
    assert rep["mismatches"] == 0 and rep["codes_compared"] > 0 and rep["bit_exact"] is None
    assert rep["logits_equal_accelerator"] is True  # NaN at the same positions: equal, not a difference
    text = rep.format()
    assert "NaN: NaN/infinity in accelerator backend logits, RTL forward logits, fake-quantized logits, first " \
           "produced by model.norm (output of shape [1, 6, 32]: 1 NaN of 192 values, the first at index [0, 3, 5])" \
           in text
    assert "bit-exact: NaN: 0 differing code(s)" in text and "bit-exact: NO" not in text and "DIFFER" not in text
    assert "logits vs --backend accelerator on the same 6 token(s): bit for bit EQUAL (NaN at the same positions)" \
        in text
    assert main(["cosim", "-c", str(ckpts["llama8"]), "--layer", "all", "--engine", "reference", "--rows", "4",
                 "--cols", "4", "--k-max", "64", "--tokens", "6", "--no-progress", "--json"]) == 4
    out = json.loads(capsys.readouterr().out)
    assert out["bit_exact"] is None and out["nan"]["source"]["module"] == "model.norm"

"""The Python API for in-memory models on the RTL (docs/python-api.md): ``layer_call`` /
``run_layer`` / ``on_rtl`` / ``capture_inputs`` against the accelerator-exact backend and
``sfx.linear`` (zero tolerance), their errors; ``synthesize`` and ``sfx synth`` with the same
defaults and file layout; build outputs under the current directory, never the checkout's."""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from superfloat.sim import CosimError, capture_inputs, layer_call, on_rtl, run_layer
from superfloat.sw import sfx

from test_cosim import CALIB_TEXT, micro_model

REPO = Path(__file__).resolve().parent.parent
IDS = torch.tensor([list(b"The quick brown fox jumps")[:8]], dtype=torch.long)


def scaled_rows(k: int, scales=(1, 8, 64, 1, 8, 64, 2)) -> torch.Tensor:
    """Float rows ``[len(scales), k]`` of several magnitudes: several row exponents."""
    u = np.random.default_rng(3).standard_normal((len(scales), k))
    return torch.tensor(0.9 * u / np.abs(u).max(axis=1, keepdims=True) * np.asarray(scales)[:, None],
                        dtype=torch.float32)


def quantized(kind: str, **config):
    from superfloat.sw.wasq import WASQConfig, quantize_
    from superfloat.sw.wasq.accelerator import calibrate_outputs_

    model = micro_model(kind)
    quantize_(model, WASQConfig(**config))
    calibrate_outputs_(model, [torch.tensor([list(CALIB_TEXT.encode()[:60])])], out_bits=8)
    return model


@pytest.fixture(scope="module")
def llama():
    return quantized("llama", weight_bits=8, act_bits=8)


@pytest.fixture(scope="module")
def opt4():
    return quantized("opt", weight_bits=4, act_bits=8, scale_kind="pow2")  # biases, SF4 weights


def layer(model, name):
    from superfloat.sw.wasq import quantized_layers

    return quantized_layers(model)[name]


def backend_output(model, name, x):
    from superfloat.sw.wasq.accelerator import set_backend

    set_backend(model, "accelerator")
    try:
        with torch.no_grad():
            return layer(model, name)(x)
    finally:
        set_backend(model, "fake")


# --------------------------------------------------------------------------- one layer, no simulator


@pytest.mark.parametrize("kind,name", [("llama", "model.layers.0.self_attn.q_proj"),
                                       ("opt", "model.decoder.layers.1.fc2")])
def test_layer_call_operations_are_the_backend(llama, opt4, kind, name):
    model = llama if kind == "llama" else opt4
    x = capture_inputs(model, name, IDS)[name]
    assert x.reshape(-1, x.shape[-1]).shape[0] == IDS.numel()   # OPT's fc layers take [T, K], the others [B, T, K]
    if kind == "opt":
        x = scaled_rows(x.shape[-1])
    call = layer_call(layer(model, name), x, rows=2, cols=2, w_bits=8)   # SF4 weights widened on an SF8 array
    if kind == "opt":
        assert len(call.ops) >= 2  # a bias: one operation per distinct row exponent
    kws = call.run_linear_kwargs()
    assert all(kw["rows"] == 2 and kw["cols"] == 2 and kw["simulator"] == "verilator" for kw in kws)
    codes = call.assemble([sfx.linear(**kw) for kw in call.linear_kwargs()])
    np.testing.assert_array_equal(codes, call.backend_codes())
    assert call.ops[0].args.w_bits == 8 and call.shape == (x.reshape(-1, x.shape[-1]).shape[0],
                                                           layer(model, name).out_features,
                                                           layer(model, name).in_features)
    y = call.decode(codes, x).reshape(*x.shape[:-1], -1)
    assert torch.equal(y, backend_output(model, name, x))


def test_run_layer_reference_engine(opt4):
    name = "model.decoder.layers.0.self_attn.k_proj"
    x = capture_inputs(opt4, name, IDS)[name]
    r = run_layer(layer(opt4, name), x, rows=2, cols=2, w_bits=8, engine="reference")
    assert r.bit_exact and r.mismatches == 0 and r.equal_to_backend and r.cycles == 0
    assert torch.equal(r.output, backend_output(opt4, name, x))
    s = r.summary()
    assert s["layer"] == name and s["operations"] == len(r.call.ops) and s["T"] == 8


def test_on_rtl_reference_engine_whole_model(llama):
    from superfloat.sw.wasq import quantized_layers
    from superfloat.sw.wasq.accelerator import backend_of, set_backend

    set_backend(llama, "accelerator")
    with torch.no_grad():
        want = llama(IDS).logits
    set_backend(llama, "fake")
    with torch.no_grad(), on_rtl(llama, "all", engine="reference") as rtl:
        got = llama(IDS).logits
    assert torch.equal(got, want)
    assert backend_of(llama) == "fake"  # restored
    assert len(rtl.calls) == len(quantized_layers(llama)) == 14
    assert rtl.bit_exact and rtl.summary()["codes_compared"] == sum(8 * c["N"] for c in rtl.calls)


def test_capture_inputs_block(llama):
    got = capture_inputs(llama, "model.layers.1.mlp", IDS)
    assert sorted(got) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert got["model.layers.1.mlp.down_proj"].shape == (1, 8, 64)


def test_api_errors(llama):
    from superfloat.sw.wasq import WASQConfig, quantize_

    q = layer(llama, "model.layers.0.self_attn.q_proj")
    x = torch.zeros(3, 32)
    with pytest.raises(TypeError, match=r"layer must be a quantized layer \(SFxLinear"):
        layer_call(torch.nn.Linear(32, 32), x)
    with pytest.raises(TypeError, match=r"x must be a torch tensor"):
        layer_call(q, np.zeros((3, 32)))
    with pytest.raises(CosimError, match=r"input has shape \[3, 16\], expected \[\.\.\., 32\]"):
        layer_call(q, torch.zeros(3, 16))
    with pytest.raises(CosimError, match=r"K=32 exceeds the array's k_max=16"):
        layer_call(q, x, k_max=16)
    with pytest.raises(CosimError, match=r"calibrated for SF8 outputs but the array produces SF16"):
        layer_call(q, x, out_bits=16)
    with pytest.raises(ValueError, match=r"engine must be 'session', 'session-percycle', 'run_linear' or 'reference'"):
        run_layer(q, x, engine="fast")
    with pytest.raises(ValueError, match=r"simulator must be one of 'verilator', 'icarus', got 'xsim'"):
        run_layer(q, x, simulator="xsim")
    with pytest.raises(CosimError, match=r"no quantized layer or block named 'model.layers.9'"):
        on_rtl(llama, "model.layers.9")
    with pytest.raises(CosimError, match=r"the model has no quantized layers \(SFxLinear\): quantize it first"):
        on_rtl(micro_model("llama"))
    raw = quantize_(micro_model("llama"), WASQConfig(weight_bits=8, act_bits=8))   # no output exponents
    with pytest.raises(CosimError, match=r"no calibrated output exponents .*calibrate_outputs_"):
        layer_call(layer(raw, "model.layers.0.mlp.up_proj"), x)
    with pytest.raises(CosimError, match=r"the accelerator cannot run this model: .*no calibrated output exponents"):
        on_rtl(raw, "model.layers.0.mlp.up_proj", engine="reference")


# --------------------------------------------------------------------------- on the RTL


@pytest.mark.sim
@pytest.mark.xdist_group("sim-accel-2x2-sf8-icarus")
def test_run_layer_and_on_rtl_on_icarus(llama, opt4):
    name = "model.decoder.layers.1.fc2"
    x = scaled_rows(64)
    r = run_layer(layer(opt4, name), x, rows=2, cols=2, w_bits=8, simulator="icarus")
    assert len(r.call.ops) >= 2 and r.bit_exact and r.cycles > 0 and not r.rtl_error
    assert torch.equal(r.output, backend_output(opt4, name, x))
    from superfloat.sw.wasq.accelerator import set_backend

    set_backend(llama, "accelerator")
    with torch.no_grad():
        want = llama(IDS).logits
        with on_rtl(llama, "model.layers.1.self_attn.k_proj,model.layers.1.self_attn.v_proj", rows=2, cols=2,
                    simulator="icarus") as rtl:
            got = llama(IDS).logits
    set_backend(llama, "fake")
    assert torch.equal(got, want)
    assert [c["layer"] for c in rtl.calls] == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    assert rtl.bit_exact and rtl.cycles > 0 and rtl.mismatches == 0


# --------------------------------------------------------------------------- CLI and Python: defaults, layout, paths


def _synth_parser() -> argparse.ArgumentParser:
    from superfloat.cli import fpga

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    fpga.register(sub)
    return ap


def test_synth_and_build_board_defaults_match_the_cli():
    from superfloat.hw.fpga.boards import build_board
    from superfloat.hw.fpga.synth import synthesize

    ap = _synth_parser()
    for argv, fn in ((["synth", "--target", "ice40-up5k"], synthesize), (["build-board", "--board", "icebreaker"],
                                                                        build_board)):
        args = ap.parse_args(argv)
        params = inspect.signature(fn).parameters
        for cli_name, py in (("rows", "rows"), ("cols", "cols"), ("a_bits", "a_bits"), ("w_bits", "w_bits"),
                             ("out_bits", "out_bits"), ("k_max", "k_max"), ("dsp_budget", "dsp_budget"),
                             ("overlap_drain", "overlap_drain"), ("chunk_k", "chunk_k"),
                             ("mul_stages", "mul_stages"), ("pipelined", "pipelined")):
            assert getattr(args, cli_name) == params[py].default, (argv[0], py)
    assert _synth_parser().parse_args(["synth", "--target", "x"]).seed == inspect.signature(synthesize).parameters[
        "seed"].default


def _fake_flow(monkeypatch):
    """run_flow replaced by a recorder that fails like a tool would (no tool runs)."""
    from superfloat.hw.fpga import flow, synth

    seen = []

    def fake(text, *, target, out_dir, **kw):
        seen.append(Path(out_dir))
        raise flow.FlowError("yosys", "stopped by the test")

    monkeypatch.setattr(synth, "run_flow", fake)
    return seen


def test_synth_layout_is_the_same_in_python_and_cli(tmp_path, monkeypatch, capsys):
    from superfloat import cli
    from superfloat.hw.fpga.synth import synthesize

    seen = _fake_flow(monkeypatch)
    s = synthesize(target="ice40-up5k", rows=1, cols=1, a_bits=2, kind="sm-array", out_dir=tmp_path / "py")
    assert seen[-1] == tmp_path / "py" / "flow" and s["flow_dir"] == str(tmp_path / "py" / "flow")
    assert json.loads((tmp_path / "py" / "summary.json").read_text())["error"] == "stopped by the test"
    code = cli.main(["synth", "--target", "ice40-up5k", "--rows", "1", "--cols", "1", "--a-bits", "2", "--design",
                     "sm-array", "--out", str(tmp_path / "cli")])
    assert code == 5 and "stopped by the test" in capsys.readouterr().err
    assert seen[-1] == tmp_path / "cli" / "flow"
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["flow_dir"] == str(tmp_path / "cli" / "flow")


def test_build_outputs_go_under_the_current_directory(tmp_path, monkeypatch):
    from superfloat.hw.fpga import flow
    from superfloat.hw.fpga.synth import synthesize
    from superfloat.sim import fmax, runner

    for var in ("SFX_BUILD_DIR", "SFX_SIM_BUILD_DIR", "YOWASP_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert flow.build_root() == tmp_path.resolve() / "build"
    assert runner.build_root() == tmp_path.resolve() / "build" / "sim"
    assert REPO not in Path(flow.yowasp_env()["YOWASP_CACHE_DIR"]).resolve().parents
    seen = _fake_flow(monkeypatch)
    s = synthesize(target="ecp5-25k", rows=1, cols=1, a_bits=2, kind="sm-array")
    out = Path(s["out_dir"])
    assert out.parent == tmp_path.resolve() / "build" / "fpga" / "synth" / "ecp5-25k"
    assert seen[-1] == out / "flow" and (out / "summary.json").is_file()
    assert out / "summary.json" in fmax.fmax_sources()   # cosim's Fmax lookup reads the same place
    monkeypatch.setenv("SFX_BUILD_DIR", "elsewhere")
    assert flow.build_root() == tmp_path.resolve() / "elsewhere"
    assert runner.build_root() == tmp_path.resolve() / "elsewhere" / "sim"
    monkeypatch.setenv("SFX_SIM_BUILD_DIR", str(tmp_path / "simcache"))
    assert runner.build_root() == tmp_path.resolve() / "simcache"
    monkeypatch.setenv("YOWASP_CACHE_DIR", str(tmp_path / "yw"))
    assert flow.yowasp_env()["YOWASP_CACHE_DIR"] == str(tmp_path / "yw")


def test_docs_example_runs():
    """docs/python-api.md's example (tiny-gpt2, the reference engine: no simulator)."""
    import doctest
    import re

    path = REPO / "docs" / "python-api.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, path.name, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.attempted > 10 and res.failed == 0

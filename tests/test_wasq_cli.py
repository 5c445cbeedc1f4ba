"""``sfx quantize``, ``sfx eval`` and ``sfx generate`` on tiny models, in process."""
from __future__ import annotations

import json
import re

import pytest

from superfloat import cli



@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "small.txt"
    f.write_text("".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(12)))
    return f


def _json(capsys, argv):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # --json prints exactly one object on stdout
    return json.loads(out[0])


def test_eval_json_float_and_quantized(capsys, text_file):
    base = ["eval", "--model", "tiny-llama", "--data", str(text_file), "--context", "64", "--stride", "32",
            "--max-tokens", "300", "--json", "--no-progress"]
    f = _json(capsys, base)
    for key in ("perplexity", "tokens", "weight_bits", "act_bits", "context", "stride"):
        assert key in f
    assert f["weight_bits"] is None and f["act_bits"] is None and f["method"] == "float"
    assert f["tokens"] == 299 and f["context"] == 64 and f["stride"] == 32 and f["split"] == "all"
    q = _json(capsys, base + ["--weight-bits", "4", "--act-bits", "8"])
    assert q["weight_bits"] == 4 and q["act_bits"] == 8 and q["method"] == "vanilla"
    assert q["quantized_layers"] == 28 and q["tokens"] == 299 and q["scale_kind"] == "float"
    assert q["perplexity"] != f["perplexity"] and q["perplexity"] > 1
    r = _json(capsys, base + ["--weight-bits", "8", "--method", "rtn-int"])
    assert r["method"] == "rtn-int" and r["scale_kind"] is None


def test_quantize_then_eval_checkpoint(capsys, tmp_path, text_file):
    ck = tmp_path / "ck"
    out = _json(capsys, ["quantize", "--model", "tiny-gpt2", "--weight-bits", "4", "--scale", "pow2", "-o", str(ck),
                         "--json"])
    assert out["quantized_layers"] == 16
    assert out["memory"]["model_safetensors_bytes"] == (ck / "model.safetensors").stat().st_size
    common = ["--data", str(text_file), "--context", "48", "--max-tokens", "200", "--json", "--no-progress"]
    a = _json(capsys, ["eval", "--model", str(ck)] + common)
    b = _json(capsys, ["eval", "--model", "tiny-gpt2", "--weight-bits", "4", "--scale", "pow2"] + common)
    assert a["perplexity"] == b["perplexity"] and a["weight_bits"] == 4
    assert cli.main(["quantize", "--model", "tiny-gpt2", "--weight-bits", "4", "-o", str(ck)]) == 2
    assert "exists and is not empty; pass overwrite=True" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", "tiny-gpt2", "--weight-bits", "4", "-o", str(ck), "--overwrite"]) == 0
    assert "model.safetensors" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["eval", "--model", "tiny-llama", "--act-bits", "8"], "--act-bits needs --weight-bits"),
    (["eval", "--model", "tiny-llama", "--weight-bits", "1"], "argument --weight-bits/-w: must be an SFx width in "
                                                              "2..16, got 1"),
    (["eval", "--model", "tiny-llama", "--context", "0"], "argument --context: must be an integer >= 1, got 0"),
    (["eval", "--model", "tiny-llama", "--context", "9999"], "--context 9999 exceeds the model's"),
    (["eval", "--model", "tiny-llama", "--context", "9999"], "positions (max_position_embeddings): give --context "),
    (["eval", "--model", "tiny-llama", "--headroom", "0.5"], "argument --headroom: must be a number >= 1, got 0.5"),
    (["eval", "--model", "tiny-llama", "--out-bits", "17"], "argument --out-bits: must be an SFx width in 2..16"),
    (["eval", "--model", "tiny-llama", "--backend", "accelerator"],
     "--backend accelerator runs quantized layers: give --weight-bits N or a WASQ checkpoint"),
    (["eval", "--model", "tiny-llama", "--calibrate-outputs"], "--calibrate-outputs needs a quantized model"),
    (["eval", "--model", "tiny-llama", "-w", "8", "-a", "8", "--backend", "accelerator", "--calib-tokens", "5"],
     "calibration rows, fewer than 16: the calibration text is too short"),
    (["eval", "--model", "tiny-llama", "-w", "8", "--backend", "accelerator", "--calib-tokens", "0"],
     "argument --calib-tokens: must be an integer >= 1, got 0"),
    (["generate", "--model", "tiny-llama", "--prompt", "x", "--top-p", "2"], "argument --top-p: must be a number in "
                                                                             "(0, 1], got 2"),
    (["eval", "--model", "tiny-llama", "--data", "nope"], "'nope' is not a file"),
    (["eval", "--model", "tiny-llama", "--weight-bits", "4", "--context", "8", "--stride", "9"],
     "stride (9) must not exceed context (8)"),
    (["quantize", "--model", "tiny-llama", "--weight-bits", "4", "--method", "rtn-int", "-o", "x"],
     "--method rtn-int with these options is not executable by the SFx accelerator (integer codes"),
    (["eval", "--model", "/no/such/model/dir"], "no such model directory or file: '/no/such/model/dir'"),
    (["generate", "--model", "tiny-llama", "--prompt", "x", "-n", "100000"],
     "plus --max-new-tokens 100000 exceed the model's"),
    (["quantize", "--model", "tiny-llama", "-w", "4", "-a", "8", "--act-exponent", "static", "--calib-tokens", "1",
      "-o", "/no/such/ck"], "--calib-tokens must be >= 2 (one token is scored per preceding token), got 1"),
    (["quantize", "--model", "tiny-llama", "-w", "4", "--packed", "/proc/no/such/x.safetensors"],
     "cannot write /proc/no"),
    (["eval", "--model", "no-such-org/no-such-model"], "could not load model 'no-such-org/no-such-model' from the "
                                                       "Hugging Face hub"),
])
def test_cli_errors(capsys, argv, msg, monkeypatch):
    if argv[2].startswith("no-such"):
        # a hub lookup must fail fast and clearly without a network
        import transformers

        def offline(*a, **k):
            raise OSError("We couldn't connect to 'https://huggingface.co'")

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors (range-checked flags)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert f"sfx {argv[0]}: error: " in err and msg in err


def test_generate_side_by_side(capsys):
    out = _json(capsys, ["generate", "--model", "tiny-llama", "--weight-bits", "4", "8", "--prompt", "To be",
                         "-n", "6", "--json"])
    assert [o["model"] for o in out["outputs"]] == ["tiny-llama float", "tiny-llama SF4 float/channel",
                                                    "tiny-llama SF8 float/channel"]
    assert all(isinstance(o["text"], str) for o in out["outputs"])
    assert cli.main(["generate", "--model", "tiny-llama", "--weight-bits", "4", "--prompt", "To be", "-n", "4",
                     "--layout", "columns"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("prompt: To be") and "tiny-llama float" in text and " | " in text


def test_generate_keeps_the_float_model_float():
    from superfloat.sw.wasq import quantized_layers
    from superfloat.cli.wasq import generation_entries

    args = cli.build_parser().parse_args(["generate", "--model", "tiny-opt", "--weight-bits", "4", "8", "--prompt", "x"])
    entries = generation_entries(args)
    assert [len(quantized_layers(m)) for _, m, _ in entries] == [0, 24, 24]
    assert len({id(m) for _, m, _ in entries}) == 3
    args = cli.build_parser().parse_args(["generate", "--model", "tiny-opt", "--weight-bits", "4", "--no-float",
                                          "--prompt", "x"])
    assert [label for label, _, _ in generation_entries(args)] == ["tiny-opt SF4 float/channel"]


def test_commands_are_registered(capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    help_text = capsys.readouterr().out
    for opt in ("--weight-bits", "--act-bits", "--method", "--context", "--stride", "--max-tokens", "--json"):
        assert opt in help_text


def test_eval_accelerator_backend(capsys, text_file):
    """--backend accelerator: SPEC section 8 on the fly (output exponents calibrated on the calibration
    text), JSON with top1_agreement (float pass in the same run) and saturated; a checkpoint from
    sfx quantize carries its exponents and evaluates to the same numbers."""
    base = ["--data", str(text_file), "--context", "64", "--max-tokens", "300", "--json", "--no-progress",
            "--calib-data", str(text_file)]
    q = ["eval", "--model", "tiny-llama", "-w", "8", "-a", "8"] + base
    fake = _json(capsys, q)
    acc = _json(capsys, q + ["--backend", "accelerator"])
    assert fake["backend"] == "fake" and acc["backend"] == "accelerator"
    for r in (fake, acc):
        assert 0.0 <= r["top1_agreement"] <= 1.0 and r["float_perplexity"] > 1
    assert acc["float_perplexity"] == fake["float_perplexity"]
    assert acc["saturated"] >= 0 and acc["outputs"] == 7 * 0 + acc["outputs"] > 0
    assert acc["output_calibration"]["out_bits"] == [16] and acc["output_calibration"]["headroom"] == [4.0]
    assert abs(acc["perplexity"] / fake["perplexity"] - 1) < 0.05  # 16-bit outputs: close to fake
    narrow = _json(capsys, q + ["--backend", "accelerator", "--out-bits", "4", "--headroom", "1"])
    assert narrow["output_calibration"]["out_bits"] == [4] and narrow["perplexity"] != acc["perplexity"]
    assert narrow["saturated"] > 0 and narrow["saturated_layers"]
    nob = _json(capsys, q + ["--backend", "accelerator", "--no-baseline"])
    assert "top1_agreement" not in nob and nob["perplexity"] == acc["perplexity"]
    both = _json(capsys, q + ["--backend", "both"])
    assert both["backend"] == "accelerator" and both["perplexity"] == acc["perplexity"]
    assert both["fake"]["perplexity"] == fake["perplexity"] and both["top1_agreement"] == acc["top1_agreement"]
    assert both["fake"]["top1_agreement"] == fake["top1_agreement"] and both["time_ratio"] > 0
    assert both["cpu_seconds"] > 0 and both["fake"]["cpu_seconds"] > 0
    assert both["cpu_time_ratio"] > 0 and abs(both["cpu_time_ratio"] * both["fake"]["cpu_seconds"] / both["cpu_seconds"] - 1) < 0.03  # ms-rounded


def test_accelerator_checkpoint_round_trip(capsys, tmp_path, text_file):
    ck = tmp_path / "ck"
    calib = ["--calib-data", str(text_file), "--calib-tokens", "400"]
    w = _json(capsys, ["quantize", "--model", "tiny-opt", "-w", "8", "-a", "8", "-o", str(ck), "--json",
                       "--context", "64"] + calib)
    assert w["output_calibration"]["calib_tokens"] == 400
    common = ["--data", str(text_file), "--context", "64", "--max-tokens", "200", "--json", "--no-progress",
              "--backend", "accelerator"]
    a = _json(capsys, ["eval", "--model", str(ck)] + common)  # float model: the recorded source, tiny-opt
    b = _json(capsys, ["eval", "--model", "tiny-opt", "-w", "8", "-a", "8"] + common + calib)
    assert a["perplexity"] == b["perplexity"] and a["top1_agreement"] == b["top1_agreement"]
    assert cli.main(["eval", "--model", str(ck), "--out-bits", "8"] + common) == 2
    assert "--out-bits/--headroom change the static output exponents of a checkpoint: add --calibrate-outputs" \
        in capsys.readouterr().err
    c = _json(capsys, ["eval", "--model", str(ck), "--out-bits", "8", "--calibrate-outputs"] + common + calib)
    assert c["output_calibration"]["out_bits"] == [8] and c["perplexity"] != a["perplexity"]


def test_accelerator_needs_calibrated_checkpoint(capsys, tmp_path, text_file):
    from superfloat.sw.wasq import WASQConfig, quantize_, save_checkpoint
    from superfloat.sw.wasq.models import byte_tokenizer, tiny_model

    m = tiny_model("tiny-llama")
    quantize_(m, WASQConfig(weight_bits=8))
    save_checkpoint(m, tmp_path / "raw", tokenizer=byte_tokenizer(), source="tiny-llama")
    argv = ["eval", "--model", str(tmp_path / "raw"), "--data", str(text_file), "--context", "64", "--max-tokens",
            "100", "--backend", "accelerator", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no calibrated output exponents (SPEC section 8); calibrate them with" in err
    assert "sfx eval --calibrate-outputs" in err
    assert cli.main(argv + ["--calibrate-outputs", "--calib-data", str(text_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_calibration"]["calib_tokens"] > 0


@pytest.mark.parametrize("method, knobs", [("awq", ["--awq-grid", "2"]), ("smoothquant", []),
                                           ("adaround", ["--adaround-iters", "3"])])
def test_ptq_methods_write_accelerator_checkpoints(capsys, tmp_path, text_file, method, knobs):
    """sfx quantize --method M --act-bits 8 -o DIR: a checkpoint the accelerator runs, with its
    calibrated output exponents; evaluating it accelerator-exact gives the numbers of the same
    configuration quantized on the fly."""
    ck = tmp_path / method
    calib = ["--calib-data", str(text_file), "--calib-tokens", "300", "--search-tokens", "32"] + knobs
    _json(capsys, ["quantize", "--model", "tiny-llama", "-w", "8", "-a", "8", "--method", method, "-o", str(ck),
                   "--json", "--context", "64"] + calib)
    common = ["--data", str(text_file), "--context", "64", "--max-tokens", "150", "--json", "--no-progress",
              "--backend", "accelerator", "--no-baseline"]
    a = _json(capsys, ["eval", "--model", str(ck)] + common)
    b = _json(capsys, ["eval", "--model", "tiny-llama", "-w", "8", "-a", "8", "--method", method] + common + calib)
    assert a["method"] == method and a["perplexity"] == b["perplexity"] and a["saturated"] == b["saturated"]


def test_xmult_activations_checkpoint_and_backends(capsys, tmp_path, text_file):
    """--act-scale float with dynamic activations: a float scale per token (SPEC rev. 2 xmult),
    through the checkpoint and both backends; the label says xmult."""
    ck = tmp_path / "xm"
    calib = ["--calib-data", str(text_file), "--calib-tokens", "300"]
    q = _json(capsys, ["quantize", "--model", "tiny-llama", "-w", "4", "-a", "4", "--act-scale", "float", "-o",
                       str(ck), "--json", "--context", "64"] + calib)
    assert q["label"].endswith("+ A4 dynamic xmult") and q["hardware_executable"]
    common = ["--data", str(text_file), "--context", "64", "--max-tokens", "150", "--json", "--no-progress",
              "--backend", "both", "--no-baseline"]
    a = _json(capsys, ["eval", "--model", str(ck)] + common)
    b = _json(capsys, ["eval", "--model", "tiny-llama", "-w", "4", "-a", "4", "--act-scale", "float"] + common + calib)
    p = _json(capsys, ["eval", "--model", "tiny-llama", "-w", "4", "-a", "4"] + common + calib)
    assert a["perplexity"] == b["perplexity"] and a["fake"]["perplexity"] == b["fake"]["perplexity"]
    assert b["fake"]["perplexity"] != p["fake"]["perplexity"]  # per-token float scales are not pow2 exponents


def test_a_nan_is_named_at_its_source_in_eval_and_generate(capsys, tmp_path):
    """Issue 17: a NaN produced inside the model (a huge, finite embedding that overflows in ln_1)
    names that module, not the quantized layer that then refuses its input (SFx has no NaN)."""
    import torch

    from superfloat.sw.wasq import WASQConfig, load_model, quantize_, save_checkpoint

    lm = load_model("tiny-gpt2")
    quantize_(lm.model, WASQConfig(weight_bits=4, act_bits=8))
    with torch.no_grad():
        lm.model.transformer.wte.weight[:, 0] = 3.0e38
    ck = str(tmp_path / "ck")
    save_checkpoint(lm.model, ck, tokenizer=lm.tokenizer)
    source = (r"forward pass, first produced by transformer\.h\.0\.ln_1 \(output of shape \[1, \d+, 128\]: .*NaN.*: "
              r"check the weights and inputs of transformer\.h\.0\.ln_1 \(then: layer transformer\.h\.0\.attn\.c_attn: "
              r"input")
    assert cli.main(["eval", "-m", ck, "--max-tokens", "16", "--no-progress", "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"sfx eval: error: NaN/infinity in the model's " + source, err), err
    assert cli.main(["generate", "-c", ck, "-p", "Hello", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"sfx generate: error: NaN/infinity in .*ck's " + source, err), err

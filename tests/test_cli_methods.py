"""``sfx methods``, ``sfx clip-analysis``, the post-training methods through ``sfx eval/quantize
--method`` (cli/methods.py, cli/wasq.py) and the ``ptq`` bench (tiny models, few tokens)."""
from __future__ import annotations

import json

import pytest

from superfloat import cli

TINY = ["-m", "tiny-llama", "--max-tokens", "200", "--calib-tokens", "128", "--context", "64", "--search-tokens", "32"]



def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_methods_lists_hardware_flags(capsys):
    assert cli.main(["methods", "--json"]) == 0
    rows = {r["method"]: r for r in _json(capsys)["methods"]}
    assert set(rows) >= {"rtn", "smoothquant", "awq", "awq-dyngroup", "clip", "mixed", "adaround", "asym"}
    assert rows["awq"]["hardware_executable_sfx"] and not rows["awq-dyngroup"]["hardware_executable_sfx"]
    assert cli.main(["methods"]) == 0
    assert "needs per-group scales along K" in capsys.readouterr().out


EVAL = ["eval", "-m", "tiny-llama", "--max-tokens", "200", "--calib-tokens", "128", "--context", "64",
        "--search-tokens", "32", "--no-progress"]


def test_eval_reports_perplexity_size_and_hardware(capsys):
    assert cli.main([*EVAL, "--method", "awq", "-w", "4", "-a", "4", "--awq-grid", "2", "--baseline", "--memory",
                     "--json"]) == 0
    out = _json(capsys)
    assert out["label"] == "awq SF4 float/channel + A4 dynamic" and out["hardware_executable"] is True
    assert out["perplexity"] > 1 and out["float_perplexity"] > 1 and out["tokens"] == 199
    assert out["memory"]["bits_per_weight"] > 4 and out["packed_file_bytes"] > out["memory"]["codes_packed"]
    assert cli.main([*EVAL, "--method", "asym", "-w", "3"]) == 0
    text = capsys.readouterr().out
    assert "[asym int3 asym]" in text and "hardware-executable: no (zero points" in text


def test_quantize_writes_checkpoint_and_packed_file(tmp_path, capsys):
    from superfloat.sw.wasq.checkpoint import load_checkpoint
    from superfloat.sw.wasq.packing import load_packed

    ck, pk = tmp_path / "ck", tmp_path / "m.safetensors"
    assert cli.main(["quantize", "-m", "tiny-llama", "--calib-tokens", "128", "--context", "64", "--method", "mixed",
                     "-w", "4", "-a", "8", "-o", str(ck), "--packed", str(pk), "--json"]) == 0
    out = _json(capsys)
    assert out["memory"]["codes_packed_bytes"] > 0 and out["memory"]["packed"]["file_bytes"] == pk.stat().st_size
    model = load_checkpoint(ck)
    bits = {getattr(m, "bits", None) for m in model.modules()} - {None}
    assert bits == {4, 8}  # mixed precision: the checkpoint carries bits per layer
    layers, _ = load_packed(pk)
    assert {q.bits for q in layers.values()} == {4, 8}
    assert cli.main(["quantize", "-m", "tiny-llama", "-w", "4", "--method", "awq-dyngroup", "--calib-tokens", "128",
                     "--context", "64", "--packed", str(tmp_path / "g.safetensors")]) == 0  # any format packs
    assert "layers quantized" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["quantize", "-m", "tiny-llama", "-w", "4", "--method", "awq-dyngroup", "-o", "X"],
     r"is not executable by the SFx accelerator \(per-group scales along K.*--packed FILE"),
    (["quantize", "-m", "tiny-llama", "-w", "4", "--method", "rtn-int"], "give --output DIR"),
    ([*EVAL, "-w", "4", "--method", "awq", "--group-size", "big"], "--group-size must be an int or 'dynamic', got 'big'"),
    ([*EVAL, "--method", "awq", "-w", "1"], r"argument --weight-bits/-w: must be an SFx width in 2..16, got 1"),
    ([*EVAL, "--method", "awq", "-w", "4", "--awq-grid", "0"], r"argument --awq-grid: must be an integer >= 1, got 0"),
    ([*EVAL, "--method", "smoothquant", "-w", "4", "--smoothquant", "1.5"],
     r"argument --smoothquant: must be a number in \[0, 1\], got 1.5"),
    ([*EVAL, "--method", "awq", "-w", "4", "--weight-scale", "tensor"], "--weight-scale tensor is a vanilla/rtn-int"),
    ([*EVAL, "--method", "awq", "-w", "4", "--data", "nope:x"], "data 'nope:x' is not a file"),
])
def test_errors(argv, msg, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's range-checked flags
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert f"sfx {argv[0]}: error:" in err.splitlines()[-1]
    import re

    assert re.search(msg, err), err


def test_clip_analysis(capsys):
    assert cli.main(["clip-analysis", *TINY, "-a", "4", "--codes", "sfx", "--strategies", "dynamic", "raw", "mse",
                     "float+-1", "--json"]) == 0
    out = _json(capsys)
    strategies = [r["strategy"] for r in out["rows"]]
    assert strategies == ["float+-1", "dynamic", "raw", "mse", "mse (pow2)"]
    assert all(r["perplexity"] > 1 for r in out["rows"])


def test_bench_quick_writes_report_and_plot(tmp_path, monkeypatch):
    from superfloat.bench import ptq as ptq_bench

    monkeypatch.setattr(ptq_bench, "METHOD_ORDER", ("rtn", "clip", "asym"))
    monkeypatch.setattr(ptq_bench, "CONFIGS", ((4, None), (4, 4)))
    monkeypatch.setitem(ptq_bench.BUDGET, True, {**ptq_bench.BUDGET[True], "calib_tokens": 128, "eval_tokens": 130,
                                                  "clip_eval_tokens": 65, "context": 64})
    import superfloat.cli.methods as pc

    monkeypatch.setattr(pc, "clip_strategies", lambda: ["dynamic", "raw", "float+-1"])
    ptq_bench.run(tmp_path, quick=True)
    md = (tmp_path / "ptq_methods.md").read_text()
    assert "Produced by `sfx bench ptq --quick`" in md and "| rtn | sfx |" in md and "| asym | int_asym |" in md
    assert "SFx **without exponents**" in md and (tmp_path / "ptq_methods.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "ptq_methods.json").read_text())["results"]
    assert {r["config"] for r in data["rows"]} == {"W4A16", "W4A4"}
    assert all(r["packed_file_bytes"] > 0 for r in data["rows"])


def test_docs_examples_run():
    import doctest
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "ptq-methods.md"
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(doctest.DocTestParser().get_doctest("\n".join(blocks), {}, path.name, str(path), 0))
    assert runner.summarize(verbose=False).failed == 0


def test_wasq_eval_and_quantize_take_the_ptq_methods(tmp_path, capsys):
    """``sfx eval/quantize --method awq ...`` (WASQ's own commands) run the PTQ presets; a PTQ
    checkpoint evaluates to the same perplexity through ``sfx eval --model DIR``."""
    common = ["-m", "tiny-llama", "--max-tokens", "200", "--context", "64", "--calib-tokens", "128"]
    assert cli.main(["eval", *common, "-w", "4", "-a", "8", "--method", "smoothquant", "--json", "--no-progress"]) == 0
    out = _json(capsys)
    assert out["method"] == "smoothquant" and out["label"] == "smoothquant SF4 float/channel + A8 dynamic"
    assert out["hardware_executable"]
    # the method's own time, per pass (quantize_report(model).seconds)
    ms = out["method_seconds"]
    assert {"smoothquant", "calibration", "total"} <= set(ms) and ms["total"] >= ms["smoothquant"] > 0
    assert cli.main(["eval", *common, "-w", "4", "--method", "awq", "--codes", "int", "--json", "--no-progress"]) == 0
    assert _json(capsys)["codes"] == "int"
    ck = tmp_path / "ck"
    assert cli.main(["quantize", "-m", "tiny-llama", "--calib-tokens", "128", "--context", "64", "-w", "4", "-a", "8",
                     "--method", "smoothquant", "-o", str(ck), "--json"]) == 0
    q = _json(capsys)
    assert q["memory"]["codes_packed_bytes"] > 0 and q["method_seconds"]["total"] > 0
    assert cli.main(["eval", "-m", str(ck), "--max-tokens", "200", "--context", "64", "--json", "--no-progress"]) == 0
    back = _json(capsys)
    assert back["perplexity"] == pytest.approx(out["perplexity"], rel=0, abs=0)
    assert back["method_seconds"] is None  # a checkpoint: no method ran in this command
    # software-only configurations are refused before any work
    assert cli.main(["quantize", "-m", "tiny-llama", "-w", "4", "--method", "awq-dyngroup", "-o",
                     str(tmp_path / "x")]) == 2
    assert "is not executable by the SFx accelerator (per-group scales along K" in capsys.readouterr().err
    # vanilla keeps its meaning; commands that do not take PTQ methods reject them
    assert cli.main(["eval", *common, "-w", "8", "--json", "--no-progress"]) == 0
    out = _json(capsys)
    assert out["method"] == "vanilla" and out["method_seconds"] is None
    with pytest.raises(SystemExit):
        cli.main(["analyze", "-m", "tiny-llama", "-w", "4", "--method", "awq", "-o", str(tmp_path / "a")])

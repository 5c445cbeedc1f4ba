"""CLI: ``sfx finetune``, ``sfx analyze``, ``sfx sweep`` (smoke tests on tiny models, error paths)."""
from __future__ import annotations

import csv
import json
import re

import pytest

from superfloat import cli
from superfloat.sw.wasq.models import load_model

TINY = ["--model", "tiny-llama", "--context", "32", "--tokens", "256", "--no-progress"]


def test_registered_once():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"finetune", "analyze", "sweep"} <= set(sub.choices)


@pytest.mark.parametrize("method", ["fpm", "fasteropt", "lth"])
def test_finetune_writes_checkpoint_summary_and_state(tmp_path, text, capsys, method):
    out = tmp_path / method
    extra = ["--rounds", "1", "--eval-tokens", "64"] if method == "lth" else []
    rc = cli.main(["finetune", "--method", method, *TINY, "--data", text, "--weight-bits", "4", "--max-steps", "2",
                   "--lr", "1e-3", "-o", str(out), *extra])
    assert rc == 0
    msg = capsys.readouterr().out
    assert f"{method}: SF4 float/channel -> {out / 'model'}" in msg
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["method"] == method and summary["train"]["steps"] == 2
    assert summary["calibration_tokens"] == 256 and summary["context"] == 32
    assert (out / "model" / "sfx_config.json").is_file()
    assert list((out / "train_state").glob("**/checkpoint-00000002"))
    lm = load_model(str(out / "model"))
    assert lm.kind == "checkpoint"
    if method == "fasteropt":
        assert (out / "analysis" / "layers.csv").is_file() and (out / "analysis" / "layers.png").is_file()
    if method == "lth":
        assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["rounds"][1]["eval"] > 1
        assert "round 1: sparsity 0.200" in msg


def test_finetune_resume_and_refusals(tmp_path, text, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--method", "opt", *TINY, "--data", text, "--weight-bits", "4", "--max-steps", "3",
            "--layers", "model.layers.3.mlp.down_proj", "-o", str(out), "--json"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["trained_layers"] == ["model.layers.3.mlp.down_proj"]
    assert cli.main(args) == 2
    assert "already exists; pass --resume to continue that run or --overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--resume"]) == 0  # the run is complete: resuming restores its final state
    again = json.loads(capsys.readouterr().out)
    assert again["train"]["resumed_from"] == 3 and again["train"]["losses"] == first["train"]["losses"]
    # other settings cannot resume this run
    assert cli.main([a if a != "3" else "5" for a in args] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume: the checkpoint belongs to a different run (cfg.max_steps: checkpoint 3 != now 5; " in err
    assert "total_steps: checkpoint 3 != now 5); rerun with the same arguments" in err
    assert cli.main(args + ["--overwrite"]) == 0


def test_vanilla_finetune_needs_no_training(tmp_path, text, capsys):
    assert cli.main(["finetune", "--method", "vanilla", *TINY, "--data", text, "--weight-bits", "6",
                     "-o", str(tmp_path / "v")]) == 0
    assert "vanilla: SF6 float/channel" in capsys.readouterr().out
    assert not (tmp_path / "v" / "train_state").exists()


@pytest.mark.parametrize("argv, msg", [
    (["--weight-bits", "4", "--method", "opt", "--layers", "x", "--analysis", "y"],
     "give either --layers or --analysis, not both"),
    (["--weight-bits", "4", "--method", "opt", "--analysis", "/nonexistent"], "no analysis at"),
    (["--weight-bits", "4", "--data", "/nonexistent.txt"], "data '/nonexistent.txt' is not a file"),
    (["--weight-bits", "4", "--model", str(__file__)], "exists but is neither a model directory"),
])
def test_finetune_errors(tmp_path, text, capsys, argv, msg):
    base = ["finetune", "--model", "tiny-llama", "--context", "32", "--tokens", "64", "--data", text,
            "-o", str(tmp_path / "e"), "--no-progress"]
    assert cli.main(base + argv) == 2
    assert re.search(msg, capsys.readouterr().err)


@pytest.mark.parametrize("argv, msg", [
    (["--fraction", "2"], r"--fraction must be a number in \(0, 1\] or 'cluster', got 2"),
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["--weight-bits", "1"], r"argument --weight-bits/-w: must be an SFx width in 2\.\.16, got 1"),
    (["--method", "lth", "--prune", "1.5"], r"argument --prune: must be a number in \(0, 1\), got 1\.5"),
    (["--method", "gptq"], "invalid choice: 'gptq'"),
])
def test_finetune_argument_errors(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--weight-bits", "4", "-o", str(tmp_path), *argv])
    assert e.value.code == 2
    assert re.search(msg, capsys.readouterr().err)


def test_analyze_cli(tmp_path, text, capsys):
    out = tmp_path / "an"
    assert cli.main(["analyze", "--model", "tiny-gpt2", "--data", text, "--weight-bits", "4", "--context", "32",
                     "--tokens", "96", "-o", str(out), "--no-progress", "--show", "3"]) == 0
    msg = capsys.readouterr().out
    assert "16 layers analysed on 96 tokens" in msg
    with (out / "layers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {"rank", "deviation", "rel_error", "cluster", "critical"} <= set(rows[0])
    assert (out / "layers.png").is_file()
    info = json.loads((out / "analysis.json").read_text())
    assert info["critical"] and len(info["top"]) == 10
    # the analysis drives opt
    assert cli.main(["finetune", "--method", "opt", *TINY, "--model", "tiny-gpt2", "--data", text, "--weight-bits",
                     "4", "--max-steps", "1", "--analysis", str(out), "--fraction", "cluster",
                     "-o", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trained_layers"] == info["critical"]
    assert cli.main(["analyze", "--model", "tiny-gpt2", "--data", text, "-o", str(out)]) == 2
    assert "--weight-bits is required" in capsys.readouterr().err


def test_sweep_cli(tmp_path, text, capsys):
    out = tmp_path / "sw"
    assert cli.main(["sweep", "--model", "tiny-llama", "--data", text, "--bits", "4", "8", "--context", "32",
                     "--shots", "0", "1", "--tokens", "128", "--eval-tokens", "128", "--lr", "1e-3",
                     "-o", str(out), "--no-progress"]) == 0
    md = (out / "sweep.md").read_text()
    assert "| tiny-llama |" in md and "| float |" in md and "SF4" in md and "SF8" in md
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 2 * 2  # float + bits x shots
    assert all(r["float_perplexity"] == rows[0]["perplexity"] for r in rows)
    assert {r["method"] for r in rows} == {"float", "vanilla", "fpm"}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--bits", "1", "-o", str(out), "--data", text])
    assert e.value.code == 2 and "argument --bits: must be an SFx width in 2..16, got 1" in capsys.readouterr().err

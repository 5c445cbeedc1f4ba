"""CLI numeric flags are range-checked with one clear message (superfloat.cli.argtypes; issue 17)."""
from __future__ import annotations

import argparse
import re

import pytest

from superfloat import cli
from superfloat.cli import argtypes as at


@pytest.mark.parametrize("parse, good, bad, msg", [
    (at.positive_int, [("1", 1), ("42", 42)], ["0", "-3"], r"must be an integer >= 1, got "),
    (at.nonneg_int, [("0", 0), ("7", 7)], ["-1"], r"must be an integer >= 0, got -1"),
    (at.positive_float, [("1e-4", 1e-4), ("3", 3.0)], ["0", "-0.5"], r"must be a number > 0, got "),
    (at.nonneg_float, [("0", 0.0), ("0.5", 0.5)], ["-1e-9"], r"must be a number >= 0, got -1e-9"),
    (at.probability(), [("0", 0.0), ("1", 1.0), ("0.9", 0.9)], ["1.01", "-0.1"], r"must be a number in \[0, 1\], got "),
    (at.probability(open_low=True), [("1", 1.0)], ["0", "2"], r"must be a number in \(0, 1\], got "),
    (at.int_range(-128, 127), [("-128", -128), ("127", 127)], ["128", "-129"], r"must be an integer in -128\.\.127"),
    (at.int_range(None, 5), [("-9", -9)], ["6"], r"must be an integer <= 5, got 6"),
    (at.float_range(0, 1, open_high=True), [("0", 0.0)], ["1"], r"must be a number in \[0, 1\), got 1"),
    (at.sfx_bits, [("2", 2), ("16", 16)], ["1", "17"], r"must be an SFx width in 2\.\.16, got "),
])
def test_argtypes_accept_and_refuse(parse, good, bad, msg):
    for s, v in good:
        assert parse(s) == v and type(parse(s)) is type(v)
    for s in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse(s)


@pytest.mark.parametrize("parse, s, msg", [
    (at.positive_int, "1.5", r"must be an integer, got '1\.5'"),
    (at.positive_int, "ten", r"must be an integer, got 'ten'"),
    (at.positive_float, "nan", r"must be a finite number, got 'nan'"),
    (at.positive_float, "inf", r"must be a finite number, got 'inf'"),
    (at.probability(), "-inf", r"must be a finite number, got '-inf'"),
    (at.nonneg_float, "x", r"must be a number, got 'x'"),
])
def test_argtypes_refuse_non_numbers(parse, s, msg):
    with pytest.raises(argparse.ArgumentTypeError, match=msg):
        parse(s)


def test_int_range_rejects_an_empty_range():
    with pytest.raises(ValueError, match=r"int_range: lo 3 > hi 2"):
        at.int_range(3, 2)


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


FT = ["finetune", "-m", "tiny-llama", "-o", "/nonexistent/run"]


@pytest.mark.parametrize("argv, msg", [
    (FT + ["-w", "1"], r"sfx finetune: error: argument --weight-bits/-w: must be an SFx width in 2\.\.16, got 1"),
    (FT + ["-w", "4", "-a", "17"], r"argument --act-bits/-a: must be an SFx width in 2\.\.16, got 17"),
    (FT + ["-w", "4", "--lr", "nan"], r"argument --lr: must be a finite number, got 'nan'"),
    (FT + ["-w", "4", "--lr=-1e-4"], r"argument --lr: must be a number > 0, got -1e-4"),
    (FT + ["-w", "4", "--epochs", "0"], r"argument --epochs: must be an integer >= 1, got 0"),
    (FT + ["-w", "4", "--context", "1.5"], r"argument --context: must be an integer, got '1\.5'"),
    (FT + ["-w", "4", "--warmup", "-1"], r"argument --warmup: must be an integer >= 0, got -1"),
    (FT + ["-w", "4", "--max-grad-norm", "inf"], r"argument --max-grad-norm: must be a finite number"),
    (FT + ["-w", "4", "--prune", "1"], r"argument --prune: must be a number in \(0, 1\), got 1"),
    (FT + ["-w", "4", "--prune", "0"], r"argument --prune: must be a number in \(0, 1\), got 0"),
    (FT + ["-w", "4", "--seed", "-1"], r"argument --seed: must be an integer >= 0, got -1"),
    (["analyze", "-w", "4", "-o", "/x", "--clusters", "0"], r"argument --clusters: must be an integer >= 1, got 0"),
    (["sweep", "-o", "/x", "--bits", "4", "20"], r"argument --bits: must be an SFx width in 2\.\.16, got 20"),
    (["sweep", "-o", "/x", "--shots", "-1"], r"argument --shots: must be an integer >= 0, got -1"),
    (["table", "--bits", "9"], r"sfx table: error: argument --bits: must be an SFx width \(tables are printed up to "
                               r"8 bits\) in 2\.\.8, got 9"),
    (["table", "--exponent", "200"], r"argument --exponent: must be an int8 exponent in -128\.\.127, got 200"),
    (["eval", "--max-tokens", "1"], r"sfx eval: error: argument --max-tokens: must be an integer >= 2, got 1"),
    (["eval", "--batch-size", "0"], r"argument --batch-size: must be an integer >= 1, got 0"),
    (["eval", "--stride", "-4"], r"argument --stride: must be an integer >= 1, got -4"),
    (["eval", "-w", "4", "--mp-fraction", "2"], r"argument --mp-fraction: must be a number in \[0, 1\], got 2"),
    (["eval", "-w", "4", "--search-tokens", "0"], r"argument --search-tokens: must be an integer >= 1, got 0"),
    (["eval", "-w", "4", "-a", "4", "--act-scale", "float", "--act-clip-ratio", "0"],
     r"argument --act-clip-ratio: must be a number in \(0, 1\], got 0"),
    (["quantize", "-w", "4", "-o", "/x", "--calib-tokens", "-5"], r"sfx quantize: error: argument --calib-tokens: "
                                                                  r"must be an integer >= 1, got -5"),
    (["quantize", "-w", "4", "-o", "/x", "--out-bits", "1"], r"argument --out-bits: must be an SFx width in 2\.\.16"),
    (["generate", "-p", "x", "--temperature", "0"], r"argument --temperature: must be a number > 0, got 0"),
    (["generate", "-p", "x", "--top-k", "0"], r"argument --top-k: must be an integer >= 1, got 0"),
    (["generate", "-p", "x", "-n", "0"], r"argument --max-new-tokens/-n: must be an integer >= 1, got 0"),
    (["clip-analysis", "--context", "0"], r"sfx clip-analysis: error: argument --context: must be an integer >= 1"),
    (["clip-analysis", "-a", "8", "33"], r"argument --act-bits/-a: must be an SFx width in 2\.\.16, got 33"),
    (["demo", "--tokens", "0"], r"sfx demo: error: argument --tokens: must be an integer in 1\.\.512, got 0"),
    (["cosim", "-c", "/x", "--layer", "all", "--fmax", "-5"], r"sfx cosim: error: argument --fmax: must be a number > "
                                                              r"0, got -5"),
    (["cosim", "-c", "/x", "--layer", "all", "--fmax", "nan"], r"argument --fmax: must be a finite number, got 'nan'"),
    (["synth", "--target", "ice40-up5k", "--seed", "-1"], r"sfx synth: error: argument --seed: must be an integer >= 0"),
    (["synth", "--target", "ice40-up5k", "--timeout", "0"], r"argument --timeout: must be a number > 0, got 0"),
    (["build-board", "--board", "icebreaker", "--timeout", "-1"], r"sfx build-board: error: argument --timeout: must "
                                                                  r"be a number > 0, got -1"),
])
def test_cli_numeric_flags_are_range_checked(argv, msg, capsys):
    assert re.search(msg, _cli_error(argv, capsys))


@pytest.mark.parametrize("config, msg", [
    ("0x0-a8w8o8", "--config 0x0-a8w8o8: rows must be in 1..64, got 0"),
    ("2x2-a1w8o8", "--config 2x2-a1w8o8: a_bits must be in 2..16 (SFx widths), got 1"),
])
def test_verify_config_errors_name_the_config(config, msg, capsys):
    assert cli.main(["verify", "--config", config, "--codes", "10"]) == 2
    assert f"sfx verify: error: {msg}" in capsys.readouterr().err


def test_table_accepts_the_range_ends(capsys):
    assert cli.main(["table", "--bits", "2", "--exponent", "-128"]) == 0
    assert "| 3 | `11` |" in capsys.readouterr().out


def test_text_files_that_give_no_text_are_named(tmp_path):
    from superfloat.sw.wasq.data import load_text

    short = tmp_path / "short.txt"
    short.write_text("one line\ntwo\n")
    with pytest.raises(ValueError, match=r"the test split of '.*short\.txt' \(lines 95\.\.100 % of its 2 lines\) is "
                                         r"empty; use --split all"):
        load_text(str(short), "test")
    assert load_text(str(short), "all") == "one line\ntwo\n"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"the text file '.*empty\.txt' is empty"):
        load_text(str(empty))
    with pytest.raises(ValueError, match=r"cannot decode .*short\.txt as nosuchcodec"):
        load_text(str(short), encoding="nosuchcodec")


def test_act_clip_ratio_needs_float_per_token_scales(capsys):
    assert cli.main(["eval", "-w", "4", "-a", "4", "--act-clip-ratio", "0.8"]) == 2
    assert ("sfx eval: error: WASQConfig.act_clip_ratio applies to dynamic SFx activations with a float scale per "
            "token (act_bits set, act_exponent='dynamic', act_scale='float')") in capsys.readouterr().err

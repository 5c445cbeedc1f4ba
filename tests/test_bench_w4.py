"""``sfx bench w4`` (bench/w4.py) on a tiny model: every row one ``sfx eval --backend both`` with its
command beside its numbers, the method's time, targets judged against the float row; resume."""
from __future__ import annotations

import json

import pytest

import superfloat.bench as bench_registry
from superfloat.bench import w4


@pytest.mark.slow
def test_quick_bench_writes_every_row_with_its_command_and_resumes(tmp_path):
    part = tmp_path / "partial.json"
    data = w4.run(tmp_path, quick=True, partial=part)
    md = (tmp_path / "w4.md").read_text()
    assert json.loads((tmp_path / "w4.json").read_text())["command"] == "sfx bench w4 --quick"
    assert (tmp_path / "w4.png").stat().st_size > 0
    assert [(r["act_bits"], r["method"]) for r in data["rows"]] == [(16, "rtn"), (16, "gptq"), (4, "rotate-gptq"),
                                                                    (4, "rotate-gptq, xmult")]
    for r in data["rows"]:
        assert "`sfx eval " + " ".join(r["args"]) + "`" in md and "--backend both" in " ".join(r["args"])
        assert r["backend"] == "accelerator" and r["fake"]["perplexity"] > 0
        assert r["met"] == (r["delta_pct"] <= w4.TARGETS[r["act_bits"]])
        assert (r["method_seconds"] is None) == (r["method"] == "rtn")
    assert data["rows"][3]["label"].endswith("xmult")
    assert "W4A4 <= +100 % of float: best" in md
    again = w4.run(tmp_path, quick=True, partial=part)  # everything resumed: the same numbers
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in data["rows"]]
    assert "4 of them resumed" in (tmp_path / "w4.md").read_text()


def test_registered_as_a_bench():
    assert bench_registry.BENCHES["w4"] == "superfloat.bench.w4:run"


@pytest.mark.parametrize("spec,rows", [(None, list(range(len(w4.ROWS)))), ("", list(range(len(w4.ROWS)))),
                                       ("20-22", [19, 20, 21]), ("3, 1,2-3", [0, 1, 2]), ("22", [21])])
def test_row_selection(spec, rows):
    assert w4.select_rows(spec) == rows


@pytest.mark.parametrize("spec,msg", [("0", r"rows are 1\.\.23, got '0'"), ("21-24", r"rows are 1\.\.23, got '21-24'"),
                                      ("3-2", r"got '3-2'"), ("best", r"'best' is not a row number or a range")])
def test_row_selection_errors_say_the_syntax(spec, msg):
    with pytest.raises(ValueError, match=r"SFX_BENCH_W4_ROWS=.*" + msg):
        w4.select_rows(spec)


def test_a_row_subset_is_reported_with_the_rows_left_out(tmp_path, monkeypatch):
    """Only the chosen rows run; the report names the others and the command carries the setting
    (``sfx eval`` replaced by a stand-in: this checks the bench's bookkeeping, not perplexities)."""
    calls = []

    def fake_eval(cmd, args):
        calls.append(args)
        ppl = 40.0 if "--backend" not in args else 44.0
        return {"perplexity": ppl, "tokens": 8191, "fake": {"perplexity": ppl + 1}, "saturated": 0,
                "outputs": 10, "method_seconds": {"total": 1.0}}

    monkeypatch.setattr(w4, "sfx_json", fake_eval)
    monkeypatch.setenv(w4.ROWS_ENV, "21-22")
    data = w4.run(tmp_path, partial=tmp_path / "p.json")
    assert len(calls) == 3 and [r["method"] for r in data["rows"]] == [w4.ROWS[20][1], w4.ROWS[21][1]]
    md = (tmp_path / "w4.md").read_text()
    assert "Rows run: 2 of 23 (SFX_BENCH_W4_ROWS=21-22); not run: W4A16 rtn; W4A16 awq;" in md
    assert json.loads((tmp_path / "w4.json").read_text())["command"] == "SFX_BENCH_W4_ROWS=21-22 sfx bench w4"

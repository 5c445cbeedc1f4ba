"""``sfx bench qat`` (bench/qat.py) on a tiny model: every row evaluated fake and accelerator-exact with its
commands beside it, QAT rows trained (fake and on the accelerator's arithmetic) with their run time, the
target judged against the float row; a rerun reuses the finished runs and evaluations."""
from __future__ import annotations

import json

import superfloat.bench as bench_registry
from superfloat.bench import qat


def test_quick_bench_rows_commands_target_and_reuse(tmp_path):
    part = tmp_path / "partial.json"
    data = qat.run(tmp_path, quick=True, partial=part)
    md = (tmp_path / "qat.md").read_text()
    assert json.loads((tmp_path / "qat.json").read_text())["command"] == "sfx bench qat --quick"
    assert (tmp_path / "qat.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["key"] for r in data["rows"]] == [r.key for r in qat.QUICK_ROWS]
    fpv = data["float_perplexity"]
    for r in data["rows"]:
        assert "`sfx " + " ".join(r["eval_args"]) + "`" in md and r["eval_args"][-2:] == ["--backend", "both"]
        assert r["backend"] == "accelerator" and r["fake"]["perplexity"] > 0 and 0 <= r["top1_agreement"] <= 1
        assert r["delta_pct"] == 100 * (r["perplexity"] / fpv - 1)
        assert r["met"] == (None if not r["qat"] else r["delta_pct"] <= qat.TARGET)
        if r["finetune_args"] is not None:
            assert "`sfx " + " ".join(r["finetune_args"]) + "`" in md
            assert r["train"]["steps"] == 2 and r["train"]["cpu_seconds"] > 0 and not r["reused"]
            assert r["train"]["backend"] == ("accelerator" if "accelerator" in r["finetune_args"] else "fake")
    assert "Target (issue 15): SF4 weights after QAT within +10 % of float, accelerator-exact" in md
    again = qat.run(tmp_path, quick=True, partial=part)  # nothing is trained or evaluated again
    assert [r["perplexity"] for r in again["rows"]] == [r["perplexity"] for r in data["rows"]]
    assert all(r["reused"] for r in again["rows"] if r["finetune_args"] is not None)
    assert "(reused run)" in (tmp_path / "qat.md").read_text()


def test_registered_as_a_bench():
    assert bench_registry.BENCHES["qat"] == "superfloat.bench.qat:run"


def test_row_selection_by_key():
    assert [r.key for r in qat.pick_rows("ptq-rtn, rot-accel")] == ["ptq-rtn", "rot-accel"]
    assert qat.pick_rows(None) == qat.ROWS and qat.pick_rows(" ") == qat.ROWS
    import pytest

    with pytest.raises(ValueError, match=r"SFX_BENCH_QAT_ROWS='rtn': unknown row key\(s\) rtn; the rows are ptq-rtn, "):
        qat.pick_rows("rtn")
    rot = qat.pick_rows("rot-accel")[0]
    assert rot.finetune[-2:] == ("--backend", "accelerator") and "rotate-gptq-clip" in rot.finetune

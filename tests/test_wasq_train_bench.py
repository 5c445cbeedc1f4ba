"""The WASQ bench (bench/wasq.py) end to end on a tiny model with tiny budgets: the
report has every table, target and figure (the real run is ``make bench``)."""
from __future__ import annotations

import json

from superfloat.bench import wasq as bench



def test_bench_writes_report_tables_and_figures(tmp_path):
    b = bench.Budgets(eval_tokens=700, calib_tokens=1100, epochs=2, warmup=1, analysis_tokens=512, lth_rounds=1,
                      lth_calib_tokens=600, lth_epochs=1, lth_eval_tokens=600,
                      sweep_models=("tiny-llama",), sweep_bits=(4,), sweep_contexts=(64,), sweep_shots=(0, 1),
                      sweep_pretrain_steps=2, sweep_tokens=256, sweep_eval_tokens=256)
    data = bench.run(tmp_path, model="tiny-llama", budgets=b)
    md = (tmp_path / "wasq.md").read_text()
    for heading in ("## Setup", "## Post-training quantization", "## Quantization-aware training at SF4",
                    "## Speed", "## Lottery ticket (lth) at SF8", "## Scaling-law sweep", "## Targets",
                    "## Layer analysis"):
        assert heading in md, heading
    for row in ("| SF8 vanilla (float scale) |", "| int4 RTN |", "| W8A8 SF8 (per-token SF8 activations) |",
                "| SF4 fpm |", "| SF4 opt (top 25% layers) |", "| SF4 fasteropt |", "QAT throughput >= 0.7x"):
        assert row in md, row
    assert "`sfx eval --model tiny-llama --data shakespeare --split test --context 512 --max-tokens 700`" in md
    for png in ("ptq.png", "training.png", "lth.png", "analysis/layers.png", "sweep/sweep.png"):
        assert (tmp_path / "wasq" / png).read_bytes()[:4] == b"\x89PNG", png
    saved = json.loads((tmp_path / "wasq.json").read_text())
    assert saved["command"] == "sfx bench wasq"
    q = data["qat"]
    assert q["fasteropt_vs_opt"]["identical"] and q["fasteropt_vs_opt"]["loss_curves_identical"]
    assert q["fpm"]["train"]["steps"] == 2 * 3 and q["plain"]["train"]["steps"] == 6
    assert [r["round"] for r in data["lth"]["rounds"]] == [0, 1]
    # the page can be re-rendered from the JSON alone (wording changes need no new measurement)
    (tmp_path / "wasq.md").unlink()
    bench.rerender(tmp_path)
    again = (tmp_path / "wasq.md").read_text()
    assert again.split("## Setup")[1].split("## Versions")[0] == md.split("## Setup")[1].split("## Versions")[0]

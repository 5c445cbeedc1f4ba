"""CI synthesis regression: each committed baseline (hw/fpga/baselines/*.json) is re-run and
compared: core LUTs within +10 %, DSPs not above, Fmax not below 90 %.
Regenerate: python -m superfloat.hw.fpga.regress --update (docs/fpga.md)."""
from __future__ import annotations

import pytest

from superfloat.hw.fpga import regress

pytestmark = pytest.mark.fpga

BASELINES = regress.load_baselines()


def test_every_target_has_a_baseline():
    assert {b["target"] for b in BASELINES} == set(regress.REGRESSION_CONFIGS)


@pytest.mark.parametrize("base", BASELINES, ids=[f"{b['target']}-{b['config'].replace(' ', '-')}" for b in BASELINES])
def test_synthesis_within_baseline(base, tmp_path):
    cfg = {k: base[k] for k in ("rows", "cols", "a_bits", "w_bits", "out_bits", "k_max")}
    new = regress.run_config(base["target"], {**cfg, "kind": base["kind"]}, freq_mhz=base["freq_target_mhz"],
                             out_dir=tmp_path / "flow")
    bad = regress.compare(new, base)
    assert not bad, "\n".join(bad) + "\n(if intended: python -m superfloat.hw.fpga.regress --update)"


def test_compare_flags_each_regression():
    base = {"target": "t", "config": "c", "luts": 100, "dsps": 2, "fmax_mhz": 50.0}
    ok = {"fits": True, "luts": 110, "dsps": 2, "fmax_mhz": 45.0}
    assert regress.compare(ok, base) == []
    bad = regress.compare({"fits": True, "luts": 111, "dsps": 3, "fmax_mhz": 44.9}, base)
    assert len(bad) == 3
    assert "LUTs 111 > baseline 100 + 10%" in bad[0]
    assert "DSPs 3 > baseline 2" in bad[1]
    assert "Fmax 44.9 MHz < 90% of baseline 50.0 MHz" in bad[2]
    assert "the run failed: boom" in regress.compare({"error": "boom"}, base)[0]

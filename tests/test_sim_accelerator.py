"""The accelerator's cocotb benches (``sim/tb_accelerator.py``) on Verilator and Icarus.

Each configuration of ``tb_accelerator.CONFIGS`` runs every regression test (random
operations with stalls on every stream, back-to-back operations with changing parameters,
edge values, reset in the middle of an operation, malformed commands, bias out of range)
in one simulator run; every result is compared with ``sfx.linear`` (zero tolerance).
Tests of one build share an xdist group so that two workers never build the same thing.
"""
from __future__ import annotations

import pytest

from superfloat.hw.interface import AccelParams
from superfloat.sim import runner
from superfloat.sim.linear import build_accelerator, params_env
from superfloat.sim.tb_accelerator import CONFIGS, REGRESSION_TESTS

pytestmark = pytest.mark.sim

TB = "superfloat.sim.tb_accelerator"


def group(config: str, simulator: str) -> pytest.MarkDecorator:
    return pytest.mark.xdist_group(f"sim-accel-{config}-{simulator}")


CASES = [pytest.param(c, s, marks=group(c, s), id=f"{c}-{s}") for c in CONFIGS for s in runner.SIMULATORS]


@pytest.mark.parametrize("config,simulator", CASES)
def test_accelerator_benches(config, simulator):
    p = AccelParams(**CONFIGS[config])
    b = build_accelerator(p, simulator=simulator)
    r = runner.run(b, TB, testcase=list(REGRESSION_TESTS),
                   env={"SFX_SIM_PARAMS": params_env(p), "SFX_SIM_NOPS": "8", "SFX_SIM_SEED": "1"})
    assert r.tests == len(REGRESSION_TESTS) and r.failed == 0


@group("sf8_4x4", "verilator")
def test_scoreboard_catches_a_wrong_code():
    """Self-test: with one expected code flipped, the bench must fail and name the element."""
    p = AccelParams(**CONFIGS["sf8_4x4"])
    b = build_accelerator(p, simulator="verilator")
    with pytest.raises(runner.SimulationFailed, match=r"Y\[t=0, n=0\]: expected code 0x[0-9a-f]+, got 0x"):
        runner.run(b, TB, testcase="back_to_back_full_rate",
                   env={"SFX_SIM_PARAMS": params_env(p), "SFX_SIM_INJECT": "flip"})

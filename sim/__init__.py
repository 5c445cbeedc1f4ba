"""cocotb benches and the co-simulation harness (see ``docs/simulation.md``).

* :func:`run_linear`: LINEAR computed by the generated RTL in Verilator or Icarus, the
  co-simulation twin of :func:`superfloat.sw.sfx.linear`;
* :mod:`.runner`: cached builds and cocotb runs (``cocotb_tools.runner``, no Makefiles);
* :mod:`.streams`: stream driver / sink / per-cycle bench loop for ``lib.stream`` ports;
* :mod:`.scoreboard`: result checking against the reference model;
* :mod:`.tb_accelerator`: the accelerator's cocotb benches; :mod:`.bench_rtl`: speed and
  utilisation numbers (``sfx bench rtl``).
"""
from .linear import LinearSimStats, run_linear
from .runner import SimulationFailed, SimulatorNotFound

__all__ = ["run_linear", "LinearSimStats", "SimulationFailed", "SimulatorNotFound"]

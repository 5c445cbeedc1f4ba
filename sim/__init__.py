"""cocotb benches and the co-simulation harness (see ``docs/simulation.md``).

* :func:`run_linear`: LINEAR computed by the generated RTL in Verilator or Icarus, the
  co-simulation twin of :func:`superfloat.sw.sfx.linear`;
* :mod:`.runner`: cached builds and cocotb runs (``cocotb_tools.runner``, no Makefiles);
* :mod:`.streams`: stream driver / sink / per-cycle bench loop for ``lib.stream`` ports;
* :mod:`.scoreboard`: result checking against the reference model;
* :mod:`.packing`: the ``cmd`` word and the per-cycle beat lists of an operation (shared by
  every path that drives the RTL);
* :mod:`.harness` / :mod:`.tb_harness`: the in-simulation stream drivers and monitors (the
  default path of ``run_linear`` and co-simulation); :mod:`.verify`: verification at scale
  (``sfx verify``); :mod:`.tb_accelerator`: the accelerator's per-cycle cocotb benches;
  :mod:`.cosim`: co-simulation of checkpoints (``sfx cosim``).

The names are imported lazily, so that a cocotb bench importing ``superfloat.sim.streams``
inside the simulator does not pay for Amaranth.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["run_linear", "LinearSimStats", "SimulationFailed", "SimulatorNotFound"]

_LAZY = {"run_linear": "linear", "LinearSimStats": "linear", "SimulationFailed": "runner",
         "SimulatorNotFound": "runner"}

if TYPE_CHECKING:  # pragma: no cover
    from .linear import LinearSimStats, run_linear
    from .runner import SimulationFailed, SimulatorNotFound


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

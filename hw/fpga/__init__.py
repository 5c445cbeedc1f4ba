"""FPGA side of Superfloat: the open synthesis flow (YoWASP Yosys + nextpnr), DSP
budgeting, board tops with a UART host link, and the host driver.

Modules: :mod:`.flow` (tools, timeouts), :mod:`.report` (parsing), :mod:`.budget` (DSP
plan), :mod:`.wrapper` (pin-light synthesis wrapper), :mod:`.baseline` (two's complement
comparison PEs), :mod:`.synth` (``sfx synth``), :mod:`.uart`, :mod:`.board_top`,
:mod:`.boards` (``sfx build-board``), :mod:`.host` (``run_linear_uart``), :mod:`.bench`.
See docs/fpga.md.
"""

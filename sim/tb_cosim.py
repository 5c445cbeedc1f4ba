"""cocotb side of a co-simulation session (:class:`superfloat.sim.cosim.RTLSession`).

One simulator process serves many LINEAR operations: the test :func:`serve` connects to
the Unix socket named by ``SFX_COSIM_SOCKET`` and then reads one request line at a time:

* ``run <job.npz> <out.npz>``: stream the operation packed in ``job.npz`` (the format of
  :func:`superfloat.sim.run_linear`: hex beats per stream, ``res_beats``, ``params``)
  through the accelerator without stalls, write the ``res`` beats, the cycle counts and
  the status outputs to ``out.npz``, answer ``ok``;
* ``quit`` (or end of file): end the test.

While it waits for a request the coroutine blocks the simulator, so idle time costs no
simulated cycles. The DUT is reset before every operation, so ``sat_count`` and
``error`` belong to that operation alone, exactly as in one :func:`run_linear` call, and
``cycles`` is measured the same way (from the cycle in which the ``cmd`` beat was taken
to the one in which the last ``res`` beat was taken, both included).

A failing operation (a hung stream, X on an output) answers ``error <message>`` and fails
the test; the host raises :class:`superfloat.sim.runner.SimulationFailed` with the log.
"""
from __future__ import annotations

import os
import socket
import time

import cocotb
import numpy as np

from .streams import StreamBench, StreamDriver, StreamSink, read_int

DRIVEN = ("cmd", "par", "act", "wgt")


def _words(arr) -> list[int]:
    return [int(h, 16) for h in arr.tolist() if h != ""]


async def run_one(bench: StreamBench, drv: dict, res: StreamSink, dut, job_path: str, out_path: str,
                  start_cycle: int | None = None) -> None:
    """Stream the operation of ``job_path`` (a run_linear job file) through the started
    ``bench`` without stalls and write results, cycle counts and status to ``out_path``
    (atomically). ``sim_cycles`` counts from ``start_cycle`` (default: now)."""
    with np.load(job_path) as job:
        beats = {s: _words(job[s]) for s in DRIVEN}
        n_res = int(job["res_beats"])
    res.clear()
    start_cycle = bench.cycle if start_cycle is None else start_cycle
    t0 = time.perf_counter()
    c0 = time.process_time()
    for s in DRIVEN:
        drv[s].put(beats[s])
    budget = 20 * (len(beats["act"]) + n_res + len(beats["par"])) + 5000
    await bench.until(lambda: len(res.beats) >= n_res, max_cycles=budget, what=f"{n_res} res beats")
    await bench.until(lambda: read_int(dut.busy) == 0, max_cycles=500, what="busy to fall")
    loop_s = time.perf_counter() - t0
    loop_cpu_s = time.process_time() - c0
    left = {s: d.pending for s, d in drv.items() if d.pending}
    assert not left, f"beats left untaken after the last result: {left}"
    cycles = res.last_transfer_cycle - drv["cmd"].last_transfer_cycle + 1
    tmp = out_path + ".part.npz"
    np.savez(tmp, res=np.array([format(w, "x") for w in res.beats] or [""])[:n_res],
             cycles=np.int64(cycles), sim_cycles=np.int64(bench.cycle - start_cycle), loop_s=np.float64(loop_s),
             loop_cpu_s=np.float64(loop_cpu_s),
             sat_count=np.int64(read_int(dut.sat_count)), error=np.int64(read_int(dut.error)),
             busy=np.int64(read_int(dut.busy)))
    os.replace(tmp, out_path)


@cocotb.test(skip=not os.environ.get("SFX_COSIM_SOCKET"))
async def serve(dut):
    """Serve LINEAR operations from the host over ``SFX_COSIM_SOCKET`` until ``quit``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["SFX_COSIM_SOCKET"])
    f = sock.makefile("rwb", buffering=0)
    bench = StreamBench(dut)
    drv = {s: bench.add(StreamDriver(dut, s)) for s in DRIVEN}
    res = bench.add(StreamSink(dut, "res"))
    await bench.start()
    first = True
    served = 0
    try:
        f.write(b"ready\n")
        while True:
            line = f.readline()  # blocks the simulator: no cycles pass while the host prepares a job
            if not line or line.strip() == b"quit":
                break
            parts = line.decode().split()
            if len(parts) != 3 or parts[0] != "run":
                raise ValueError(f"bad request {line!r}")
            if not first:
                await bench.reset(2)  # status (sat_count, error) per operation, as in one run_linear call
            first = False
            try:
                await run_one(bench, drv, res, dut, parts[1], parts[2])
            except BaseException as e:
                msg = f"{type(e).__name__}: {e}".replace("\n", " ")
                f.write(f"error {msg}\n".encode())
                raise
            served += 1
            f.write(b"ok\n")
    finally:
        dut._log.info("cosim session served %d operation(s)", served)
        try:
            f.close()
            sock.close()
        except OSError:
            pass

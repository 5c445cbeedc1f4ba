"""Co-simulation of WASQ checkpoints on the simulated accelerator (``sfx cosim``, docs/cosim.md).

The flow, for one layer, a block of layers or the whole forward pass:

1. load the checkpoint (:func:`superfloat.sw.wasq.load_checkpoint`: every tensor checked)
   and check that it fits the array before anything is built: weight / activation widths
   against the array's, ``K <= k_max``, the layer names;
2. run the model in software on the prompt three times:

   * **software**: the checkpoint's own forward (fake-quantized weights, float or
     fake-quantized activations between layers);
   * **reference**: every selected linear layer replaced, through a forward hook, by the
     bit-exact integer path: its input quantized per token (:func:`quantize_input`), the
     weight codes, bias and scales mapped onto the accelerator's parameters
     (:func:`layer_ops`) and computed by :func:`superfloat.sw.sfx.linear`, the codes
     decoded with the output exponents;
   * **RTL**: the same, with each operation computed by the generated accelerator in an
     HDL simulator (:class:`RTLSession`, or :func:`superfloat.sim.run_linear` with
     ``engine="run_linear"``);

3. report, per layer: RTL codes against ``sfx.linear`` on the same inputs (zero
   mismatches required), the dequantized RTL output against the float layer output,
   cycles, utilisation and the time on the FPGA at its reported Fmax; for the model:
   whether the RTL forward's logits equal the reference forward's, and how close both are
   to the software model.

How the checkpoint maps onto the accelerator (SPEC sections 1, 3-5):

* weights: the stored codes; a power-of-two exponent ``Ew[n]`` goes into ``shift``; a
  float scale ``s[n] * 2**Ew[n]`` is folded by ``sfx.fold_scale`` into ``mult[n]`` and
  ``shift``;
* activations: SF``a`` codes with one exponent per token (``xexp``, streamed with each
  row) or one static exponent; a weight-only checkpoint gets SF8 per-token dynamic
  activations (the report says so);
* output: SF``o`` codes with an output exponent ``Eo`` per channel (or per tensor) chosen
  from the float layer output so that the right shift stays in 0..63;
  ``shift[n] = Ew[n] - Eo[n]`` (or the folded shift minus ``Eo[n]``);
* bias: in accumulator units, ``round_nearest_even(b / unit)`` with
  ``unit = 2**(Ea - F) * 2**Ew`` (times ``mult * 2**(shift_w - 16)`` for a folded scale),
  computed exactly with rationals (:func:`bias_to_accumulator`). The accumulator's unit
  depends on the token's exponent ``Ea``, so a layer with a bias is run as one operation
  per distinct ``Ea`` (tokens grouped; a static activation exponent gives one group).
"""
from __future__ import annotations

import json
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from superfloat.sw import sfx

__all__ = [
    "CosimError",
    "ArrayConfig",
    "LayerQuant",
    "Op",
    "OpResult",
    "OpStats",
    "RTLSession",
    "prebuild",
    "SessionEngine",
    "RunLinearEngine",
    "ReferenceEngine",
    "bias_to_accumulator",
    "weight_scale_params",
    "output_exponent",
    "quantize_input",
    "layer_ops",
    "find_fmax",
    "cosim",
    "CosimReport",
]


class CosimError(ValueError):
    """A checkpoint, a layer name or an option that cannot be co-simulated (raised before
    any simulator build starts; the message says what to change)."""


# --------------------------------------------------------------------------- the array


@dataclass(frozen=True)
class ArrayConfig:
    """Generation parameters of the simulated accelerator and the simulator that runs it."""

    rows: int = 8
    cols: int = 8
    a_bits: int = 8
    w_bits: int = 8
    out_bits: int = 8
    k_max: int = sfx.DEFAULT_K_MAX
    simulator: str = "verilator"

    def params(self):
        from superfloat.hw.interface import AccelParams

        return AccelParams(rows=self.rows, cols=self.cols, a_bits=self.a_bits, w_bits=self.w_bits,
                           out_bits=self.out_bits, k_max=self.k_max)

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols} a{self.a_bits}w{self.w_bits}o{self.out_bits} k_max={self.k_max}"


@dataclass
class Op:
    """One LINEAR operation for the accelerator: validated arguments and where it comes from."""

    args: sfx.LinearArgs
    array: ArrayConfig
    layer: str = ""
    rows_index: np.ndarray | None = None  # which rows of the layer call this operation computes
    label: str = ""

    @property
    def macs(self) -> int:
        return self.args.T * self.args.N * self.args.K


@dataclass
class OpResult:
    """The codes of one operation, ``sfx.linear``'s codes on the same arguments, and what
    the engine measured (:class:`OpStats`; zero cycles for the reference engine)."""

    codes: np.ndarray
    reference: np.ndarray
    mismatches: int
    first_mismatch: dict | None
    stats: Any = None
    wall_s: float = 0.0


@dataclass
class OpStats:
    """What the simulator measured for one operation, as :func:`superfloat.sim.run_linear`
    measures it: ``cycles`` from the cycle in which the ``cmd`` beat was taken to the one in
    which the last ``res`` beat was taken (both included), ``utilization = macs / (rows *
    cols * cycles)``; ``sim_cycles`` every simulated cycle of the operation (reset included)
    and ``loop_s`` / ``loop_cpu_s`` the wall / CPU time of the cocotb loop that drove them
    (CPU time does not depend on the machine's load); ``saturated`` and ``error`` are the
    RTL's status outputs after the operation."""

    simulator: str
    rows: int
    cols: int
    cycles: int
    macs: int
    utilization: float
    saturated: int
    reference_saturated: int
    error: bool
    mismatches: int
    first_mismatch: dict | None
    padding_nonzero: int
    sim_cycles: int
    loop_s: float
    loop_cpu_s: float
    sim_s: float
    wall_s: float
    build_cached: bool
    build_s: float
    build_dir: str
    waves: str | None = None

    @classmethod
    def from_linear_sim_stats(cls, st: Any) -> "OpStats":
        """From :class:`superfloat.sim.linear.LinearSimStats` (``run_linear``'s)."""
        names = [f for f in cls.__dataclass_fields__]
        return cls(**{n: getattr(st, n, 0.0 if n == "loop_cpu_s" else None) for n in names})

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# --------------------------------------------------------------------------- engines


def _hex_words(words: Sequence[int]) -> np.ndarray:
    return np.array([format(int(w), "x") for w in words] or [""], dtype=str)[:len(words)]


def _compare(op: Op, codes: np.ndarray) -> tuple[np.ndarray, int, dict | None, Any]:
    from .scoreboard import first_mismatch, linear_kwargs

    ref, ref_stats = sfx.linear_with_stats(op.args.x, op.args.w, **linear_kwargs(op.args))
    count, first = first_mismatch(codes, ref)
    return ref, count, first, ref_stats


class ReferenceEngine:
    """``sfx.linear`` in this process (the bit-exact software path; no simulator)."""

    name = "sfx.linear"

    def submit(self, op: Op) -> Future:
        fut: Future = Future()
        t0 = time.perf_counter()
        try:
            from .scoreboard import linear_kwargs

            codes, st = sfx.linear_with_stats(op.args.x, op.args.w, **linear_kwargs(op.args))
            wall = time.perf_counter() - t0
            stats = OpStats(
                simulator="none", rows=op.array.rows, cols=op.array.cols, cycles=0, macs=op.macs, utilization=0.0,
                saturated=st.n_saturated, reference_saturated=st.n_saturated, error=False, mismatches=0,
                first_mismatch=None, padding_nonzero=0, sim_cycles=0, loop_s=0.0, loop_cpu_s=0.0, sim_s=0.0,
                wall_s=wall, build_cached=True, build_s=0.0, build_dir="", waves=None)
            fut.set_result(OpResult(codes, codes, 0, None, stats, wall))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        pass


class RTLSession:
    """One HDL simulator process that runs many LINEAR operations on one accelerator build.

    :func:`superfloat.sim.run_linear` starts a simulator (and a Python interpreter inside
    it) per operation, which costs seconds; a model's forward pass has hundreds of
    operations. A session builds (or finds in the cache) the same accelerator as
    ``run_linear`` (:func:`superfloat.sim.linear.build_accelerator`), packs every operation
    the same way (:func:`superfloat.sim.linear.linear_traffic`), and runs the cocotb test
    ``serve`` of :mod:`superfloat.sim.tb_cosim` once, through
    :func:`superfloat.sim.runner.run` in a helper process; operations travel over a Unix
    socket. Each result is checked against ``sfx.linear`` like ``run_linear`` does, and the
    stats (:class:`OpStats`) are measured the same way
    (``tests/test_cosim_sim.py`` checks codes and cycles against ``run_linear``).
    """

    START_TIMEOUT_S = 600.0

    def __init__(self, array: ArrayConfig, *, waves: bool = False, dsp_pes: int = 0):
        from .linear import build_accelerator

        self.array = array
        self.p = array.params()
        self.waves = bool(waves)
        t0 = time.perf_counter()
        with _BUILD_LOCK:  # the runner sets os.environ while it builds: one build at a time per process
            self.build = build_accelerator(self.p, simulator=array.simulator, waves=self.waves, dsp_pes=dsp_pes)
        self.build_s = time.perf_counter() - t0
        self.ops = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="sfx-cosim-"))  # short path: AF_UNIX names are <= 107 bytes
        self.run_dir = self.build.dir / "runs" / f"cosim-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{_uid()}"
        self.run_dir.mkdir(parents=True)
        sock_path = str(self._tmp / "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(sock_path)
        self._listener.listen(1)
        spec = {"rows": self.p.rows, "cols": self.p.cols, "a_bits": self.p.a_bits, "w_bits": self.p.w_bits,
                "out_bits": self.p.out_bits, "k_max": self.p.k_max, "simulator": array.simulator,
                "waves": self.waves, "dsp_pes": dsp_pes, "run_dir": str(self.run_dir), "socket": sock_path}
        env = dict(os.environ)
        env["SFX_COSIM_HOST"] = json.dumps(spec)
        self._host_log = self.run_dir / "host.log"
        self._host_log_f = open(self._host_log, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from superfloat.sim.cosim import _host_main; _host_main()"],
            env=env, stdout=self._host_log_f, stderr=subprocess.STDOUT)
        self._conn: socket.socket | None = None
        self._file = None
        t1 = time.perf_counter()
        try:
            self._accept()
            line = self._readline(self.START_TIMEOUT_S, "the simulator to start")
            if line != "ready":
                raise self._failed(f"unexpected greeting {line!r}")
        except BaseException:
            self.close(kill=True)
            raise
        self.start_s = time.perf_counter() - t1

    @property
    def waves_path(self) -> str | None:
        """The session's trace (complete once the session is closed), or None without ``waves``."""
        if not self.waves:
            return None
        name = f"{self.build.toplevel}.fst" if self.array.simulator == "icarus" else "dump.vcd"
        return str(self.run_dir / name)

    # ------------------------------------------------------------------ plumbing

    def _failed(self, why: str):
        from .runner import SimulationFailed

        self._proc.poll()
        log = self.run_dir / "sim.log"
        tail = ""
        for path in (log, self._host_log):
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            tail += f"\n--- {path} (last lines):\n" + "\n".join(text[-25:])
        return SimulationFailed(f"{self.array.simulator} co-simulation session ({self.array.name}): {why}{tail}")

    def _accept(self) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while True:
            r, _, _ = select.select([self._listener], [], [], 0.2)
            if r:
                self._conn, _ = self._listener.accept()
                self._file = self._conn.makefile("rwb", buffering=0)
                return
            if self._proc.poll() is not None:
                raise self._failed(f"the simulator process ended (exit code {self._proc.returncode}) before "
                                   f"connecting")
            if time.monotonic() > deadline:
                raise self._failed(f"the simulator did not connect within {self.START_TIMEOUT_S:.0f} s")

    def _readline(self, timeout: float | None, what: str) -> str:
        assert self._conn is not None and self._file is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            r, _, _ = select.select([self._conn], [], [], 0.5)
            if r:
                line = self._file.readline()
                if not line:
                    raise self._failed(f"the simulator closed the session while waiting for {what}")
                return line.decode().strip()
            if self._proc.poll() is not None:
                raise self._failed(f"the simulator process ended (exit code {self._proc.returncode}) while "
                                   f"waiting for {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise self._failed(f"no answer within {timeout:.0f} s while waiting for {what}")

    # ------------------------------------------------------------------ operations

    def run(self, args: sfx.LinearArgs) -> tuple[np.ndarray, Any]:
        """Run one validated operation; return ``(codes, OpStats)`` like ``run_linear``
        (``stats.mismatches`` counts the codes that differ from ``sfx.linear``)."""
        codes, _, stats = self.run_with_reference(args)
        return codes, stats

    def run_with_reference(self, args: sfx.LinearArgs) -> tuple[np.ndarray, np.ndarray, Any]:
        """:meth:`run`, also returning ``sfx.linear``'s codes: ``(codes, reference, stats)``."""
        from .linear import linear_traffic, params_env, res_to_codes

        if self._file is None:
            raise RuntimeError("the session is closed")
        t_start = time.perf_counter()
        if (args.a_bits, args.w_bits, args.out_bits, args.k_max) != (self.p.a_bits, self.p.w_bits,
                                                                       self.p.out_bits, self.p.k_max):
            raise ValueError(f"operation widths a{args.a_bits}w{args.w_bits}o{args.out_bits} k_max={args.k_max} do "
                             f"not match the session's array {self.array.name}")
        traffic = linear_traffic(args, self.p)
        self.ops += 1
        job = self.run_dir / f"job{self.ops}.npz"
        out = self.run_dir / f"out{self.ops}.npz"
        np.savez(job, cmd=_hex_words([traffic.cmd]), par=_hex_words(traffic.par), act=_hex_words(traffic.act),
                 wgt=_hex_words(traffic.wgt), res_beats=np.int64(traffic.res_beats),
                 params=np.array(params_env(self.p)))
        t_sim = time.perf_counter()
        self._file.write(f"run {job} {out}\n".encode())
        line = self._readline(None, f"operation {self.ops}")
        if line != "ok":
            raise self._failed(f"operation {self.ops} failed: {line}")
        sim_s = time.perf_counter() - t_sim
        with np.load(out) as o:
            res_words = [int(s, 16) for s in o["res"].tolist() if s != ""]
            meas = {k: o[k].item() for k in o.files if k != "res"}
        if not self.waves:
            job.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
        codes, padding = res_to_codes(res_words, args.T, args.N, self.p)
        from .scoreboard import first_mismatch, linear_kwargs

        ref, ref_stats = sfx.linear_with_stats(args.x, args.w, **linear_kwargs(args))
        count, first = first_mismatch(codes, ref)
        cycles = int(meas["cycles"])
        macs = args.T * args.N * args.K
        loop_s = float(meas["loop_s"])
        stats = OpStats(
            simulator=self.array.simulator, rows=self.p.rows, cols=self.p.cols, cycles=cycles, macs=macs,
            utilization=macs / (self.p.rows * self.p.cols * cycles) if cycles else 0.0,
            saturated=int(meas["sat_count"]), reference_saturated=int(ref_stats.n_saturated),
            error=bool(meas["error"]), mismatches=count, first_mismatch=first, padding_nonzero=padding,
            sim_cycles=int(meas["sim_cycles"]), loop_s=loop_s, loop_cpu_s=float(meas["loop_cpu_s"]),
            sim_s=sim_s, wall_s=time.perf_counter() - t_start,
            build_cached=self.build.cached, build_s=self.build.build_s, build_dir=str(self.build.dir),
            waves=self.waves_path)
        return codes, ref, stats

    def close(self, kill: bool = False) -> None:
        """End the simulator (``quit``) and wait for it; ``kill`` ends it at once."""
        if self._file is not None and not kill:
            try:
                self._file.write(b"quit\n")
            except OSError:
                pass
        for f in (self._file, self._conn, self._listener):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._file = self._conn = None
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=5 if kill else 120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        try:
            self._host_log_f.close()
        except OSError:
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)
        if not self.waves and self._proc.returncode == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "RTLSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close(kill=exc[0] is not None)


def _host_main() -> None:  # pragma: no cover - runs in the helper process
    """Helper process of :class:`RTLSession`: run the cocotb ``serve`` test on the cached build."""
    from superfloat.hw.interface import AccelParams

    from . import runner
    from .linear import build_accelerator

    spec = json.loads(os.environ.pop("SFX_COSIM_HOST"))
    p = AccelParams(**{k: spec[k] for k in ("rows", "cols", "a_bits", "w_bits", "out_bits", "k_max")})
    b = build_accelerator(p, simulator=spec["simulator"], waves=spec["waves"], dsp_pes=spec["dsp_pes"])
    r = runner.run(b, "superfloat.sim.tb_cosim", testcase="serve", env={"SFX_COSIM_SOCKET": spec["socket"]},
                   run_dir=spec["run_dir"], waves=spec["waves"], check=False)
    if r.failed or not r.tests:
        for name, msg in r.failures:
            print(f"{name}: {msg}", flush=True)
        sys.exit(1)


_UID = [0]
_UID_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()


def _uid() -> int:
    with _UID_LOCK:
        _UID[0] += 1
        return _UID[0]


class SessionEngine:
    """Runs operations on :class:`RTLSession` s: ``jobs`` worker threads, each with its own
    simulator process per array configuration (started on its first operation), so up to
    ``jobs`` independent operations are simulated at once."""

    name = "session"

    def __init__(self, jobs: int = 1, *, waves: bool = False):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        self.jobs = jobs
        self.waves = waves
        self._q: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._sessions: list[RTLSession] = []
        self._lock = threading.Lock()
        self._closed = False
        self.session_start_s: list[float] = []
        self.build_s: list[float] = []

    def submit(self, op: Op) -> Future:
        if self._closed:
            raise RuntimeError("engine is closed")
        fut: Future = Future()
        self._q.put((op, fut))
        with self._lock:
            if not self._threads:
                for i in range(self.jobs):
                    t = threading.Thread(target=self._worker, name=f"cosim-{i}", daemon=True)
                    t.start()
                    self._threads.append(t)
        return fut

    def _worker(self) -> None:
        mine: dict[ArrayConfig, RTLSession] = {}
        while True:
            item = self._q.get()
            if item is None:
                break
            op, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                s = mine.get(op.array)
                if s is None:
                    s = RTLSession(op.array, waves=self.waves)
                    mine[op.array] = s
                    with self._lock:
                        self._sessions.append(s)
                        self.session_start_s.append(s.start_s)
                        self.build_s.append(s.build_s)
                t0 = time.perf_counter()
                codes, ref, stats = s.run_with_reference(op.args)
                fut.set_result(OpResult(codes, ref, stats.mismatches, stats.first_mismatch, stats,
                                        time.perf_counter() - t0))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        for s in mine.values():
            s.close()

    @property
    def sessions(self) -> list[RTLSession]:
        return list(self._sessions)

    def close(self) -> None:
        """Cancel the operations not started yet (e.g. after an error), end every session."""
        self._closed = True
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout=180)
        self._threads = []


def _run_linear_job(op_args: sfx.LinearArgs, array: ArrayConfig, waves: bool):  # runs in a worker process
    from .linear import run_linear
    from .scoreboard import linear_kwargs

    return run_linear(op_args.x, op_args.w, **linear_kwargs(op_args), rows=array.rows, cols=array.cols,
                      simulator=array.simulator, waves=waves)


class RunLinearEngine:
    """Every operation through :func:`superfloat.sim.run_linear` (one simulator process per
    operation: slow, but the plain API; for cross-checks). ``jobs`` worker processes."""

    name = "run_linear"

    def __init__(self, jobs: int = 1, *, waves: bool = False):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        self.jobs = jobs
        self.waves = waves
        self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        self.session_start_s: list[float] = []
        self.build_s: list[float] = []

    def submit(self, op: Op) -> Future:
        inner = self._pool.submit(_run_linear_job, op.args, op.array, self.waves)
        outer: Future = Future()
        t0 = time.perf_counter()

        def done(f: Future) -> None:
            try:
                codes, st = f.result()
                ref, count, first, _ = _compare(op, codes)
                outer.set_result(OpResult(codes, ref, count, first, OpStats.from_linear_sim_stats(st),
                                          time.perf_counter() - t0))
            except BaseException as e:  # noqa: BLE001
                outer.set_exception(e)

        inner.add_done_callback(done)
        return outer

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def prebuild(array: ArrayConfig, *, waves: bool = False) -> subprocess.Popen:
    """Start building ``array`` for its simulator in a background process (returns the
    ``Popen``; its output goes to ``build/sim/prebuild-*.log``), so that the build overlaps
    other work; a later :class:`RTLSession` finds it in the cache (the runner's file lock
    makes it wait for a build in progress)."""
    from .runner import build_root

    spec = {"rows": array.rows, "cols": array.cols, "a_bits": array.a_bits, "w_bits": array.w_bits,
            "out_bits": array.out_bits, "k_max": array.k_max, "simulator": array.simulator, "waves": bool(waves)}
    env = dict(os.environ)
    env["SFX_COSIM_PREBUILD"] = json.dumps(spec)
    log = build_root() / f"prebuild-{array.simulator}-{os.getpid()}-{_uid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", "from superfloat.sim.cosim import _prebuild_main; "
                                 "_prebuild_main()"], env=env, stdout=f, stderr=subprocess.STDOUT)


def _prebuild_main() -> None:  # pragma: no cover - runs in the helper process
    from superfloat.hw.interface import AccelParams

    from .linear import build_accelerator

    spec = json.loads(os.environ.pop("SFX_COSIM_PREBUILD"))
    p = AccelParams(**{k: spec[k] for k in ("rows", "cols", "a_bits", "w_bits", "out_bits", "k_max")})
    b = build_accelerator(p, simulator=spec["simulator"], waves=spec["waves"])
    print(f"{'cached' if b.cached else 'built'}: {b.dir} ({b.build_s:.1f} s)", flush=True)


def make_engine(engine: str, jobs: int = 1, *, waves: bool = False):
    """``"session"`` (default), ``"run_linear"`` or ``"reference"`` (``sfx.linear`` only)."""
    if engine == "session":
        return SessionEngine(jobs, waves=waves)
    if engine == "run_linear":
        return RunLinearEngine(jobs, waves=waves)
    if engine == "reference":
        return ReferenceEngine()
    raise ValueError(f"engine must be 'session', 'run_linear' or 'reference', got {engine!r}")


# --------------------------------------------------------------------------- checkpoint -> accelerator mapping


def bias_to_accumulator(bias: Any, *, frac_bits: int, a_exponent: int, w_shift: Any, mult: Any = None) -> np.ndarray:
    """A float bias per output channel in accumulator units: ``round_nearest_even(b[n] / unit[n])``, exactly.

    One accumulator unit (SPEC section 3, ``acc`` represents ``acc * 2**(-F + Ea + Ew)``) is
    worth ``2**(a_exponent - frac_bits + w_shift[n])`` for power-of-two weight exponents
    (``w_shift = Ew``; this is SPEC's ``round(b * 2**(F - Ea - Ew))``), or
    ``2**(a_exponent - frac_bits) * mult[n] * 2**(w_shift[n] - 16)`` when the weight scale
    was folded into ``mult`` / ``w_shift`` by ``sfx.fold_scale``: the bias is divided by the
    scale the hardware really applies, so that after the multiplier it is worth ``b``.
    The division and the rounding (ties to even) are done on exact rationals.

    Args:
        bias: ``[N]`` floats (any float dtype; NaN / inf are errors).
        frac_bits: ``F = (a_bits - 1) + (w_bits - 1)`` of the array.
        a_exponent: the activation exponent ``Ea`` of the rows this bias is used with.
        w_shift: ``[N]`` (or scalar) weight exponents, or folded shifts with ``mult``.
        mult: ``[N]`` folded multipliers or None.

    Returns:
        int64 ``[N]``. Range checks against the accumulator are ``sfx.check_linear_args``'.
    """
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(b)):
        raise ValueError(f"bias holds {int((~np.isfinite(b)).sum())} NaN/inf value(s)")
    n = b.size
    ws = np.broadcast_to(np.asarray(w_shift, dtype=np.int64), (n,))
    mu = None if mult is None else np.broadcast_to(np.asarray(mult, dtype=np.int64), (n,))
    base = int(a_exponent) - int(frac_bits)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        e = base + int(ws[i]) - (sfx.MULT_FRAC_BITS if mu is not None else 0)
        unit = Fraction(2) ** e
        if mu is not None:
            unit *= int(mu[i])
        q = round(Fraction(float(b[i])) / unit)  # Fraction rounds half to even
        if abs(q) >= 1 << 62:
            raise ValueError(f"bias[{i}] = {b[i]!r} is {q} accumulator units: far out of any accumulator's range")
        out[i] = q
    return out


def weight_scale_params(exported: Any) -> tuple[np.ndarray | None, np.ndarray]:
    """``(mult, w_shift)`` per output channel of an exported layer
    (:class:`superfloat.sw.wasq.ExportedLinear`): power-of-two exponents give
    ``(None, Ew)``; float scales give ``sfx.fold_scale(s) `` with ``Ew`` added
    (:meth:`ExportedLinear.fold`), i.e. ``real weight = value(code) * mult * 2**(w_shift - 16)``."""
    n = exported.codes.shape[0]
    if exported.scale is None:
        return None, np.broadcast_to(np.asarray(exported.exponent, dtype=np.int64), (n,)).copy()
    mult, shift = exported.fold()
    return np.asarray(mult, dtype=np.int64), np.asarray(shift, dtype=np.int64)


def output_exponent(y_float: Any, out_bits: int, *, w_shift: Any, x_exponent: Any, frac_bits: int,
                    per: str = "channel") -> tuple[np.ndarray, int]:
    """Output exponents ``Eo`` (int64 ``[N]``) for the float layer output ``y_float`` ``[T, N]``.

    ``Eo`` starts from ``sfx.choose_exponent`` of the float output (per channel, or one for
    the tensor), then is clamped so that every right shift
    ``r = frac_bits - (out_bits - 1) - (w_shift[n] - Eo[n] + x_exponent[t])`` is in 0..63,
    ``shift = w_shift - Eo`` fits int8 and ``Eo`` fits int8. ``frac_bits`` includes the 16
    bits of ``mult`` when the layer uses it. Returns ``(Eo, number of channels clamped)``.
    """
    y = np.asarray(y_float, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y_float must be [T, N], got shape {list(y.shape)}")
    n = y.shape[1]
    ws = np.broadcast_to(np.asarray(w_shift, dtype=np.int64), (n,))
    xe = np.asarray(x_exponent, dtype=np.int64).reshape(-1)
    mo = sfx.check_bits(out_bits, "out_bits") - 1
    if per == "channel":
        e0 = np.asarray(sfx.choose_exponent(y, out_bits, axis=1), dtype=np.int64)
    elif per == "tensor":
        e0 = np.full(n, int(sfx.choose_exponent(y, out_bits)), dtype=np.int64)
    else:
        raise ValueError(f"per must be 'channel' or 'tensor', got {per!r}")
    xmax, xmin = (int(xe.max()), int(xe.min())) if xe.size else (0, 0)
    lo = np.maximum.reduce([ws + mo - frac_bits + xmax, ws - 127, np.full(n, -128)])
    hi = np.minimum.reduce([ws + mo - frac_bits + 63 + xmin, ws + 128, np.full(n, 127)])
    if np.any(lo > hi):
        j = int(np.argmax(lo > hi))
        raise ValueError(
            f"no output exponent keeps the right shift in 0..63 for channel {j} (weight shift {int(ws[j])}, "
            f"activation exponents {xmin}..{xmax}, F={frac_bits}): the per-token exponents span too much")
    if per == "tensor":
        lo_t, hi_t = int(lo.max()), int(hi.min())
        if lo_t > hi_t:
            raise ValueError("no single output exponent keeps every channel's right shift in 0..63; "
                             "use per-channel output exponents")
        e = np.full(n, min(max(int(e0[0]), lo_t), hi_t), dtype=np.int64)
    else:
        e = np.clip(e0, lo, hi)
    return e, int(np.count_nonzero(e != e0))


def quantize_input(x: Any, bits: int, *, mode: str = "dynamic", exponent: int | None = None,
                   rounding: str = "nearest_even") -> tuple[np.ndarray, np.ndarray]:
    """Activations ``[T, K]`` to SF``bits`` codes and one exponent per row (int64 ``[T]``).

    ``mode="dynamic"``: ``Ea[t] = sfx.choose_exponent`` of row ``t`` (what
    :class:`~superfloat.sw.wasq.SFxLinear` does per token); ``"static"``: the calibrated
    ``exponent`` for every row. Codes from ``sfx.encode``.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"x must be [T, K], got shape {list(arr.shape)}")
    if mode == "dynamic":
        e = np.asarray(sfx.choose_exponent(arr, bits, axis=0), dtype=np.int64)
    elif mode == "static":
        if exponent is None:
            raise ValueError("a static activation exponent is needed (the layer is not calibrated)")
        e = np.full(arr.shape[0], int(exponent), dtype=np.int64)
    else:
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    return sfx.encode(arr, bits, e[:, None], rounding), e


def widen_codes(codes: np.ndarray, from_bits: int, to_bits: int) -> np.ndarray:
    """SF``from_bits`` codes as SF``to_bits`` codes of the same values (exact; ``to_bits >= from_bits``)."""
    if to_bits == from_bits:
        return codes
    if to_bits < from_bits:
        raise ValueError(f"cannot narrow SF{from_bits} codes to SF{to_bits} without changing values")
    return sfx.encode(sfx.decode(codes, from_bits), to_bits)


@dataclass
class LayerQuant:
    """One quantized layer of a checkpoint as the accelerator sees it.

    ``exported`` is :meth:`SFxLinear.export` (the stored codes, exponents, scales, bias);
    the activation settings come from the checkpoint, or are SF8 per-token dynamic for a
    weight-only checkpoint (``act_source`` says which)."""

    name: str
    exported: Any
    act_bits: int
    act_mode: str
    act_exponent: int | None
    act_source: str
    rounding: str

    @property
    def bits(self) -> int:
        return int(self.exported.bits)

    @property
    def N(self) -> int:
        return int(self.exported.codes.shape[0])

    @property
    def K(self) -> int:
        return int(self.exported.codes.shape[1])

    @property
    def has_bias(self) -> bool:
        return self.exported.bias is not None

    @property
    def scale_kind(self) -> str:
        return "float" if self.exported.scale is not None else "pow2"

    @classmethod
    def from_module(cls, name: str, module: Any, default_act_bits: int = 8) -> "LayerQuant":
        ex = module.export()
        if module.act_bits is None:
            return cls(name, ex, default_act_bits, "dynamic", None, "weight-only checkpoint: SF"
                       f"{default_act_bits} per-token dynamic activations chosen by cosim", ex.rounding)
        if module.act_exponent == "static":
            e = module.static_act_exponent
            if e is None:
                raise CosimError(f"layer {name}: the checkpoint asks for a static activation exponent but holds no "
                                 f"calibrated value (act_amax); re-quantize with calibration data")
            return cls(name, ex, int(module.act_bits), "static", int(e), "checkpoint", ex.rounding)
        return cls(name, ex, int(module.act_bits), "dynamic", None, "checkpoint", ex.rounding)


@dataclass
class LayerCall:
    """The accelerator operations of one call of a layer, and how to put the output together."""

    layer: LayerQuant
    array: ArrayConfig
    ops: list[Op]
    out_exponent: np.ndarray  # [N]
    x_exponent: np.ndarray  # [T]
    clamped_channels: int
    shape: tuple[int, int, int]  # T, N, K

    def assemble(self, results: Sequence[OpResult], which: str = "codes") -> np.ndarray:
        t, n, _ = self.shape
        out = np.zeros((t, n), dtype=sfx.code_dtype(self.array.out_bits))
        for op, r in zip(self.ops, results):
            out[op.rows_index] = getattr(r, which)
        return out

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return sfx.decode(codes, self.array.out_bits, self.out_exponent[None, :])


def layer_ops(lq: LayerQuant, x: Any, y_float: Any, array: ArrayConfig, *, out_exponent: str = "channel") -> LayerCall:
    """The LINEAR operations that compute layer ``lq`` on float inputs ``x`` ``[T, K]`` on ``array``.

    ``y_float`` ``[T, N]`` is the float layer output on the same inputs (it sets the output
    exponents). Codes narrower than the array are widened exactly; wider ones are an error
    (:func:`check_layer_fits`). Every operation is validated by ``sfx.check_linear_args``;
    a problem raises :class:`CosimError` naming the layer.
    """
    ex = lq.exported
    x = np.asarray(x)
    t, k = x.shape
    try:
        xc, ea = quantize_input(x, lq.act_bits, mode=lq.act_mode, exponent=lq.act_exponent, rounding=lq.rounding)
        xc = widen_codes(xc, lq.act_bits, array.a_bits)
        wc = widen_codes(ex.codes, lq.bits, array.w_bits)
        mult, w_shift = weight_scale_params(ex)
        f = (array.a_bits - 1) + (array.w_bits - 1)
        f_eff = f + (sfx.MULT_FRAC_BITS if mult is not None else 0)
        eo, clamped = output_exponent(y_float, array.out_bits, w_shift=w_shift, x_exponent=ea, frac_bits=f_eff,
                                      per=out_exponent)
        shift = w_shift - eo
        groups: list[tuple[np.ndarray, Any]] = []
        if ex.bias is None:
            groups.append((np.arange(t), None))
        else:
            for e in np.unique(ea):
                rows = np.flatnonzero(ea == e)
                groups.append((rows, bias_to_accumulator(ex.bias, frac_bits=f, a_exponent=int(e), w_shift=w_shift,
                                                         mult=mult)))
        ops = []
        for i, (rows, bias) in enumerate(groups):
            args = sfx.check_linear_args(xc[rows], wc, a_bits=array.a_bits, w_bits=array.w_bits,
                                         out_bits=array.out_bits, bias=bias, shift=shift, relu=False,
                                         rounding=lq.rounding, k_max=array.k_max, mult=mult, x_exponent=ea[rows])
            label = lq.name if len(groups) == 1 else f"{lq.name} [Ea={int(ea[rows[0]])}]"
            ops.append(Op(args, array, lq.name, rows, label))
    except (ValueError, TypeError) as e:
        raise CosimError(f"layer {lq.name}: {e}") from None
    return LayerCall(lq, array, ops, eo, ea, clamped, (t, lq.N, k))


# --------------------------------------------------------------------------- preflight


def resolve_array(lq: LayerQuant, *, rows: int, cols: int, k_max: int, simulator: str, a_bits: int | None = None,
                  w_bits: int | None = None, out_bits: int | None = None) -> ArrayConfig:
    """The array that runs layer ``lq``: the given widths, or the layer's own (activations of a
    weight-only checkpoint: 8 bits; output: the activation width). Raises :class:`CosimError`
    when the layer does not fit: codes wider than the array's, ``K > k_max``, ``N`` too large."""
    a = lq.act_bits if a_bits is None else a_bits
    w = lq.bits if w_bits is None else w_bits
    o = a if out_bits is None else out_bits
    try:
        cfg = ArrayConfig(rows=rows, cols=cols, a_bits=a, w_bits=w, out_bits=o, k_max=k_max, simulator=simulator)
        cfg.params()
    except (TypeError, ValueError) as e:
        raise CosimError(f"array: {e}") from None
    if lq.bits > w:
        raise CosimError(
            f"layer {lq.name}: the checkpoint holds SF{lq.bits} weight codes but the array takes SF{w} weights "
            f"(--w-bits {w}): codes wider than the array cannot be streamed; use an array generated with "
            f"--w-bits {lq.bits} (or leave --w-bits out)")
    if lq.act_bits > a:
        raise CosimError(
            f"layer {lq.name}: the checkpoint quantizes activations to SF{lq.act_bits} but the array takes SF{a} "
            f"activations (--a-bits {a}); use an array generated with --a-bits {lq.act_bits} (or leave --a-bits out)")
    if lq.K > k_max:
        raise CosimError(f"layer {lq.name}: K={lq.K} exceeds the array's k_max={k_max} (longest reduction it "
                         f"accepts); use an array generated with --k-max {lq.K} or more")
    from superfloat.hw.interface import TN_BITS

    if lq.N > (1 << TN_BITS) - 1:
        raise CosimError(f"layer {lq.name}: N={lq.N} does not fit the 16-bit command field")
    return cfg


def select_layers(names: Sequence[str], layer: str) -> tuple[list[str], str]:
    """The layer names that ``layer`` selects and its kind: ``"layer"`` (one name), ``"block"``
    (a module prefix: every quantized layer under it), ``"all"``, or ``"layers"`` (several
    comma-separated selections). Unknown names raise :class:`CosimError` listing a few valid ones."""
    names = list(names)
    if layer == "all":
        return names, "all"
    if "," in layer:  # several selections: their union, in model order
        chosen: set[str] = set()
        for part in (p.strip() for p in layer.split(",")):
            if part:
                chosen.update(select_layers(names, part)[0])
        return [n for n in names if n in chosen], "layers"
    if layer in names:
        return [layer], "layer"
    prefix = layer.rstrip(".") + "."
    block = [n for n in names if n.startswith(prefix)]
    if block:
        return block, "block"
    import difflib

    blocks = sorted({n.rsplit(".", 1)[0] for n in names}, key=lambda b: names.index(next(n for n in names
                                                                                          if n.startswith(b + "."))))
    last = layer.rsplit(".", 1)[-1]
    same_last = [n for n in names + blocks if n.rsplit(".", 1)[-1] == last]
    close = difflib.get_close_matches(layer, same_last, n=3, cutoff=0.0) if same_last else \
        difflib.get_close_matches(layer, names + blocks, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CosimError(
        f"no quantized layer or block named {layer!r} in the checkpoint.{hint} Valid layers "
        f"({len(names)} in total) include {', '.join(names[:4])}; blocks include {', '.join(blocks[:3])}; "
        f"or 'all' (sfx cosim --list-layers shows every name)")


# --------------------------------------------------------------------------- FPGA timing


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _fmax_entries(obj: Any, source: str, out: list) -> None:
    if isinstance(obj, dict):
        if "fmax_mhz" in obj and "target" in obj and "rows" in obj:
            out.append((obj, source))
            return
        for v in obj.values():
            _fmax_entries(v, source, out)
    elif isinstance(obj, list):
        for v in obj:
            _fmax_entries(v, source, out)


def fmax_sources() -> list[Path]:
    """Files searched for synthesis results, in order of preference: the checked-in FPGA
    baselines (``hw/fpga/baselines/*.json``), the FPGA bench (``results/fpga.json``), then
    ``sfx synth`` summaries under ``build/fpga/``."""
    import superfloat.hw.fpga as fpga

    paths = sorted((Path(fpga.__file__).resolve().parent / "baselines").glob("*.json"))
    root = _repo_root()
    paths += [root / "results" / "fpga.json"]
    paths += sorted((root / "build" / "fpga").glob("**/summary.json"))
    return [p for p in paths if p.is_file()]


def find_fmax(array: ArrayConfig, target: str = "ecp5-25k", fmax_mhz: float | None = None,
              extra_sources: Sequence[Path] = ()) -> dict:
    """Fmax of the accelerator ``array`` on ``target`` from the FPGA reports (see :func:`fmax_sources`).

    Returns ``{"fmax_mhz", "source", "match", "config"}``: ``match`` is ``"given"`` (the
    ``fmax_mhz`` argument), ``"exact"`` (same target, array shape, widths and k_max),
    ``"nearest"`` (same target: the closest widths, then the closest array size; the time is
    an estimate) or ``"none"`` (``fmax_mhz`` None, ``source`` says how to get one).
    ``extra_sources`` are JSON files searched first (e.g. a bench's own ``fpga.json``)."""
    if fmax_mhz is not None:
        return {"fmax_mhz": float(fmax_mhz), "source": "--fmax (given)", "match": "given", "config": None,
                "target": target}
    entries: list = []
    for path in [Path(p) for p in extra_sources if Path(p).is_file()] + fmax_sources():
        try:
            _fmax_entries(json.loads(path.read_text()), str(path), entries)
        except (OSError, json.JSONDecodeError):
            continue
    want = (array.rows, array.cols, array.a_bits, array.w_bits, array.out_bits, array.k_max)
    best = None
    for e, src in entries:
        if e.get("target") != target or not e.get("fmax_mhz") or e.get("kind", "accel") != "accel" \
                or e.get("fits") is False or e.get("error"):
            continue
        try:
            have = (int(e["rows"]), int(e["cols"]), int(e["a_bits"]), int(e["w_bits"]),
                    int(e.get("out_bits", e["a_bits"])), int(e.get("k_max", sfx.DEFAULT_K_MAX)))
        except (KeyError, TypeError, ValueError):
            continue
        bits_apart = sum(abs(h - w) for h, w in zip(have[2:5], want[2:5]))  # widths set the PE and clamp paths
        score = (have != want, bits_apart, abs(have[0] * have[1] - want[0] * want[1]), have[5] != want[5])
        if best is None or score < best[0]:
            best = (score, e, src, have)
    cmd = (f"sfx synth --target {target} --rows {array.rows} --cols {array.cols} --a-bits {array.a_bits} "
           f"--w-bits {array.w_bits} --out-bits {array.out_bits} --k-max {array.k_max} --json")
    if best is None:
        return {"fmax_mhz": None, "match": "none", "config": None, "target": target,
                "source": f"no synthesis report for {target} found (run `{cmd}`, or pass --fmax MHZ)"}
    _, e, src, have = best
    try:
        src = str(Path(src).relative_to(_repo_root()))
    except ValueError:
        pass
    return {"fmax_mhz": float(e["fmax_mhz"]), "source": src, "match": "exact" if have == want else "nearest",
            "config": f"{have[0]}x{have[1]} a{have[2]}w{have[3]}o{have[4]} k_max={have[5]}", "target": target,
            "hint": None if have == want else f"for this exact array run `{cmd}`"}


# --------------------------------------------------------------------------- forward passes with hooks


def _err_stats(got: np.ndarray, ref: np.ndarray) -> dict:
    g = np.asarray(got, dtype=np.float64).reshape(-1)
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    d = np.abs(g - r)
    ng, nr = float(np.linalg.norm(g)), float(np.linalg.norm(r))
    cos = 1.0 if ng == 0 and nr == 0 else (float(g @ r) / (ng * nr) if ng and nr else 0.0)
    return {"max_abs_error": float(d.max()) if d.size else 0.0, "mean_abs_error": float(d.mean()) if d.size else 0.0,
            "cosine": cos, "reference_max_abs": float(np.abs(r).max()) if r.size else 0.0}


@dataclass
class _Call:
    index: int
    name: str
    call: LayerCall
    results: list[OpResult]
    y_float: np.ndarray  # the float layer output (software layer on the same input)
    y_out: np.ndarray  # the decoded output handed to the rest of the model
    codes: np.ndarray
    reference: np.ndarray
    y_float_weights: np.ndarray | None = None


@dataclass
class _Prefetch:
    name: str
    x: Any
    call: LayerCall
    futures: list[Future]
    y_float: np.ndarray


class _LinearHooks:
    """Forward hooks that replace the selected layers' outputs by the integer path on ``engine``.

    With a ``plan`` (the calls recorded by a previous pass) and an engine that runs several
    operations at once, the layers that take the same input tensor object as the layer being
    called (q/k/v projections, gate/up) are submitted together (``prefetch``)."""

    def __init__(self, modules: dict[str, Any], lqs: dict[str, LayerQuant], arrays: dict[str, ArrayConfig], engine,
                 *, out_exponent: str, plan: list[tuple[str, int]] | None = None, prefetch: bool = False,
                 float_modules: dict[str, Any] | None = None, on_op_done: Callable[[OpResult], None] | None = None):
        self.modules = modules
        self.lqs = lqs
        self.arrays = arrays
        self.engine = engine
        self.out_exponent = out_exponent
        self.plan = plan
        self.prefetch = prefetch and plan is not None
        self.float_modules = float_modules or {}
        self.on_op_done = on_op_done
        self.calls: list[_Call] = []
        self.record: list[tuple[str, int]] = []  # (name, input group) of every call
        self._prev_x = None
        self._group = -1
        self._handles: list = []
        self._pre: dict[int, _Prefetch] = {}

    def __enter__(self) -> "_LinearHooks":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._make(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pre.clear()

    def _submit(self, call: LayerCall) -> list[Future]:
        futs = [self.engine.submit(op) for op in call.ops]
        if self.on_op_done is not None:
            for f in futs:
                f.add_done_callback(lambda fut: fut.exception() is None and self.on_op_done(fut.result()))
        return futs

    def _plan_call(self, name: str, x2: np.ndarray, y2: np.ndarray) -> LayerCall:
        return layer_ops(self.lqs[name], x2, y2, self.arrays[name], out_exponent=self.out_exponent)

    def _make(self, name: str):
        import torch

        def hook(module, args, output):
            x = args[0]
            idx = len(self.record)
            if x is not self._prev_x:
                self._group += 1
            self._prev_x = x
            self.record.append((name, self._group))
            k = x.shape[-1]
            x2 = x.detach().reshape(-1, k).to(torch.float32).cpu().numpy()
            y2 = output.detach().reshape(-1, output.shape[-1]).to(torch.float64).cpu().numpy()
            pre = self._pre.pop(idx, None)
            if pre is not None and pre.name == name and (pre.x is x or torch.equal(pre.x, x)) \
                    and np.array_equal(pre.y_float, y2):
                call, futs = pre.call, pre.futures
            else:
                call = self._plan_call(name, x2, y2)
                futs = self._submit(call)
                if self.prefetch and idx < len(self.plan) and self.plan[idx][0] == name:
                    g = self.plan[idx][1]
                    j = idx + 1
                    while j < len(self.plan) and self.plan[j][1] == g:
                        other = self.plan[j][0]
                        if other in self.modules and j not in self._pre:
                            with torch.no_grad():
                                yj = self.modules[other].forward(x)  # the layer's own forward, no hooks
                            yj2 = yj.detach().reshape(-1, yj.shape[-1]).to(torch.float64).cpu().numpy()
                            cj = self._plan_call(other, x2, yj2)
                            self._pre[j] = _Prefetch(other, x, cj, self._submit(cj), yj2)
                        j += 1
            results = [f.result() for f in futs]
            codes = call.assemble(results, "codes")
            ref = call.assemble(results, "reference")
            y_out = call.decode(codes)
            yfw = None
            fm = self.float_modules.get(name)
            if fm is not None:
                yfw = _float_weights_output(fm, x2)
            self.calls.append(_Call(idx, name, call, results, y2, y_out, codes, ref, yfw))
            return torch.from_numpy(y_out.reshape(output.shape)).to(dtype=output.dtype, device=output.device)

        return hook


def _float_weights_output(module: Any, x2: np.ndarray) -> np.ndarray:
    """``x @ W.T + b`` in float64 with a float model's own layer (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    from torch import nn

    w = module.weight.detach().to("cpu").double().numpy()
    if not isinstance(module, nn.Linear):  # Conv1D stores [K, N]
        w = w.T
    y = x2.astype(np.float64) @ w.T
    if getattr(module, "bias", None) is not None:
        y = y + module.bias.detach().to("cpu").double().numpy()[None, :]
    return y


class _OutputCapture:
    """Forward hook keeping the first tensor of a module's output (a block's output)."""

    def __init__(self, module: Any | None):
        self.module = module
        self.value = None
        self._h = None

    def __enter__(self):
        if self.module is not None:
            def hook(m, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                self.value = out.detach().to("cpu").double().numpy().copy()

            self._h = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        if self._h is not None:
            self._h.remove()


# --------------------------------------------------------------------------- the driver

DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small town by the sea, "
                  "there lived an old clockmaker who built machines that could count the stars, and every "
                  "night the children of the town came to listen to his stories about numbers and light.")
DEFAULT_TOKENS = 8


def _token_ids(tok: Any, prompt: str | None, tokens: int | None, vocab: int | None) -> tuple[list[int], str, list[str]]:
    notes = []
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise CosimError(f"--tokens must be a positive int, got {tokens!r}")
    text = DEFAULT_PROMPT if prompt is None else prompt
    if prompt is None and tokens is None:
        tokens = DEFAULT_TOKENS
    if tok is None:
        ids = [b % (vocab or 256) for b in text.encode()]
        notes.append("the checkpoint has no tokenizer: token ids are the prompt's UTF-8 bytes")
    else:
        ids = list(tok(text)["input_ids"])
    if tokens is not None:
        if tokens > len(ids):
            raise CosimError(f"--tokens {tokens} asks for more tokens than the prompt has ({len(ids)})")
        ids = ids[:tokens]
    if not ids:
        raise CosimError("the prompt gives no tokens")
    from superfloat.hw.interface import TN_BITS

    if len(ids) > (1 << TN_BITS) - 1:
        raise CosimError(f"{len(ids)} tokens do not fit the 16-bit T field of a command")
    return ids, text, notes


class _torch_threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)


def _logit_compare(a, b) -> dict:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    e = _err_stats(a, b)
    am, bm = a.argmax(-1).reshape(-1), b.argmax(-1).reshape(-1)
    return {"max_abs_diff": e["max_abs_error"], "mean_abs_diff": e["mean_abs_error"], "cosine": e["cosine"],
            "argmax_agreement": float((am == bm).mean()), "next_token_equal": bool(am[-1] == bm[-1])}


def cosim(checkpoint: str | os.PathLike, layer: str = "all", *, prompt: str | None = None, tokens: int | None = None,
          simulator: str = "verilator", rows: int = 8, cols: int = 8, k_max: int = sfx.DEFAULT_K_MAX,
          a_bits: int | None = None, w_bits: int | None = None, out_bits: int | None = None,
          out_exponent: str = "channel", jobs: int = 1, engine: str = "session", waves: bool = False,
          target: str = "ecp5-25k", fmax_mhz: float | None = None, float_model: Any = None,
          progress: bool = False, fmax_sources: Sequence[str | os.PathLike] = ()) -> "CosimReport":
    """Co-simulate layer(s) of a WASQ checkpoint on the generated accelerator (see the module docstring).

    Args:
        checkpoint: WASQ checkpoint directory (SPEC section 7).
        layer: a quantized layer name, a block (a module holding several, e.g.
            ``model.layers.0.mlp``), several of these separated by commas, or ``"all"``
            (every quantized layer: the whole forward).
        prompt, tokens: the input text, and how many of its tokens to use (default: the
            first 8 tokens of :data:`DEFAULT_PROMPT`).
        simulator: ``"verilator"`` or ``"icarus"``.
        rows, cols, k_max: the array's shape and longest reduction.
        a_bits, w_bits, out_bits: the array's widths (default: the checkpoint's; weight-only
            checkpoints get 8-bit activations; outputs as wide as the activations).
            Narrower checkpoint codes are widened exactly, wider ones are an error.
        out_exponent: ``"channel"`` (default) or ``"tensor"`` output exponents.
        jobs: operations simulated at once (one simulator process each).
        engine: ``"session"`` (default), ``"run_linear"`` (one simulator per operation) or
            ``"reference"`` (``sfx.linear`` only, no simulator: a dry run).
        waves: record waveforms (paths in the report).
        target, fmax_mhz: the FPGA target whose Fmax converts cycles to time, or a given Fmax.
        fmax_sources: extra synthesis report files searched first (see :func:`find_fmax`).
        float_model: optional float model (a ``load_model`` spec or a module) to compare
            against as well (logits; per layer: the layer with float weights).
        progress: step lines and a progress bar on stderr.

    Raises:
        CosimError: a damaged or mismatched checkpoint, an unknown layer, a layer that does
            not fit the array, a bad option; always before any simulator build starts.
        superfloat.sim.SimulatorNotFound, superfloat.sim.SimulationFailed: simulator problems.
    """
    import torch

    from . import runner

    t_start = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[cosim {time.perf_counter() - t_start:5.1f} s] {msg}", file=sys.stderr, flush=True)

    extra_sources = [Path(p) for p in fmax_sources]
    if simulator not in runner.SIMULATORS:
        raise CosimError(f"simulator must be one of {', '.join(map(repr, runner.SIMULATORS))}, got {simulator!r}")
    if engine not in ("session", "run_linear", "reference"):
        raise CosimError(f"engine must be 'session', 'run_linear' or 'reference', got {engine!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise CosimError(f"jobs must be a positive int, got {jobs!r}")
    if out_exponent not in ("channel", "tensor"):
        raise CosimError(f"out_exponent must be 'channel' or 'tensor', got {out_exponent!r}")
    for nm, v in (("a_bits", a_bits), ("w_bits", w_bits), ("out_bits", out_bits)):
        if v is not None:
            try:
                sfx.check_bits(v, nm)
            except (TypeError, ValueError) as e:
                raise CosimError(str(e)) from None

    from superfloat.sw.wasq import quantized_layers
    from superfloat.sw.wasq.checkpoint import CheckpointError, load_checkpoint

    say(f"loading checkpoint {checkpoint}")
    try:
        model, tok, info = load_checkpoint(checkpoint, return_info=True)
    except CheckpointError as e:
        raise CosimError(f"cannot co-simulate this checkpoint: {e}") from None
    qlayers = quantized_layers(model)
    names, kind = select_layers(list(qlayers), layer)
    lqs = {n: LayerQuant.from_module(n, qlayers[n], default_act_bits=a_bits or 8) for n in names}
    arrays = {n: resolve_array(lqs[n], rows=rows, cols=cols, k_max=k_max, simulator=simulator, a_bits=a_bits,
                               w_bits=w_bits, out_bits=out_bits) for n in names}
    notes: list[str] = []
    wo = sorted({lq.act_source for lq in lqs.values() if lq.act_source != "checkpoint"})
    notes += wo
    widened = [n for n in names if arrays[n].w_bits > lqs[n].bits or arrays[n].a_bits > lqs[n].act_bits]
    if widened:
        notes.append(f"{len(widened)} layer(s) have codes narrower than the array; they were widened exactly "
                     f"(e.g. {widened[0]})")
    base_note = (info.get("base_model") or {}).get("note")
    if base_note:
        notes.append(str(base_note))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids, text, tok_notes = _token_ids(tok, prompt, tokens, vocab)
    notes += tok_notes
    if engine != "reference":
        runner.check_simulator(simulator)  # SimulatorNotFound (with install hints) before any work
    input_ids = torch.tensor([ids], dtype=torch.long)
    modules = {n: qlayers[n] for n in names}
    block_module = model.get_submodule(layer) if kind == "block" else None

    fm = None
    if float_model is not None:
        if isinstance(float_model, str):
            from superfloat.sw.wasq import load_model

            say(f"loading float model {float_model}")
            fm = load_model(float_model, progress=progress).model
        else:
            fm = float_model
        fm.eval()
    float_modules = {}
    if fm is not None:
        for n in names:
            try:
                float_modules[n] = fm.get_submodule(n)
            except AttributeError:
                pass

    T = len(ids)
    say(f"{kind} {layer!r}: {len(names)} layer(s), {T} token(s); software and reference (sfx.linear) passes")
    # A forward pass over a few tokens gains nothing from intra-op threads, and spinning threads
    # would take the core that a simulator process needs.
    with _torch_threads(1):
        with torch.no_grad():
            with _OutputCapture(block_module) as cap_sw:
                logits_sw = model(input_ids).logits.double().numpy()
            logits_fp = block_fp = None
            if fm is not None:
                with _OutputCapture(fm.get_submodule(layer) if kind == "block" else None) as cap_fp:
                    logits_fp = fm(input_ids).logits.double().numpy()
                block_fp = cap_fp.value
            ref_engine = ReferenceEngine()
            t0 = time.perf_counter()
            with _LinearHooks(modules, lqs, arrays, ref_engine, out_exponent=out_exponent,
                              float_modules=float_modules) as hb, _OutputCapture(block_module) as cap_ref:
                logits_ref = model(input_ids).logits.double().numpy()
            ref_s = time.perf_counter() - t0
        plan = hb.record
        total_ops = sum(len(c.call.ops) for c in hb.calls)
        total_macs = sum(op.macs for c in hb.calls for op in c.call.ops)
        distinct = sorted({a.name for a in arrays.values()})
        say(f"{total_ops} accelerator operation(s), {total_macs / 1e6:.2f} M MACs, on {engine} "
            f"({simulator}, array {', '.join(distinct)}, jobs={jobs})")

        eng = make_engine(engine, jobs, waves=waves)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_ops, desc=f"cosim {simulator}", unit="op", file=sys.stderr, dynamic_ncols=True,
                       leave=False)
        lock = threading.Lock()

        def done(_r: OpResult) -> None:
            if bar is not None:
                with lock:
                    bar.update(1)

        t0 = time.perf_counter()
        try:
            with torch.no_grad(), _LinearHooks(modules, lqs, arrays, eng, out_exponent=out_exponent, plan=plan,
                                               prefetch=jobs > 1, float_modules=float_modules,
                                               on_op_done=done) as hc, _OutputCapture(block_module) as cap_rtl:
                logits_rtl = model(input_ids).logits.double().numpy()
        finally:
            if bar is not None:
                bar.close()
            eng.close()
        rtl_s = time.perf_counter() - t0

        fmax = {a.name: find_fmax(a, target, fmax_mhz, extra_sources)
                for a in {arrays[n] for n in names}}
        report = _build_report(
            checkpoint=str(checkpoint), info=info, layer=layer, kind=kind, names=names, ids=ids, text=text,
            simulator=simulator, engine=eng, jobs=jobs, arrays=arrays, lqs=lqs, ref_calls=hb.calls, rtl_calls=hc.calls,
            logits=(logits_sw, logits_ref, logits_rtl, logits_fp),
            blocks=(cap_sw.value, cap_ref.value, cap_rtl.value, block_fp), fmax=fmax, target=target, notes=notes,
            timing={"reference_pass_s": ref_s, "rtl_pass_s": rtl_s, "wall_s": time.perf_counter() - t_start},
            out_exponent=out_exponent)
        say(f"done in {report['wall_s']:.1f} s: {report['mismatches']} mismatching code(s) of "
            f"{report['codes_compared']}")
        return report


def _build_report(*, checkpoint, info, layer, kind, names, ids, text, simulator, engine, jobs, arrays, lqs, ref_calls,
                  rtl_calls, logits, blocks, fmax, target, notes, timing, out_exponent) -> "CosimReport":
    logits_sw, logits_ref, logits_rtl, logits_fp = logits
    block_sw, block_ref, block_rtl, block_fp = blocks
    layers = []
    ref_by_index = {c.index: c for c in ref_calls}
    tot = {"mismatches": 0, "codes": 0, "cycles": 0, "sim_cycles": 0, "macs": 0, "pe_cycles": 0, "saturated": 0,
           "loop_s": 0.0, "loop_cpu_s": 0.0, "sim_s": 0.0, "fpga_us": 0.0, "abs_sum": 0.0, "n_out": 0}
    fpga_known = True
    errors = []
    for c in rtl_calls:
        arr = c.call.array
        stats = [r.stats for r in c.results]
        cycles = sum(s.cycles for s in stats)
        sim_cycles = sum(s.sim_cycles for s in stats)
        macs = sum(op.macs for op in c.call.ops)
        mism = sum(r.mismatches for r in c.results)
        first = next((r.first_mismatch for r in c.results if r.first_mismatch), None)
        e = _err_stats(c.y_out, c.y_float)
        f = fmax[arr.name]
        fpga_us = cycles / f["fmax_mhz"] if f["fmax_mhz"] else None
        if fpga_us is None:
            fpga_known = False
        rc = ref_by_index.get(c.index)
        lq = c.call.layer
        eo = c.call.out_exponent
        entry = {
            "name": c.name, "array": arr.name, "T": c.call.shape[0], "N": c.call.shape[1], "K": c.call.shape[2],
            "w_bits": lq.bits, "scale": lq.scale_kind, "bias": lq.has_bias,
            "activations": f"SF{lq.act_bits} {lq.act_mode}" + (f" (E={lq.act_exponent})" if lq.act_mode == "static"
                                                               else " per token"),
            "activation_source": lq.act_source, "ops": len(c.call.ops),
            "x_exponents": [int(v) for v in np.unique(c.call.x_exponent)],
            "out_exponent": [int(eo.min()), int(eo.max())], "out_exponent_clamped": c.call.clamped_channels,
            "mismatches": mism, "codes_compared": int(c.codes.size), "first_mismatch": first,
            "equal_to_reference_pass": bool(rc is not None and rc.name == c.name
                                            and np.array_equal(rc.codes, c.codes)),
            "cycles": cycles, "sim_cycles": sim_cycles, "macs": macs,
            "utilization": macs / (arr.rows * arr.cols * cycles) if cycles else 0.0,
            "saturated": sum(s.saturated for s in stats),
            "saturated_reference": sum(s.reference_saturated for s in stats),
            "rtl_error_flag": any(s.error for s in stats),
            **e,
            "fpga_us": fpga_us,
            "sim_wall_s": sum(r.wall_s for r in c.results), "loop_s": sum(s.loop_s for s in stats),
            "loop_cpu_s": sum(s.loop_cpu_s for s in stats),
            "waves": sorted({s.waves for s in stats if getattr(s, "waves", None)}) or None,
        }
        if c.y_float_weights is not None:
            ef = _err_stats(c.y_out, c.y_float_weights)
            entry["vs_float_weights"] = {k: ef[k] for k in ("max_abs_error", "mean_abs_error", "cosine")}
        layers.append(entry)
        if entry["rtl_error_flag"]:
            errors.append(c.name)
        tot["mismatches"] += mism
        tot["codes"] += int(c.codes.size)
        tot["cycles"] += cycles
        tot["sim_cycles"] += sim_cycles
        tot["macs"] += macs
        tot["pe_cycles"] += arr.rows * arr.cols * cycles
        tot["saturated"] += entry["saturated"]
        tot["loop_s"] += entry["loop_s"]
        tot["loop_cpu_s"] += entry["loop_cpu_s"]
        tot["fpga_us"] += fpga_us or 0.0
        tot["abs_sum"] += e["mean_abs_error"] * c.y_out.size
        tot["n_out"] += c.y_out.size

    fwd = {
        "logits_identical": bool(np.array_equal(logits_rtl, logits_ref)),
        "max_logit_diff": float(np.abs(logits_rtl - logits_ref).max()),
        "argmax_identical": bool(np.array_equal(logits_rtl.argmax(-1), logits_ref.argmax(-1))),
        "next_token": {"rtl": int(logits_rtl[0, -1].argmax()), "reference": int(logits_ref[0, -1].argmax()),
                       "software": int(logits_sw[0, -1].argmax())},
        "rtl_vs_software": _logit_compare(logits_rtl, logits_sw),
        "reference_vs_software": _logit_compare(logits_ref, logits_sw),
    }
    if logits_fp is not None:
        fwd["next_token"]["float"] = int(logits_fp[0, -1].argmax())
        fwd["rtl_vs_float"] = _logit_compare(logits_rtl, logits_fp)
        fwd["software_vs_float"] = _logit_compare(logits_sw, logits_fp)
    if block_rtl is not None:
        blk = {"identical_to_reference": bool(np.array_equal(block_rtl, block_ref)),
               "vs_software": _err_stats(block_rtl, block_sw)}
        if block_fp is not None:
            blk["vs_float"] = _err_stats(block_rtl, block_fp)
        fwd["block_output"] = blk
    arrays_used = sorted({a.name for a in arrays.values()})
    starts = list(getattr(engine, "session_start_s", []))
    rtl_s = timing["rtl_pass_s"]
    data = {
        "checkpoint": checkpoint, "model": (info.get("base_model") or {}).get("architecture"),
        "quant_config": info.get("quant_config"), "selection": layer, "kind": kind, "layers_simulated": len(names),
        "tokens": len(ids), "token_ids": ids, "prompt": text, "simulator": simulator, "engine": engine.name,
        "jobs": jobs, "arrays": arrays_used, "out_exponent": out_exponent,
        "mismatches": tot["mismatches"], "codes_compared": tot["codes"],
        "bit_exact": tot["mismatches"] == 0 and fwd["logits_identical"] and not errors,
        "rtl_error_flags": errors,
        "cycles": tot["cycles"], "macs": tot["macs"],
        "utilization": tot["macs"] / tot["pe_cycles"] if tot["pe_cycles"] else 0.0,
        "saturated": tot["saturated"],
        "max_abs_error": max((l["max_abs_error"] for l in layers), default=0.0),
        "mean_abs_error": tot["abs_sum"] / tot["n_out"] if tot["n_out"] else 0.0,
        "cosine": min((l["cosine"] for l in layers), default=1.0),
        "fpga": {"target": target, "per_array": fmax, "time_us": tot["fpga_us"] if fpga_known else None},
        "forward": fwd,
        "speed": {"rtl_pass_s": rtl_s, "reference_pass_s": timing["reference_pass_s"],
                  "session_start_s": starts, "sim_loop_s": tot["loop_s"],
                  "macs_per_wall_s": tot["macs"] / rtl_s if rtl_s else 0.0,
                  "macs_per_loop_s": tot["macs"] / tot["loop_s"] if tot["loop_s"] else 0.0,
                  "cycles_per_loop_s": tot["sim_cycles"] / tot["loop_s"] if tot["loop_s"] else 0.0,
                  "sim_loop_cpu_s": tot["loop_cpu_s"],
                  "macs_per_cpu_s": tot["macs"] / tot["loop_cpu_s"] if tot["loop_cpu_s"] else 0.0,
                  "cycles_per_cpu_s": tot["sim_cycles"] / tot["loop_cpu_s"] if tot["loop_cpu_s"] else 0.0},
        "wall_s": timing["wall_s"], "notes": notes, "layers": layers,
    }
    return CosimReport(data)


class CosimReport(dict):
    """The result of :func:`cosim`: a dict (what ``sfx cosim --json`` prints) with a text view.

    Top-level keys: ``mismatches`` and ``codes_compared`` (RTL against ``sfx.linear``, all
    operations), ``bit_exact`` (no mismatch, RTL forward logits identical to the reference
    forward's, no RTL error flag), ``cycles``, ``macs``, ``utilization``, ``saturated``,
    ``max_abs_error`` (worst layer), ``mean_abs_error``, ``cosine`` (worst layer; errors of
    the dequantized RTL output against the float layer output), ``fpga`` (Fmax source and
    time), ``forward`` (logits), ``speed``, ``notes`` and ``layers`` (one entry per layer).
    """

    def format(self) -> str:
        d = self
        lines = [f"cosim {d['kind']} {d['selection']!r} of {d['checkpoint']} ({d['model']}), {d['tokens']} token(s), "
                 f"{d['simulator']} via {d['engine']}, array {', '.join(d['arrays'])}"]
        rows = d["layers"]
        hdr = f"  {'layer':<44} {'T x K -> N':>16} {'ops':>3} {'mism':>5} {'cycles':>9} {'util':>5} " \
              f"{'max|err|':>9} {'mean|err|':>9} {'cosine':>8} {'FPGA us':>8}"
        lines.append(hdr)
        shown = rows if len(rows) <= 16 else rows[:8] + [None] + rows[-4:]
        for r in shown:
            if r is None:
                lines.append(f"  ... {len(rows) - 12} more layer(s) (--json lists all)")
                continue
            us = f"{r['fpga_us']:.1f}" if r["fpga_us"] is not None else "-"
            lines.append(f"  {r['name'][-44:]:<44} {str(r['T']) + ' x ' + str(r['K']) + ' -> ' + str(r['N']):>16} "
                         f"{r['ops']:>3} {r['mismatches']:>5} {r['cycles']:>9} {r['utilization']:>5.2f} "
                         f"{r['max_abs_error']:>9.4g} {r['mean_abs_error']:>9.3g} {r['cosine']:>8.5f} {us:>8}")
        fw = d["forward"]
        lines.append(f"bit-exact: {'YES' if d['bit_exact'] else 'NO'}: {d['mismatches']} differing code(s) of "
                     f"{d['codes_compared']} (RTL vs sfx.linear on the same inputs); logits of the RTL forward "
                     f"{'identical to' if fw['logits_identical'] else 'DIFFER from'} the sfx.linear forward "
                     f"(max diff {fw['max_logit_diff']:.3g})"
                     + (f"; RTL error flag in {', '.join(d['rtl_error_flags'])}" if d["rtl_error_flags"] else ""))
        rs = fw["rtl_vs_software"]
        nt = fw["next_token"]
        lines.append(f"vs the software model (checkpoint in PyTorch): logits max |diff| {rs['max_abs_diff']:.4g}, "
                     f"cosine {rs['cosine']:.6f}, argmax agreement {rs['argmax_agreement']:.0%}, next token "
                     f"{nt['rtl']} vs {nt['software']}")
        if "rtl_vs_float" in fw:
            rf = fw["rtl_vs_float"]
            lines.append(f"vs the float model: logits max |diff| {rf['max_abs_diff']:.4g}, cosine {rf['cosine']:.6f}, "
                         f"argmax agreement {rf['argmax_agreement']:.0%}, next token {nt['rtl']} vs {nt['float']}")
        if "block_output" in fw:
            b = fw["block_output"]
            lines.append(f"block output: {'identical to' if b['identical_to_reference'] else 'DIFFERS from'} the "
                         f"sfx.linear path; vs software max |err| {b['vs_software']['max_abs_error']:.4g}, cosine "
                         f"{b['vs_software']['cosine']:.6f}")
        lines.append(f"accelerator: {d['cycles']} cycles, utilization {d['utilization']:.2f}, {d['macs']} MACs, "
                     f"{d['saturated']} saturated output(s); worst layer max |err| {d['max_abs_error']:.4g}, "
                     f"cosine {d['cosine']:.6f}")
        fp = d["fpga"]
        for name, f in fp["per_array"].items():
            if f["fmax_mhz"]:
                lines.append(f"FPGA {fp['target']}: array {name} at {f['fmax_mhz']:.1f} MHz ({f['match']}: "
                             f"{f.get('config') or ''} from {f['source']})"
                             + (f" -> {fp['time_us']:.1f} us for these operations" if fp["time_us"] is not None
                                else ""))
            else:
                lines.append(f"FPGA {fp['target']}: array {name}: {f['source']}")
        sp = d["speed"]
        lines.append(f"harness: {sp['macs_per_wall_s'] / 1e3:.1f} k simulated MACs per wall second of the RTL pass "
                     f"({sp['rtl_pass_s']:.1f} s, simulator start-up included); bench loop "
                     f"{sp['cycles_per_loop_s'] / 1e3:.1f} k cycles per wall s, {sp['cycles_per_cpu_s'] / 1e3:.1f} k "
                     f"per CPU s; total {d['wall_s']:.1f} s")
        for n in d["notes"]:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    @property
    def bit_exact(self) -> bool:
        return bool(self["bit_exact"])

"""Co-simulation engines: what runs a LINEAR operation of ``sfx cosim`` and where.

* :class:`ArrayConfig`, :class:`Op`, :class:`OpResult`, :class:`OpStats`: an operation for an
  accelerator configuration, and what an engine returns for it;
* :class:`ReferenceEngine`: ``sfx.linear`` in this process (no simulator);
* :class:`RTLSession`: one simulator process serving many operations (cocotb test ``serve``
  of :mod:`superfloat.sim.tb_cosim`, operations over a Unix socket);
  :class:`SessionEngine`: ``jobs`` threads with one session each;
* :class:`RunLinearEngine`: one :func:`superfloat.sim.run_linear` call per operation;
* :func:`prebuild`, :func:`make_engine`.
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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from superfloat.sw import sfx


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
    xmult: bool = False   # generated with the per-row activation multiplier (SPEC revision 2)

    def params(self):
        from superfloat.hw.interface import AccelParams

        return AccelParams(rows=self.rows, cols=self.cols, a_bits=self.a_bits, w_bits=self.w_bits,
                           out_bits=self.out_bits, k_max=self.k_max, xmult=self.xmult)

    @property
    def name(self) -> str:
        return (f"{self.rows}x{self.cols} a{self.a_bits}w{self.w_bits}o{self.out_bits} k_max={self.k_max}"
                + (" xmult" if self.xmult else ""))


def _spec_params(spec: dict):
    """The :class:`~superfloat.hw.interface.AccelParams` of a helper process's JSON spec."""
    from superfloat.hw.interface import AccelParams

    return AccelParams(**{k: spec[k] for k in ("rows", "cols", "a_bits", "w_bits", "out_bits", "k_max")},
                       xmult=bool(spec.get("xmult", False)))


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

    def __init__(self, array: ArrayConfig, *, waves: bool = False, dsp_pes: int = 0, engine: str = "harness",
                 seed: int = 1, stalls: Any = None):
        from .harness import Stalls
        from .linear import ENGINES, build_accelerator, build_harness

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
        self.array = array
        self.p = array.params()
        self.waves = bool(waves)
        self.engine = engine
        self.seed = int(seed)
        self.stalls = stalls if isinstance(stalls, Stalls) else (Stalls.uniform(float(stalls), 6) if stalls
                                                                 else Stalls())
        t0 = time.perf_counter()
        with _BUILD_LOCK:  # the runner sets os.environ while it builds: one build at a time per process
            build = build_harness if engine == "harness" else build_accelerator
            self.build = build(self.p, simulator=array.simulator, waves=self.waves, dsp_pes=dsp_pes)
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
                "out_bits": self.p.out_bits, "k_max": self.p.k_max, "xmult": self.p.xmult, "simulator": array.simulator,
                "waves": self.waves, "dsp_pes": dsp_pes, "run_dir": str(self.run_dir), "socket": sock_path,
                "engine": engine, "build": self.build.as_dict()}
        env = dict(os.environ)
        env["SFX_COSIM_HOST"] = json.dumps(spec)
        self._host_log = self.run_dir / "host.log"
        self._host_log_f = open(self._host_log, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from superfloat.sim.engines import _host_main; _host_main()"],
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
        from .linear import params_env
        from .packing import linear_traffic, res_to_codes

        if self._file is None:
            raise RuntimeError("the session is closed")
        t_start = time.perf_counter()
        if (args.a_bits, args.w_bits, args.out_bits, args.k_max) != (self.p.a_bits, self.p.w_bits,
                                                                       self.p.out_bits, self.p.k_max):
            raise ValueError(f"operation widths a{args.a_bits}w{args.w_bits}o{args.out_bits} k_max={args.k_max} do "
                             f"not match the session's array {self.array.name}")
        if self.engine == "harness":
            return self._run_harness(args, t_start)
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

    def _run_harness(self, args: sfx.LinearArgs, t_start: float) -> tuple[np.ndarray, np.ndarray, Any]:
        from .harness import HarnessJob, depths_for, linear_beats, read_res_text, read_result, res_codes, write_job
        from .linear import harness_failure
        from .scoreboard import first_mismatch, linear_kwargs

        beats = linear_beats(args, self.p)
        self.ops += 1
        write_job(self.run_dir, HarnessJob(beats, seed=self.seed + self.ops - 1, stalls=self.stalls,
                                           reset_cycles=2), depths_for(self.array.simulator))
        t_sim = time.perf_counter()
        self._file.write(b"go\n")
        # sfx.linear on the host while the simulator runs the operation (numpy releases the GIL),
        # on one BLAS thread: spinning BLAS workers would take the simulator's core
        _BlasThreads.limit(1)
        try:
            ref, ref_stats = sfx.linear_with_stats(args.x, args.w, **linear_kwargs(args))
        finally:
            _BlasThreads.restore()
        line = self._readline(None, f"operation {self.ops}")
        parts = line.split()
        if len(parts) != 3 or parts[0] != "ok":
            raise self._failed(f"operation {self.ops} failed: {line}")
        sim_s = time.perf_counter() - t_sim
        res = read_result(self.run_dir, words=False)
        msg = harness_failure(self.array.simulator, res, f"operation {self.ops} (T={args.T} N={args.N} K={args.K})")
        if msg:
            raise self._failed(msg)
        codes, padding = res_codes(read_res_text(self.run_dir), args.T, args.N, self.p)
        count, first = first_mismatch(codes, ref)
        cycles = res.cycles
        macs = args.T * args.N * args.K
        stats = OpStats(
            simulator=self.array.simulator, rows=self.p.rows, cols=self.p.cols, cycles=cycles, macs=macs,
            utilization=macs / (self.p.rows * self.p.cols * cycles) if cycles else 0.0,
            saturated=res.stats["sat_count"], reference_saturated=int(ref_stats.n_saturated),
            error=bool(res.stats["error"]), mismatches=count, first_mismatch=first, padding_nonzero=padding,
            sim_cycles=res.stats["cycles"], loop_s=float(parts[1]), loop_cpu_s=float(parts[2]),
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
    """Helper process of :class:`RTLSession`: run the cocotb ``serve`` test on the session's build."""
    from . import runner

    spec = json.loads(os.environ.pop("SFX_COSIM_HOST"))
    harness = spec.get("engine", "harness") == "harness"
    if spec.get("build"):  # the session built it already: no Verilog generation or hashing here
        d = dict(spec["build"])
        b = runner.Build(**{**d, "dir": Path(d["dir"]), "verilog": Path(d["verilog"])})
    else:
        from .linear import build_accelerator, build_harness

        p = _spec_params(spec)
        build = build_harness if harness else build_accelerator
        b = build(p, simulator=spec["simulator"], waves=spec["waves"], dsp_pes=spec["dsp_pes"])
    r = runner.run(b, "superfloat.sim.tb_harness" if harness else "superfloat.sim.tb_cosim", testcase="serve", env={"SFX_COSIM_SOCKET": spec["socket"]},
                   run_dir=spec["run_dir"], waves=spec["waves"], check=False)
    if r.failed or not r.tests:
        for name, msg in r.failures:
            print(f"{name}: {msg}", flush=True)
        sys.exit(1)


_UID = [0]
_UID_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()


class _BlasThreads:
    """Set the thread count of the OpenBLAS that numpy loaded (found in ``/proc/self/maps``,
    as threadpoolctl does; a no-op where there is none). :class:`RTLSession` computes
    ``sfx.linear``'s reference while the simulator runs the operation: with the default
    thread count OpenBLAS's worker threads busy-wait after every call and take the
    simulator's core (measured on 2 cores, 28 SmolLM2-shaped operations: host CPU 2.0 s ->
    0.24 s, operations' wall time 4.1 s -> 2.4 s)."""

    _lock = threading.Lock()
    _funcs: tuple | None = None

    @classmethod
    def _find(cls) -> tuple:
        if cls._funcs is None:
            funcs: tuple = ()
            try:
                import ctypes

                with open("/proc/self/maps") as f:
                    paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln})
                for path in paths:
                    lib = ctypes.CDLL(path)
                    for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                                     ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                                     ("openblas_get_num_threads", "openblas_set_num_threads")):
                        if hasattr(lib, get) and hasattr(lib, put):
                            g, s = getattr(lib, get), getattr(lib, put)
                            g.restype, s.argtypes = ctypes.c_int, [ctypes.c_int]
                            funcs += ((g, s),)
                            break
            except (OSError, AttributeError):
                funcs = ()
            cls._funcs = funcs
        return cls._funcs

    _users = 0
    _saved: list[int] = []

    @classmethod
    def limit(cls, n: int) -> None:
        """Set every OpenBLAS to ``n`` threads until the matching :meth:`restore` (calls may
        overlap from several threads, e.g. :class:`SessionEngine`'s sessions: the first saves
        the counts, the last restores them)."""
        with cls._lock:
            funcs = cls._find()
            if cls._users == 0:
                cls._saved = [g() for g, _ in funcs]
            cls._users += 1
            for _, s in funcs:
                s(n)

    @classmethod
    def restore(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                for (_, s), n in zip(cls._find(), cls._saved):
                    s(n)


def _uid() -> int:
    with _UID_LOCK:
        _UID[0] += 1
        return _UID[0]


class SessionEngine:
    """Runs operations on :class:`RTLSession` s: ``jobs`` worker threads, each with its own
    simulator process per array configuration (started on its first operation), so up to
    ``jobs`` independent operations are simulated at once."""

    name = "session"

    def __init__(self, jobs: int = 1, *, waves: bool = False, sim_engine: str = "harness"):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {jobs!r}")
        self.jobs = jobs
        self.waves = waves
        self.sim_engine = sim_engine
        if sim_engine == "percycle":
            self.name = "session-percycle"
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
                    s = RTLSession(op.array, waves=self.waves, engine=self.sim_engine)
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
                      simulator=array.simulator, waves=waves, xmult_hw=array.xmult)


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
            "out_bits": array.out_bits, "k_max": array.k_max, "xmult": array.xmult, "simulator": array.simulator,
            "waves": bool(waves)}
    env = dict(os.environ)
    env["SFX_COSIM_PREBUILD"] = json.dumps(spec)
    log = build_root() / f"prebuild-{array.simulator}-{os.getpid()}-{_uid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", "from superfloat.sim.engines import _prebuild_main; "
                                 "_prebuild_main()"], env=env, stdout=f, stderr=subprocess.STDOUT)


def _prebuild_main() -> None:  # pragma: no cover - runs in the helper process
    from .linear import build_harness

    spec = json.loads(os.environ.pop("SFX_COSIM_PREBUILD"))
    p = _spec_params(spec)
    b = build_harness(p, simulator=spec["simulator"], waves=spec["waves"])
    print(f"{'cached' if b.cached else 'built'}: {b.dir} ({b.build_s:.1f} s)", flush=True)


def make_engine(engine: str, jobs: int = 1, *, waves: bool = False):
    """``"session"`` (default: in-simulation stream drivers), ``"session-percycle"`` (the
    per-cycle Python drivers, for debugging), ``"run_linear"`` or ``"reference"``
    (``sfx.linear`` only)."""
    if engine == "session":
        return SessionEngine(jobs, waves=waves)
    if engine == "session-percycle":
        return SessionEngine(jobs, waves=waves, sim_engine="percycle")
    if engine == "run_linear":
        return RunLinearEngine(jobs, waves=waves)
    if engine == "reference":
        return ReferenceEngine()
    raise ValueError(f"engine must be 'session', 'session-percycle', 'run_linear' or 'reference', got {engine!r}")

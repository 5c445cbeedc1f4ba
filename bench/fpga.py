"""``sfx bench fpga``: the FPGA sweep behind ``results/fpga.md``.

For each target (iCE40 UP5K, ECP5-25k), widths SF2/SF4/SF8/SF16 and arrays 2x2/4x4/8x8:

* the accelerator (``sfx synth``, DSP plan of the device),
* beside it the bare PE arrays of the comparison: SFx sign-magnitude PEs (``sm-array``)
  and two's complement integer PEs of the same width (``tc-array``), same wrapper, same
  flow, logic multipliers only (8x8 arrays only at the targets' widths, :data:`BIG_ARRAYS`),

then the bitstreams of the three boards (build times), and the two targets of the
project (8x8 SF4 on UP5K at >= 40 MHz; 8x8 SF8 on ECP5-25k at >= 100 MHz), with the
accelerator at ``k_max = 2048`` as well (a smaller accumulator; K = 2048 covers every
layer of SmolLM2-135M).

Runs go two at a time (2 cores). 2x2 and 4x4 run first; an 8x8 run whose LUTs,
extrapolated linearly in the PE count from the 2x2 and 4x4 runs, exceed 1.25x the device
is not run (reported as such). Results are cached by design hash under
``build/fpga/bench/`` so an interrupted or repeated bench only runs what changed.
``quick``: 2x2 SF4 and SF8 only, no boards.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from superfloat.hw.fpga.flow import TARGETS, build_root

KINDS = ("accel", "sm-array", "tc-array")
WIDTHS = (2, 4, 8, 16)
SIZES = (2, 4, 8)
SKIP_FACTOR = 1.25
BOARD_CONFIG = dict(rows=2, cols=2, a_bits=8)
TARGET_GOALS = [("ice40-up5k", 8, 4, 40.0), ("ecp5-25k", 8, 8, 100.0)]
SMALL_K_MAX = 2048
#: Accelerator variants run (2x2, 4x4, 8x8) for each target goal besides the default
#: (k_max 16384, overlapped drain): (k_max, overlap_drain).
GOAL_VARIANTS = {"ice40-up5k": [(16384, False), (SMALL_K_MAX, True), (SMALL_K_MAX, False)],
                 "ecp5-25k": [(SMALL_K_MAX, True)]}
#: 8x8 PE arrays (slow to place and route on 2 cores) only at the targets' widths; LUTs of
#: the arrays grow linearly with the PE count (2x2 -> 4x4), so 4x4 carries the comparison.
BIG_ARRAYS = {("ice40-up5k", 4), ("ecp5-25k", 8)}


def _job_dir(job: dict) -> Path:
    return (build_root() / "fpga" / "bench" / job["target"] /
            f"{job['kind']}-{job['n']}x{job['n']}-sf{job['bits']}-k{job['k_max']}"
            f"{'' if job.get('overlap', True) else '-nooverlap'}")


def _run_job(job: dict) -> dict:
    from superfloat.hw.fpga.synth import synthesize

    t0 = time.perf_counter()
    s = synthesize(target=job["target"], rows=job["n"], cols=job["n"], a_bits=job["bits"], w_bits=job["bits"],
                   out_bits=job["bits"], k_max=job["k_max"], kind=job["kind"], out_dir=_job_dir(job), cache=True,
                   overlap_drain=job.get("overlap", True))
    s["wall_s"] = round(time.perf_counter() - t0, 2)
    s["job"] = job
    return s


def _run_board(name: str) -> dict:
    from superfloat.hw.fpga.boards import build_board

    t0 = time.perf_counter()
    r = build_board(name, **BOARD_CONFIG, out_dir=build_root() / "fpga" / "bench" / "boards" / name)
    r["wall_s"] = round(time.perf_counter() - t0, 2)
    return r


def _estimate(results: dict, job: dict) -> float | None:
    """LUTs of an n x n job extrapolated from the 2x2 and 4x4 runs of the same kind/width/target."""
    pts = []
    for m in (2, 4):
        r = results.get((job["target"], job["kind"], m, job["bits"], job["k_max"], job.get("overlap", True)))
        if r and r.get("luts"):
            pts.append((m * m, r["luts"]))
    if len(pts) < 2:
        return None
    (p1, l1), (p2, l2) = pts
    per = (l2 - l1) / (p2 - p1)
    return l2 + per * (job["n"] ** 2 - p2)


def _jobs(quick: bool) -> tuple[list[dict], list[dict]]:
    from superfloat.sw import sfx

    first, second = [], []
    widths = (4, 8) if quick else WIDTHS
    sizes = (2,) if quick else SIZES
    for target in TARGETS:
        for bits in widths:
            for n in sizes:
                for kind in KINDS:
                    if n == 8 and kind != "accel" and (target, bits) not in BIG_ARRAYS:
                        continue
                    job = dict(target=target, kind=kind, n=n, bits=bits, k_max=sfx.DEFAULT_K_MAX)
                    (first if n < 8 else second).append(job)
    if not quick:
        for target, n, bits, _ in TARGET_GOALS:
            for k_max, overlap in GOAL_VARIANTS[target]:
                for m in (2, 4):
                    first.append(dict(target=target, kind="accel", n=m, bits=bits, k_max=k_max, overlap=overlap))
                second.append(dict(target=target, kind="accel", n=n, bits=bits, k_max=k_max, overlap=overlap))
    return first, second


def _key(job: dict) -> tuple:
    return (job["target"], job["kind"], job["n"], job["bits"], job["k_max"], job.get("overlap", True))


def _pool_map(fn, items, workers: int = 2):
    if not items:
        return []
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))


def run(out_dir: Path, quick: bool) -> None:
    from superfloat.bench import markdown_table, write_report

    t_start = time.perf_counter()
    first, second = _jobs(quick)
    results: dict[tuple, dict] = {}
    for r in _pool_map(_run_job, first):
        results[_key(r["job"])] = r
        print(f"  {r['target']} {r['kind']} {r['config']} k{r['k_max']}: {_brief(r)}", flush=True)
    run_second, skipped = [], []
    for job in second:
        est = _estimate(results, job)
        cap = TARGETS[job["target"]].capacity["luts"]
        if est is not None and est > SKIP_FACTOR * cap:
            skipped.append({**job, "estimate": round(est)})
        else:
            run_second.append(job)
    for r in _pool_map(_run_job, run_second):
        results[_key(r["job"])] = r
        print(f"  {r['target']} {r['kind']} {r['config']} k{r['k_max']}: {_brief(r)}", flush=True)
    for job in skipped:
        results[_key(job)] = {"job": job, "target": job["target"], "kind": job["kind"],
                              "config": f"{job['n']}x{job['n']} SF{job['bits']}", "k_max": job["k_max"],
                              "overlap_drain": job.get("overlap", True),
                              "skipped": f"not run: about {job['estimate']} LUT4 extrapolated from 2x2/4x4, "
                                         f"> {SKIP_FACTOR}x the device's {TARGETS[job['target']].capacity['luts']}"}
    boards = [] if quick else _pool_map(_run_board, ["icebreaker", "ulx3s-25f", "orangecrab-25f"])
    for b in boards:
        print(f"  board {b['board']}: {b.get('wall_s')} s, Fmax {b.get('fmax_mhz')}, {b.get('error', 'ok')}", flush=True)

    rows = sorted(results.values(), key=lambda r: (r["target"], r["job"]["bits"], r["job"]["n"], -r["job"]["k_max"],
                                                  not r["job"].get("overlap", True), KINDS.index(r["kind"])))
    sections = [("What was run", _what(quick, results, skipped, time.perf_counter() - t_start))]
    sections.append(("Targets", _targets(results)))
    for target in TARGETS:
        sections.append((f"{target}: accelerator", _accel_table(rows, target, markdown_table)))
        sections.append((f"{target}: sign-magnitude vs two's complement PE arrays",
                         _compare_table(rows, target, markdown_table)))
    png = _plot(rows, Path(out_dir))
    sections.append(("LUTs per PE against bits",
                     f"![LUT4 per PE vs bits]({png.name})\n\n"
                     "Core LUT4s of the 4x4 PE arrays divided by 16 (Yosys, after mapping; the array's "
                     "registers and broadcast included), sign-magnitude (`sm-array`, SFx) and two's "
                     "complement (`tc-array`), both targets. Points where the array does not fit the "
                     "device are still synthesized counts." if png else "(matplotlib missing: no plot)"))
    if boards:
        sections.append(("Bitstreams (sfx build-board)", _boards_table(boards, markdown_table)))
    sections.append(("How to read this", _notes()))
    data = {"results": rows, "boards": boards, "skipped": skipped, "quick": quick}
    write_report(out_dir, "fpga", "FPGA synthesis: SFx accelerator and PE arrays", sections, data,
                 command=f"sfx bench fpga{' --quick' if quick else ''}")


def _brief(r: dict) -> str:
    if "error" in r:
        return f"{r.get('step')}: {r['error'][:100]}"
    return f"LUT {r['luts']} FF {r['ffs']} DSP {r['dsps']} Fmax {r['fmax_mhz']} ({r.get('wall_s')} s{' cached' if r.get('cached') else ''})"


def _fmt_fit(r: dict) -> str:
    if r.get("skipped"):
        return "not run"
    if r.get("error"):
        return "no" if r.get("step") == "fit" else f"failed ({r.get('step')})"
    return "yes"


def _accel_table(rows, target, markdown_table) -> str:
    out = []
    for r in rows:
        if r["target"] != target or r["kind"] != "accel":
            continue
        j = r["job"]
        ov = "yes" if j.get("overlap", True) else "no"
        if r.get("skipped"):
            out.append([r["config"], j["k_max"], ov, "-", "-", "-", "-", "-", "-", "-", "-", r["skipped"], "-"])
            continue
        plan = r.get("dsp_plan") or {}
        cp = r.get("critical_path")
        cps = f"{cp['from']} -> {cp['to']} ({cp['delay_ns']} ns, {cp['logic_levels']} cells)" if cp else "-"
        out.append([r["config"], j["k_max"], ov, r.get("acc_bits"), r.get("luts"), r.get("ffs"),
                    f"{r.get('dsps')} ({plan.get('dsp_pes')} PEs{', clamp' if plan.get('clamp_impl') == 'dsp' else ''})",
                    r.get("brams"), r.get("device_logic") or "-", r.get("fmax_mhz") or "-",
                    r.get("peak_gmacs") or "-", _fmt_fit(r) + (f": {r['error'][:90]}" if r.get("error") else ""), cps])
    return markdown_table(["config", "k_max", "overlap", "A", "LUT4", "FF", "DSP", "BRAM", "logic used (with wrapper)",
                           "Fmax MHz", "peak GMAC/s", "fits", "critical path"], out)


def _compare_table(rows, target, markdown_table) -> str:
    by = {}
    for r in rows:
        if r["target"] == target and r["kind"] != "accel":
            by[(r["job"]["bits"], r["job"]["n"], r["kind"])] = r
    out = []
    for (bits, n, kind), sm in sorted(by.items()):
        if kind != "sm-array":
            continue
        tc = by.get((bits, n, "tc-array"), {})

        def cell(r, key):
            return "-" if r.get("skipped") else (r.get(key) if r.get(key) is not None else "-")

        saving = "-"
        if sm.get("luts") and tc.get("luts"):
            saving = f"{100 * (1 - sm['luts'] / tc['luts']):.1f} %"
        out.append([f"{n}x{n} SF{bits}", cell(sm, "luts"), cell(tc, "luts"), saving, cell(sm, "ffs"), cell(tc, "ffs"),
                    cell(sm, "fmax_mhz"), cell(tc, "fmax_mhz"),
                    cell(sm, "peak_gmacs"), cell(tc, "peak_gmacs"), f"{_fmt_fit(sm)} / {_fmt_fit(tc)}"])
    return markdown_table(["array", "LUT4 SM", "LUT4 2C", "SM saves", "FF SM", "FF 2C", "Fmax SM", "Fmax 2C",
                           "GMAC/s SM", "GMAC/s 2C", "fits SM / 2C"], out)


def _targets(results: dict) -> str:
    from superfloat.sw import sfx

    lines = []
    for target, n, bits, goal in TARGET_GOALS:
        for k, overlap in [(sfx.DEFAULT_K_MAX, True), *GOAL_VARIANTS[target]]:
            r = results.get((target, "accel", n, bits, k, overlap))
            if r is None:
                continue
            what = (f"{n}x{n} SF{bits} on {target} (k_max {k}{', no overlapped drain' if not overlap else ''}), "
                    f"goal >= {goal:g} MHz")
            if r.get("skipped"):
                lines.append(f"* {what}: {r['skipped']}.")
            elif r.get("error"):
                lines.append(f"* {what}: **not reached**: {r['error']} (core {r.get('luts')} LUT4, "
                             f"{r.get('ffs')} FF).")
            else:
                ok = r["fmax_mhz"] >= goal
                lines.append(f"* {what}: {'**reached**' if ok else '**missed**'}: Fmax {r['fmax_mhz']} MHz, "
                             f"{r['device_logic']} logic, {r['dsps']} DSP, peak {r['peak_gmacs']} GMAC/s.")
    if lines:
        lines += ["", *_target_notes(results)]
    return "\n".join(lines) or "(not run in quick mode)"


def _lcs_needed(error: str | None) -> int | None:
    """Logic cells nextpnr tried to place, from the flow's fit message (``ICESTORM_LC N/5280``) or
    nextpnr's own ('Failed to expand region ... of N ICESTORM_LCs')."""
    import re

    m = re.search(r"of (\d+) ICESTORM_LCs|ICESTORM_LC (\d+)/", error or "")
    return int(m.group(1) or m.group(2)) if m else None


def _target_notes(results: dict) -> list[str]:
    """Why each target is reached or not, from the runs themselves (array alone against the
    accelerator, cells needed, critical paths)."""
    from superfloat.sw import sfx

    notes = []
    for target, n, bits, goal in TARGET_GOALS:
        k = sfx.DEFAULT_K_MAX
        arr = results.get((target, "sm-array", n, bits, k, True))
        accels = [r for (t, kind, m, b, _, _), r in results.items()
                  if (t, kind, m, b) == (target, "accel", n, bits) and not r.get("skipped")]
        if not arr or not accels:
            continue
        cap = TARGETS[target].capacity["luts"]
        head = f"* {n}x{n} SF{bits} on {target}: the bare PE array (`sm-array`, logic multipliers) "
        if arr.get("fmax_mhz"):
            head += (f"places in {arr['device_logic']} logic cells at {arr['fmax_mhz']} MHz "
                     f"(critical path {_path(arr)}). ")
        else:
            head += f"does not place ({arr.get('error')}). "
        fitting = [r for r in accels if r.get("fmax_mhz")]
        if not fitting:
            needed = [x for x in (_lcs_needed(r.get("error")) for r in accels) if x]
            head += ("The accelerator around it (command and tile control, activation/weight feeds, the "
                     "overlapped-drain shadow registers, result FIFO, clamp unit) does not fit"
                     + (f": {'its variants need' if len(needed) > 1 else 'it needs'} "
                        f"{min(needed)}{'' if min(needed) == max(needed) else f'-{max(needed)}'} logic cells "
                        f"against the device's {cap}" if needed else "") +
                     ". A smaller array (the 4x4 accelerator fits) or moving the feeds and shadow registers "
                     "into block RAM would be needed.")
        else:
            best = max(fitting, key=lambda r: r["fmax_mhz"])
            pes = n * n
            head += (f"The accelerator's best variant reaches {best['fmax_mhz']} MHz with {best['dsp_pes']} of "
                     f"{pes} PEs on DSP blocks (the device has {TARGETS[target].capacity['dsps']}); critical "
                     f"path {_path(best)}.")
            if best["fmax_mhz"] < goal and arr.get("fmax_mhz") and arr["fmax_mhz"] < goal:
                head += (f" The array alone misses {goal:g} MHz as well: a {bits - 1} x {bits - 1}-bit "
                         f"magnitude product in LUTs in one cycle is one limit, so reaching the goal needs a "
                         f"pipelined logic multiplier (one more register stage in the non-DSP PEs), and "
                         f"registered fan-out of the control state where the critical path is in the control.")
        notes.append(head)
    return notes


def _path(r: dict) -> str:
    cp = r.get("critical_path") or {}
    if not cp:
        return "n/a"
    return f"{cp.get('from')} -> {cp.get('to')}, {cp.get('delay_ns')} ns, {cp.get('logic_levels')} levels"


def _boards_table(boards, markdown_table) -> str:
    out = []
    for b in boards:
        ts = b.get("tool_seconds", {})
        out.append([b["board"], b["config"], f"{b['clock_mhz']:g}", b.get("fmax_mhz") or "-", b.get("device_logic") or "-",
                    b.get("dsps"), b.get("brams"), ts.get("yosys", "-"), ts.get("nextpnr", "-"), ts.get("pack", "-"),
                    b.get("wall_s"), b.get("error", "ok")])
    return markdown_table(["board", "config", "clock MHz", "Fmax MHz", "logic used", "DSP", "BRAM", "yosys s",
                           "nextpnr s", "pack s", "total s", "status"], out)


def _plot(rows, out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    sizes = {r["job"]["n"] for r in rows if r["kind"] != "accel" and r.get("luts")}
    n = 4 if 4 in sizes else min(sizes, default=4)
    for ax, target in zip(axes, TARGETS):
        for kind, style, label in (("sm-array", "o-", "sign-magnitude (SFx)"), ("tc-array", "s--", "two's complement")):
            pts = sorted((r["job"]["bits"], r["luts"] / (n * n)) for r in rows
                         if r["target"] == target and r["kind"] == kind and r["job"]["n"] == n and r.get("luts"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"{target}: {n}x{n} PE array")
        ax.set_xlabel("bits per operand (x of SFx / intx)")
        ax.set_ylabel("LUT4 per PE")
        ax.set_xticks(list(WIDTHS))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fpga_luts_vs_bits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _source_version() -> str:
    """The commit the RTL came from: ``$SFX_SOURCE_COMMIT`` (a bench run from a snapshot), else
    ``git describe`` of the checkout (marked when hw/ has uncommitted changes)."""
    import os
    import subprocess

    env = os.environ.get("SFX_SOURCE_COMMIT")
    if env:
        return env
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hw"], cwd=repo, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" with uncommitted changes in hw/" if dirty else "")


def _what(quick, results, skipped, seconds) -> str:
    n_run = sum(1 for r in results.values() if not r.get("skipped"))
    n_cached = sum(1 for r in results.values() if r.get("cached"))
    return (f"RTL of commit {_source_version()}. "
            f"{'Quick mode: 2x2 arrays, SF4 and SF8, no boards. ' if quick else ''}"
            f"{n_run} synthesis runs ({n_cached} reused from the cache of an identical earlier run), "
            f"{len(skipped)} not run because they cannot fit (extrapolated), in {seconds / 60:.1f} min on "
            f"2 parallel workers. Every run: Yosys + nextpnr place and route at the target's reference clock "
            f"(40 MHz iCE40 UP5K, 100 MHz ECP5-25k speed 6), seed 1, the core inside the 5-pin scan wrapper "
            f"(docs/fpga.md). A design that does not fit stops after synthesis (its LUT/FF counts are Yosys').")


def _notes() -> str:
    return ("* LUT4 / FF / DSP / BRAM: the core alone (accelerator or PE array), from Yosys after mapping. "
            "`logic used`: nextpnr's packed logic cells of the whole placed design, wrapper included "
            "(ICESTORM_LC of 5280 / TRELLIS_COMB of 24288).\n"
            "* Fmax: nextpnr after routing, one seed; peak GMAC/s = PEs x Fmax / 1000 (one MAC per PE per cycle).\n"
            "* DSP column of the accelerator: blocks used (PEs with a DSP multiplier; `clamp`: the requantizer's "
            "A x 16 multiplier is on DSPs). The PE arrays use logic multipliers only.\n"
            "* SM saves = 1 - LUT4(sign-magnitude) / LUT4(two's complement), same array, same accumulator width "
            "A = sfx.accumulator_bits(x, x, k_max).\n"
            "* k_max sets the accumulator width A (SPEC section 3): 16384 (default) or 2048. overlap: the "
            "accelerator's overlapped drain (shadow registers, the default); without it the PEs are smaller and "
            "the array stalls while a tile drains (`--no-overlap-drain`).")


def main() -> None:  # pragma: no cover - manual helper
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results")
    run(out, quick="--quick" in sys.argv)


if __name__ == "__main__":  # pragma: no cover
    main()

"""``sfx bench fpga``: the FPGA measurements behind ``results/fpga.md``.

1. **Targets** (issue 13): the 8x8 SF4 accelerator on the iCE40 UP5K (logic used, Fmax at
   48 MHz, logic cells per PE of the bare array, everything but the array against the
   array), the 8x8 SF8 accelerator on the ECP5-25k (Fmax at 125 MHz), a 16x16 (256-PE) SF4
   accelerator on the ECP5-25k and the largest SF4 array there (at 100 MHz). Array and
   accelerator are measured by the same flow; "cells" are logic cells after nextpnr's
   packing of the core alone (``core_logic``: an iCE40 logic cell is a LUT4 and a
   flip-flop; on the ECP5 the LUT4s, TRELLIS_COMB).
2. **Largest configuration** per target and width (SF2, SF4, SF8): candidate shapes
   ``rows x cols`` (``rows <= cols <= 2 rows``) in order of PEs; a linear model in the
   PE count from two packed calibration runs predicts the largest that leaves 10 % of the
   logic free, packed runs (``nextpnr --pack-only``, minutes instead of tens of minutes)
   confirm it and its next larger neighbour, and the largest confirmed one is placed and
   routed for its Fmax.
3. **SFx against two's complement**: the flagship accelerators built with two's complement
   PEs of the same width (``tc-accel``) and both bare arrays.
4. **Bitstreams** (``sfx build-board``) for each board at its largest fitting SF4 and SF8
   configuration, clocked from the PLL at a frequency that meets timing (a second build at
   a lower PLL frequency when the first misses), with the UART at the fastest standard rate
   of the board's bridge; the host link's bytes/s and the cost of one SmolLM2 q_proj
   (8 tokens, K = N = 576) over it, counted from the protocol (``host.link_cost``).

Runs go two at a time (2 cores) and are cached by design hash under ``build/fpga/bench/``,
so an interrupted or repeated bench only runs what changed. ``quick``: 2x2 SF4 and SF8
accelerators only, packed, no boards.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from superfloat.hw.fpga.flow import TARGETS, build_root

WIDTHS = (2, 4, 8)
#: Clock constraint of the runs (MHz): the targets' goals.
REF_MHZ = {"ice40-up5k": 48.0, "ecp5-25k": 100.0}
#: Logic that must stay free in a "largest configuration".
FREE = 0.10
#: The issue's targets.
ICE40_GOAL = dict(target="ice40-up5k", n=8, bits=4, mhz=48.0, logic=0.90, lc_per_pe=45.0, overhead=0.35)
ECP5_SF8_GOAL = dict(target="ecp5-25k", n=8, bits=8, mhz=125.0)
ECP5_SF4_GOAL = dict(target="ecp5-25k", bits=4, pes=256, mhz=100.0, shape=(16, 16))
#: Placement seeds of the two flagship accelerators' runs. nextpnr's placement of one
#: netlist varies by 10-20 % in Fmax from seed to seed, and so does a netlist's whose only
#: change is a name (the iCE40 8x8 SF4 accelerator, seed 1: 42.74 MHz at commit d67c7df,
#: 51.8 MHz on the RTL of commit 821d9cd before its feed-stage code, which the iCE40 plan
#: does not use, was written: the same LUT4 and flip-flop counts); the
#: Targets section judges the best seed's run and lists every seed's Fmax. Everything else
#: is placed with seed 1.
TARGET_SEEDS = (1, 2, 3)
#: SmolLM2-135M q_proj: K = N = 576, here for 8 tokens.
QPROJ = dict(t=8, n=576, k=576)
BOARD_NAMES = ("icebreaker", "ulx3s-25f", "orangecrab-25f")


#: Side lengths of the candidate shapes.
SIDES = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 28, 32, 36, 40, 48, 56, 64)


def candidate_shapes(max_pes: int = 64 * 64) -> list[tuple[int, int]]:
    """Array shapes ``(rows, cols)`` from :data:`SIDES` with ``rows <= cols <= 2 * rows`` (no
    long thin arrays: a tile should hold several rows of tokens), in order of PEs (for equal
    PE counts the squarer one only)."""
    shapes = [(r, c) for r in SIDES for c in SIDES if r <= c <= 2 * r and r * c <= max_pes]
    shapes.sort(key=lambda s: (s[0] * s[1], s[1] - s[0]))
    out = []
    for sh in shapes:
        if not out or out[-1][0] * out[-1][1] != sh[0] * sh[1]:
            out.append(sh)
    return out


def predict_largest(calib: list[tuple[int, int]], capacity: int, free: float = FREE) -> int:
    """The largest PE count whose logic, on the line through the calibration points
    ``(pes, logic)``, leaves ``free`` of ``capacity``."""
    (p1, l1), (p2, l2) = sorted(calib)[:2]
    per = (l2 - l1) / max(1, p2 - p1)
    if per <= 0:
        return p2
    return max(1, int(p2 + ((1 - free) * capacity - l2) / per))


def _job_dir(job: dict) -> Path:
    tag = job.get("tag", "")
    return (build_root() / "fpga" / "bench" / job["target"] /
            f"{job['kind']}-{job['rows']}x{job['cols']}-sf{job['bits']}-{job.get('mhz', 0):g}"
            f"{'-pack' if not job.get('place', True) else ''}{'-core' if job.get('core', False) else ''}{tag}"
            f"{'' if job.get('seed', 1) == 1 else '-s%d' % job['seed']}"
            f"{'-noov' if job.get('overlap_drain') is False else ''}")


#: Smaller shapes a search tries when its largest packed shape fails to place.
STEPS_DOWN = 2

#: Seconds a run needs at least to be started under a time budget (a cached run is always reused).
MIN_START_S = 120.0


def _budget_timeouts(deadline: float | None, place_limit: float | None = None) -> dict | None:
    """Per-tool timeouts that end by ``deadline`` (``time.time()``), the place-and-route run at
    most ``place_limit`` seconds; None without either."""
    if deadline is None and place_limit is None:
        return None
    left = 1e9 if deadline is None else max(1.0, deadline - time.time())
    return {"yosys": left, "nextpnr": min(left, place_limit or left), "pack": left}


def _skipped(job: dict, why: str) -> dict:
    from superfloat.hw.fpga.synth import config_name

    b = job["bits"]
    return {"target": job["target"], "kind": job["kind"], "config": config_name(job["rows"], job["cols"], b, b, b),
            "rows": job["rows"], "cols": job["cols"], "a_bits": b, "w_bits": b, "out_bits": b,
            "error": why, "step": "budget", "fits": False, "fmax_mhz": None, "placed": job.get("place", True),
            "job": {k: v for k, v in job.items() if k != "deadline"}, "not_run": True}


def _cpu_children() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_job(job: dict) -> dict:
    """One ``synthesize`` run, cached under :func:`_job_dir`. With ``job["deadline"]`` (a
    ``time.time()``), a run that has no cached summary is not started when less than
    :data:`MIN_START_S` are left, and its tools are killed at the deadline."""
    from superfloat.hw.fpga.synth import synthesize

    deadline = job.get("deadline")
    cached = (_job_dir(job) / "summary.json").is_file()
    if deadline is not None and not cached and deadline - time.time() < MIN_START_S:
        return _skipped(job, "not run: the bench's time budget (--budget-min) was spent")
    t0, c0 = time.perf_counter(), _cpu_children()
    s = synthesize(target=job["target"], rows=job["rows"], cols=job["cols"], a_bits=job["bits"], w_bits=job["bits"],
                   out_bits=job["bits"], kind=job["kind"], freq_mhz=job.get("mhz"), out_dir=_job_dir(job),
                   cache=True, core_pack=job.get("core", False), place=job.get("place", True),
                   timeouts=_budget_timeouts(deadline, job.get("place_limit")), seed=job.get("seed", 1),
                   overlap_drain=job.get("overlap_drain"))
    s["seed"] = job.get("seed", 1)
    s["wall_s"] = round(time.perf_counter() - t0, 2)
    if not s.get("cached"):
        # CPU seconds of the tools (Yosys, nextpnr) this run started, kept with the cached summary
        s["cpu_s"] = round(_cpu_children() - c0, 1)
        s["run_wall_s"] = s["wall_s"]
        s["load_avg_1m"] = round(__import__("os").getloadavg()[0], 2)
        _update_summary(_job_dir(job) / "summary.json", {k: s[k] for k in ("cpu_s", "run_wall_s", "load_avg_1m")})
    if s.get("step") == "nextpnr" and job.get("place_limit") and "timed out" in str(s.get("error")):
        s["error"] = (f"stopped by the bench's --place-timeout-min ({job['place_limit'] / 60:g} min): "
                      + str(s["error"]))
    s["job"] = {k: v for k, v in job.items() if k != "deadline"}
    return s


def _update_summary(path: Path, extra: dict) -> None:
    import json

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    d.update(extra)
    path.write_text(json.dumps(d, indent=2) + "\n")


def _logic_used(s: dict) -> int | None:
    dl = s.get("device_logic")
    if dl:
        return int(dl.split("/")[0])
    return None


def _fits_free(s: dict, free: float = FREE) -> bool:
    used = _logic_used(s)
    cap = TARGETS[s["target"]].capacity["luts"]
    return used is not None and used <= (1 - free) * cap and not s.get("error")


class _BudgetSpent(Exception):
    """A search's check was not started for the time budget."""


def _walk(shapes: list, idx: int, check) -> int | None:
    """The index of the largest shape that ``check`` accepts, starting at the predicted ``idx``:
    if it fits, one or two larger neighbours; else steps down about 8 % of the PEs at a time."""
    best = None
    if check(idx):
        best = idx
        for nxt in range(idx + 1, min(idx + 3, len(shapes))):   # one or two larger neighbours
            if shapes[nxt][0] * shapes[nxt][1] == shapes[best][0] * shapes[best][1]:
                continue
            if check(nxt):
                best = nxt
            else:
                break
    else:
        cur = idx
        while cur > 0:   # step down about 8 % of the PEs at a time
            pes = shapes[cur][0] * shapes[cur][1]
            cur = max(i for i in range(cur) if shapes[i][0] * shapes[i][1] <= max(1, int(0.92 * pes)) or i == 0)
            if check(cur):
                best = cur
                break
    return best


def _search(target: str, bits: int, deadline: float | None = None, max_pes: int | None = None,
            seeds: tuple[int, ...] = (1,), place_limit: float | None = None) -> dict:
    """The largest shape of SF``bits`` on ``target`` leaving :data:`FREE` logic free (at most
    ``max_pes`` PEs when given: the search is then bounded, and says so). The placed run of
    that shape tries the next of ``seeds`` when place and route fails (nextpnr's analytical
    placer can stall on an ECP5 design for one seed and not for another, YosysHQ/nextpnr#1062)."""
    cap = TARGETS[target].capacity["luts"]
    calib_shapes = [(2, 2), (4, 4)] if (target, bits) == ("ice40-up5k", 8) else [(4, 4), (8, 8)]
    runs = []
    calib = []
    for r, c in calib_shapes:
        s = _run_job(dict(target=target, kind="accel", rows=r, cols=c, bits=bits, mhz=REF_MHZ[target], place=False,
                          deadline=deadline))
        runs.append(s)
        if _logic_used(s):
            calib.append((r * c, _logic_used(s)))
    shapes = candidate_shapes(max_pes if max_pes else 64 * 64)
    if any(x.get("not_run") for x in runs):
        return {"target": target, "bits": bits, "runs": runs, "not_run": True,
                "error": "not finished: the bench's time budget (--budget-min) was spent before the calibration runs"}
    if len(calib) < 2:
        return {"target": target, "bits": bits, "runs": runs, "error": "calibration runs failed"}
    want = predict_largest(calib, cap)
    idx = max(i for i, (r, c) in enumerate(shapes) if r * c <= want)
    tried: dict[int, dict] = {}

    def check(i: int) -> bool:
        r, c = shapes[i]
        s = _run_job(dict(target=target, kind="accel", rows=r, cols=c, bits=bits, mhz=REF_MHZ[target], place=False,
                          deadline=deadline))
        runs.append(s)
        tried[i] = s
        if s.get("not_run"):   # an unconfirmed shape ends the search: no smaller one stands in for it
            raise _BudgetSpent
        return _fits_free(s)

    best = None
    try:
        best = _walk(shapes, idx, check)
    except _BudgetSpent:
        return {"target": target, "bits": bits, "runs": runs, "not_run": True, "prediction_pes": want,
                "calibration": calib,
                "error": "not finished: the bench's time budget (--budget-min) was spent before the largest shape "
                         "was confirmed"}
    if best is None:
        return {"target": target, "bits": bits, "runs": runs, "error": "no shape fits"}
    def place(r: int, c: int) -> tuple[dict, str | None]:
        for seed in seeds:
            final = _run_job(dict(target=target, kind="accel", rows=r, cols=c, bits=bits, mhz=REF_MHZ[target],
                                  place=True, deadline=deadline, seed=seed, place_limit=place_limit))
            runs.append(final)
            if not final.get("error") or final.get("step") in ("fit", "budget"):
                break   # placed (or cannot fit / no time): another seed would not help
        if final.get("step") == "nextpnr" and final.get("overlap_drain"):
            # nextpnr-ecp5's placer stalls on large arrays with the shadow-register flip-flops
            # (docs/fpga.md): the same shape without them
            final = _run_job(dict(target=target, kind="accel", rows=r, cols=c, bits=bits, mhz=REF_MHZ[target],
                                  place=True, deadline=deadline, seed=seeds[0], place_limit=place_limit,
                                  overlap_drain=False))
            runs.append(final)
            return final, "no shadow registers"
        return final, None

    top = best
    final, fallback = place(*shapes[best])
    # A shape that packs but does not place (nextpnr-ice40's placer can stall on a nearly full
    # device): the next smaller shapes, at most STEPS_DOWN of them
    for _ in range(STEPS_DOWN):
        if not (final.get("step") == "nextpnr" and final.get("error")) or best == 0:
            break
        best -= 1   # candidate_shapes: one shape per PE count, in increasing order
        try:
            if not check(best):
                continue
        except _BudgetSpent:
            break
        final, fallback = place(*shapes[best])
    r, c = shapes[best]
    bounded = bool(max_pes) and top == len(shapes) - 1
    return {"target": target, "bits": bits, "rows": r, "cols": c, "prediction_pes": want, "calibration": calib,
            "final": final, "runs": runs, "max_pes": max_pes, "bounded": bounded, "fallback": fallback,
            "stepped_down_from": None if top == best else "%dx%d" % shapes[top]}


def _search_job(args) -> dict:
    return _search(*args)


def _not_run_search(target: str, bits: int, why: str) -> dict:
    return {"target": target, "bits": bits, "runs": [], "error": why, "not_run": True}


def _build_board_cached(name: str, r: int, c: int, bits: int, clock: float, deadline: float | None,
                        overlap_drain: bool | None = None) -> dict:
    """``build_board`` into the bench's folder; a report of the same board, shape and clock made
    from the same committed RTL (``git rev-parse HEAD``, no uncommitted hw/ change) is reused."""
    import json

    from superfloat.hw.fpga.boards import build_board

    noov = "-noov" if overlap_drain is False else ""
    out = build_root() / "fpga" / "bench" / "boards" / f"{name}-{r}x{c}-sf{bits}-{clock:g}{noov}"
    src = _source_version()
    key = f"{src}|{name}|{r}x{c}|sf{bits}|{clock:g}{noov}"
    cache = out / "bench_board.json"
    if "uncommitted" not in src and src != "unknown" and cache.is_file():
        try:
            old = json.loads(cache.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key and old.get("rep", {}).get("step") in (None, "fit"):
            return dict(old["rep"], cached=True)
    if deadline is not None and deadline - time.time() < MIN_START_S:
        return {"board": name, "not_run": True, "error": "not run: the bench's time budget (--budget-min) was spent"}
    t0, c0 = time.perf_counter(), _cpu_children()
    rep = build_board(name, rows=r, cols=c, a_bits=bits, clock_mhz=clock, out_dir=out, overlap_drain=overlap_drain,
                      timeout=None if deadline is None else max(1.0, deadline - time.time()))
    rep["wall_s"] = rep["run_wall_s"] = round(time.perf_counter() - t0, 2)
    rep["cpu_s"] = round(_cpu_children() - c0, 1)
    try:
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "rep": rep}, indent=2, default=str) + "\n")
    except OSError:
        pass
    return rep


def _board_job(args) -> dict:
    """Largest fitting configuration of one width on one board, at a PLL clock meeting timing."""
    from superfloat.hw.fpga.boards import BOARDS, REBUILDS, retry_clock

    name, bits, start_shape, fmax_hint, deadline, overlap = args
    b = BOARDS[name]
    shapes = [s for s in candidate_shapes() if s[0] * s[1] <= start_shape[0] * start_shape[1]]
    tries = []
    clock = b.pll_mhz if b.family == "ice40" else min(125.0, retry_clock(fmax_hint or b.pll_mhz))
    for shape in reversed(shapes[-4:] if len(shapes) >= 4 else shapes):
        r, c = shape
        rep = _build_board_cached(name, r, c, bits, clock, deadline, overlap)
        tries.append(rep)
        if rep.get("step") == "fit":
            continue
        if rep.get("error"):
            break
        fmax, rebuilds = rep.get("fmax_mhz"), 0
        while not tries[-1].get("met_timing") and fmax and rebuilds < REBUILDS and not tries[-1].get("error"):
            rebuilds += 1
            tries.append(_build_board_cached(name, r, c, bits, retry_clock(fmax, name), deadline, overlap))
            fmax = min(fmax, tries[-1].get("fmax_mhz") or fmax)
        break
    final = tries[-1] if tries else {"board": name, "error": "nothing built"}
    return {"board": name, "bits": bits, "final": final, "tries": tries}


def _pool_map(fn, items, workers: int = 2):
    if not items:
        return []
    if workers == 1:   # in this process, one run at a time
        return [fn(x) for x in items]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))


# --------------------------------------------------------------------------- run


#: The parts of the full bench, in the order they run (``--parts``).
PARTS = ("targets", "compare", "largest", "boards")


def run(out_dir: Path, quick: bool, *, parts: tuple[str, ...] = PARTS, workers: int = 2,
        budget_min: float | None = None, searches: tuple[tuple[str, int], ...] | None = None,
        max_pes: int | None = None, boards_only: tuple[str, ...] | None = None,
        seeds: tuple[int, ...] = (1,), place_timeout_min: float | None = None,
        compare_targets: tuple[str, ...] | None = None,
        command: str = "sfx bench fpga") -> None:
    """Run the bench and write ``<out_dir>/fpga.md`` / ``.json`` (and the plot).

    ``parts`` (a subset of :data:`PARTS`): ``targets`` = the issue's three targets (the 8x8 SF4
    iCE40 accelerator and its bare array, the 8x8 SF8 ECP5 accelerator, the largest SF4 ECP5
    array); ``compare`` = the two's complement designs beside them; ``largest`` = the largest
    configuration of every target and width (or only ``searches``, pairs ``(target, bits)``);
    ``boards`` = the bitstreams. ``workers``: runs at a time. ``budget_min``: no run starts
    (and every tool is stopped) after that many minutes; what did not run is listed in the
    report. ``max_pes``: the largest-configuration searches try no larger array (the report
    says when a search stopped at that bound). ``seeds``: placement seeds a search's placed run
    tries in turn when place and route fails. ``place_timeout_min``: a placed run's nextpnr is
    stopped after that many minutes (recorded as such). ``compare_targets``: the comparisons
    of these targets only. ``boards_only``: these boards of
    :data:`BOARD_NAMES` only. Every run is cached, so a second call resumes.
    """
    from superfloat.bench import write_report

    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise ValueError(f"unknown bench parts {bad}: choose from {', '.join(PARTS)}")
    bad = [t for t in compare_targets or () if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown compare targets {bad}: choose from {', '.join(TARGETS)}")
    bad = [b for b in boards_only or () if b not in BOARD_NAMES]
    if bad:
        raise ValueError(f"unknown boards {bad}: choose from {', '.join(BOARD_NAMES)}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    t_start = time.perf_counter()
    deadline = None if budget_min is None else time.time() + 60.0 * budget_min
    place_limit = None if place_timeout_min is None else 60.0 * place_timeout_min
    if quick:
        jobs = [dict(target=t, kind="accel", rows=2, cols=2, bits=b, mhz=REF_MHZ[t], place=False, deadline=deadline)
                for t in TARGETS for b in (4, 8)]
        runs = _pool_map(_run_job, jobs, workers)
        sections = [("What was run", "Quick mode: 2x2 SF4 and SF8 accelerators, packed (no placement)."),
                    ("Accelerators", _simple_table(runs))]
        write_report(out_dir, "fpga", "FPGA synthesis: SFx accelerator (quick)", sections, {"runs": runs},
                     command=command if command != "sfx bench fpga" else "sfx bench fpga --quick")
        return

    # Flagships and their comparisons (placed, core packed alone).
    ice, sf8, sf4 = ICE40_GOAL, ECP5_SF8_GOAL, ECP5_SF4_GOAL
    target_jobs = [
        *[dict(target=ice["target"], kind="accel", rows=8, cols=8, bits=4, mhz=ice["mhz"], core=True, seed=seed)
          for seed in TARGET_SEEDS],
        dict(target=ice["target"], kind="sm-array", rows=8, cols=8, bits=4, mhz=ice["mhz"], core=True),
        *[dict(target=sf8["target"], kind="accel", rows=8, cols=8, bits=8, mhz=sf8["mhz"], core=True, seed=seed)
          for seed in TARGET_SEEDS],
        # the SF4 goal's own shape, placed without shadow registers (with them this size stalls
        # nextpnr-ecp5's placer, docs/fpga.md): whether 256 PEs make the clock even where the
        # largest array that fits does not
        dict(target=sf4["target"], kind="accel", rows=sf4["shape"][0], cols=sf4["shape"][1], bits=sf4["bits"],
             mhz=sf4["mhz"], overlap_drain=False),
    ]
    compare_jobs = [
        dict(target=ice["target"], kind="tc-accel", rows=8, cols=8, bits=4, mhz=ice["mhz"], core=True),
        dict(target=ice["target"], kind="tc-array", rows=8, cols=8, bits=4, mhz=ice["mhz"], core=True),
        dict(target=sf8["target"], kind="tc-accel", rows=8, cols=8, bits=8, mhz=sf8["mhz"], core=True),
        dict(target=sf8["target"], kind="sm-array", rows=8, cols=8, bits=8, mhz=sf8["mhz"], core=True),
        dict(target=sf8["target"], kind="tc-array", rows=8, cols=8, bits=8, mhz=sf8["mhz"], core=True),
    ]
    # Cheapest first: under a time budget the iCE40 comparisons (minutes) run before the
    # searches, the ECP5 ones (tens of minutes each) after them.
    compare_jobs = [j for j in compare_jobs if j["target"] in (compare_targets or TARGETS)]
    cheap = [j for j in compare_jobs if j["target"] == "ice40-up5k"]
    dear = [j for j in compare_jobs if j["target"] != "ice40-up5k"]
    jobs = (target_jobs if "targets" in parts else []) + (cheap if "compare" in parts else [])
    flags = _pool_map(_run_job, [dict(j, deadline=deadline, place_limit=place_limit) for j in jobs], workers)
    for s in flags:
        print(f"  {s['target']} {s['kind']} {s['config']}: {_brief(s)}", flush=True)
    pairs = []
    if "largest" in parts:
        pairs = list(searches) if searches else [(t, b) for t in TARGETS for b in WIDTHS]
    goal = (ECP5_SF4_GOAL["target"], ECP5_SF4_GOAL["bits"])
    if "targets" in parts and goal not in pairs:
        pairs.append(goal)
    found = _pool_map(_search_job, [(t, b, deadline, max_pes, tuple(seeds), place_limit) for t, b in pairs],
                      workers)
    for se in found:
        print(f"  largest {se['target']} SF{se['bits']}: {se.get('rows')}x{se.get('cols')} "
              f"{_brief(se['final']) if se.get('final') else se.get('error')}", flush=True)
    skipped_searches = [] if "largest" in parts and not searches else \
        [(t, b) for t in TARGETS for b in WIDTHS if (t, b) not in pairs]
    by_tb = {(se["target"], se["bits"]): se for se in found}
    board_args = []
    if "boards" in parts:
        from superfloat.hw.fpga.boards import BOARDS

        for name in boards_only or BOARD_NAMES:
            tgt = BOARDS[name].target
            for bits in (4, 8):
                se = by_tb.get((tgt, bits), {})
                if se.get("rows"):
                    # a search that could only place its shape without shadow registers: the board
                    # (its shape plus the bridge) is built the same way, not left to stall
                    board_args.append((name, bits, (se["rows"], se["cols"]),
                                       (se.get("final") or {}).get("fmax_mhz"), deadline,
                                       False if se.get("fallback") else None))
    boards = _pool_map(_board_job, board_args, workers)
    for b in boards:
        f = b["final"]
        print(f"  board {b['board']} SF{b['bits']}: {f.get('config')} {f.get('clock_mhz')} MHz "
              f"Fmax {f.get('fmax_mhz')} {f.get('error', 'ok')}", flush=True)
    # Last (dearest): the ECP5 comparisons; SFx vs two's complement at the largest ECP5 SF4 array as well.
    big = by_tb.get(("ecp5-25k", 4), {})
    if "compare" in parts:
        later = list(dear)
        if big.get("rows") and "ecp5-25k" in (compare_targets or TARGETS):
            later.append(dict(target="ecp5-25k", kind="tc-accel", rows=big["rows"], cols=big["cols"], bits=4,
                              mhz=REF_MHZ["ecp5-25k"]))
        extra = _pool_map(_run_job, [dict(j, deadline=deadline, place_limit=place_limit) for j in later], workers)
        for s in extra:
            print(f"  {s['target']} {s['kind']} {s['config']}: {_brief(s)}", flush=True)
        flags += extra

    png = _plot(found, Path(out_dir))
    scope = dict(parts=list(parts), workers=workers, budget_min=budget_min, max_pes=max_pes,
                 boards=list(boards_only or BOARD_NAMES), seeds=list(seeds),
                 place_timeout_min=place_timeout_min, compare_targets=list(compare_targets or TARGETS),
                 searches=[list(p) for p in pairs], searches_not_run=[list(p) for p in skipped_searches])
    sections = [
        ("What was run", _what(flags, found, boards, time.perf_counter() - t_start, scope)),
        ("Targets", _targets(flags, by_tb)),
        ("Largest configuration per target and width", _largest_table(found, skipped_searches) +
         (f"\n\n![largest arrays]({png.name})" if png else "\n\n(no plot: matplotlib missing or no search ran)")),
        ("SFx against two's complement", _compare_table(flags) if "compare" in parts else
         f"Not run in this report (`--parts {','.join(parts)}`)."),
        ("Bitstreams and the host link", _boards_table(boards) if "boards" in parts else
         f"Not run in this report (`--parts {','.join(parts)}`); `sfx build-board` builds them one at a time."),
        ("How to read this", _notes()),
    ]
    data = {"flagships": flags, "searches": found, "boards": boards, "scope": scope}
    write_report(out_dir, "fpga", "FPGA: the SFx accelerator on the edge boards", sections, data, command=command)


# --------------------------------------------------------------------------- report


def _brief(r: dict) -> str:
    if r.get("error"):
        return f"{r.get('step')}: {r['error'][:100]}"
    return (f"LUT {r.get('luts')} FF {r.get('ffs')} DSP {r.get('dsps')} logic {r.get('device_logic')} "
            f"core {r.get('core_logic')} Fmax {r.get('fmax_mhz')} ({r.get('wall_s')} s{' cached' if r.get('cached') else ''})")


def _matching(flags: list, target: str, kind: str, rows: int, bits: int, cols: int | None = None) -> list[dict]:
    """The runs of ``kind`` with ``rows`` (and ``cols``, when given) SF``bits`` on ``target``."""
    return [s for s in flags if (s["target"], s["kind"], s["rows"], s["a_bits"]) == (target, kind, rows, bits)
            and cols in (None, s.get("cols"))]


def _find(flags: list, target: str, kind: str, rows: int, bits: int, cols: int | None = None) -> dict:
    return next(iter(_matching(flags, target, kind, rows, bits, cols)), {})


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _best_seed(flags: list, target: str, rows: int, bits: int) -> tuple[dict, str]:
    """The accelerator run of ``rows x rows`` SF``bits`` on ``target`` with the highest Fmax
    among its placement seeds, and (with several seeds) a note listing every seed's Fmax."""
    runs = _matching(flags, target, "accel", rows, bits)
    placed = [s for s in runs if s.get("fmax_mhz")]
    if not placed:
        return (runs[0] if runs else {}), ""
    best = max(placed, key=lambda s: s["fmax_mhz"])
    if len(runs) == 1:
        return best, ""
    each = ", ".join(f"{s.get('seed', 1)}: {s['fmax_mhz'] if s.get('fmax_mhz') else 'not placed'}" for s in runs)
    return best, f"best of placement seeds {each} MHz"


def _targets(flags: list, by_tb: dict) -> str:
    g = ICE40_GOAL
    acc, seeds = _best_seed(flags, g["target"], g["n"], g["bits"])
    arr = _find(flags, g["target"], "sm-array", g["n"], g["bits"])
    lines = []
    cap = TARGETS[g["target"]].capacity["luts"]
    pes = g["n"] * g["n"]
    if acc.get("fmax_mhz") and arr.get("core_logic") and acc.get("core_logic"):
        used = _logic_used(acc)
        per_pe = arr["core_logic"] / pes
        over = (acc["core_logic"] - arr["core_logic"]) / arr["core_logic"]
        checks = [
            (f"fits with {used}/{cap} logic cells ({_pct(used / cap)}, goal <= {_pct(g['logic'])})",
             used <= g["logic"] * cap),
            (f"Fmax {acc['fmax_mhz']} MHz (goal >= {g['mhz']:g}{'; ' + seeds if seeds else ''})",
             acc["fmax_mhz"] >= g["mhz"]),
            (f"bare array {arr['core_logic']} logic cells = {per_pe:.1f} per PE (goal <= {g['lc_per_pe']:g})",
             per_pe <= g["lc_per_pe"]),
            (f"everything but the array {acc['core_logic'] - arr['core_logic']} logic cells = {_pct(over)} of the "
             f"array's (goal <= {_pct(g['overhead'])}; accelerator core {acc['core_logic']} cells)",
             over <= g["overhead"]),
        ]
        lines.append(f"* **8x8 SF4 accelerator on ice40-up5k** (k_max {acc['k_max']}, {acc['arch_plan']['reason']}):")
        lines += [f"  * {txt}: **{'met' if ok else 'missed'}**" for txt, ok in checks]
        lines.append(f"  * critical path{' (seed %d)' % acc.get('seed', 1) if seeds else ''}: {_path(acc)}; "
                     f"peak {acc.get('peak_gmacs')} GMAC/s")
        lines.append(f"  * CPU s / wall s of the runs: accelerator {_cpu(acc)}, array {_cpu(arr)}")
    else:
        lines.append(f"* 8x8 SF4 accelerator on ice40-up5k: **not measured**: {acc.get('error') or arr.get('error')}")
    g = ECP5_SF8_GOAL
    acc, seeds = _best_seed(flags, g["target"], g["n"], g["bits"])
    if acc.get("fmax_mhz"):
        lines.append(_fmax_line("8x8 SF8 accelerator on ecp5-25k", "Fmax", acc, g["mhz"],
                                (f"{seeds}; " if seeds else "") + f"{acc['device_logic']} logic, {acc['dsps']} DSP "
                                f"({acc['dsp_plan']['dsp_pes']} PEs), "))
    else:
        lines.append(f"* 8x8 SF8 accelerator on ecp5-25k: **not measured**: {acc.get('error')}")
    g = ECP5_SF4_GOAL
    se = by_tb.get((g["target"], g["bits"]), {})
    fin = se.get("final") or {}
    shp = _find(flags, g["target"], "accel", g["shape"][0], g["bits"], g["shape"][1])
    if shp.get("fmax_mhz"):
        lines.append(_fmax_line(f"SF4 array of {g['pes']} PEs on ecp5-25k", f"{shp['rows']}x{shp['cols']} at", shp,
                                g["mhz"], "placed with no shadow registers (the array waits while a tile drains); "
                                f"{shp['device_logic']} logic, "))
    elif shp:
        lines.append(f"* SF4 array of {g['pes']} PEs on ecp5-25k: **not measured**: {shp.get('error')}")
    if fin.get("fmax_mhz"):
        pes = se["rows"] * se["cols"]
        ok = pes >= g["pes"] and fin["fmax_mhz"] >= g["mhz"]
        lines.append(f"* **largest SF4 array on ecp5-25k**: {se['rows']}x{se['cols']} ({pes} PEs, goal >= "
                     f"{g['pes']}) at {fin['fmax_mhz']} MHz (goal >= {g['mhz']:g}): **{'met' if ok else 'missed'}**; "
                     f"{fin['device_logic']} logic, peak {fin['peak_gmacs']} GMAC/s; critical path {_path(fin)}; "
                     f"CPU s / wall s {_cpu(fin)}"
                     + (f" (search bounded at {se['max_pes']} PEs: larger arrays were not tried, so the largest "
                        f"that fits may be larger)" if se.get("bounded") else "")
                     + (f"; placed with {se['fallback']}: with the plan's shadow registers place and route failed "
                        f"({_first_failure(se)})" if se.get("fallback") else "")
                     + (f"; {se['stepped_down_from']} packs but did not place" if se.get("stepped_down_from") else ""))
    else:
        lines.append(f"* largest SF4 array on ecp5-25k: **not measured**: {se.get('error') or fin.get('error')}")
    return "\n".join(lines)


def _fmax_line(title: str, lead: str, r: dict, mhz: float, notes: str) -> str:
    """A target's line: ``lead`` Fmax against ``mhz``, its verdict, then ``notes`` and the run's figures."""
    ok = r["fmax_mhz"] >= mhz
    return (f"* **{title}**: {lead} {r['fmax_mhz']} MHz (goal >= {mhz:g}): **{'met' if ok else 'missed'}**; {notes}"
            f"peak {r['peak_gmacs']} GMAC/s; critical path {_path(r)}; CPU s / wall s {_cpu(r)}")


def _first_failure(se: dict) -> str:
    for x in se.get("runs", []):
        if x.get("placed") and x.get("step") == "nextpnr":
            return f"seed {x.get('seed', 1)}: {str(x.get('error'))[:120]}"
    return "-"


def _path(r: dict) -> str:
    cp = r.get("critical_path") or {}
    if not cp:
        return "n/a"
    return f"{cp.get('from')} -> {cp.get('to')} ({cp.get('delay_ns')} ns, {cp.get('logic_levels')} cells)"


def _largest_table(searches: list, not_run: list | tuple = ()) -> str:
    from superfloat.bench import markdown_table

    rows = []
    for se in sorted(searches, key=lambda s: (s["target"], s["bits"])):
        f = se.get("final") or {}
        if not se.get("rows"):
            rows.append([se["target"], f"SF{se['bits']}", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         se.get("error")])
            continue
        ap = f.get("arch_plan") or {}
        note = f"{'overlap' if ap.get('overlap_drain') else 'no overlap'}, chunk {ap.get('chunk_k')}"
        if se.get("bounded"):
            note += f"; search bounded at {se['max_pes']} PEs (larger not tried)"
        if se.get("stepped_down_from"):
            note += f"; {se['stepped_down_from']} packs but did not place (see the failed placement): a smaller shape"
        if se.get("fallback"):
            note += (f"; placed with {se['fallback']} (the packed fit check used the plan's organisation; "
                     f"placement with it failed, see the runs)")
        failed = [x for x in se.get("runs", []) if x.get("placed") and x.get("step") == "nextpnr"]
        if f.get("seed", 1) != 1:
            note += f"; placed with seed {f.get('seed', 1)}"
        note += "".join(f"; failed placement (seed {x.get('seed', 1)}, "
                        f"{'shadow registers' if x.get('overlap_drain') else 'no shadow registers'}): "
                        f"{str(x.get('error'))[:120]}" for x in failed if x is not f)
        if f.get("error"):
            note += f"; {f['error']}"
        rows.append([se["target"], f"SF{se['bits']}", f"{se['rows']}x{se['cols']}", se["rows"] * se["cols"],
                     *["-" if f.get(k) is None else f[k] for k in ("device_logic", "fmax_mhz", "luts", "ffs",
                                                                      "dsps", "brams", "peak_gmacs")],
                     _cpu(f), note])
    for t, b in not_run:
        rows.append([t, f"SF{b}", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "not run in this report"])
    return markdown_table(["target", "width", "rows x cols", "PEs", "logic used", "Fmax MHz", "LUT4 (core)",
                           "FF (core)", "DSP", "BRAM", "peak GMAC/s", "P&R CPU s / wall s", "array / note"], rows)


def _cpu(r: dict) -> str:
    """CPU and wall seconds of the run that produced ``r`` (also when reused from the cache)."""
    if r.get("cpu_s") is None:
        return "-"
    return f"{r['cpu_s']:.0f} / {r.get('run_wall_s', r.get('wall_s', 0)):.0f}"


def _compare_table(flags: list) -> str:
    from superfloat.bench import markdown_table

    out = []
    pairs = sorted({(s["target"], s["rows"], s["cols"], s["a_bits"], "array" if "array" in s["kind"] else "accel")
                    for s in flags})
    for target, r, c, bits, what in pairs:
        sm = next((s for s in flags if (s["target"], s["rows"], s["cols"], s["a_bits"]) == (target, r, c, bits)
                   and s["kind"] == ("accel" if what == "accel" else "sm-array")), {})
        tc = next((s for s in flags if (s["target"], s["rows"], s["cols"], s["a_bits"]) == (target, r, c, bits)
                   and s["kind"] == ("tc-accel" if what == "accel" else "tc-array")), {})
        if not sm or not tc:
            continue

        def cell(s, k):
            v = s.get(k)
            return "-" if v is None else v

        saves = "-"
        key = "core_logic" if sm.get("core_logic") and tc.get("core_logic") else "luts"
        if sm.get(key) and tc.get(key):
            saves = _pct(1 - sm[key] / tc[key])
        elif sm.get("not_run") or tc.get("not_run"):
            saves = "not run (time budget)"
        elif sm.get("error") or tc.get("error"):
            saves = f"failed: {(sm.get('error') or tc.get('error'))[:80]}"
        out.append([target, f"{r}x{c} SF{bits} {'accelerator' if what == 'accel' else 'array'}",
                    cell(sm, "core_logic"), cell(tc, "core_logic"), cell(sm, "luts"), cell(tc, "luts"), saves,
                    cell(sm, "ffs"), cell(tc, "ffs"), cell(sm, "fmax_mhz"), cell(tc, "fmax_mhz"),
                    cell(sm, "peak_gmacs"), cell(tc, "peak_gmacs")])
    return markdown_table(["target", "design", "cells SFx", "cells 2C", "LUT4 SFx", "LUT4 2C", "SFx saves",
                           "FF SFx", "FF 2C", "Fmax SFx", "Fmax 2C", "GMAC/s SFx", "GMAC/s 2C"], out)


def _boards_table(boards: list) -> str:
    from superfloat.bench import markdown_table
    from superfloat.hw.fpga.host import link_cost

    rows, link_rows = [], []
    for b in boards:
        f = b["final"]
        ts = f.get("tool_seconds", {})
        status = f.get("error") or ("timing met" if f.get("met_timing") else "timing MISSED")
        cfg = f.get("config")
        if cfg and f.get("overlap_drain") is False and (f.get("arch_plan") or {}).get("target", "").startswith("ecp5"):
            cfg += " (no shadow registers)"
        rows.append([b["board"], cfg, f.get("oscillator_mhz"), f.get("clock_mhz"), f.get("fmax_mhz"),
                     f.get("device_logic"), f.get("dsps"), f.get("brams"), f.get("baud"), f.get("bridge"),
                     len(b["tries"]), sum(t.get("wall_s", 0) for t in b["tries"]), status])
        if f.get("baud") and not f.get("error"):
            lc = link_cost(QPROJ["t"], QPROJ["n"], QPROJ["k"], rows=f["rows"], cols=f["cols"], a_bits=f["a_bits"],
                           k_max=f["k_max"], baud=f["baud"])
            compute_s = (QPROJ["t"] * QPROJ["n"] * QPROJ["k"]) / (f["rows"] * f["cols"] * f["clock_mhz"] * 1e6)
            b["qproj"] = lc
            link_rows.append([b["board"], f.get("config"), f["baud"], f"{lc['line_bytes_per_s']:.0f}",
                              lc["bytes_to_board"], lc["bytes_from_board"], f"{lc['seconds']:.3f}",
                              f"{compute_s * 1e3:.3f}", f"{lc['macs_per_s'] / 1e6:.2f}"])
    t1 = markdown_table(["board", "config", "oscillator MHz", "PLL clock MHz", "Fmax MHz", "logic used", "DSP", "BRAM",
                         "UART baud", "USB bridge", "builds", "build s", "status"], rows)
    t2 = markdown_table(["board", "config", "baud", "line bytes/s each way", "bytes to board", "bytes from board",
                         "q_proj over the link s", "q_proj compute ms (peak)", "effective MMAC/s"], link_rows)
    return (t1 + "\n\nOne SmolLM2-135M q_proj (8 tokens, K = N = 576) over the UART link "
            "(`superfloat.hw.fpga.host.link_cost`: every frame of the protocol counted, 8N1 at the baud rate, "
            "both directions at once; compute time at the PLL clock and one MAC per PE per cycle):\n\n" + t2)


def _simple_table(runs: list) -> str:
    from superfloat.bench import markdown_table

    return markdown_table(["target", "config", "LUT4", "FF", "DSP", "BRAM", "logic (packed)"],
                          [[r["target"], r["config"], r.get("luts"), r.get("ffs"), r.get("dsps"), r.get("brams"),
                            r.get("device_logic")] for r in runs])


def _plot(searches: list, out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(se.get("rows") for se in searches):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for target, marker in zip(TARGETS, ("o", "s")):
        pts = sorted((se["bits"], se["rows"] * se["cols"], (se.get("final") or {}).get("peak_gmacs") or 0)
                     for se in searches if se["target"] == target and se.get("rows"))
        if not pts:
            continue
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker + "-", label=target)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker + "-", label=target)
    axes[0].set_ylabel("PEs of the largest array (10 % logic free)")
    axes[1].set_ylabel("peak GMAC/s (PEs x Fmax)")
    for ax in axes:
        ax.set_xlabel("SFx width (activations = weights = outputs)")
        ax.set_xticks(list(WIDTHS))
        ax.set_yscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fpga_largest.png"
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
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hw"], cwd=repo, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" with uncommitted changes in hw/" if dirty else "")


def _what(flags, searches, boards, seconds, scope: dict | None = None) -> str:
    runs = list(flags) + [r for se in searches for r in se.get("runs", [])]
    n_cached = sum(1 for r in runs if r.get("cached"))
    n_pack = sum(1 for r in runs if r.get("placed") is False)
    n_skip = sum(1 for r in runs if r.get("not_run"))
    n_boards = sum(len(b["tries"]) for b in boards)
    cpu = sum(r.get("cpu_s") or 0 for r in runs)
    text = (f"RTL of commit {_source_version()}. {len(runs)} synthesis runs ({n_pack} packed only, "
            f"{n_cached} reused from the cache of an identical earlier run, {n_skip} not started for the time "
            f"budget) and {n_boards} board builds, in {seconds / 60:.1f} min of this call; the runs' tools took "
            f"{cpu / 60:.1f} CPU-minutes when they ran (cached ones included). Every run: Yosys + nextpnr (seed "
            f"1; the two flagship accelerators of the Targets also with seeds "
            f"{', '.join(str(x) for x in TARGET_SEEDS[1:])}, judged on the best; a largest-array run placed with "
            f"another seed says so in its table row) with the core inside "
            f"the 5-pin scan wrapper (docs/fpga.md), clock constraint "
            f"{REF_MHZ['ice40-up5k']:g} MHz on the iCE40 UP5K, {REF_MHZ['ecp5-25k']:g} MHz on the ECP5-25k "
            f"(speed 6; {ECP5_SF8_GOAL['mhz']:g} MHz for the 8x8 SF8 flagship); k_max {16384} (SPEC's A), the "
            f"array organisation of each target's plan (`hw/fpga/budget.py`, `plan_architecture`).")
    if scope and (list(scope.get("parts", PARTS)) != list(PARTS) or scope.get("budget_min") or scope.get("max_pes")
                  or scope.get("searches_not_run") or scope.get("place_timeout_min")
                  or list(scope.get("compare_targets", TARGETS)) != list(TARGETS)
                  or list(scope.get("seeds", [1])) != [1]
                  or ("boards" in scope.get("parts", PARTS)
                      and list(scope.get("boards", BOARD_NAMES)) != list(BOARD_NAMES))):
        missing = [x for x in PARTS if x not in scope.get("parts", PARTS)]
        text += ("\n\n**Partial run.** Parts run: " + ", ".join(scope.get("parts", PARTS)) +
                 (f"; not run: {', '.join(missing)}" if missing else "") +
                 (f"; largest-configuration searches run: "
                  f"{', '.join(f'{t} SF{b}' for t, b in scope.get('searches', []))}" if scope.get("searches") else "") +
                 (f"; searches not run: {', '.join(f'{t} SF{b}' for t, b in scope['searches_not_run'])}"
                  if scope.get("searches_not_run") else "") +
                 (f"; searches bounded at {scope['max_pes']} PEs" if scope.get("max_pes") else "") +
                 (f"; boards: {', '.join(scope['boards'])}" if "boards" in scope.get("parts", PARTS)
                  and scope.get("boards") and list(scope["boards"]) != list(BOARD_NAMES) else "") +
                 (f"; time budget {scope['budget_min']:g} min" if scope.get("budget_min") else "") +
                 (f"; comparisons on {', '.join(scope['compare_targets'])} only"
                  if "compare" in scope.get("parts", PARTS)
                  and list(scope.get("compare_targets", TARGETS)) != list(TARGETS) else "") +
                 (f"; placed runs stopped after {scope['place_timeout_min']:g} min"
                  if scope.get("place_timeout_min") else "") +
                 (f"; placement seeds of the searches: {', '.join(map(str, scope['seeds']))}"
                  if list(scope.get("seeds", [1])) != [1] else "") +
                 f"; {scope.get('workers')} run(s) at a time.")
    return text


def _notes() -> str:
    return ("* LUT4 / FF / DSP / BRAM: the core alone (accelerator or PE array), from Yosys after mapping. "
            "`logic used`: nextpnr's packed logic of the whole design, scan wrapper included (ICESTORM_LC of "
            "5280 / TRELLIS_COMB of 24288). `cells`: the core alone packed by nextpnr (`--pack-only`): the "
            "cost of the core on the device without the wrapper.\n"
            "* Fmax: nextpnr after routing, one seed (the two flagship accelerators of the Targets: the best of "
            "seeds 1-3); peak GMAC/s = PEs x Fmax / 1000 (one MAC per PE per "
            "cycle). \"Largest\" shapes are checked packed (fit without placement), then placed and routed.\n"
            "* The iCE40 array has no shadow registers (the array waits while a tile drains: about "
            "rows x cols cycles per tile of K steps); the ECP5 plan's array drains while it accumulates (a row "
            "marked 'no overlap' does not). Both "
            "accumulate chunks of at most 512 products in the PEs (partial sums in block RAM).\n"
            "* SFx saves = 1 - cells(SFx) / cells(two's complement), same accelerator or array, same widths, "
            "same accumulator width, nothing else changed (`pe_kind`).\n"
            "* Bitstreams: `sfx build-board`; the PLL clock is the frequency built for (the calculators' "
            "nearest to the request), `Fmax` what nextpnr achieved; an ECP5 board is first built at 95 % of "
            "its search's Fmax (at most 125 MHz), an iCE40 board at its default PLL clock, and a build that "
            "misses is rebuilt, up to twice, at the highest clock under 95 % of its Fmax that makes the fastest "
            "standard UART rate of the board's bridge (`hw.fpga.boards.retry_clock`).")


def main(argv: list[str] | None = None) -> None:
    """``python -m superfloat.bench.fpga [OUT] [--parts ...] [--workers N] [--budget-min M] ...``: the bench
    with its scope limited (``sfx bench fpga`` runs all of it, two runs at a time)."""
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m superfloat.bench.fpga", description=main.__doc__)
    ap.add_argument("out", nargs="?", default="results", help="output folder (default: results)")
    ap.add_argument("--quick", action="store_true", help="2x2 accelerators, packed only")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start no run after this many minutes; stop the tools then (cached runs are reused)")
    ap.add_argument("--searches", default=None,
                    help="largest-configuration searches to run, e.g. ecp5-25k:4,ice40-up5k:4 (default: all)")
    ap.add_argument("--max-pes", type=int, default=None, help="largest-configuration searches try no larger array")
    ap.add_argument("--seeds", default="1",
                    help="placement seeds a search's placed run tries in turn when place and route fails (default 1)")
    ap.add_argument("--place-timeout-min", type=float, default=None,
                    help="stop a placed run's nextpnr after this many minutes (recorded as such in the report)")
    ap.add_argument("--compare-targets", default=None,
                    help=f"comparisons of these targets only ({','.join(TARGETS)}; default: both)")
    ap.add_argument("--boards", default=None, help=f"comma-separated subset of {','.join(BOARD_NAMES)} (default: all)")
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    parts = tuple(x for x in args.parts.split(",") if x)
    searches = None
    if args.searches:
        searches = []
        for item in args.searches.split(","):
            t, _, b = item.partition(":")
            if t not in TARGETS or not b.isdigit() or int(b) not in WIDTHS:
                ap.error(f"--searches: {item!r} is not TARGET:BITS with TARGET in {', '.join(TARGETS)} "
                         f"and BITS in {', '.join(map(str, WIDTHS))}")
            searches.append((t, int(b)))
        searches = tuple(searches)
    command = "python -m superfloat.bench.fpga " + " ".join(shlex.quote(a) for a in raw) if raw else "sfx bench fpga"
    run(Path(args.out), quick=args.quick, parts=parts, workers=args.workers, budget_min=args.budget_min,
        searches=searches, max_pes=args.max_pes,
        boards_only=tuple(args.boards.split(",")) if args.boards else None,
        seeds=tuple(int(x) for x in args.seeds.split(",")), place_timeout_min=args.place_timeout_min,
        compare_targets=tuple(args.compare_targets.split(",")) if args.compare_targets else None,
        command=command.strip())


if __name__ == "__main__":  # pragma: no cover
    main()

"""``sfx bench NAME``: run the benchmarks of :mod:`superfloat.bench` (``make bench`` runs ``all``)."""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from superfloat.bench import BENCHES

__all__ = ["register", "cmd_bench"]


def cmd_bench(args) -> int:
    names = list(BENCHES) if args.which == "all" else [args.which]
    failed = []
    for name in names:
        modname, func = BENCHES[name].split(":")
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name and modname.startswith(e.name):
                print(f"[bench {name}] not available in this version ({modname} missing); skipped")
                continue
            raise
        print(f"[bench {name}] running ...", flush=True)
        t0 = time.perf_counter()
        try:
            getattr(mod, func)(Path(args.out), quick=args.quick)
        except Exception as e:  # noqa: BLE001 - one failing bench must not hide the others
            failed.append(name)
            print(f"[bench {name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            if args.which != "all":
                raise
            continue
        print(f"[bench {name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks and write results/ (make bench)")
    p.add_argument("which", nargs="?", default="all", choices=["all", *BENCHES])
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    p.set_defaults(func=cmd_bench)

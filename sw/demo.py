"""``sfx demo``: the main job on the embedded defaults (grows as the project does)."""
from __future__ import annotations

import time

import numpy as np


def cmd_demo(args) -> int:
    from . import sfx

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    print("Superfloat demo: SFx reference model")
    w = rng.standard_normal((64, 256)).astype(np.float32) * 0.05
    x = rng.standard_normal((16, 256)).astype(np.float32) * 3.0
    ew = sfx.choose_exponent(w, 8, axis=0, keepdims=True)
    ex = sfx.choose_exponent(x, 8, axis=0, keepdims=True)
    wc = sfx.encode(w, 8, ew)
    xc = sfx.encode(x, 8, ex)
    y_float = x.astype(np.float64) @ w.astype(np.float64).T
    eo = sfx.choose_exponent(y_float, 8)
    codes, stats = sfx.linear_with_stats(xc, wc, a_bits=8, w_bits=8, out_bits=8,
                                         shift=ew[:, 0].astype(np.int64) - eo, x_exponent=ex[:, 0])
    y = sfx.decode(codes, 8, eo)
    err = np.abs(y - y_float)
    print(f"  SF8 x SF8 -> SF8 linear [16x256] @ [256x64]: max |err| {err.max():.4f}, "
          f"mean |err| {err.mean():.5f} (output step {2.0 ** (eo - 7):.4f}), saturated {stats.n_saturated}")
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded defaults")
    p.set_defaults(func=cmd_demo)

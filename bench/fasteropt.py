"""``sfx bench fasteropt``: fasteropt's speed-up over opt where it applies (writes ``results/fasteropt.md``).

``fasteropt`` caches the output of the frozen prefix (every transformer block before the
first trained one), so it only helps when that first trained block is deep. In the main
bench (``sfx bench wasq``) the ranking put a trained layer in block 0, so there was
nothing to cache. This bench picks layer selections whose first trained block is deep
and runs ``opt`` and ``fasteropt`` on each, back to back, on the same data:

1. the top ``top_k`` layers of :func:`analyze`'s ranking among the blocks of the model's
   second half (blocks ``>= n/2``);
2. the attention output projection (``o_proj``) of every block of the last third;
3. every linear layer of the last block.

For each it reports the first trained block, the number of layers trained, the wall and
CPU seconds of each method (whole call: quantization, prefix cache and training; best of
``repeats`` runs, in alternating order), the measured speed-up ``opt / fasteropt``, the
speed-up predicted by the formula of docs/wasq-methods.md (time goes from ``E`` to
``p + E (1 - p)`` steps' worth, with ``p = first_block / n_blocks``, and with ``p``
measured as the cache build time over the time of one opt epoch), and whether the final
weights and the loss curves are identical.
"""
from __future__ import annotations

import copy
import gc
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from superfloat.bench import QATBudgets, logger

__all__ = ["run", "Budgets", "selections", "predicted_speedup", "state_dict_diff"]

MODEL = "smollm2-135m"
QUICK_MODEL = "tiny-llama"
DATA = "shakespeare"


@dataclass(frozen=True)
class Budgets(QATBudgets):
    calib_tokens: int = 4096  # 8 blocks of 512 x 3 epochs = 24 steps: about 1.5 min per opt run on an idle core
    warmup: int = 1
    top_k: int = 4  # layers of the ranking in the "top" selection
    repeats: int = 2  # runs per method, alternating
    threads: int = 1

    @classmethod
    def quick(cls) -> "Budgets":
        return cls(calib_tokens=512, context=64, epochs=2, analysis_tokens=256, top_k=2, repeats=2)


_log = logger("fasteropt")


def predicted_speedup(p: float, epochs: int) -> float:
    """``E / (p + E (1 - p))``: the speed-up of docs/wasq-methods.md for a prefix that costs
    a fraction ``p`` of an epoch of opt and ``E`` epochs."""
    p = min(max(p, 0.0), 1.0)
    return epochs / (p + epochs * (1.0 - p))


def _is_attn_out(name: str) -> bool:
    kind = name.rsplit(".", 1)[-1]
    return kind in ("o_proj", "out_proj") or name.endswith("attn.c_proj")


def selections(analysis, n_blocks: int, top_k: int) -> list[dict[str, Any]]:
    """The layer selections of the bench: ``[{key, label, layers}]`` (layers in model order)."""
    from superfloat.sw.wasq.analyze import block_index

    names = [s.layer for s in analysis.layers]  # model order
    half = n_blocks // 2
    top = [s.layer for s in analysis.ranked() if block_index(s.layer) >= half][:top_k]
    third = n_blocks - max(1, n_blocks // 3)
    attn = [n for n in names if block_index(n) >= third and _is_attn_out(n)]
    last = [n for n in names if block_index(n) == n_blocks - 1]
    out = [
        {"key": "top", "label": f"top {top_k} of the ranking in blocks >= {half}",
         "layers": [n for n in names if n in top]},
        {"key": "attn-out", "label": f"attention output projection of blocks {third}..{n_blocks - 1}",
         "layers": attn},
        {"key": "last-block", "label": f"every linear layer of block {n_blocks - 1}", "layers": last},
    ]
    for s in out:
        if not s["layers"]:
            raise ValueError(f"bench fasteropt: selection {s['label']!r} is empty for this model")
        s["first_block"] = min(block_index(n) for n in s["layers"])
    return out


def state_dict_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """``(max |a - b| over every tensor, bit-identical)`` of two state dicts (``inf, False``
    when their keys differ)."""
    if a.keys() != b.keys():
        return math.inf, False
    same = all(torch.equal(a[k], b[k]) for k in a)
    diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)
    return diff, same


def run(out_dir: Path | str, quick: bool = False, *, model: str | None = None,
        budgets: Budgets | None = None) -> dict[str, Any]:
    """Run the bench and write ``<out_dir>/fasteropt.md`` and ``fasteropt.json``.

    ``quick`` uses a tiny random model (``tiny-llama``) and tiny budgets (a smoke test:
    its timings mean nothing). ``model`` and ``budgets`` override either."""
    from superfloat.sw.wasq.analyze import analyze
    from superfloat.sw.wasq.data import pad_id
    from superfloat.sw.wasq.config import WASQConfig
    from superfloat.sw.wasq.data import load_text, tokenize
    from superfloat.sw.wasq.methods import decoder_blocks, fasteropt, opt
    from superfloat.sw.wasq.models import load_model
    from superfloat.sw.wasq.train import make_blocks

    out_dir = Path(out_dir)
    b = budgets or (Budgets.quick() if quick else Budgets())
    model = model or (QUICK_MODEL if quick else MODEL)
    threads_before = torch.get_num_threads()
    threads = int(os.environ.get("SUPERFLOAT_BENCH_THREADS") or b.threads)
    torch.set_num_threads(threads)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    try:
        lm = load_model(model, progress=False)
        tok = lm.tokenizer
        pad = pad_id(tok)
        float_model = lm.model
        train_text = load_text(DATA, "train")
        blocks = make_blocks(tokenize(tok, train_text, b.calib_tokens), b.context, pad)
        ablocks = make_blocks(tokenize(tok, train_text, b.analysis_tokens), b.context, pad)
        _, blist = decoder_blocks(float_model)
        n_blocks = len(blist)
        cfg = WASQConfig(weight_bits=4)
        tcfg = b.train_config()
        _log(f"{model}: {n_blocks} blocks; calibration {blocks.n_tokens} tokens ({len(blocks)} blocks of "
             f"{b.context}) x {b.epochs} epochs; torch threads {threads}")

        t0 = time.perf_counter()
        an = analyze(float_model, ablocks, cfg, progress=False)
        t_an = time.perf_counter() - t0
        sels = selections(an, n_blocks, b.top_k)
        _log(f"analysis: {len(an)} layers in {t_an:.1f} s")

        rows = []
        for sel in sels:
            _log(f"{sel['label']}: {len(sel['layers'])} layers, first trained block {sel['first_block']}")
            ref: dict[str, Any] = {}  # the first run (always opt): weights and losses
            runs, comps = [], []
            for rep in range(b.repeats):
                order = (("opt", opt), ("fasteropt", fasteropt))
                for name, fn in (order if rep % 2 == 0 else order[::-1]):
                    m = copy.deepcopy(float_model)
                    gc.collect()
                    w0, c0 = time.perf_counter(), time.process_time()
                    res = fn(m, blocks, cfg, tcfg, layers=sel["layers"])
                    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                    r = {"method": name, "repeat": rep, "wall_seconds": wall, "cpu_seconds": cpu,
                         "train_seconds": res.train.seconds, "steps": res.train.steps,
                         "cache_seconds": res.extra.get("cache_seconds"),
                         "first_trained_block": res.extra.get("first_trained_block"),
                         "first_loss": res.train.first_loss, "last_loss": res.train.last_loss}
                    runs.append(r)
                    _log(f"  {name} (repeat {rep}): {wall:.1f} s wall, {cpu:.1f} s CPU, "
                         f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
                    sd = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
                    if not ref:
                        ref = {"sd": sd, "losses": list(res.train.losses)}
                    else:
                        diff, same = state_dict_diff(ref["sd"], sd)
                        comps.append({"method": name, "max_abs_weight_diff": diff, "identical": same,
                                      "loss_curves_identical": list(res.train.losses) == ref["losses"]})
                    del m, res, sd
            fo_c = [c for c in comps if c["method"] == "fasteropt"]
            op_c = [c for c in comps if c["method"] == "opt"]

            def best(method: str, key: str) -> float:
                return min(r[key] for r in runs if r["method"] == method)

            o_wall, f_wall = best("opt", "wall_seconds"), best("fasteropt", "wall_seconds")
            o_cpu, f_cpu = best("opt", "cpu_seconds"), best("fasteropt", "cpu_seconds")
            first = sel["first_block"]
            cache_s = min(r["cache_seconds"] for r in runs if r["method"] == "fasteropt")
            epoch_s = best("opt", "train_seconds") / b.epochs
            p_measured = cache_s / epoch_s if epoch_s > 0 else float("nan")
            row = {**sel, "n_layers": len(sel["layers"]), "n_blocks": n_blocks, "runs": runs,
                   "opt_wall_seconds": o_wall, "fasteropt_wall_seconds": f_wall,
                   "opt_cpu_seconds": o_cpu, "fasteropt_cpu_seconds": f_cpu,
                   "speedup_wall": o_wall / f_wall, "speedup_cpu": o_cpu / f_cpu,
                   "p_naive": first / n_blocks, "predicted_speedup_naive": predicted_speedup(first / n_blocks, b.epochs),
                   "cache_seconds": cache_s, "p_measured": p_measured,
                   "predicted_speedup_measured_p": predicted_speedup(p_measured, b.epochs),
                   "max_abs_weight_diff": max((c["max_abs_weight_diff"] for c in fo_c), default=float("nan")),
                   "identical": bool(fo_c) and all(c["identical"] for c in fo_c),
                   "loss_curves_identical": bool(fo_c) and all(c["loss_curves_identical"] for c in fo_c),
                   "opt_repeats_identical": all(c["identical"] and c["loss_curves_identical"] for c in op_c)}
            rows.append(row)
            _log(f"  speed-up {row['speedup_wall']:.2f}x wall, {row['speedup_cpu']:.2f}x CPU (predicted "
                 f"{row['predicted_speedup_naive']:.2f}x with p = first/n, {row['predicted_speedup_measured_p']:.2f}x "
                 f"with p measured); weights {'identical' if row['identical'] else 'DIFFER'}")
            del ref
            gc.collect()
        data = {"budgets": asdict(b), "model": model, "data": DATA, "n_blocks": n_blocks,
                "calib_tokens": blocks.n_tokens, "calib_blocks": len(blocks), "torch_threads": threads,
                "analysis": {"seconds": t_an, "tokens": an.tokens, "layers": len(an),
                             "top": [s.row() for s in an.ranked()[:8]]},
                "selections": rows, "load_average_at_start": load,
                "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "total_seconds": time.perf_counter() - t_start,
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick}
    finally:
        torch.set_num_threads(threads_before)
    _render(out_dir, data, b)
    return data


def _render(out_dir: Path, d: dict[str, Any], b: Budgets) -> None:
    from superfloat.bench import markdown_table, write_report

    quick = bool(d.get("quick"))
    ft = b.finetune_command(d["model"], DATA)
    la = d["load_average_at_start"]
    setup = "\n".join([
        f"* Model: `{d['model']}` ({d['n_blocks']} transformer blocks), SF4 weight-only (per channel, float scales).",
        f"* Calibration: the first {d['calib_tokens']} tokens of the Shakespeare training plays, {d['calib_blocks']} "
        f"blocks of {b.context}, {b.epochs} epochs, AdamW lr {b.lr:g}, {b.warmup} warm-up step(s), cosine, batch 1 "
        f"(the `sfx finetune` loop).",
        f"* Layer ranking (selection 1): `analyze` on the first {d['analysis']['tokens']} training tokens "
        f"({d['analysis']['seconds']:.0f} s, not counted in the times below); every method gets its layers as an "
        f"explicit list (`layers=`, CLI `--layers`).",
        f"* Times: the whole `opt(...)` / `fasteropt(...)` call (quantization, prefix cache, training), best of "
        f"{b.repeats} runs per method, run in alternating order (opt, fasteropt, fasteropt, opt, ...) on one model "
        f"copy each. torch threads {d['torch_threads']}, so CPU time (`time.process_time`) is about the wall time "
        f"on an idle core and is less disturbed by other load. Load average at start "
        f"{', '.join(f'{x:.1f}' for x in la) if la else 'n/a'}, at end "
        f"{', '.join(f'{x:.1f}' for x in d['load_average_at_end']) if d.get('load_average_at_end') else 'n/a'}. "
        f"Measured {d.get('measured_at', '?')}; whole bench {d['total_seconds'] / 60:.1f} min.",
    ])
    rows = []
    for r in d["selections"]:
        rows.append([r["label"], r["n_layers"], f"{r['first_block']} / {r['n_blocks']}",
                     f"{r['opt_wall_seconds']:.1f}", f"{r['fasteropt_wall_seconds']:.1f}",
                     f"**{r['speedup_wall']:.2f}x**", f"{r['speedup_cpu']:.2f}x",
                     f"{r['predicted_speedup_naive']:.2f}x", f"{r['predicted_speedup_measured_p']:.2f}x "
                                                             f"(p = {r['p_measured']:.2f})",
                     "identical" if r["identical"] else f"max diff {r['max_abs_weight_diff']:.3g}",
                     "identical" if r["loss_curves_identical"] else "different"])
    table = markdown_table(["layers trained", "layers", "first trained block / blocks", "opt wall s", "fasteropt wall s",
                            "speed-up (wall)", "speed-up (CPU)", "predicted, p = first/n",
                            "predicted, p measured", "final weights", "loss curves"], rows)
    notes = "\n".join([
        f"* Predicted speed-up: `E / (p + E (1 - p))` with `E = {b.epochs}` epochs (docs/wasq-methods.md: the "
        f"time goes from `E` to `p + E (1 - p)` epochs' worth, the prefix running once instead of `E` times). "
        f"`p = first/n` takes the prefix's share of the *forward* blocks; it overstates `p`, because a training "
        f"step also runs the LM head and the backward pass, which the prefix does not have. \"p measured\" is "
        f"the time of fasteropt's cache build (one no-grad pass of the prefix over the calibration blocks) over "
        f"the training time of one opt epoch.",
        "* Final weights: every fasteropt run against the first opt run, whole `state_dict` (max |diff| over "
        "every tensor); loss curves: the per-step losses compared exactly. "
        + ("Repeated opt runs were identical too." if all(r["opt_repeats_identical"] for r in d["selections"])
           else "Repeated opt runs were NOT identical to each other."),
        "* Why a separate bench: the main bench (`sfx bench wasq`, results/wasq.md) trains the top 25 % of the "
        "ranking, which there includes a layer of block 0, so fasteropt has no prefix to cache in it.",
    ])
    cmds = []
    for r in d["selections"]:
        cmds.append(f"* {r['label']} (first trained block {r['first_block']}): `{ft} --method fasteropt --layers "
                    f"{' '.join(r['layers'])} -o runs/fopt-{r['key']}` (and `--method opt`)")
    runs = []
    for r in d["selections"]:
        for x in r["runs"]:
            runs.append([r["key"], x["method"], x["repeat"], f"{x['wall_seconds']:.1f}", f"{x['cpu_seconds']:.1f}",
                         f"{x['train_seconds']:.1f}",
                         f"{x['cache_seconds']:.1f}" if x.get("cache_seconds") is not None else "-",
                         f"{x['first_loss']:.4f} -> {x['last_loss']:.4f}"])
    sections = [("Setup", setup), ("fasteropt against opt", table + "\n\n" + notes),
                ("Every run", markdown_table(["selection", "method", "repeat", "wall s", "CPU s", "training s",
                                              "cache s", "train loss"], runs)),
                ("Commands (one run each)", "\n".join(cmds))]
    cmd = "sfx bench fasteropt" + (" --quick" if quick else "")
    write_report(out_dir, "fasteropt", f"fasteropt against opt on {d['model']}: speed-up with a deep first trained "
                 "block" + (" (quick smoke run on a tiny random model: timings mean nothing)" if quick else ""),
                 sections, d, cmd)

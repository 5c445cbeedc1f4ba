"""``sfx bench qat``: SF4 weights after QAT, accelerator-exact (writes ``results/qat.md`` + ``qat.json``).

SmolLM2-135M (its "float" weights are the GGUF's dequantized Q4_1, groups of 32: every number
is relative to an already 4-bit model), held-out Shakespeare test plays, the first 8192 tokens,
context 512, disjoint windows. Every row is evaluated by one
``sfx eval ... --backend both --json`` (command printed beside it): fake
quantization and then accelerator-exact (SPEC section 8: activation codes streamed per token,
exact integer LINEAR, the 16-bit per-lane multiplier, requantization to SF16 outputs with the
static output exponents stored in the checkpoint) on the same tokens, with the float model on
the same windows for the top-1 agreement (the float perplexity of the table comes from one
``sfx eval`` of the float model, the first row).

Rows:

* post-training baselines (no training): round to nearest, AdaRound, GPTQ (``sfx eval -w 4
  --method M``, calibrated on 2048 training tokens);
* the old QAT recipe of ``results/wasq.md`` (fpm from round to nearest, 8192 tokens x 3
  epochs, lr 1e-4, fake quantization while training);
* the recipe found for issue 15 (:data:`RECIPE`), trained with fake quantization and on the
  accelerator's arithmetic (``--backend accelerator``: the hardware's values in the forward,
  the fake-quantized layer's gradients), and with SF8 activations (W4A8);
* QAT on the accelerator's arithmetic from the best post-training recipe of ``sfx bench w4``
  (:data:`ROT_RECIPE`: rotations, GPTQ with MSE clipping, then fpm at a small learning rate).

``SFX_BENCH_QAT_ROWS="ptq-rtn,rot-accel"`` runs some rows only (their keys, :data:`ROWS`); the
report lists the others as not run.

Each QAT row is one ``sfx finetune ... -o build/qat/<row>`` (command printed beside it; its
wall and CPU seconds and the load average at its start are in ``finetune.json``), then the
``sfx eval`` of ``build/qat/<row>/model``. A finished run whose ``finetune.json`` records the
same settings is reused (an interrupted one resumes from its training state), and finished
evaluations are kept in ``build/qat_partial.json``: rerunning the bench measures only what is
missing, and the table says which rows were reused.

Target (issue 15): SF4 weights after QAT within +10 % of float, accelerator-exact.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from superfloat.bench import Partial, logger, sfx_json

__all__ = ["run", "ROWS", "QUICK_ROWS", "TARGET", "RECIPE", "Row"]

MODEL = "smollm2-135m"
TARGET = 10.0  # largest perplexity increase over float (%), accelerator-exact, SF4 weights after QAT

#: the recipe found (docs/wasq-methods.md, "QAT on the accelerator's arithmetic"): sfx finetune arguments
RECIPE = ["--method", "fpm", "--init", "adaround", "--tokens", "16384", "--epochs", "2", "--lr", "2e-4",
          "--warmup", "4", "--scheduler", "cosine"]
OLD = ["--method", "fpm", "--tokens", "8192", "--epochs", "3", "--lr", "1e-4", "--warmup", "4"]
#: QAT from the best W4 post-training recipe (results/w4.md): rotations + GPTQ + clipping, then fpm
ROT_RECIPE = ["--method", "fpm", "--init", "rotate-gptq-clip", "--init-option", "gptq_damp=0.05",
              "--calib-tokens", "4096", "--tokens", "16384", "--epochs", "1", "--lr", "1e-4", "--warmup", "4",
              "--scheduler", "cosine"]
#: a subset of :data:`ROWS` by key, comma-separated
ROWS_ENV = "SFX_BENCH_QAT_ROWS"


@dataclass(frozen=True)
class Row:
    """One row: ``finetune`` is None for a post-training row (then ``quant`` are its ``sfx eval``
    quantization arguments), else the ``sfx finetune`` arguments after the common ones."""

    key: str
    label: str
    act_bits: int | None
    quant: tuple[str, ...] = ()
    finetune: tuple[str, ...] | None = None
    qat: bool = True  # judged against the QAT target


ROWS: list[Row] = [
    Row("ptq-rtn", "PTQ: round to nearest", None, ("-w", "4"), qat=False),
    Row("ptq-adaround", "PTQ: AdaRound", None, ("-w", "4", "--method", "adaround"), qat=False),
    Row("ptq-gptq", "PTQ: GPTQ", None, ("-w", "4", "--method", "gptq"), qat=False),
    Row("old-fpm", "QAT, old recipe (fpm from RTN, 8192 tokens x 3, lr 1e-4, fake)", None,
        finetune=("-w", "4", *OLD)),
    Row("recipe-fake", "QAT, recipe, fake quantization while training", None,
        finetune=("-w", "4", *RECIPE, "--backend", "fake")),
    Row("recipe-accel", "QAT, recipe, on the accelerator's arithmetic", None,
        finetune=("-w", "4", *RECIPE, "--backend", "accelerator")),
    Row("rot-accel", "QAT from rotate-gptq-clip (damp 0.05, 4096 calib), on the accelerator's arithmetic", None,
        finetune=("-w", "4", *ROT_RECIPE, "--backend", "accelerator")),
]


def pick_rows(spec: str | None) -> list[Row]:
    """The rows of :data:`ROWS` named in ``spec`` (:data:`ROWS_ENV`'s syntax; None or empty: all)."""
    if not spec or not spec.strip():
        return list(ROWS)
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    known = {r.key for r in ROWS}
    bad = [k for k in keys if k not in known]
    if bad:
        raise ValueError(f"{ROWS_ENV}={spec!r}: unknown row key(s) {', '.join(bad)}; the rows are "
                         f"{', '.join(r.key for r in ROWS)}")
    return [r for r in ROWS if r.key in keys]
QUICK_RECIPE = ("--method", "fpm", "--init", "adaround", "--init-option", "adaround_iters=5", "--tokens", "128",
                "--epochs", "1", "--lr", "3e-3", "--warmup", "1")
QUICK_ROWS: list[Row] = [
    Row("ptq-rtn", "PTQ: round to nearest", None, ("-w", "4"), qat=False),
    Row("old-fpm", "QAT, fpm from RTN, fake", None,
        finetune=("-w", "4", "--method", "fpm", "--tokens", "128", "--epochs", "1", "--lr", "3e-3", "--warmup", "1")),
    Row("recipe-accel", "QAT, AdaRound init, on the accelerator's arithmetic", None,
        finetune=("-w", "4", *QUICK_RECIPE, "--backend", "accelerator")),
    Row("recipe-accel-a8", "QAT W4A8, AdaRound init, on the accelerator's arithmetic", 8,
        finetune=("-w", "4", "-a", "8", *QUICK_RECIPE, "--backend", "accelerator")),
]
#: settings that do not change what a finetune run computes
_NEUTRAL = {"output", "json", "no_progress", "overwrite", "resume", "command"}


_log = logger("qat")


def _settings(args: list[str]) -> dict[str, Any]:
    """The parsed ``sfx finetune`` settings of ``args`` (JSON-comparable)."""
    from superfloat.cli import build_parser

    ns = build_parser().parse_args(["finetune", *args, "-o", "-"])
    return {k: v for k, v in json.loads(json.dumps(vars(ns), default=str)).items()
            if k not in _NEUTRAL and k != "func"}


def _finetune(args: list[str], run_dir: Path) -> tuple[dict[str, Any], bool]:
    """``sfx finetune ARGS -o run_dir`` unless ``run_dir`` holds a finished run with the same
    settings (reused: True); an interrupted run with the same settings resumes."""
    fj = run_dir / "finetune.json"
    want = _settings(args)
    if fj.is_file() and (run_dir / "model").is_dir():
        prev = json.loads(fj.read_text())
        have = {k: v for k, v in json.loads(json.dumps(prev.get("args", {}), default=str)).items()
                if k not in _NEUTRAL}
        if have == want:
            return prev, True
    flag = "--resume" if (run_dir / "train_state").is_dir() and not fj.is_file() else "--overwrite"
    try:
        return sfx_json("finetune", [*args, "-o", str(run_dir), flag]), False
    except RuntimeError:
        if flag != "--resume":
            raise
        _log(f"  cannot resume {run_dir}: starting afresh")
        return sfx_json("finetune", [*args, "-o", str(run_dir), "--overwrite"]), False


def _pct(p: float, ref: float) -> float:
    return 100.0 * (p / ref - 1.0)


def _fmt(p: float, ref: float) -> str:
    return f"{p:.2f} ({_pct(p, ref):+.1f} %)"


def _cmd(args: list[str]) -> str:
    return "`sfx " + " ".join(shlex.quote(a) for a in args) + "`"


def _plot(rows: list[dict[str, Any]], fpv: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [_pct(r["fake"]["perplexity"], fpv) for r in rows], height=0.4,
            label="fake quantization")
    ax.barh([i - 0.2 for i in y], [_pct(r["perplexity"], fpv) for r in rows], height=0.4, label="accelerator-exact")
    ax.set_yticks(list(y), [r["key"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(TARGET, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("perplexity vs float (%)")
    ax.legend(loc="lower right", fontsize=8)
    for r in rows:
        losses = (r.get("train") or {}).get("losses")
        if losses:
            ax2.plot(range(1, len(losses) + 1), losses, label=r["key"])
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("training loss (nats/token)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path | str, quick: bool = False, *, model: str | None = None, rows: list[Row] | None = None,
        runs_dir: Path | str | None = None, partial: Path | str | None = None) -> dict[str, Any]:
    from superfloat.bench import markdown_table, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model or ("tiny-llama" if quick else MODEL)
    spec = None if quick or rows is not None else os.environ.get(ROWS_ENV)
    rows_def = rows if rows is not None else (QUICK_ROWS if quick else pick_rows(spec))
    runs = Path(runs_dir) if runs_dir is not None else (out_dir / "qat-runs" if quick else Path("build") / "qat")
    partial = partial if partial is not None else (None if quick else Path("build") / "qat_partial.json")
    ctx = ["--context", "64"] if quick else ["--context", "512"]
    base = ["--data", "shakespeare", "--split", "test", *ctx, "--max-tokens", "128" if quick else "8192"]
    train_base = ["--model", model, "--data", "shakespeare", "--split", "train", *ctx]
    if quick:
        train_base += ["--calib-tokens", "128"]
    part = Partial(partial, base, _log)  # finished evaluations, kept as they finish
    done, keep = part.rows, part.keep
    t_start, c_start = time.perf_counter(), time.process_time()
    fargs = ["eval", "--model", model, *base]
    if " ".join(fargs) not in done:
        _log("float model ...")
        t0, c0 = time.perf_counter(), time.process_time()
        r = sfx_json(fargs[0], fargs[1:])
        r.update(args=fargs, wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
        keep(" ".join(fargs), r)
    fpv = done[" ".join(fargs)]["perplexity"]
    out_rows: list[dict[str, Any]] = []
    for row in rows_def:
        ft = None
        reused = False
        if row.finetune is not None:
            targs = [*train_base, *row.finetune]
            run_dir = runs / row.key
            _log(f"{row.label}: finetune ...")
            ft, reused = _finetune(targs, run_dir)
            eargs = ["eval", "--model", str(run_dir / "model"), *base, "--float-model", model]
            ft_cmd = ["finetune", *targs, "-o", str(run_dir)]
        else:
            eargs = ["eval", "--model", model, *base, *row.quant]
            if quick and "--method" in row.quant:
                eargs += ["--calib-tokens", "128", "--adaround-iters", "5"]
            ft_cmd = None
        eargs += ["--backend", "both"]
        # the eval of a QAT row depends on its run: keyed by the run's settings too
        key = " ".join(eargs) + ("" if ft is None else " <- " + json.dumps(ft.get("args"), sort_keys=True, default=str))
        if key not in done or (ft is not None and not reused):
            _log(f"{row.label}: eval ...")
            t0, c0 = time.perf_counter(), time.process_time()
            r = sfx_json(eargs[0], eargs[1:])
            r.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
            keep(key, r)
        r = dict(done[key], key=row.key, label=row.label, act_bits=row.act_bits, qat=row.qat, eval_args=eargs,
                 finetune_args=ft_cmd, reused=reused)
        if ft is not None:
            r["train"] = {k: ft.get(k) for k in ("total_seconds", "cpu_seconds", "load_avg_start", "torch_threads",
                                                  "backend", "output_calibration", "calibration_tokens")}
            r["train"].update({k: (ft.get("train") or {}).get(k) for k in ("steps", "tokens", "tokens_per_s",
                                                                            "first_loss", "last_loss", "losses")})
        r["delta_pct"] = _pct(r["perplexity"], fpv)
        r["fake_delta_pct"] = _pct(r["fake"]["perplexity"], fpv)
        r["met"] = r["delta_pct"] <= TARGET if row.qat else None
        out_rows.append(r)
        _log(f"  accelerator {r['perplexity']:.3f} ({r['delta_pct']:+.1f} %), fake {r['fake']['perplexity']:.3f} "
             f"(float {fpv:.3f})")

    table = []
    for r in out_rows:
        tr = r.get("train")
        t = "-" if tr is None else (f"{tr['total_seconds']:.0f} / {tr['cpu_seconds']:.0f} s, {tr['steps']} steps "
                                    f"({tr['tokens_per_s']:.1f} tok/s), backend {tr['backend']}")
        if r["reused"]:
            t += " (reused run)"
        table.append([r["label"], "W4A16" if r["act_bits"] is None else f"W4A{r['act_bits']}",
                      f"**{_fmt(r['perplexity'], fpv)}**", _fmt(r["fake"]["perplexity"], fpv),
                      f"{100 * r['top1_agreement']:.1f} %", f"{r['saturated']} / {r['outputs']}", t,
                      f"{r['wall_s']:.0f} / {r['cpu_s']:.0f} s",
                      "-" if r["met"] is None else ("yes" if r["met"] else "no")])
    cmds = []
    for r in out_rows:
        line = f"* **{r['label']}**: "
        if r["finetune_args"]:
            line += _cmd(r["finetune_args"]) + ", then "
        cmds.append(line + _cmd(r["eval_args"]))
    qat_rows = [r for r in out_rows if r["qat"] and r["act_bits"] is None]
    best = min(qat_rows, key=lambda r: r["perplexity"]) if qat_rows else None
    fl = done[" ".join(fargs)]
    target = ("no W4A16 QAT row" if best is None else
              f"best W4A16 QAT row **{best['label']}**: accelerator-exact {_fmt(best['perplexity'], fpv)} "
              f"(fake {_fmt(best['fake']['perplexity'], fpv)}): **{'met' if best['met'] else 'missed'}**")
    ctl = next((r for r in out_rows if r["key"] == "recipe-fake"), None)
    acc = next((r for r in out_rows if r["key"] == "recipe-accel"), None)
    cmp = ""
    if ctl is not None and acc is not None:
        cmp = (f"\n\nSame recipe, training backend fake vs accelerator: accelerator-exact {ctl['perplexity']:.3f} vs "
               f"{acc['perplexity']:.3f} ({_pct(acc['perplexity'], ctl['perplexity']):+.2f} %); training time "
               f"{ctl['train']['total_seconds']:.0f} s vs {acc['train']['total_seconds']:.0f} s wall "
               f"({acc['train']['total_seconds'] / ctl['train']['total_seconds']:.2f}x).")
    setup = (f"* Model `{model}`" + ("" if quick else ": **its 'float' weights are the GGUF's dequantized Q4_1 "
                                     "(groups of 32), so every number is relative to an already 4-bit model**") + ".\n"
             f"* Evaluation: held-out Shakespeare test plays, the first {base[base.index('--max-tokens') + 1]} "
             f"tokens, context {ctx[1]}, disjoint windows; float perplexity **{fpv:.3f}** "
             f"({_cmd(fl['args'])}). Each row: fake-quantized, then accelerator-exact (SPEC section 8, SF16 outputs "
             f"with the static output exponents of the checkpoint), on the same tokens; top-1 agreement with the "
             f"float model.\n"
             f"* QAT rows train on the Shakespeare training plays (never the test plays), weights SF4 with float "
             f"per-channel scales (folded into the per-lane multiplier), every parameter trained (fpm); output "
             f"exponents calibrated on the first {'128' if quick else '2048'} training tokens; the post-training "
             f"initialisation (`--init`) runs on the same tokens. Fine-tuning on Shakespeare also adapts the model to "
             f"Shakespeare: compare with the plain float fine-tuning control of results/wasq.md as well as with the "
             f"float model.\n"
             f"* Run time: training (`sfx finetune`: wall / CPU seconds of the whole command, from its finetune.json) "
             f"and evaluation (wall / CPU seconds of `sfx eval`, both backends). The machine is shared (2 cores, "
             f"other agents): wall above CPU means others were running; the load average at each run's start is in "
             f"`qat.json`. Whole bench this time: {time.perf_counter() - t_start:.0f} s wall, "
             f"{time.process_time() - c_start:.0f} s CPU (reused runs and evaluations not counted).")
    header = ["row", "format", "accelerator-exact", "fake-quantized", "top-1 vs float", "saturated / outputs",
              "training (wall / CPU)", "eval (wall / CPU)", f"<= +{TARGET:g} %"]
    if spec and len(rows_def) < len(ROWS):
        left = ", ".join(r.key for r in ROWS if r not in rows_def)
        setup += f"\n* Rows run: {len(rows_def)} of {len(ROWS)} ({ROWS_ENV}={spec}); not run: {left}."
    sections = [("Setup", setup),
                ("Result", f"Target (issue 15): SF4 weights after QAT within +{TARGET:g} % of float, "
                           f"accelerator-exact: {target}.{cmp}"),
                ("Perplexity", markdown_table(header, table) + "\n\n![QAT](qat.png)"),
                ("Commands", "\n".join(cmds))]
    data = {"model": model, "float_perplexity": fpv, "target_pct": TARGET, "rows": out_rows, "base": base,
            "recipe": list(QUICK_RECIPE if quick else RECIPE),
            "best": None if best is None else {"key": best["key"], "perplexity": best["perplexity"],
                                               "delta_pct": best["delta_pct"], "met": best["met"]}}
    _plot(out_rows, fpv, out_dir / "qat.png")
    write_report(out_dir, "qat", f"QAT of SF4 weights on {model}, accelerator-exact", sections, data,
                 (f"{ROWS_ENV}={spec} " if spec else "") + "sfx bench qat" + (" --quick" if quick else ""))
    return data

"""``sfx sweep`` (and part 4 of ``sfx bench wasq``): upstream's "scaling law" ``P = f(n, c, shots, x)``,
measured. An experiment on top of the library, so it lives with the benches.

Upstream states that the perplexity ``P`` after quantization is a function of the model
size ``n``, the maximum context length ``c`` of the calibration text, the number of
quantization fine-tuning shots and the SFx width ``x``, but never measured it. This
module measures it on models that are cheap here:

* for every model ``n`` (``--model``, e.g. the tiny GPT-2/OPT/Llama of different sizes,
  or ``smollm2-135m`` with small budgets), every context ``c``, every width ``x`` and
  every number of shots ``s``: ``s = 0`` is vanilla round-to-nearest, ``s >= 1`` is
  :func:`~superfloat.sw.wasq.methods.fpm` for ``s`` epochs over the first
  ``calib_tokens`` tokens of the training split, cut into blocks of ``c``;
* perplexity on the first ``eval_tokens`` tokens of the validation split with windows of
  ``c`` (the :mod:`~superfloat.sw.wasq.evaluate` protocol), the float model at the same
  ``c`` always beside it (``float_perplexity``, ``delta_pct``).

The tiny models are randomly initialised: ``pretrain_steps`` first trains each float
model on the training split so that quantizing it means something (its perplexity is
then the float baseline). Fine-tuning on the calibration text also adapts the model to
the corpus, which helps the float model as much; the float baseline is *not* fine-tuned,
so read ``delta_pct < 0`` as "QAT also adapted the model to the domain".
"""
from __future__ import annotations

import copy
import csv
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SweepSpec", "run_sweep", "write_sweep", "COLUMNS"]

COLUMNS = ("model", "params", "context", "bits", "shots", "method", "perplexity", "float_perplexity", "delta_pct",
           "train_seconds", "calib_tokens", "eval_tokens")


@dataclass(frozen=True)
class SweepSpec:
    models: tuple[str, ...] = ("tiny-llama",)
    bits: tuple[int, ...] = (4, 6, 8)
    contexts: tuple[int, ...] = (64, 256)
    shots: tuple[int, ...] = (0, 1, 3)
    data: str = "shakespeare"
    calib_tokens: int = 4096
    eval_tokens: int = 4096
    lr: float = 1e-4
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-3
    pretrain_context: int = 256
    scale_kind: str = "float"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from superfloat.sw import sfx

        if not self.models:
            raise ValueError("sweep: give at least one model")
        for b in self.bits:
            if isinstance(b, bool) or not isinstance(b, int) or not sfx.MIN_BITS <= b <= sfx.MAX_BITS:
                raise ValueError(f"sweep: bits must be in {sfx.MIN_BITS}..{sfx.MAX_BITS}, got {b!r}")
        for c in self.contexts:
            if isinstance(c, bool) or not isinstance(c, int) or c < 2:
                raise ValueError(f"sweep: context must be an int >= 2, got {c!r}")
        for s in self.shots:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"sweep: shots must be ints >= 0, got {s!r}")
        if not self.bits or not self.contexts or not self.shots:
            raise ValueError("sweep: bits, contexts and shots must not be empty")
        for name in ("calib_tokens", "eval_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"sweep: {name} must be >= 2, got {getattr(self, name)}")
        if max(self.contexts) > self.eval_tokens:
            raise ValueError(f"sweep: eval_tokens ({self.eval_tokens}) must be at least the largest context "
                             f"({max(self.contexts)})")


def _log(spec: SweepSpec, msg: str) -> None:
    if spec.progress:
        print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def run_sweep(spec: SweepSpec) -> list[dict[str, Any]]:
    """Measure every point of ``spec``; returns one row (dict with :data:`COLUMNS`) per point,
    float rows included (``method="float"``, ``bits=None``)."""
    from superfloat.sw.wasq.config import WASQConfig
    from superfloat.sw.wasq.data import load_text, pad_id, tokenize
    from superfloat.sw.wasq.evaluate import perplexity
    from superfloat.sw.wasq.methods import fpm, vanilla
    from superfloat.sw.wasq.models import load_model
    from superfloat.sw.wasq.train import TrainConfig, make_blocks, train

    rows: list[dict[str, Any]] = []
    for spec_name in spec.models:
        lm = load_model(spec_name, progress=spec.progress)
        tok = lm.tokenizer
        pad = pad_id(tok)
        n_params = sum(p.numel() for p in lm.model.parameters())
        train_text = load_text(spec.data, "train")
        if spec.pretrain_steps:
            pre_ids = tokenize(tok, train_text, spec.pretrain_steps * spec.pretrain_context * 4 + 1)
            # the pretraining text lies after the calibration text, so QAT never sees it twice
            pre_blocks = make_blocks(pre_ids[spec.calib_tokens:] if pre_ids.numel() > spec.calib_tokens * 2
                                     else pre_ids, spec.pretrain_context, pad)
            t0 = time.perf_counter()
            train(lm.model, pre_blocks, TrainConfig(epochs=10**6, max_steps=spec.pretrain_steps, batch_size=4,
                                                    lr=spec.pretrain_lr, warmup_steps=min(20, spec.pretrain_steps),
                                                    scheduler="cosine", seed=spec.seed, progress=spec.progress),
                  desc=f"pretrain {spec_name}")
            _log(spec, f"{spec_name}: pretrained {spec.pretrain_steps} steps in {time.perf_counter() - t0:.1f} s")
        base = lm.model
        calib_ids = tokenize(tok, train_text, spec.calib_tokens)
        eval_ids = tokenize(tok, load_text(spec.data, "validation"), spec.eval_tokens)
        for c in spec.contexts:
            fp = perplexity(base, eval_ids, context=c, pad_token_id=pad, progress=False).perplexity
            _log(spec, f"{spec_name} context {c}: float perplexity {fp:.4f}")
            common = {"model": spec_name, "params": n_params, "context": c, "float_perplexity": fp,
                      "calib_tokens": int(calib_ids.numel()), "eval_tokens": int(eval_ids.numel())}
            rows.append({**common, "bits": None, "shots": 0, "method": "float", "perplexity": fp, "delta_pct": 0.0,
                         "train_seconds": 0.0})
            blocks = make_blocks(calib_ids, c, pad)
            for x in spec.bits:
                config = WASQConfig(weight_bits=x, scale_kind=spec.scale_kind)
                for s in spec.shots:
                    model = copy.deepcopy(base)
                    if s == 0:
                        res = vanilla(model, config)
                        secs = 0.0
                    else:
                        res = fpm(model, blocks, config, TrainConfig(epochs=s, lr=spec.lr, seed=spec.seed,
                                                                     progress=False))
                        secs = res.train.seconds if res.train else 0.0
                    p = perplexity(res.model, eval_ids, context=c, pad_token_id=pad, progress=False).perplexity
                    rows.append({**common, "bits": x, "shots": s, "method": "vanilla" if s == 0 else "fpm",
                                 "perplexity": p, "delta_pct": 100.0 * (p / fp - 1.0), "train_seconds": secs})
                    _log(spec, f"{spec_name} c={c} SF{x} shots={s}: {p:.4f} ({100 * (p / fp - 1):+.2f} %)")
                    del model, res
        del base, lm
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["model", "params", "context c", "bits x", "shots", "method", "perplexity", "float (same c)", "delta %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in (
            r["model"], f"{r['params'] / 1e6:.2f} M", r["context"], "float" if r["bits"] is None else f"SF{r['bits']}",
            r["shots"], r["method"], r["perplexity"], r["float_perplexity"],
            None if r["bits"] is None else r["delta_pct"])) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["context"]) for r in rows}, key=lambda k: (k[0], k[1]))
    n = len(keys)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, (m, c) in zip(axes.flat, keys):
        sub = [r for r in rows if r["model"] == m and r["context"] == c]
        fl = [r for r in sub if r["bits"] is None]
        for s in sorted({r["shots"] for r in sub if r["bits"] is not None}):
            pts = sorted((r["bits"], r["perplexity"]) for r in sub if r["bits"] is not None and r["shots"] == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{s} shots" if s else "vanilla")
        if fl:
            ax.axhline(fl[0]["perplexity"], color="k", ls="--", lw=1, label="float")
        ax.set_yscale("log")
        ax.set_xlabel("SFx weight bits x")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{m}, c={c}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_sweep(rows: list[dict[str, Any]], out_dir: str | Path, spec: SweepSpec | None = None) -> list[Path]:
    """``sweep.md`` (table), ``sweep.csv`` (:data:`COLUMNS`) and ``sweep.png`` in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "sweep.md"
    body = markdown(rows)
    if spec is not None:
        body = (f"Sweep of {', '.join(spec.models)} on {spec.data}: calibration = first {spec.calib_tokens} tokens of "
                f"the train split per shot, evaluation = first {spec.eval_tokens} tokens of the validation split, "
                f"windows of c tokens; QAT lr {spec.lr}, {spec.scale_kind} per-channel scales"
                + (f"; tiny models pretrained {spec.pretrain_steps} steps first" if spec.pretrain_steps else "")
                + ".\n\n" + body)
    md.write_text(body + "\n")
    cpath = out / "sweep.csv"
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    png = out / "sweep.png"
    plot(rows, png, "perplexity vs SFx bits, shots and context (float dashed)")
    js = out / "sweep.json"
    js.write_text(json.dumps({"spec": asdict(spec) if spec else None, "rows": rows}, indent=2) + "\n")
    return [md, cpath, png, js]

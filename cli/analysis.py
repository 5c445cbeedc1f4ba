"""The report of ``sfx analyze``: ``layers.csv`` (one row per layer of an
:class:`~superfloat.sw.wasq.analyze.Analysis`, model order) and ``layers.png``, written and read
back (``sfx finetune --analysis DIR``). The analysis itself is :mod:`superfloat.sw.wasq.analyze`."""
from __future__ import annotations

import csv
from pathlib import Path

from superfloat.sw.wasq.analyze import Analysis, LayerStats

__all__ = ["CSV_COLUMNS", "write_analysis", "read_analysis"]

CSV_COLUMNS = ("rank", "layer", "block", "kind", "in_features", "out_features", "float_mean_abs", "quant_mean_abs",
               "deviation", "rel_error", "cluster", "critical")


def write_analysis(analysis: Analysis, out_dir: str | Path, *, title: str | None = None,
                   plot: bool = True) -> tuple[Path, Path | None]:
    """Write ``layers.csv`` (columns :data:`CSV_COLUMNS`, model order) and ``layers.png``
    into ``out_dir``. Returns both paths (PNG None when ``plot=False``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "layers.csv"
    tmp = out / ".layers.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for s in analysis.layers:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in s.row().items()})
    tmp.replace(csv_path)
    if not plot:
        return csv_path, None
    png_path = out / "layers.png"
    _plot(analysis, png_path, title)
    return csv_path, png_path


def read_analysis(path: str | Path) -> Analysis:
    """Read a ``layers.csv`` written by :func:`write_analysis` (a file or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "layers.csv"
    if not p.is_file():
        raise ValueError(f"no analysis at {p} (run 'sfx analyze ... -o DIR' first)")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{p}: not an analysis CSV (missing column(s) {', '.join(missing)})")
        stats = []
        for r in reader:
            stats.append(LayerStats(r["layer"], int(r["in_features"]), int(r["out_features"]),
                                    float(r["float_mean_abs"]), float(r["quant_mean_abs"]), float(r["rel_error"]),
                                    int(r["rank"]), int(r["cluster"]), bool(int(r["critical"]))))
    return Analysis(stats)


def _plot(analysis: Analysis, path: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = analysis.layers
    x = list(range(len(st)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, min(24.0, 0.06 * len(st) + 6)), 7), sharex=True)
    ax1.plot(x, [s.float_mean_abs for s in st], ".-", lw=0.8, ms=3, label="float")
    ax1.plot(x, [s.quant_mean_abs for s in st], ".-", lw=0.8, ms=3, label="quantized")
    ax1.set_yscale("log")
    ax1.set_ylabel("mean |output|")
    ax1.legend(loc="upper left")
    ax1.grid(alpha=0.3)
    vals = [s.value(analysis.metric) for s in st]
    cmap = plt.get_cmap("viridis", max(analysis.clusters, 2))
    colors = ["tab:red" if s.critical else cmap(s.cluster) for s in st]
    ax2.bar(x, vals, color=colors, width=1.0)
    ax2.set_ylabel(analysis.metric + (" |q-f|/f" if analysis.metric == "deviation" else " ||q-f||/||f||"))
    ax2.set_xlabel("layer (model order); red = critical cluster")
    ax2.grid(alpha=0.3, axis="y")
    # block boundaries as light ticks
    blocks = [s.block for s in st]
    ticks = [i for i in x if i == 0 or blocks[i] != blocks[i - 1]]
    ax2.set_xticks(ticks)
    ax2.set_xticklabels([str(blocks[i]) if blocks[i] >= 0 else "" for i in ticks], fontsize=7)
    ax2.set_xlabel("transformer block; red bars = critical cluster")
    fig.suptitle(title or f"activation deviation per layer ({len(st)} layers, {analysis.tokens} tokens)")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)

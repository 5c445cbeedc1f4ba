"""``sfx bench``: benchmarks that write ``results/`` (``make bench`` runs ``sfx bench all``).

Each benchmark is a function ``run(out_dir: Path, quick: bool) -> None`` in its own
module (registered in :data:`BENCHES`) that writes ``<name>.md`` and ``<name>.json``
through :func:`write_report`, which records the command, the machine and the tool
versions beside the numbers.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: name -> "module:function"
BENCHES = {
    "sw": "superfloat.bench.sw:run",
    "rtl": "superfloat.bench.rtl:run",
    "fpga": "superfloat.bench.fpga:run",
    "wasq": "superfloat.bench.wasq:run",
    "fasteropt": "superfloat.bench.fasteropt:run",
    "wasq-targets": "superfloat.bench.wasq_targets:run",
    "ptq": "superfloat.bench.ptq:run",
    "cosim": "superfloat.bench.cosim:run",
    "accel": "superfloat.bench.accel:run",
    "w4": "superfloat.bench.w4:run",
    "qat": "superfloat.bench.qat:run",
}


def sfx_json(command: str, args: list[str]) -> dict[str, Any]:
    """``sfx COMMAND ARGS --json --no-progress`` in this process; its (last) JSON object."""
    import contextlib
    import io

    from superfloat.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([command, *args, "--json", "--no-progress"])
    if code:
        raise RuntimeError(f"sfx {command} {' '.join(args)} exited with {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def logger(name: str):
    """``log(msg)``: a line ``[bench NAME] msg`` on stderr, flushed."""
    import sys

    def log(msg: str) -> None:
        print(f"[bench {name}] {msg}", file=sys.stderr, flush=True)

    return log


@dataclass(frozen=True)
class QATBudgets:
    """The training budgets the QAT benches share (``wasq``, ``fasteropt``): the first
    ``calib_tokens`` training tokens in blocks of ``context``, ``epochs`` epochs of AdamW at
    ``lr`` with ``warmup`` warm-up steps and cosine decay (the ``sfx finetune`` loop), and
    ``analysis_tokens`` tokens for the layer ranking that ``opt``/``fasteropt`` use."""

    calib_tokens: int = 8192
    context: int = 512
    epochs: int = 3
    lr: float = 1e-4
    warmup: int = 4
    analysis_tokens: int = 2048

    def train_config(self):
        """The :class:`~superfloat.sw.wasq.train.TrainConfig` of these budgets (no progress bar)."""
        from superfloat.sw.wasq.train import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr, warmup_steps=self.warmup, scheduler="cosine",
                           progress=False)

    def finetune_command(self, model: str, data: str) -> str:
        """The ``sfx finetune`` command (SF4 weights, no ``--method``/``-o``) that trains with these budgets."""
        return (f"sfx finetune --model {model} --data {data} --split train --weight-bits 4 --context {self.context} "
                f"--tokens {self.calib_tokens} --epochs {self.epochs} --lr {self.lr:g} --warmup {self.warmup}")


class Partial:
    """The finished rows of a long bench, kept in a JSON file ``{"base": ..., "rows": {key: row}}``
    as they finish, so that a rerun with the same ``base`` settings resumes from them (a file
    with other settings is ignored; ``path=None``: kept in memory only)."""

    def __init__(self, path: Path | str | None, base: Any, log=None) -> None:
        self.path = None if path is None else Path(path)
        self.base = base
        self.rows: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("base") == base:
                self.rows = saved["rows"]
                if log is not None:
                    log(f"resuming: {len(self.rows)} rows from {self.path}")

    def keep(self, key: str, row: dict[str, Any]) -> None:
        self.rows[key] = row
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, json.dumps({"base": self.base, "rows": self.rows}))


def machine_info() -> dict[str, Any]:
    from superfloat.cli.info import tool_versions

    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": {name: ver for name, ver, _ in tool_versions() if ver is not None},
    }


def write_report(out_dir: Path | str, name: str, title: str, sections: list[tuple[str, str]],
                 data: dict[str, Any], command: str, machine: dict[str, Any] | None = None
                 ) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` and ``.json``.

    ``sections`` is a list of ``(heading, markdown body)``; ``data`` is the raw numbers.
    The command that produced the file is written at the top of both. ``machine`` (the
    ``machine`` record of an earlier report) re-renders a report without measuring again:
    date, machine and versions stay those of the measurement.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info() if machine is None else machine
    load = (f"; load average (1 min) {info['load_avg_1m']} when the report was written (timings are slower "
            f"on a loaded machine)" if "load_avg_1m" in info else "")
    md = [f"# {title}", "", f"Produced by `{command}` on {info['date']}.", "",
          f"Machine: {info['cpu']}, {info['cores']} cores, {info['platform']}{load}.", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body.rstrip(), ""]
    md += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in info["versions"].items()), ""]
    md_path = out_dir / f"{name}.md"
    json_path = out_dir / f"{name}.json"
    _atomic_write(md_path, "\n".join(md))
    _atomic_write(json_path, json.dumps({"command": command, "machine": info, "results": data}, indent=2,
                                        default=_json_default) + "\n")
    return md_path, json_path


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)

"""The shared quantization-aware training (QAT) loop of the WASQ methods.

:func:`train` runs AdamW on whatever parameters of ``model`` have
``requires_grad=True`` (the methods in :mod:`superfloat.sw.wasq.methods` decide which),
over fixed-length token blocks (:class:`Blocks`), with Hugging Face ``accelerate``:

* ``Accelerator()``: one CPU process by default; ``accelerate launch`` / ``torchrun`` give
  data parallelism over several processes (docs/distributed.md): each process takes its
  slice of every global batch, gradients are averaged by DDP (gloo on CPU, nccl on GPUs),
  the loss is normalised by the *global* number of predicted tokens (so N processes with
  batch B train like one process with batch N*B), and the reported losses and token counts
  are global (all-reduced). Started by a launcher on a machine without GPUs, the processes
  train on CPU (gloo) even without ``--cpu``/``ACCELERATE_USE_CPU``. When the environment
  says several processes but accelerate sees one, :func:`train` raises
  :class:`DistributedLaunchError` instead of training alone.
* fp32 master weights, always: a trainable parameter that is not float32 is an error
  (upstream cast the whole model to bf16/fp16 and trained that). Mixed precision, if a
  user asks ``accelerate`` for it, only autocasts the matmuls.
* Loss: next-token cross entropy over the real tokens only. Padding carries the label
  ``-100`` and is left out of both the sum and the token count (upstream averaged the
  loss over padding too).
* The forward of every :class:`~superfloat.sw.wasq.qlinear.SFxLinear` quantizes the
  *current* shadow weight (its cache is keyed on the weight's version counter, which
  every optimizer step bumps), so each step trains through the grid of the updated
  weights (upstream quantized once and never again).
* Dropout is off by default (``TrainConfig.dropout=False``: the model runs in eval mode
  while its parameters train). This is calibration-style QAT of a pretrained model on a
  small corpus: it keeps runs deterministic, makes ``fasteropt`` equal to ``opt``, and in
  eval mode each SFxLinear quantizes its weight once per optimizer step instead of once
  per micro-batch.
* Resumable, atomic checkpoints: every ``save_every`` steps (and at the end, and on
  Ctrl-C between steps) ``Accelerator.save_state`` writes model, optimizer, scheduler,
  RNG states and the trainer state (step, losses, a fingerprint of the run) into a
  temporary directory that is then renamed to ``checkpoint-<step>``. ``resume=True``
  continues from the newest complete checkpoint; on CPU the result is bit for bit the
  one of an uninterrupted run (the data order depends only on ``seed`` and the epoch).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainConfig", "TrainStats", "Blocks", "make_blocks", "causal_lm_loss", "default_forward",
           "train", "latest_checkpoint", "evaluate_loss", "SCHEDULERS", "process_state", "DistributedLaunchError"]

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
IGNORE_INDEX = -100
_CKPT_RE = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE = "trainer_state.json"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (validated on construction).

    Attributes:
        epochs: passes over the calibration blocks ("shots" upstream).
        lr: AdamW learning rate.
        max_steps: stop after this many optimizer steps (``None``: ``epochs`` full passes).
        batch_size: blocks per micro-batch (per process).
        grad_accum: micro-batches per optimizer step.
        weight_decay: AdamW weight decay (0 by default: QAT should not shrink weights).
        warmup_steps: linear warm-up steps of the scheduler.
        scheduler: ``constant``, ``constant_with_warmup``, ``linear`` or ``cosine``
            (``transformers.get_scheduler``).
        max_grad_norm: gradient clipping (``None``: off).
        seed: seeds the data order (per epoch) and every RNG.
        save_every: checkpoint every this many steps (``None``: only at the end of each
            epoch and of the run); needs a ``state_dir``.
        keep_checkpoints: how many checkpoints to keep (the newest).
        dropout: train with dropout (model in train mode); off by default.
        progress: show a tqdm bar.
    """

    epochs: int = 1
    lr: float = 2e-5
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int | None = None
    keep_checkpoints: int = 1
    dropout: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        for name in ("max_steps", "save_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive int or None, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (not isinstance(self.max_grad_norm, (int, float))
                                               or self.max_grad_norm <= 0):
            raise ValueError(f"TrainConfig.max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"TrainConfig.scheduler must be one of {', '.join(map(repr, SCHEDULERS))}, "
                             f"got {self.scheduler!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainStats:
    """What :func:`train` did. ``tokens`` counts real (non-pad) input tokens processed by
    all ``world`` processes together; ``losses`` are the global per-token losses of each
    step; ``seconds`` is the wall time of the optimizer steps only (no set-up, no
    checkpoint writes; of this process); ``tokens_per_s = tokens / seconds``."""

    steps: int
    total_steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    trainable_params: int = 0
    world: int = 1
    backend: str = "fake"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tokens_per_s=self.tokens_per_s, first_loss=self.first_loss, last_loss=self.last_loss)
        return d


# --------------------------------------------------------------------------- data


@dataclass
class Blocks:
    """Fixed-length training blocks: ``input_ids``, ``attention_mask`` (1 = real token)
    and ``labels`` (the input ids, ``-100`` at padding), all ``[N, context]`` int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"Blocks.input_ids must be [N, context], got shape {list(self.input_ids.shape)}")
        if self.attention_mask.shape != self.input_ids.shape or self.labels.shape != self.input_ids.shape:
            raise ValueError("Blocks: input_ids, attention_mask and labels must have the same shape")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def context(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batch(self, idx: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
        out = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
               "labels": self.labels[idx], "index": idx}
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def subset(self, idx: Sequence[int]) -> "Blocks":
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Blocks(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.labels):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def make_blocks(ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, context: int, pad_id: int, *,
                max_blocks: int | None = None, drop_partial: bool = False) -> Blocks:
    """Cut token ids into ``[N, context]`` blocks.

    ``ids`` is one token sequence or a list of documents (each cut separately, so no
    block spans two documents). A last, shorter piece of a document is right-padded
    with ``pad_id`` (attention mask 0, label ``-100``), or dropped when
    ``drop_partial``; pieces of fewer than 2 tokens (nothing to predict) are dropped.
    ``max_blocks`` keeps the first blocks only.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an int >= 2, got {context!r}")
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise ValueError(f"max_blocks must be a positive int or None, got {max_blocks!r}")
    if isinstance(ids, torch.Tensor):
        docs = [ids.reshape(-1).tolist()] if ids.dim() <= 1 else [r.tolist() for r in ids]
    elif len(ids) and not isinstance(ids[0], (int,)) and hasattr(ids[0], "__len__"):
        docs = [list(d) for d in ids]  # type: ignore[arg-type]
    else:
        docs = [list(ids)]  # type: ignore[arg-type]
    rows, masks = [], []
    for doc in docs:
        for start in range(0, len(doc), context):
            piece = doc[start:start + context]
            if len(piece) < 2 or (drop_partial and len(piece) < context):
                continue
            n = len(piece)
            rows.append(piece + [pad_id] * (context - n))
            masks.append([1] * n + [0] * (context - n))
            if max_blocks is not None and len(rows) >= max_blocks:
                break
        if max_blocks is not None and len(rows) >= max_blocks:
            break
    if not rows:
        raise ValueError(f"no training block of context {context}: the text has too few tokens "
                         f"({sum(len(d) for d in docs)} in {len(docs)} document(s))")
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(masks, dtype=torch.long)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return Blocks(input_ids, attention_mask, labels)


# --------------------------------------------------------------------------- loss / forward


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of next-token cross entropies, number of predicted tokens)``: position ``t``
    predicts label ``t + 1``; labels ``-100`` (padding) count in neither."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def default_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a transformers causal LM for ``batch`` (no KV cache)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@torch.no_grad()
def evaluate_loss(model: nn.Module, blocks: Blocks, *, batch_size: int = 1,
                  forward: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> tuple[float, int]:
    """Mean next-token loss of ``model`` over ``blocks`` (token-weighted, padding excluded)
    and the number of predicted tokens. Quick block-wise measure for training curves; the
    reported perplexities come from :mod:`superfloat.sw.wasq.evaluate`."""
    from .layers import evaluating

    forward = forward or default_forward
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for s in range(0, len(blocks), batch_size):
            b = blocks.batch(range(s, min(s + batch_size, len(blocks))), dev)
            loss, n = causal_lm_loss(forward(model, b), b["labels"])
            total += float(loss)
            count += n
    return (total / count if count else float("nan")), count


# --------------------------------------------------------------------------- checkpoints


def _check_fingerprint(saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} != now {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume: the checkpoint belongs to a different run ({detail}); "
                         f"rerun with the same arguments or use a new output directory")


class _TrainerState:
    """Registered with ``Accelerator.register_for_checkpointing``: step, losses, fingerprint."""

    def __init__(self, fingerprint: dict[str, Any]) -> None:
        self.step = 0
        self.losses: list[float] = []
        self.tokens = 0
        self.fingerprint = fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses), "tokens": self.tokens,
                "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        _check_fingerprint(d.get("fingerprint", {}), self.fingerprint)
        self.step = int(d["step"])
        self.losses = list(d.get("losses", []))
        self.tokens = int(d.get("tokens", 0))


def _checkpoints(state_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if state_dir.is_dir():
        for p in state_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(state_dir: str | Path) -> Path | None:
    """Newest complete ``checkpoint-<step>`` directory under ``state_dir`` (or None)."""
    cks = _checkpoints(Path(state_dir))
    return cks[-1][1] if cks else None


def _save(accelerator, state_dir: Path, state: _TrainerState, total_steps: int, keep: int) -> Path:
    step = state.step
    tmp = state_dir / f".tmp-checkpoint-{step:08d}"
    final = state_dir / f"checkpoint-{step:08d}"
    if accelerator.is_main_process:
        state_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    quiet = logging.getLogger("accelerate.utils.other")  # "Removed shared tensor ..." for tied embeddings: expected
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp))
    finally:
        quiet.setLevel(level)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"step": step, "total_steps": total_steps, "tokens": state.tokens,
                "last_loss": state.losses[-1] if state.losses else None, "fingerprint": state.fingerprint}
        (tmp / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n")  # written last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in _checkpoints(state_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------- processes

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "ACCELERATE_NUM_PROCESSES")
_RANK_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCH_HELP = ("on one machine start N processes with: accelerate launch --multi_gpu --num_processes N -m "
               "superfloat.cli finetune ... (on a machine without GPUs they train on CPU, gloo) or torchrun "
               "--nproc_per_node N -m superfloat.cli finetune ...; see docs/distributed.md")


class DistributedLaunchError(RuntimeError):
    """The launch environment and accelerate disagree on the number of processes."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _has_accelerator_device() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        try:
            return bool(acc.is_available())
        except Exception:  # noqa: BLE001 - a broken driver is no device
            return False
    return torch.cuda.is_available()


def _accelerator_kwargs(accelerator_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``Accelerator`` keywords of a run: a process started by a launcher (``LOCAL_RANK`` set:
    torchrun, ``accelerate launch --multi_gpu``) on a machine without GPUs trains on CPU
    (accelerate would otherwise run it as an unaware single process)."""
    kw = dict(accelerator_kwargs or {})
    if "cpu" not in kw and _env_int("LOCAL_RANK") is not None and (_env_int("WORLD_SIZE") or 1) > 1 \
            and not _has_accelerator_device():
        kw["cpu"] = True
    return kw


def _check_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` (N > 1) without MPI starts *one* process,
    with ``ACCELERATE_USE_CPU`` and ``MASTER_ADDR`` but no rank variables."""
    if _env_flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR") and not any(v in os.environ
                                                                                    for v in _RANK_VARS):
        raise DistributedLaunchError(
            "accelerate launch --cpu was asked for several processes (--num_processes > 1 or --num_machines > 1) "
            "but started only this one: accelerate starts several CPU processes only through MPI "
            "(--mpirun_hostfile); " + LAUNCH_HELP + "; for one process drop --num_processes (or unset MASTER_ADDR)")


def _check_world(n: int) -> None:
    for var in _WORLD_VARS:
        want = _env_int(var)
        if want is not None and want > 1 and want != n:
            raise DistributedLaunchError(
                f"the environment says {want} processes ({var}={want}) but accelerate sees {n}: the processes "
                f"would train alone and write the same files; " + LAUNCH_HELP)
    local = _env_int("LOCAL_WORLD_SIZE")
    if local is not None and local > 1 and n == 1:
        raise DistributedLaunchError(f"the environment says {local} processes on this machine (LOCAL_WORLD_SIZE="
                                     f"{local}) but accelerate sees 1; " + LAUNCH_HELP)


def process_state(accelerator_kwargs: dict[str, Any] | None = None):
    """accelerate's ``PartialState`` of this run, started the way :func:`train` starts its
    ``Accelerator`` (same CPU rule and checks): for code around training that must run on
    one process (``is_main_process``) or wait for the others (``wait_for_everyone()``).

    Raises:
        DistributedLaunchError: ``accelerate launch --cpu --num_processes N`` without MPI
            (one process started), or launch variables (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
            ``ACCELERATE_NUM_PROCESSES``, MPI's) that disagree with accelerate.
    """
    from accelerate import PartialState

    _check_launch()
    kw = _accelerator_kwargs(accelerator_kwargs)
    state = PartialState(cpu=bool(kw.get("cpu")) or _env_flag("ACCELERATE_USE_CPU"))
    _check_world(state.num_processes)
    return state


# --------------------------------------------------------------------------- the loop


def _epoch_micro_batches(n: int, epoch: int, cfg: TrainConfig, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches (lists of block indices) of ``epoch``: a permutation
    seeded by ``(seed, epoch)``, cut into global batches of ``batch_size * world`` (the
    tail wraps around to the start when there are several processes, like
    ``accelerate``'s ``even_batches``)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    gb = cfg.batch_size * world
    if world > 1 and len(perm) % gb:
        perm += perm[: gb - len(perm) % gb]
    out = []
    for s in range(0, len(perm), gb):
        chunk = perm[s:s + gb]
        mine = chunk[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        if mine:
            out.append(mine)
    return out


def _steps_per_epoch(n: int, cfg: TrainConfig, world: int) -> int:
    micro = math.ceil(n / (cfg.batch_size * world))
    return math.ceil(micro / cfg.grad_accum)


def _backend_of(model: nn.Module) -> str:
    """``"fake"``, ``"accelerator"`` or ``"mixed"``: where the model's quantized layers compute
    (``"fake"`` for a model without any)."""
    from .layers import quantized_layers

    kinds = {getattr(m, "backend", "fake") for m in quantized_layers(model).values()}
    if not kinds:
        return "fake"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def train(model: nn.Module, blocks: Blocks, cfg: TrainConfig | None = None, *, state_dir: str | Path | None = None,
          resume: bool = False, forward: Callable[[nn.Module, dict], torch.Tensor] | None = None,
          callback: Callable[[int, float], None] | None = None, post_step: Callable[[], None] | None = None,
          accelerator_kwargs: dict[str, Any] | None = None, desc: str = "train",
          run_id: dict[str, Any] | None = None, epoch_start: Callable[[int], None] | None = None,
          checkpoint_objects: Sequence[Any] = ()) -> TrainStats:
    """Train the parameters of ``model`` that require a gradient on ``blocks`` (in place).

    Args:
        model: a causal LM (usually already ``quantize_``-d: then this is QAT).
        blocks: the calibration/training blocks (:func:`make_blocks`).
        cfg: :class:`TrainConfig`.
        state_dir: where resumable checkpoints go (``None``: no checkpoints).
        resume: continue from the newest checkpoint in ``state_dir`` (start afresh, with a
            message, when there is none). Without ``resume`` an existing checkpoint in
            ``state_dir`` is an error, so that a run is never silently mixed with another.
        forward: ``forward(model, batch) -> logits`` (default: :func:`default_forward`);
            ``batch`` also holds ``index``, the block indices (``fasteropt`` uses them).
        callback: called as ``callback(step, loss)`` after each optimizer step (and after
            a checkpoint due at that step has been written).
        post_step: called right after each ``optimizer.step()`` (``lth`` re-applies its
            masks there).
        accelerator_kwargs: keyword arguments of the ``accelerate.Accelerator`` created for
            this run (default none: ``accelerate launch`` / its config decide; launched
            processes on a machine without GPUs get ``cpu=True``).
        desc: progress-bar label.
        run_id: extra items for the run fingerprint that a resume must match.
        epoch_start: called as ``epoch_start(epoch)`` before the first step of every epoch
            that starts in this run (epoch 0 included; not for an epoch resumed in its
            middle): QAT on the accelerator re-calibrates its output exponents there.
        checkpoint_objects: more objects with ``state_dict()`` / ``load_state_dict(d)``
            saved in every checkpoint and restored on resume (after the model and
            optimizer), e.g. the calibrated output exponents of the quantized layers.

    Returns:
        :class:`TrainStats` (global figures over all processes).

    Raises:
        DistributedLaunchError: see :func:`process_state`.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg = cfg or TrainConfig()
    if not isinstance(blocks, Blocks):
        raise TypeError(f"blocks must be a Blocks (see make_blocks), got {type(blocks).__name__}")
    if len(blocks) == 0:
        raise ValueError("no training blocks")
    named = trainable_parameters(model)
    if not named:
        raise ValueError("train: the model has no trainable parameters (requires_grad=False everywhere)")
    for name, p in named:
        if p.dtype != torch.float32:
            raise ValueError(f"train: parameter {name} is {p.dtype}; WASQ trains fp32 master weights only "
                             f"(load the model in float32; never cast it to bf16/fp16 for training)")
    if resume and state_dir is None:
        raise ValueError("train: resume=True needs a state_dir holding checkpoints")
    forward = forward or default_forward
    state_dir = Path(state_dir) if state_dir is not None else None

    _check_launch()
    acc = Accelerator(**_accelerator_kwargs(accelerator_kwargs))
    world, rank = acc.num_processes, acc.process_index
    _check_world(world)
    spe = _steps_per_epoch(len(blocks), cfg, world)
    total = spe * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, spe * cfg.epochs)
    fingerprint = {"data": blocks.fingerprint(), "n_blocks": len(blocks), "context": blocks.context,
                   "total_steps": total, "world": world,
                   "trainable": hashlib.sha256(",".join(n for n, _ in named).encode()).hexdigest()[:16],
                   **{f"cfg.{k}": v for k, v in cfg.to_dict().items() if k not in ("progress", "save_every",
                                                                                    "keep_checkpoints")},
                   **(run_id or {})}
    state = _TrainerState(fingerprint)

    set_seed(cfg.seed)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_kwargs: dict[str, Any] = {}
    if cfg.scheduler != "constant":
        sched_kwargs["num_warmup_steps"] = cfg.warmup_steps
    if cfg.scheduler in ("linear", "cosine"):
        sched_kwargs["num_training_steps"] = total
    scheduler = get_scheduler(cfg.scheduler, optimizer, **sched_kwargs)
    # The scheduler is stepped once per optimizer step by this loop (not prepared, which
    # would step it once per process); it is checkpointed as a registered object.
    pmodel, poptimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(scheduler, state, *checkpoint_objects)

    resumed_from = None
    if state_dir is not None:
        existing = latest_checkpoint(state_dir)
        if acc.is_main_process and state_dir.is_dir():
            for p in state_dir.glob(".tmp-checkpoint-*"):  # half-written by an interrupted save
                shutil.rmtree(p, ignore_errors=True)
        if existing is not None and not resume:
            raise ValueError(f"{state_dir} already holds training checkpoints ({existing.name}); pass resume=True "
                             f"(--resume) to continue that run, or use another output directory")
        if resume:
            if existing is None:
                acc.print(f"[{desc}] no checkpoint in {state_dir}: starting from step 0", file=sys.stderr)
            else:
                # the run's fingerprint first (trainer_state.json, written last), before accelerate
                # loads objects that another kind of run may not have registered
                try:
                    saved = json.loads((existing / STATE_FILE).read_text()).get("fingerprint")
                except (OSError, ValueError):
                    saved = None
                if isinstance(saved, dict):
                    _check_fingerprint(saved, fingerprint)
                acc.load_state(str(existing))
                resumed_from = state.step
                acc.print(f"[{desc}] resumed from {existing} (step {state.step}/{total})", file=sys.stderr)

    pmodel.train(cfg.dropout)
    backend = _backend_of(model)
    device = acc.device
    step = state.step
    epoch, offset = divmod(step, spe)
    seconds = 0.0
    tokens_this_run = 0
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and acc.is_local_main_process), file=sys.stderr)
    in_update = False
    last_saved = step if resumed_from is not None else None
    # per block: predicted tokens (labels after the first that are not padding) and real tokens;
    # every process knows every process's batches, so the global counts need no communication
    n_pred = (blocks.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    n_tok = blocks.attention_mask.sum(dim=1).tolist()
    try:
        while step < total:
            micro_all = [_epoch_micro_batches(len(blocks), epoch, cfg, world, r) for r in range(world)]
            if offset == 0 and epoch_start is not None:
                epoch_start(epoch)
            for s in range(offset, spe):
                if step >= total:
                    break
                groups = [m[s * cfg.grad_accum:(s + 1) * cfg.grad_accum] for m in micro_all]
                group = groups[rank]
                t0 = time.perf_counter()
                batches = [blocks.batch(idx, device) for idx in group]
                denom = max(sum(n_pred[i] for g in groups for idx in g for i in idx), 1)  # global
                step_tokens = sum(n_tok[i] for g in groups for idx in g for i in idx)
                step_loss = 0.0
                local_sum = 0.0
                for j, b in enumerate(batches):
                    sync = contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(pmodel)
                    with sync:
                        loss_sum, _ = causal_lm_loss(forward(pmodel, b), b["labels"])
                        # DDP averages the gradients over the world: scale so that the average is the
                        # gradient of the global mean loss per predicted token
                        loss = loss_sum / denom if world == 1 else loss_sum * (world / denom)
                        acc.backward(loss)
                    if world == 1:
                        step_loss += float(loss.detach())
                    else:
                        local_sum += float(loss_sum.detach())
                if world > 1:
                    total_sum = acc.reduce(torch.tensor([local_sum], dtype=torch.float64, device=device), "sum")
                    step_loss = float(total_sum[0]) / denom
                tokens_this_run += step_tokens
                if cfg.max_grad_norm is not None:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                in_update = True
                poptimizer.step()
                if post_step is not None:
                    post_step()
                scheduler.step()
                poptimizer.zero_grad(set_to_none=True)
                in_update = False
                seconds += time.perf_counter() - t0
                step += 1
                state.step = step
                state.losses.append(step_loss)
                state.tokens += step_tokens
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_this_run / max(seconds, 1e-9):.0f}")
                if state_dir is not None and ((cfg.save_every and step % cfg.save_every == 0)
                                              or s == spe - 1 or step == total):
                    _save(acc, state_dir, state, total, cfg.keep_checkpoints)
                    last_saved = step
                if callback is not None:
                    callback(step, step_loss)
            epoch += 1
            offset = 0
    except KeyboardInterrupt:
        if state_dir is not None and not in_update and last_saved != step and step > 0:
            acc.print(f"\n[{desc}] interrupted: saving step {step} to {state_dir} (continue with --resume)",
                      file=sys.stderr)
            _save(acc, state_dir, state, total, cfg.keep_checkpoints)
        raise
    finally:
        bar.close()
        for p in params:
            p.grad = None
    acc.wait_for_everyone()
    model.train(False)
    return TrainStats(steps=step, total_steps=total, tokens=tokens_this_run, seconds=seconds, losses=list(state.losses),
                      resumed_from=resumed_from, trainable_params=sum(p.numel() for p in params), world=world,
                      backend=backend)


def freeze_all_but(model: nn.Module, trainable: Iterable[str] | None) -> list[str]:
    """Set ``requires_grad`` on the parameters of the named modules (and their children)
    and clear it everywhere else; ``None`` makes every parameter trainable. Returns the
    names of the trainable parameters."""
    if trainable is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in trainable_parameters(model)]
    names = list(trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} does not exist in {type(model).__name__}") from None
        for p in mod.parameters():
            p.requires_grad_(True)
    return [n for n, _ in trainable_parameters(model)]

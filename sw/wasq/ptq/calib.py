"""Calibration: the inputs of every linear layer of the float model, captured once.

:meth:`Calibration.collect` runs token batches through the float model with forward
pre-hooks on the layers to quantize and keeps their inputs (``[tokens, K]`` float32).
Layers that receive the very same tensor (q/k/v after one norm, gate/up) share one
stored matrix. SmoothQuant and AWQ keep the float model's function unchanged, so the
inputs after a scale ``s`` is folded are exactly the stored ones divided by ``s``
(:meth:`Calibration.rescale`): one forward pass serves every method.

Batches are token-id tensors ``[B, T]`` / ``[T]`` or dicts of model inputs, without
padding (use :func:`superfloat.sw.wasq.data.calibration_batches`).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

import torch
from torch import nn

from ..layers import evaluating

__all__ = ["Calibration"]


class Calibration:
    """Captured layer inputs. ``x(name)`` is ``[tokens, in_features]`` float32."""

    def __init__(self, inputs: dict[str, torch.Tensor], key_of: dict[str, str], tokens: int,
                 batches: list | None = None) -> None:
        self.inputs = inputs
        self.key_of = key_of
        self.tokens = tokens
        #: the token batches the inputs came from (for rankings that rerun the model)
        self.batches = batches

    def __contains__(self, name: str) -> bool:
        return name in self.key_of

    def x(self, name: str) -> torch.Tensor:
        try:
            return self.inputs[self.key_of[name]]
        except KeyError:
            raise KeyError(f"no calibration inputs for layer {name!r}") from None

    def sample(self, name: str, rows: int | None) -> torch.Tensor:
        """At most ``rows`` evenly spaced tokens of :meth:`x` (all when ``rows`` is None)."""
        x = self.x(name)
        if rows is None or x.shape[0] <= rows:
            return x
        idx = torch.linspace(0, x.shape[0] - 1, rows).round().to(torch.long)
        return x[idx]

    @torch.no_grad()
    def rescale(self, layers: Iterable[str], column_scale: torch.Tensor) -> None:
        """Divide the stored inputs of ``layers`` (shared ones once) by ``column_scale``."""
        done = set()
        cs = column_scale.detach().to(torch.float64)
        for name in layers:
            key = self.key_of.get(name)
            if key is None or key in done:
                continue
            done.add(key)
            self.inputs[key] = (self.inputs[key].to(torch.float64) / cs).to(torch.float32)

    @classmethod
    @torch.no_grad()
    def collect(cls, model: nn.Module, batches: Iterable[Any], layers: Iterable[str], *,
                max_tokens: int | None = None, progress: bool = False) -> "Calibration":
        """Run ``batches`` through ``model`` (eval mode, no grad) and capture the inputs of
        ``layers`` (names of ``nn.Linear`` / ``Conv1D`` modules). Stops after ``max_tokens``."""
        names = list(layers)
        if not names:
            raise ValueError("Calibration.collect: no layers to calibrate")
        chunks: dict[str, list[torch.Tensor]] = {}
        key_of: dict[str, str] = {}
        seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        handles = []

        def hook(name: str):
            def pre(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                sig = (x.data_ptr(), tuple(x.shape), x.dtype)
                hit = seen.get(sig)
                if hit is None:
                    # keep x referenced for the whole batch so that its address cannot be reused
                    seen[sig] = (name, x)
                    chunks.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).to(torch.float32).cpu()
                                                       .clone())
                    key = name
                else:
                    key = hit[0]
                key_of.setdefault(name, key)
            return pre

        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True))
        tokens = 0
        n_batches = 0
        used: list = []
        try:
            with evaluating(model, hooks=handles):
                for batch in batches:
                    used.append(batch)
                    seen.clear()
                    if isinstance(batch, dict):
                        n = int(batch["input_ids"].numel())
                        model(**batch)
                    else:
                        ids = torch.as_tensor(batch)
                        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
                        n = int(ids.numel())
                        model(input_ids=ids)
                    tokens += n
                    n_batches += 1
                    if progress:
                        print(f"\rcalibration: {tokens} tokens", end="", file=sys.stderr, flush=True)
                    if max_tokens is not None and tokens >= max_tokens:
                        break
        finally:
            if progress:
                print(file=sys.stderr)
        if n_batches == 0:
            raise ValueError("Calibration.collect: no calibration batches were given")
        missing = [n for n in names if n not in key_of]
        if missing:
            raise ValueError(f"Calibration.collect: layer {missing[0]!r} never ran during calibration "
                             f"({len(missing)} layer(s) without inputs)")
        inputs = {k: torch.cat(v, 0) for k, v in chunks.items()}
        if max_tokens is not None:
            inputs = {k: v[:max_tokens] for k, v in inputs.items()}
        return cls(inputs, key_of, min(tokens, max_tokens) if max_tokens is not None else tokens, used)

"""NaN and infinity in co-simulation: found, located and reported as such, never as an RTL
mismatch (issue 17).

The accelerator has no NaN: its codes are integers. A NaN (or an infinity) in a
co-simulation comes from the float side of the model (an embedding, a norm, attention, the
LM head, or an in-memory change of the model) and is the same in every pass. When one
appears, the comparison of the RTL with the accelerator backend says nothing about the RTL;
:func:`locate_nonfinite` re-runs the forward pass with a hook on every module and names the
first module whose output held a non-finite value (modules finish before the modules that
contain them, so this is the innermost, earliest producer).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .mapping import CosimError

__all__ = ["CosimNaN", "locate_nonfinite", "describe_source", "count_nonfinite", "same_float"]


class CosimNaN(CosimError):
    """The model's forward pass produced a NaN or an infinity that stopped it (a quantized
    layer refuses a non-finite input: SFx has no NaN) before anything was compared. Not an RTL
    mismatch: the message names the module that first produced it. ``source`` holds
    :func:`locate_nonfinite`'s record."""

    def __init__(self, message: str, source: dict | None = None):
        super().__init__(message)
        self.source = source


def _tensors(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return [out.logits]
    return []


def count_nonfinite(a: Any) -> dict:
    """``{"nan", "inf", "values", "first_index"}`` of an array or tensor (``first_index``: the
    index of the first non-finite value, or ``None``)."""
    x = np.asarray(a.detach().to("cpu").double().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
    bad = ~np.isfinite(x)
    first = None
    if bad.any():
        first = [int(i) for i in np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), x.shape)]
    return {"nan": int(np.isnan(x).sum()), "inf": int(np.isinf(x).sum()), "values": int(x.size), "first_index": first}


def locate_nonfinite(model: Any, run: Callable[[], Any]) -> dict | None:
    """Run ``run()`` (a forward pass of ``model``) with a forward hook on every named module and
    return the first module whose output held a NaN or an infinity: ``{"module", "tensor",
    "shape", "nan", "inf", "values", "first_index", "error"}`` (``error``: the exception the
    pass then raised, as text, e.g. a quantized layer refusing a NaN input), or ``None`` when
    every output was finite. The hooks are removed afterwards; an exception of ``run`` is
    caught and recorded, never raised."""
    import torch

    found: dict | None = None
    handles = []

    def make(name: str):
        def hook(module, args, output):
            nonlocal found
            if found is not None:
                return
            for i, t in enumerate(_tensors(output)):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    found = {"module": name or "(model)", "tensor": "output" if i == 0 else f"output[{i}]",
                             "shape": list(t.shape), **count_nonfinite(t)}
                    return

        return hook

    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(make(name)))
    error = None
    try:
        with torch.no_grad():
            run()
    except Exception as e:  # noqa: BLE001 - the pass may stop on the NaN; the source is what we want
        error = f"{type(e).__name__}: {e}"
    finally:
        for h in handles:
            h.remove()
    if found is not None:
        found["error"] = error
    return found


def describe_source(src: dict | None) -> str:
    """One phrase naming where a non-finite value first appeared (for messages and reports)."""
    if src is None:
        return "its source was not found (every module's output was finite when the pass was run again)"
    kinds = " and ".join(f"{src[k]} {k.upper() if k == 'nan' else 'infinite'}" for k in ("nan", "inf") if src[k])
    kinds = kinds.replace("NAN", "NaN")
    at = f", the first at index {src['first_index']}" if src.get("first_index") is not None else ""
    return (f"first produced by {src['module']} ({src['tensor']} of shape {src['shape']}: {kinds} of "
            f"{src['values']} values{at})")


def same_float(a: float | None, b: float | None) -> bool:
    """``a == b``, with NaN equal to NaN (a NaN on both sides is the same result)."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))

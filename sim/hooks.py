"""Forward hooks that run a model's selected linear layers through a co-simulation engine."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .engines import ArrayConfig, OpResult
from .mapping import LayerCall, program_ops


@dataclass
class _Call:
    index: int
    name: str
    call: LayerCall
    results: list[OpResult]
    codes: np.ndarray  # the RTL's (or the engine's) output codes [T, N]
    reference: np.ndarray  # sfx.linear's codes on the same operations
    equal_to_backend: bool  # the decoded codes equal, bit for bit, the accelerator backend's output
    y_out: np.ndarray  # the decoded output handed to the rest of the model (float64 copy)
    y_fake: np.ndarray | None = None  # the layer's fake-quantized output on the same input
    y_float_weights: np.ndarray | None = None  # the float model's layer on the same input


@dataclass
class _Prefetch:
    name: str
    x: Any
    call: LayerCall
    futures: list[Future]


class _Recorder:
    """Forward hooks that only record which layers are called, in which order, and which share
    an input tensor (``record``: ``(name, input group)`` per call): the plan for prefetching."""

    def __init__(self, modules: dict[str, Any]):
        self.modules = modules
        self.record: list[tuple[str, int]] = []
        self._prev = None
        self._group = -1
        self._handles: list = []

    def __enter__(self) -> "_Recorder":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._make(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if x is not self._prev:
                self._group += 1
            self._prev = x
            self.record.append((name, self._group))

        return hook


class _ProgramHooks:
    """Forward hooks that replace the selected layers' outputs (computed by the accelerator
    backend) by the decoded codes that ``engine`` computes from the same program, and check
    that both are identical.

    With a ``plan`` (:class:`_Recorder`'s) and an engine that runs several operations at once,
    the layers that take the same input tensor object as the layer being called (q/k/v
    projections, gate/up) are submitted together (``prefetch``)."""

    def __init__(self, modules: dict[str, Any], programs: dict[str, Any], arrays: dict[str, ArrayConfig], engine, *,
                 plan: list[tuple[str, int]] | None = None, prefetch: bool = False,
                 float_modules: dict[str, Any] | None = None, compare_fake: bool = False,
                 on_op_done: Callable[[OpResult], None] | None = None,
                 on_call: Callable[["_Call"], None] | None = None):
        self.modules = modules
        self.programs = programs
        self.arrays = arrays
        self.engine = engine
        self.plan = plan
        self.prefetch = prefetch and plan is not None
        self.float_modules = float_modules or {}
        self.compare_fake = compare_fake
        self.on_op_done = on_op_done
        self.on_call = on_call
        self.calls: list[_Call] = []
        self._count = 0
        self._handles: list = []
        self._pre: dict[int, _Prefetch] = {}

    def __enter__(self) -> "_ProgramHooks":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._make(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for pre in self._pre.values():  # an error left prefetched operations behind
            for f in pre.futures:
                f.cancel()
        self._pre.clear()

    def _submit(self, call: LayerCall) -> list[Future]:
        futs = [self.engine.submit(op) for op in call.ops]
        if self.on_op_done is not None:
            for f in futs:
                f.add_done_callback(lambda fut: fut.cancelled() or fut.exception() is not None
                                    or self.on_op_done(fut.result()))
        return futs

    def _plan_call(self, name: str, x) -> LayerCall:
        k = x.shape[-1]
        return program_ops(name, self.programs[name], x.detach().reshape(-1, k), self.arrays[name])

    def _make(self, name: str):
        import torch

        def hook(module, args, output):
            x = args[0]
            idx = self._count
            self._count += 1
            pre = self._pre.pop(idx, None)
            if pre is not None and pre.name == name and (pre.x is x or torch.equal(pre.x, x)):
                call, futs = pre.call, pre.futures
            else:
                call = self._plan_call(name, x)
                futs = self._submit(call)
                if self.prefetch and idx < len(self.plan) and self.plan[idx][0] == name:
                    g = self.plan[idx][1]
                    j = idx + 1
                    while j < len(self.plan) and self.plan[j][1] == g:
                        other = self.plan[j][0]
                        if other in self.modules and j not in self._pre:
                            cj = self._plan_call(other, x)
                            self._pre[j] = _Prefetch(other, x, cj, self._submit(cj))
                        j += 1
            results = [f.result() for f in futs]
            codes = call.assemble(results, "codes")
            ref = call.assemble(results, "reference")
            out = output.detach()
            y = call.decode(codes, out).reshape(out.shape)
            equal = bool(torch.equal(y, out))
            y_fake = yfw = None
            x2 = x.detach().reshape(-1, x.shape[-1])
            if self.compare_fake:
                saved = module.backend
                try:
                    module.backend = "fake"
                    with torch.no_grad():
                        y_fake = module.forward(x).detach().reshape(-1, out.shape[-1]).double().cpu().numpy()
                finally:
                    module.backend = saved
            fm = self.float_modules.get(name)
            if fm is not None:
                yfw = _float_weights_output(fm, x2.to(torch.float64).cpu().numpy())
            self.calls.append(_Call(idx, name, call, results, codes, ref, equal,
                                    y.detach().reshape(-1, out.shape[-1]).double().cpu().numpy(), y_fake, yfw))
            if self.on_call is not None:
                self.on_call(self.calls[-1])
            return y

        return hook


def _float_weights_output(module: Any, x2: np.ndarray) -> np.ndarray:
    """``x @ W.T + b`` in float64 with a float model's own layer (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    from torch import nn

    w = module.weight.detach().to("cpu").double().numpy()
    if not isinstance(module, nn.Linear):  # Conv1D stores [K, N]
        w = w.T
    y = x2.astype(np.float64) @ w.T
    if getattr(module, "bias", None) is not None:
        y = y + module.bias.detach().to("cpu").double().numpy()[None, :]
    return y


class _OutputCapture:
    """Forward hook keeping the first tensor of a module's output (a block's output)."""

    def __init__(self, module: Any | None):
        self.module = module
        self.value = None
        self._h = None

    def __enter__(self):
        if self.module is not None:
            def hook(m, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                self.value = out.detach().to("cpu").double().numpy().copy()

            self._h = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        if self._h is not None:
            self._h.remove()

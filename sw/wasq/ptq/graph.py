"""Where per-input-channel scales can be folded without changing the float model.

SmoothQuant and AWQ both rewrite ``y = W x`` as ``y = (W diag(s)) (diag(1/s) x)``. The
``1/s`` must be absorbed by whatever produced ``x``, so that the float model computes
exactly the same function. A :class:`ScaleGroup` is one such producer (``prev``) and
the linear layers that consume its output (``consumers``, which share the input):

* a norm (RMSNorm: ``weight /= s``; LayerNorm: ``weight /= s`` and ``bias /= s``)
  before q/k/v or before the MLP's first layer(s) (pre-norm models only);
* a linear layer before another one, when everything between them commutes with a
  positive per-channel scale: attention (``o_proj`` consumes the value projection's
  output; with grouped-query attention several ``o_proj`` input channels read the same
  value channel, so ``s`` lives on the value channels and is broadcast through
  :attr:`ScaleGroup.index`), ``up_proj -> down_proj`` (``act(gate) * up / s``), and
  ``fc1 -> fc2`` through ReLU (``relu(x / s) = relu(x) / s`` for ``s > 0``). GELU is
  not positively homogeneous, so GPT-2's ``c_fc -> c_proj`` has no group.

Supported: Llama-style models (``llama``, ``mistral``, ``qwen2``, ``qwen3``), ``opt``
and ``gpt2``. Anything else raises ``ValueError`` naming the supported types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ScaleGroup", "scale_groups", "apply_scale", "decoder_layers", "SUPPORTED_MODEL_TYPES",
           "linear_weight"]

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "opt", "gpt2")


@dataclass
class ScaleGroup:
    """``prev`` feeds ``consumers``; ``s`` has one entry per channel of ``prev``'s output
    slice ``[offset, offset + channels)``; consumer input column ``j`` is scaled by
    ``s[index[j]]`` (``index`` None: identity)."""

    name: str
    prev: str
    prev_kind: str                # "norm" | "linear" | "conv1d"
    consumers: tuple[str, ...]
    channels: int
    offset: int = 0
    index: torch.Tensor | None = None

    def column_scale(self, s: torch.Tensor) -> torch.Tensor:
        """The scale of every consumer input column."""
        return s if self.index is None else s[self.index]

    def reduce_columns(self, per_column: torch.Tensor, how: str = "amax") -> torch.Tensor:
        """Per consumer column statistic -> per ``prev`` channel (max or mean over the
        columns that read the same channel)."""
        if self.index is None:
            return per_column
        out = torch.zeros(self.channels, dtype=per_column.dtype)
        if how == "amax":
            return out.scatter_reduce(0, self.index, per_column, reduce="amax", include_self=False)
        return out.scatter_reduce(0, self.index, per_column, reduce="mean", include_self=False)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, blocks)`` of a supported model (e.g. ``("model.layers", ...)``)."""
    mt = _model_type(model)
    if mt in LLAMA_LIKE:
        name = "model.layers"
    elif mt == "opt":
        name = "model.decoder.layers"
    else:
        name = "transformer.h"
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} ({mt}) has no {name}: is it a causal LM of that family?") from None


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"smoothing/AWQ scale folding supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                         f"{type(model).__name__} has model_type {mt!r}. Use a method without scale search "
                         f"(rtn, clip, mixed, adaround) for this model")
    return mt


def scale_groups(model: nn.Module) -> list[ScaleGroup]:
    """Every foldable group of ``model`` in block order (see the module docstring)."""
    mt = _model_type(model)
    cfg = model.config
    prefix, blocks = decoder_layers(model)
    groups: list[ScaleGroup] = []
    for i, blk in enumerate(blocks):
        p = f"{prefix}.{i}"
        if mt in LLAMA_LIKE:
            hidden = cfg.hidden_size
            heads = cfg.num_attention_heads
            kv = getattr(cfg, "num_key_value_heads", None) or heads
            hd = getattr(cfg, "head_dim", None) or hidden // heads
            groups.append(ScaleGroup(f"{p}.attn_in", f"{p}.input_layernorm", "norm",
                                     (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"),
                                     hidden))
            index = None
            if kv != heads:
                h = torch.arange(heads * hd) // hd
                d = torch.arange(heads * hd) % hd
                index = (h // (heads // kv)) * hd + d
            # Qwen3 normalises q and k per head, never v: the v -> o fold stays exact.
            groups.append(ScaleGroup(f"{p}.attn_out", f"{p}.self_attn.v_proj", "linear", (f"{p}.self_attn.o_proj",),
                                     kv * hd, 0, index))
            groups.append(ScaleGroup(f"{p}.mlp_in", f"{p}.post_attention_layernorm", "norm",
                                     (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), hidden))
            groups.append(ScaleGroup(f"{p}.mlp_out", f"{p}.mlp.up_proj", "linear", (f"{p}.mlp.down_proj",),
                                     cfg.intermediate_size))
        elif mt == "opt":
            hidden = cfg.hidden_size
            if cfg.do_layer_norm_before:
                groups.append(ScaleGroup(f"{p}.attn_in", f"{p}.self_attn_layer_norm", "norm",
                                         (f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"),
                                         hidden))
            groups.append(ScaleGroup(f"{p}.attn_out", f"{p}.self_attn.v_proj", "linear", (f"{p}.self_attn.out_proj",),
                                     hidden))
            if cfg.do_layer_norm_before:
                groups.append(ScaleGroup(f"{p}.mlp_in", f"{p}.final_layer_norm", "norm", (f"{p}.fc1",), hidden))
            if cfg.activation_function == "relu":
                groups.append(ScaleGroup(f"{p}.mlp_out", f"{p}.fc1", "linear", (f"{p}.fc2",), cfg.ffn_dim))
        else:  # gpt2: c_attn = [q | k | v] (Conv1D, weight [in, out])
            hidden = cfg.n_embd
            groups.append(ScaleGroup(f"{p}.attn_in", f"{p}.ln_1", "norm", (f"{p}.attn.c_attn",), hidden))
            groups.append(ScaleGroup(f"{p}.attn_out", f"{p}.attn.c_attn", "conv1d", (f"{p}.attn.c_proj",), hidden,
                                     offset=2 * hidden))
            groups.append(ScaleGroup(f"{p}.mlp_in", f"{p}.ln_2", "norm", (f"{p}.mlp.c_fc",), hidden))
            if cfg.activation_function == "relu":
                inner = cfg.n_inner or 4 * hidden
                groups.append(ScaleGroup(f"{p}.mlp_out", f"{p}.mlp.c_fc", "conv1d", (f"{p}.mlp.c_proj",), inner))
    for g in groups:
        for n in (g.prev, *g.consumers):
            model.get_submodule(n)  # raises AttributeError early if a name is wrong
    return groups


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` view of an ``nn.Linear`` or transformers ``Conv1D`` weight (a copy for Conv1D)."""
    w = m.weight.detach()
    return w.t() if _is_conv1d(m) else w



@torch.no_grad()
def apply_scale(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold ``s`` (positive, ``[group.channels]``): ``prev`` output channels ``/= s``, consumer
    input columns ``*= s``. The float model computes the same function (up to rounding)."""
    s = s.detach().to(torch.float64).reshape(-1)
    if s.numel() != group.channels:
        raise ValueError(f"{group.name}: scale has {s.numel()} entries, the group has {group.channels} channels")
    if not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError(f"{group.name}: scales must be positive and finite")
    prev = model.get_submodule(group.prev)
    lo, hi = group.offset, group.offset + group.channels
    if group.prev_kind == "norm":
        _div_(prev.weight, s)
        if getattr(prev, "bias", None) is not None:
            _div_(prev.bias, s)
    elif group.prev_kind == "conv1d":
        w = prev.weight  # [in, out]
        w[:, lo:hi] = (w[:, lo:hi].to(torch.float64) / s.reshape(1, -1)).to(w.dtype)
        if prev.bias is not None:
            prev.bias[lo:hi] = (prev.bias[lo:hi].to(torch.float64) / s).to(prev.bias.dtype)
    else:
        w = prev.weight  # [out, in]
        w[lo:hi] = (w[lo:hi].to(torch.float64) / s.reshape(-1, 1)).to(w.dtype)
        if prev.bias is not None:
            prev.bias[lo:hi] = (prev.bias[lo:hi].to(torch.float64) / s).to(prev.bias.dtype)
    cs = group.column_scale(s)
    for name in group.consumers:
        m = model.get_submodule(name)
        w = m.weight
        if _is_conv1d(m):
            w.copy_((w.to(torch.float64) * cs.reshape(-1, 1)).to(w.dtype))
        else:
            w.copy_((w.to(torch.float64) * cs.reshape(1, -1)).to(w.dtype))


def _div_(p: torch.Tensor, s: torch.Tensor) -> None:
    p.copy_((p.to(torch.float64) / s).to(p.dtype))

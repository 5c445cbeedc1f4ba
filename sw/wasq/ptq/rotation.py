"""Rotations (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024) folded into the weights.

An orthogonal ``Q`` (``Q Q^T = I``) applied to the residual stream of a pre-norm Llama-style
model changes no float output, but spreads every outlier channel of the activations (and of
the weights) over all channels: the per-token maximum, which sets the activation quantizer's
step, drops towards the root-mean-square. That is what makes 4-bit activations work in the
literature. :func:`rotate_` rewrites the float model in place:

1. **Norm scales absorbed.** The weight ``g`` of every RMSNorm is multiplied into the
   columns of the linears that read its output (``input_layernorm`` -> q/k/v,
   ``post_attention_layernorm`` -> gate/up, the final ``norm`` -> the LM head) and the norm
   becomes weightless (``g = 1``). A weightless RMSNorm commutes with ``Q``:
   ``rms(x Q) = rms(x)``.
2. **Residual rotation** ``h -> h Q`` (``Q`` ``[d, d]``, ``d`` = hidden size): the token
   embedding ``E -> E Q``; every linear that *reads* the residual stream
   (q/k/v/gate/up, the LM head) ``W -> W Q``; every linear that *writes* it (o_proj,
   down_proj) ``W -> Q^T W`` (and its bias ``b -> b Q``). **Tied embeddings are untied**:
   the LM head becomes its own tensor ``W_head diag(g_final) Q`` while the embedding is
   ``E Q`` (they differ by the final norm's scale); ``config.tie_word_embeddings`` is set to
   False so that a saved checkpoint rebuilds the same (untied) model.
3. **Value/output heads** (``heads=True``): a Hadamard ``H_h`` per attention head on the
   value projection's output (rows of v_proj, ``W_v[head] -> H_h^T W_v[head]``) and on the
   matching input columns of o_proj (``W_o[:, head] -> W_o[:, head] H_h``), grouped-query
   attention included. Attention mixes value vectors token by token with scalar weights,
   so this is exact and needs nothing online; it flattens o_proj's input.
4. **Online rotation before down_proj** (``online="host"``): ``down_proj``'s input
   ``act(gate) * up`` is produced by an elementwise product, through which nothing can be
   folded, so the rotation ``x -> x Q_d`` (``Q_d`` ``[I, I]``, ``I`` = intermediate size)
   is computed online and ``W_down -> W_down Q_d``. Here it is a **float operation on the
   host** (a forward pre-hook on ``down_proj``, :class:`OnlineRotation`, applying the
   Kronecker factors of ``Q_d`` one after the other: ``12 + 128`` multiply-adds per element
   for ``1536 = 12 x 128`` instead of 1536), like the elementwise product before it; the
   accelerator still computes every linear layer, ``down_proj`` included, from the rotated
   (float) input that the host streams to it. ``online="none"`` leaves ``down_proj``
   unrotated (everything folded offline; a checkpoint can hold it).

Which ``Q``: ``kind="hadamard"`` (default) is a randomized Hadamard matrix ``diag(s) H / sqrt(d)``
(random signs ``s`` from ``seed``) whenever a Hadamard matrix of order ``d`` can be built as a
Kronecker product of Sylvester (``2^a``) and Paley (``q + 1``, ``q`` a prime ``= 3 mod 4``)
matrices: ``576 = 12 x 12 x 4`` and ``1536 = 12 x 128`` (SmolLM2), ``128``, ``352 = 44 x 8`` (the tiny
Llama). A full Hadamard spreads every channel over all ``d`` channels with equal weight
``1/sqrt(d)`` (the smallest largest entry an orthogonal matrix can have), which is why it is
preferred over a Hadamard of ``2^a`` Kronecker a random orthogonal block. Sizes without one
get ``H_(2^a)`` Kronecker a seeded random orthogonal matrix of the odd rest (that fallback,
or ``kind="random"``: one seeded random orthogonal matrix of the whole size, via QR).

Supported: Llama-style models with RMSNorm (``llama``, ``mistral``, ``qwen2``, ``qwen3``; Qwen3's
per-head q/k norms act after q/k and are untouched). LayerNorm models (OPT, GPT-2) would need
the mean subtraction folded first: a ``ValueError`` says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .graph import LLAMA_LIKE, decoder_layers

__all__ = ["Rotation", "hadamard", "hadamard_factors", "random_orthogonal", "make_rotation", "rotate_",
           "OnlineRotation", "attach_online_rotations", "online_rotations", "restore_online_rotations",
           "ROTATION_KINDS", "ONLINE_MODES"]

ROTATION_KINDS = ("hadamard", "random")
ONLINE_MODES = ("host", "none")


# --------------------------------------------------------------------------- matrices


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(m: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``m = q + 1``, ``q`` prime, ``q = 3 mod 4``."""
    q = m - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(m, dtype=torch.float64)


def _paley_ok(m: int) -> bool:
    return m >= 4 and m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3


def hadamard_factors(n: int) -> list[int] | None:
    """Orders of Hadamard matrices whose Kronecker product has order ``n`` (Paley orders, then
    one power of two), or None when this construction has none (``n`` not ``2^a * m1 * m2 ...``
    with Paley orders ``m_i``)."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        return [n] if n > 1 else []
    for m in range(4, n + 1, 4):
        if n % m == 0 and _paley_ok(m) and m & (m - 1):
            rest = hadamard_factors(n // m)
            if rest is not None:
                return [m] + rest
    return None if n > 1 else []


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``, float64), from
    :func:`hadamard_factors`; ``ValueError`` when there is none of that construction."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} from Sylvester and Paley factors; use "
                         f"kind='random' (or the power-of-two x random orthogonal fallback of make_rotation)")
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in f:
        h = torch.kron(h, _sylvester(m) if m & (m - 1) == 0 else _paley(m))
    return h


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``[n, n]`` matrix (float64; QR of a Gaussian, signs fixed so that it
    is Haar-distributed), from ``generator``."""
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r)).reshape(1, -1)).contiguous()


@dataclass
class Rotation:
    """An orthogonal ``Q = diag(signs) (F_1 x F_2 x ...)`` (``x``: Kronecker product; each
    factor orthogonal, float64). Rows are rotated as ``x -> x Q``."""

    factors: list[torch.Tensor]
    signs: torch.Tensor | None = None
    label: str = ""
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(math.prod(f.shape[0] for f in self.factors))

    def matrix(self) -> torch.Tensor:
        """Dense ``Q`` (float64 ``[n, n]``)."""
        if self._dense is None:
            q = torch.ones(1, 1, dtype=torch.float64)
            for f in self.factors:
                q = torch.kron(q, f)
            if self.signs is not None:
                q = self.signs.reshape(-1, 1) * q
            self._dense = q
        return self._dense

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x Q`` for rows ``x`` ``[..., n]`` (in ``x``'s dtype), factor by factor."""
        n = self.size
        if x.shape[-1] != n:
            raise ValueError(f"rotation of size {n} applied to rows of {x.shape[-1]}")
        shape = x.shape
        y = x.reshape(-1, n)
        if self.signs is not None:
            y = y * self.signs.to(y.dtype)
        sizes = [f.shape[0] for f in self.factors]
        t = y.reshape(-1, *sizes)
        for i, f in enumerate(self.factors):  # contract axis i+1 with f: y[.., l, ..] = sum_j y[.., j, ..] f[j, l]
            t = torch.tensordot(t, f.to(t.dtype), dims=([i + 1], [0]))  # new axis last
            t = t.movedim(-1, i + 1)
        return t.reshape(shape)


def make_rotation(n: int, kind: str = "hadamard", seed: int = 0) -> Rotation:
    """The rotation of size ``n`` (see the module docstring). ``kind="hadamard"``: a randomized
    Hadamard when one exists, else ``H_(2^a)`` x a random orthogonal matrix of the odd rest;
    ``kind="random"``: a random orthogonal matrix. Deterministic in ``seed``."""
    if kind not in ROTATION_KINDS:
        raise ValueError(f"rotation kind must be one of {', '.join(map(repr, ROTATION_KINDS))}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"rotation size must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(int(seed) * 1000003 + n)
    if kind == "random":
        return Rotation([random_orthogonal(n, g)], None, f"random orthogonal {n}")
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    f = hadamard_factors(n)
    if f:
        mats = [(_sylvester(m) if m & (m - 1) == 0 else _paley(m)) / math.sqrt(m) for m in f]
        return Rotation(mats, signs, "randomized Hadamard " + " x ".join(map(str, f)))
    p2 = n & -n
    rest = n // p2
    mats = ([_sylvester(p2) / math.sqrt(p2)] if p2 > 1 else []) + [random_orthogonal(rest, g)]
    label = (f"randomized Hadamard {p2} x random orthogonal {rest}" if p2 > 1 else
             f"random orthogonal {rest} with random signs")
    return Rotation(mats, signs, label + f" (no Hadamard of order {n})")


# --------------------------------------------------------------------------- the model


class OnlineRotation(nn.Module):
    """``x -> x Q`` on the host, in float (a forward pre-hook of the layer it feeds), registered
    as the submodule ``online_rotation`` of that layer. Its buffers (``signs``, ``factor0``,
    ``factor1``, ...: the :class:`Rotation`) are in the model's state dict, so a saved model
    carries them (a loader that does not know them fails on them instead of silently
    dropping the rotation); :func:`restore_online_rotations` rebuilds the hooks from them."""

    def __init__(self, rotation: Rotation) -> None:
        super().__init__()
        self.rotation = rotation
        self.register_buffer("signs", rotation.signs if rotation.signs is not None
                             else torch.ones(rotation.size, dtype=torch.float64))
        for i, f in enumerate(rotation.factors):
            self.register_buffer(f"factor{i}", f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nf = len(self.rotation.factors)
        return Rotation([getattr(self, f"factor{i}") for i in range(nf)], self.signs).apply(x)

    def hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self.forward(args[0]), *args[1:])


def attach_online_rotations(model: nn.Module, rotations: dict[str, Rotation]) -> None:
    """Register the host rotation of each ``{layer name: Rotation}`` as a forward pre-hook of
    that layer (again after the layer was replaced, e.g. by :class:`SFxLinear`). The hook is
    recorded on the layer as ``_superfloat_online_rotation`` (one per layer)."""
    for name, rot in rotations.items():
        mod = model.get_submodule(name)
        old = getattr(mod, "_superfloat_online_rotation", None)
        if old is not None:
            old.remove()
        op = OnlineRotation(rot)
        mod.online_rotation = op
        mod._superfloat_online_rotation = mod.register_forward_pre_hook(op.hook)


def online_rotations(model: nn.Module) -> dict[str, Rotation]:
    """``{layer name: Rotation}`` of the online (host) rotations attached to ``model``."""
    return {n: m.online_rotation.rotation for n, m in model.named_modules()
            if isinstance(getattr(m, "online_rotation", None), OnlineRotation)}


def restore_online_rotations(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Re-attach the online rotations recorded in a state dict (``<layer>.online_rotation.signs``,
    ``.factor0``, ...; what a saved rotated model holds) to ``model``'s layers. Returns the layers."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if ".online_rotation." in key:
            layer, buf = key.split(".online_rotation.", 1)
            found.setdefault(layer, {})[buf] = t
    rots = {}
    for layer, bufs in found.items():
        nf = sum(1 for b in bufs if b.startswith("factor"))
        if "signs" not in bufs or nf == 0 or any(f"factor{i}" not in bufs for i in range(nf)):
            raise ValueError(f"online rotation of {layer}: incomplete buffers {sorted(bufs)}")
        rots[layer] = Rotation([bufs[f"factor{i}"].to(torch.float64) for i in range(nf)],
                               bufs["signs"].to(torch.float64), "restored")
    attach_online_rotations(model, rots)
    return sorted(rots)


def _model_type(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in LLAMA_LIKE:
        raise ValueError(f"rotations support Llama-style models with RMSNorm ({', '.join(LLAMA_LIKE)}); "
                         f"{type(model).__name__} has model_type {mt!r} (LayerNorm models need the mean "
                         f"subtraction folded first, not implemented)")
    return mt


def _mul_cols_(lin: nn.Linear, m: torch.Tensor) -> None:
    """``W -> W m`` (``m`` ``[K, K']``, float64)."""
    w = lin.weight
    lin.weight = nn.Parameter((w.detach().to(torch.float64) @ m).to(w.dtype), requires_grad=w.requires_grad)


def _mul_rows_(lin: nn.Linear, m: torch.Tensor) -> None:
    """``W -> m^T W`` and ``b -> b m`` (output ``y -> y m``)."""
    w = lin.weight
    lin.weight = nn.Parameter((m.t() @ w.detach().to(torch.float64)).to(w.dtype), requires_grad=w.requires_grad)
    if lin.bias is not None:
        b = lin.bias
        lin.bias = nn.Parameter((b.detach().to(torch.float64) @ m).to(b.dtype), requires_grad=b.requires_grad)


def _absorb_norm_(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.detach().to(torch.float64)
    for lin in readers:
        _mul_cols_(lin, torch.diag(g))
    with torch.no_grad():
        norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} has a bias: not an RMSNorm")


@torch.no_grad()
def rotate_(model: nn.Module, *, kind: str = "hadamard", seed: int = 0, online: str = "host",
            heads: bool = True) -> dict[str, Any]:
    """Fold norm scales and rotations into the float ``model`` (in place); see the module docstring.

    Returns:
        ``{"residual", "down", "heads": rotation labels or None, "online": {layer: Rotation}
        (the host rotations, already attached as pre-hooks), "untied": bool}``.
    """
    _model_type(model)
    if online not in ONLINE_MODES:
        raise ValueError(f"online rotation must be one of {', '.join(map(repr, ONLINE_MODES))}, got {online!r}")
    if not isinstance(heads, bool):
        raise TypeError(f"heads must be a bool, got {heads!r}")
    cfg = model.config
    d = cfg.hidden_size
    n_heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hd = getattr(cfg, "head_dim", None) or d // n_heads
    prefix, blocks = decoder_layers(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear LM head to rotate")
    final_norm = model.get_submodule(prefix.rsplit(".", 1)[0] + ".norm")
    q_res = make_rotation(d, kind, seed)
    qm = q_res.matrix()

    # untie: the head gets its own tensor (it absorbs the final norm, the embedding does not)
    untied = head.weight is emb.weight
    if untied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        for c in (cfg, getattr(cfg, "get_text_config", lambda: cfg)()):
            c.tie_word_embeddings = False

    ew = emb.weight
    emb.weight = nn.Parameter((ew.detach().to(torch.float64) @ qm).to(ew.dtype), requires_grad=ew.requires_grad)
    _absorb_norm_(final_norm, [head])
    _mul_cols_(head, qm)

    q_heads = make_rotation(hd, "hadamard", seed + 1) if heads else None
    q_down = make_rotation(cfg.intermediate_size, kind, seed + 2) if online == "host" else None
    online_rot: dict[str, Rotation] = {}
    for i, blk in enumerate(blocks):
        attn, mlp = blk.self_attn, blk.mlp
        _absorb_norm_(blk.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _absorb_norm_(blk.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _mul_cols_(lin, qm)
        for lin in (attn.o_proj, mlp.down_proj):
            _mul_rows_(lin, qm)
        if q_heads is not None:
            hm = q_heads.matrix()
            _mul_rows_(attn.v_proj, torch.block_diag(*[hm] * kv))
            _mul_cols_(attn.o_proj, torch.block_diag(*[hm] * n_heads))
        if q_down is not None:
            _mul_cols_(mlp.down_proj, q_down.matrix())
            online_rot[f"{prefix}.{i}.mlp.down_proj"] = q_down
    attach_online_rotations(model, online_rot)
    return {"residual": q_res.label, "down": None if q_down is None else q_down.label,
            "heads": None if q_heads is None else q_heads.label, "online": online_rot, "untied": bool(untied)}

"""Perplexity, with one protocol everywhere (``sfx eval``, benches, tests).

**Protocol** (the sliding-window recipe of the Hugging Face perplexity guide, with every
token counted exactly once):

* The text is tokenized once, without special tokens, into ``n`` ids (optionally cut to
  ``max_tokens``). Token 0 has no context and is never scored; tokens ``1..n-1`` are each
  scored exactly once, so ``tokens = n - 1``.
* Windows of at most ``context`` input tokens start at ``0, stride, 2*stride, ...``
  (``1 <= stride <= context``). A window starting at ``b`` with ``L`` inputs predicts the
  targets ``b+1 .. b+L``; it scores only the targets that no earlier window scored.
  So with ``stride < context`` every target after the first window sees at least
  ``context - stride + 1`` tokens of context; ``stride == context`` gives disjoint windows.
* ``perplexity = exp(sum of NLL over scored tokens / number of scored tokens)``, the NLL
  in nats from ``log_softmax`` of float32 logits, summed in float64.
* Windows are batched (``batch_size``) with right padding. Padding is masked by
  *position* (never by token id: a real token may equal the pad id) and is never
  scored; causal attention means it cannot change the real positions either.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["PerplexityResult", "ReferencePass", "window_plan", "perplexity", "text_perplexity"]


class ReferencePass:
    """A reference model (e.g. the float model) for :func:`perplexity` whose per-window
    results (argmax of every scored position, summed NLL) are kept, so that a second
    evaluation of the same tokens and windows (another backend) does not run it again."""

    def __init__(self, model: Callable) -> None:
        self.model = model
        self._windows: dict[tuple, tuple[torch.Tensor, float]] = {}

    def scored(self, key: tuple, inp: torch.Tensor, attn: torch.Tensor, score: torch.Tensor,
               tgt: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(argmax [scored], summed NLL)`` of one batch of windows (cached by ``key``)."""
        hit = self._windows.get(key)
        if hit is None:
            dev = _device_of(self.model)
            sel = _call(self.model, inp.to(dev), attn.to(dev))[score.to(dev)].float()
            nll = float(F.cross_entropy(sel, tgt[score].to(dev), reduction="none").double().sum())
            hit = self._windows[key] = (sel.argmax(-1).cpu(), nll)
        return hit


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float          # mean negative log-likelihood, nats per scored token
    tokens: int         # scored tokens (= total_tokens - 1)
    total_tokens: int   # tokens in the evaluated stream
    windows: int
    context: int
    stride: int
    seconds: float      # the model's forward passes and scoring (not the reference's)
    #: with ``reference``: its perplexity on the same tokens, and the share of scored positions
    #: where the model's argmax equals the reference's (``top1_agreement``)
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    #: CPU seconds of this process in the same spans as ``seconds`` (all its threads): the work,
    #: whatever else runs on the machine
    cpu_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_plan(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, length, skip)``: inputs ``ids[begin:begin+length]``, targets
    ``ids[begin+1:begin+length+1]`` of which the first ``skip`` are not scored (an earlier
    window scored them). Every target ``1..n_tokens-1`` is scored exactly once."""
    _check_window(context, stride)
    plan = []
    last = 0  # index of the last scored target (token 0 is never a target)
    b = 0
    while last < n_tokens - 1:
        length = min(context, n_tokens - 1 - b)
        first = max(b + 1, last + 1)
        plan.append((b, length, first - (b + 1)))
        last = b + length
        b += stride
    return plan


def _check_window(context: Any, stride: Any) -> None:
    for name, v in (("context", context), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed context ({context}): tokens between windows would never "
                         f"be scored")


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _call(model: Callable, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "use_cache"):
        kwargs["use_cache"] = False
    return _logits(model(**kwargs))


@torch.no_grad()
def perplexity(model: Callable, input_ids: Any, *, context: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 1, pad_token_id: int = 0,
               progress: bool = True, desc: str = "perplexity", reference: Callable | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``input_ids`` (1-D) by the module's protocol.

    Args:
        model: a causal LM (or any callable taking ``input_ids``/``attention_mask`` and
            returning logits ``[B, L, V]``, directly or as ``.logits``).
        input_ids: 1-D ids (tensor or sequence).
        context: window length (model inputs per window).
        stride: window step, ``1..context``; default ``context`` (disjoint windows).
        max_tokens: evaluate only the first ``max_tokens`` ids.
        batch_size: windows per forward pass (right-padded; padding never scored).
        pad_token_id: id written into padding positions (irrelevant to the result).
        progress: tqdm bar on stderr.
        reference: another model (e.g. the float model), or a :class:`ReferencePass` of one,
            run on the same windows in the same pass: its perplexity and the top-1 agreement
            of ``model`` with it are returned too.
    """
    stride = context if stride is None else stride
    _check_window(context, stride)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    n = int(ids.numel())
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n} (is the text empty?)")
    plan = window_plan(n, context, stride)
    device = _device_of(model)
    was_training = bool(getattr(model, "training", False))
    if reference is not None and not isinstance(reference, ReferencePass):
        reference = ReferencePass(reference)
    ref_model = None if reference is None else reference.model
    ref_training = bool(getattr(ref_model, "training", False))
    for m in (model, ref_model):
        if hasattr(m, "eval"):
            m.eval()
    from tqdm.auto import tqdm

    seconds = cpu_seconds = 0.0
    total = ref_total = 0.0
    count = agree = 0
    bar = tqdm(total=n - 1, desc=desc, unit="tok", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for i in range(0, len(plan), batch_size):
            group = plan[i:i + batch_size]
            width = max(length for _, length, _ in group)
            inp = torch.full((len(group), width), int(pad_token_id), dtype=torch.long)
            tgt = torch.zeros((len(group), width), dtype=torch.long)
            attn = torch.zeros((len(group), width), dtype=torch.long)
            score = torch.zeros((len(group), width), dtype=torch.bool)
            for r, (b, length, skip) in enumerate(group):
                inp[r, :length] = ids[b:b + length]
                tgt[r, :length] = ids[b + 1:b + length + 1]
                attn[r, :length] = 1
                score[r, skip:length] = True
            t0, c0 = time.perf_counter(), time.process_time()
            logits = _call(model, inp.to(device), attn.to(device))
            if logits.shape[:2] != (len(group), width):
                raise ValueError(f"model returned logits of shape {list(logits.shape)} for inputs "
                                 f"{[len(group), width]}")
            sel = logits[score.to(logits.device)].float()
            nll = F.cross_entropy(sel, tgt[score].to(sel.device), reduction="none")
            total += float(nll.double().sum())
            seconds += time.perf_counter() - t0
            cpu_seconds += time.process_time() - c0
            if reference is not None:
                key = (inp.numpy().tobytes(), tgt.numpy().tobytes(), score.numpy().tobytes())
                rarg, rnll = reference.scored(key, inp, attn, score, tgt)
                ref_total += rnll
                agree += int((rarg == sel.argmax(-1).cpu()).sum())
            k = int(score.sum())
            count += k
            bar.update(k)
    finally:
        bar.close()
        if was_training:
            model.train()
        if ref_training:
            ref_model.train()
    assert count == n - 1, (count, n)
    mean = total / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count, total_tokens=n, windows=len(plan),
                            context=context, stride=stride, seconds=seconds, cpu_seconds=cpu_seconds,
                            reference_perplexity=None if reference is None else math.exp(ref_total / count),
                            top1_agreement=None if reference is None else agree / count)


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def text_perplexity(model: Callable, tokenizer: Any, text: str, **kw: Any) -> PerplexityResult:
    """Tokenize ``text`` (no special tokens) and run :func:`perplexity`."""
    from .data import tokenize

    ids = tokenize(tokenizer, text, kw.get("max_tokens"))
    pad = getattr(tokenizer, "pad_token_id", None)
    kw.setdefault("pad_token_id", pad if pad is not None else 0)
    return perplexity(model, ids, **kw)

"""Text generation from one or several (quantized) models, for side-by-side comparison (``sfx generate``
lays them out)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["generate", "generate_many"]


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this one has none")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids.reshape(1, -1)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.numel() == 0:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[bos]])
    return ids


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 40, sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             chat: bool = False) -> str:
    """The continuation of ``prompt`` (not including it). Greedy unless ``sample``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = _prompt_ids(tokenizer, prompt, chat)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[1] + max_new_tokens > limit:
        room = limit - ids.shape[1]
        raise ValueError(f"the prompt's {ids.shape[1]} tokens plus --max-new-tokens {max_new_tokens} exceed the "
                         f"model's {limit} positions (max_position_embeddings): "
                         + (f"give --max-new-tokens {room} or fewer" if room >= 1 else "shorten the prompt"))
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                          "attention_mask": torch.ones_like(ids)}
    if sample:
        kw.update(do_sample=True, temperature=temperature)
        if top_k is not None:
            kw["top_k"] = top_k
        if top_p is not None:
            kw["top_p"] = top_p
    else:
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(ids, **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_many(entries: Sequence[tuple[str, Any, Any]], prompt: str, **kw: Any) -> list[tuple[str, str]]:
    """``[(label, continuation)]`` for ``entries = [(label, model, tokenizer), ...]``."""
    return [(label, generate(model, tok, prompt, **kw)) for label, model, tok in entries]

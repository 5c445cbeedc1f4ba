"""Helpers shared by the WASQ tests (imported as ``wasq_helpers``: pytest puts tests/ on the path)."""
from __future__ import annotations


def smollm2_first_blocks(n: int = 2, tokens: int = 16):
    """SmolLM2-135M cut to its first ``n`` decoder blocks (real layers at a fraction of the cost)
    and the ids of a Hamlet line (``[1, tokens]``): ``(lm, ids)``, ``lm.model`` the cut model."""
    from superfloat.sw.wasq.models import load_model

    lm = load_model("smollm2-135m", progress=False)
    lm.model.model.layers = lm.model.model.layers[:n]
    lm.model.config.num_hidden_layers = n
    ids = lm.tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind",
                       return_tensors="pt").input_ids[:, :tokens]
    return lm, ids

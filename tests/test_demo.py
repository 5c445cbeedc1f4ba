"""``sfx demo``'s accelerator-exact perplexity step (issue 12) on a micro checkpoint: the figures
are those of an independent :func:`superfloat.sw.wasq.evaluate.perplexity` call on the same
tokens, and the summary prints them. (The whole demo on SmolLM2 and Verilator is ``make demo``.)"""
from __future__ import annotations

import re

import pytest
import torch

from superfloat.sim import cosim as cs

from test_cosim import micro_checkpoint, micro_model


@pytest.fixture(scope="module")
def ck16(tmp_path_factory):
    return micro_checkpoint(tmp_path_factory.mktemp("demo") / "llama8", "llama", weight_bits=8, act_bits=8,
                            out_bits=16)


def test_demo_perplexity_equals_an_independent_evaluation_and_is_printed(ck16):
    from superfloat.cli import demo
    from superfloat.sw.wasq import load_checkpoint
    from superfloat.sw.wasq.accelerator import set_backend
    from superfloat.sw.wasq.evaluate import perplexity

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (48,), generator=g)
    fm = micro_model("llama")  # the float model the checkpoint was quantized from
    d = demo.checkpoint_perplexity(ck16, fm, ids)

    model = load_checkpoint(ck16)
    set_backend(model, "accelerator")
    acc = perplexity(model, ids, context=48, progress=False, reference=micro_model("llama"))
    set_backend(model, "fake")
    fake = perplexity(model, ids, context=48, progress=False)
    assert d["tokens"] == acc.tokens == 47
    assert d["accelerator"] == acc.perplexity and d["accelerator_top1"] == acc.top1_agreement
    assert d["float"] == acc.reference_perplexity
    assert d["fake"] == fake.perplexity
    assert d["accelerator"] != d["fake"]  # the two backends differ on this model: the step ran both
    assert d["outputs"] > 0

    rep = cs.cosim(ck16, "model.layers.0.self_attn.q_proj", engine="reference", rows=4, cols=4, k_max=64, tokens=4,
                   fmax_mhz=50.0)
    d["data"] = "random bytes"
    text = "\n".join(demo.summary_lines({"report": rep, "checkpoint": "CK", "verilog": "V.v", "config": "SF8",
                                         "memory": {"model_safetensors_bytes": 10 ** 6}, "perplexity": d,
                                         "wall_s": 1.0}))
    line = next(ln for ln in text.splitlines() if ln.lstrip().startswith("perplexity"))
    rel = (acc.perplexity / acc.reference_perplexity - 1) * 100
    assert f"random bytes (47 scored): accelerator-exact {acc.perplexity:.4f} ({rel:+.2f} % vs float, top-1 " \
           f"agreement {acc.top1_agreement:.1%}" in line
    assert f"fake-quantized {fake.perplexity:.4f}" in line and line.endswith(f"float {acc.reference_perplexity:.4f}")
    assert re.search(r"\d+ of \d+ output codes saturated", line)


def test_demo_ppl_tokens_is_range_checked(capsys):
    from superfloat.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--ppl-tokens", "1"])
    assert "argument --ppl-tokens: must be an integer in 2..8192, got 1" in capsys.readouterr().err

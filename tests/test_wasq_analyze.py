"""``sfx analyze`` (sw/wasq/analyze.py: per-layer activation deviation, ranking, clusters; cli/analysis.py:
CSV + PNG)."""
from __future__ import annotations

import copy
import csv

import pytest
import torch

from superfloat.cli.analysis import CSV_COLUMNS, read_analysis, write_analysis
from superfloat.sw.wasq.analyze import analyze, block_index, kmeans_1d, select_layers
from superfloat.sw.wasq.config import WASQConfig
from superfloat.sw.wasq.models import tiny_model
from superfloat.sw.wasq.quantize import candidate_layers, quantize_
from superfloat.sw.wasq.train import make_blocks



def _blocks(context=40, n=3):
    g = torch.Generator().manual_seed(3)
    return make_blocks(torch.randint(0, 256, (context * n - 7,), generator=g), context, 0)  # last block padded


def test_analyze_writes_csv_and_png_with_expected_columns(tmp_path):
    model = tiny_model("tiny-gpt2")
    cfg = WASQConfig(weight_bits=3)
    an = analyze(model, _blocks(), cfg, progress=False)
    names = list(candidate_layers(model, cfg))
    assert [s.layer for s in an.layers] == names  # model order
    assert sorted(s.rank for s in an.layers) == list(range(1, len(names) + 1))
    vals = [s.deviation for s in an.ranked()]
    assert vals == sorted(vals, reverse=True)
    assert an.critical() and all(s.critical == (s.cluster == max(x.cluster for x in an.layers)) for s in an.layers)
    csv_path, png_path = write_analysis(an, tmp_path / "out")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 5000
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(names)
    r0 = rows[0]
    assert r0["layer"] == "transformer.h.0.attn.c_attn" and r0["block"] == "0" and r0["kind"] == "c_attn"
    assert float(r0["float_mean_abs"]) > 0 and float(r0["quant_mean_abs"]) > 0 and float(r0["rel_error"]) > 0
    back = read_analysis(tmp_path / "out")
    assert [s.layer for s in back.ranked()] == [s.layer for s in an.ranked()]
    assert back.critical() == an.critical()


def test_analyze_counts_real_tokens_only_and_leaves_models_alone():
    model = tiny_model("tiny-llama")
    blocks = _blocks()
    start = copy.deepcopy(model.state_dict())
    an = analyze(model, blocks, WASQConfig(weight_bits=4), progress=False)
    assert an.tokens == blocks.n_tokens == 40 * 3 - 7
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    # quantizing more coarsely disturbs more
    an8 = analyze(model, blocks, WASQConfig(weight_bits=8), progress=False)
    assert sum(s.rel_error for s in an8.layers) < sum(s.rel_error for s in an.layers)
    # mean |output| of the float model does not depend on the quantization
    assert [s.float_mean_abs for s in an8.layers] == pytest.approx([s.float_mean_abs for s in an.layers], rel=1e-9)


def test_rel_error_metric_and_identity_quantization():
    model = tiny_model("tiny-opt")
    q = quantize_(copy.deepcopy(model), WASQConfig(weight_bits=16))
    an = analyze(model, _blocks(), WASQConfig(weight_bits=16), quant_model=q, metric="rel_error", progress=False)
    assert an.metric == "rel_error" and max(s.rel_error for s in an.layers) < 1e-3
    vals = [s.rel_error for s in an.ranked()]
    assert vals == sorted(vals, reverse=True)


def test_kmeans_1d_and_selection():
    labels, centres = kmeans_1d([0.1, 0.12, 0.11, 0.9, 1.0], 2)
    assert labels == [0, 0, 0, 1, 1] and centres[0] < centres[1]
    assert kmeans_1d([], 2) == ([], [])
    assert kmeans_1d([0.5, 0.5, 0.5], 3)[0] == [0, 0, 0]  # k capped at the number of distinct values
    with pytest.raises(ValueError, match="number of clusters must be a positive int"):
        kmeans_1d([1.0], 0)
    an = analyze(tiny_model("tiny-llama"), _blocks(n=1), WASQConfig(weight_bits=4), progress=False)
    assert len(select_layers(an, 0.1)) == 3 and len(select_layers(an, 1.0)) == len(an)
    assert select_layers(an, "cluster") == an.critical()
    for bad in (0, 1.5, "most", True):
        with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\] or 'cluster'"):
            select_layers(an, bad)


def test_block_index():
    assert block_index("model.layers.12.mlp.up_proj") == 12
    assert block_index("transformer.h.0.attn.c_attn") == 0
    assert block_index("lm_head") == -1


def test_analyze_errors(tmp_path):
    model = tiny_model("tiny-llama")
    cfg = WASQConfig(weight_bits=4)
    with pytest.raises(ValueError, match="metric must be one of 'deviation', 'rel_error'"):
        analyze(model, _blocks(), cfg, metric="max")
    with pytest.raises(ValueError, match="float_model is already quantized"):
        analyze(quantize_(copy.deepcopy(model), cfg), _blocks(), cfg)
    with pytest.raises(ValueError, match="nothing to quantize"):
        analyze(model, _blocks(), WASQConfig(weight_bits=4, skip=("*",)))
    with pytest.raises(ValueError, match="no analysis at"):
        read_analysis(tmp_path)
    (tmp_path / "layers.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an analysis CSV"):
        read_analysis(tmp_path)

"""The shared QAT loop (sw/wasq/train.py): blocks, loss masking, re-quantization after
optimizer steps, fp32 master weights, atomic resumable checkpoints (bit-exact resume)."""
from __future__ import annotations

import copy

import pytest
import torch

from superfloat.sw.wasq.config import WASQConfig
from superfloat.sw.wasq.models import tiny_model
from superfloat.sw.wasq.quantize import quantize_, quantized_layers
from superfloat.sw.wasq.train import (Blocks, TrainConfig, causal_lm_loss, evaluate_loss, freeze_all_but,
                                      latest_checkpoint, make_blocks, train)



def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: a repeated random "sentence" of bytes
    base = torch.randint(32, 127, (37,), generator=g)
    return base.repeat(n // 37 + 1)[:n]


def _qmodel(name="tiny-llama", bits=4):
    m = tiny_model(name)
    quantize_(m, WASQConfig(weight_bits=bits))
    return m


# --------------------------------------------------------------------------- blocks


def test_make_blocks_pads_last_piece_and_masks_labels():
    b = make_blocks(list(range(10)), 4, pad_id=99)
    assert b.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert b.attention_mask.tolist()[-1] == [1, 1, 0, 0]
    assert b.labels.tolist()[-1] == [8, 9, -100, -100]
    assert b.n_tokens == 10 and len(b) == 3 and b.context == 4
    # documents are cut separately; a 1-token tail has nothing to predict and is dropped
    d = make_blocks([[1, 2, 3, 4, 5], [6, 7]], 4, pad_id=0)
    assert d.input_ids.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0]]
    assert len(make_blocks(list(range(12)), 4, 0, max_blocks=2)) == 2
    assert len(make_blocks(list(range(10)), 4, 0, drop_partial=True)) == 2


@pytest.mark.parametrize("kwargs, msg", [
    ({"context": 1}, "context must be an int >= 2"),
    ({"context": 4, "max_blocks": 0}, "max_blocks must be a positive int"),
])
def test_make_blocks_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_blocks(list(range(10)), pad_id=0, **kwargs)


def test_make_blocks_too_short():
    with pytest.raises(ValueError, match="no training block of context 8: the text has too few tokens"):
        make_blocks([5], 8, 0)


@pytest.mark.parametrize("field, value, msg", [
    ("epochs", 0, "TrainConfig.epochs must be a positive int"),
    ("lr", -1.0, "TrainConfig.lr must be a positive finite number"),
    ("scheduler", "step", "TrainConfig.scheduler must be one of"),
    ("max_steps", 0, "TrainConfig.max_steps must be a positive int or None"),
    ("warmup_steps", -1, "TrainConfig.warmup_steps must be an int >= 0"),
    ("max_grad_norm", 0.0, "TrainConfig.max_grad_norm must be positive or None"),
])
def test_train_config_errors(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**{field: value})


# --------------------------------------------------------------------------- loss masking


def test_padding_does_not_count_in_the_loss():
    m = _qmodel()
    ids = _ids(20)
    alone = make_blocks(ids, 20, pad_id=0)
    padded = make_blocks(ids, 32, pad_id=0)            # same 20 tokens + 12 pads
    other_pad = make_blocks(ids, 32, pad_id=200)       # the pad id must not matter either
    with torch.no_grad():
        la, na = causal_lm_loss(m(input_ids=alone.input_ids, attention_mask=alone.attention_mask).logits, alone.labels)
        lp, n_p = causal_lm_loss(m(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits,
                                 padded.labels)
        lo, _ = causal_lm_loss(m(input_ids=other_pad.input_ids, attention_mask=other_pad.attention_mask).logits,
                               other_pad.labels)
    assert na == n_p == 19  # 20 tokens predict 19 targets; the 12 pads predict nothing and are not predicted
    assert float(lp) == pytest.approx(float(la), rel=1e-6)
    assert float(lo) == float(lp)
    # and in training: a padded step has the gradient of the unpadded one
    grads = []
    for b in (alone, padded):
        mm = copy.deepcopy(m)
        logits = mm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loss, n = causal_lm_loss(logits, b.labels)
        (loss / n).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in mm.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- the loop


def test_few_qat_steps_lower_the_loss():
    m = _qmodel("tiny-gpt2")
    blocks = make_blocks(_ids(64 * 6), 64, 0)
    before, _ = evaluate_loss(m, blocks)
    stats = train(m, blocks, TrainConfig(epochs=3, lr=3e-3, scheduler="constant", progress=False))
    after, _ = evaluate_loss(m, blocks)
    assert stats.steps == 18 and stats.total_steps == 18
    assert after < before - 0.5, (before, after)
    assert stats.last_loss < stats.first_loss
    assert stats.tokens == 3 * blocks.n_tokens and stats.tokens_per_s > 0


def test_weights_are_requantized_after_every_optimizer_step():
    m = _qmodel("tiny-llama", bits=4)
    layers = quantized_layers(m)
    name, layer = next(iter(layers.items()))
    w0 = layer.weight.detach().clone()
    q0 = layer.qweight().clone()
    seen = []

    def after_step(step, loss):
        # what the forward uses now is the grid of the *updated* weight
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            y = layer(x)
            fresh = copy.deepcopy(layer)
            fresh.invalidate_cache()
            expect = torch.nn.functional.linear(x, fresh._compute_qweight(), fresh.bias)
        assert torch.equal(y, expect)
        seen.append(layer.qweight().clone())

    train(m, make_blocks(_ids(64 * 3), 64, 0), TrainConfig(epochs=1, lr=1e-2, scheduler="constant", progress=False),
          callback=after_step)
    assert not torch.equal(layer.weight.detach(), w0)
    assert len(seen) == 3 and not torch.equal(seen[0], q0) and not torch.equal(seen[1], seen[0])


def test_trains_only_requires_grad_parameters_and_refuses_half_precision():
    m = _qmodel()
    names = list(quantized_layers(m))[:2]
    trainable = freeze_all_but(m, names)
    assert sorted(trainable) == sorted(f"{n}.weight" for n in names)
    with pytest.raises(ValueError, match="layer 'nope' does not exist"):
        freeze_all_but(m, ["nope"])
    freeze_all_but(m, [])
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        train(m, make_blocks(_ids(64), 32, 0), TrainConfig(progress=False))
    h = tiny_model("tiny-llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"is torch.bfloat16; WASQ trains fp32 master weights only"):
        train(h, make_blocks(_ids(64), 32, 0), TrainConfig(progress=False))


# --------------------------------------------------------------------------- checkpoints / resume


class _Stop(Exception):
    pass


@pytest.mark.parametrize("dropout", [False, True])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, dropout):
    blocks = make_blocks(_ids(48 * 5, seed=1), 48, 0)
    cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=2, save_every=1, dropout=dropout, progress=False)
    ref = _qmodel("tiny-gpt2")  # GPT-2 has dropout 0.1: with dropout=True the RNG state matters too
    start = copy.deepcopy(ref)
    full = train(ref, blocks, cfg, state_dir=tmp_path / "a")

    m = copy.deepcopy(start)

    def stop(step, loss):
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(m, blocks, cfg, state_dir=tmp_path / "b", callback=stop)
    ck = latest_checkpoint(tmp_path / "b")
    assert ck is not None and ck.name == "checkpoint-00000002"
    assert not list((tmp_path / "b").glob(".tmp-*"))
    with pytest.raises(ValueError, match="already holds training checkpoints .*pass resume=True"):
        train(copy.deepcopy(start), blocks, cfg, state_dir=tmp_path / "b")
    m2 = copy.deepcopy(start)  # a fresh process would rebuild the model like this
    res = train(m2, blocks, cfg, state_dir=tmp_path / "b", resume=True)
    assert res.resumed_from == 2 and res.steps == full.steps == 6
    assert res.losses == full.losses
    for (n, a), (_, b) in zip(ref.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    # a resume with other settings is refused, naming what differs
    with pytest.raises(ValueError, match=r"cannot resume: .*cfg.lr: checkpoint 0.005 != now 0.001"):
        train(copy.deepcopy(start), blocks, TrainConfig(epochs=2, lr=1e-3, batch_size=2, dropout=dropout,
                                                        progress=False), state_dir=tmp_path / "b", resume=True)


def test_interrupted_save_leaves_no_loadable_checkpoint(tmp_path):
    # a half-written checkpoint is a hidden temporary directory: ignored and cleaned up
    (tmp_path / ".tmp-checkpoint-00000009").mkdir()
    (tmp_path / "checkpoint-00000007").mkdir()  # no trainer_state.json: incomplete, ignored
    assert latest_checkpoint(tmp_path) is None
    m = _qmodel()
    train(m, make_blocks(_ids(64), 32, 0), TrainConfig(max_steps=1, progress=False), state_dir=tmp_path, resume=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001"
    assert not (tmp_path / ".tmp-checkpoint-00000009").exists()


def test_resume_needs_a_state_dir():
    with pytest.raises(ValueError, match="resume=True needs a state_dir"):
        train(_qmodel(), make_blocks(_ids(64), 32, 0), TrainConfig(progress=False), resume=True)
    with pytest.raises(TypeError, match="blocks must be a Blocks"):
        train(_qmodel(), torch.zeros(2, 4), TrainConfig(progress=False))
    assert isinstance(make_blocks(_ids(64), 32, 0), Blocks)

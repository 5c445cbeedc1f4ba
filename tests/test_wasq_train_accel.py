"""QAT on the accelerator's arithmetic (methods(..., backend="accelerator"), sfx finetune --backend
accelerator): the training forward is the accelerator's, the loss decreases, the output exponents
are calibrated before training (and per epoch on request), resumed exactly, and saved in the
checkpoint, which then evaluates accelerator-exact as it is; --init runs a post-training method first."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from superfloat import cli
from superfloat.sw.wasq import WASQConfig
from superfloat.sw.wasq.accelerator import backend_of, set_backend
from superfloat.sw.wasq.checkpoint import load_checkpoint, save_checkpoint
from superfloat.sw.wasq.methods import OutputCalibration, calibration_batches, fasteropt, fpm, opt
from superfloat.sw.wasq.models import tiny_model
from superfloat.sw.wasq.quantize import quantize_, quantized_layers
from superfloat.sw.wasq.train import TrainConfig, default_forward, evaluate_loss, latest_checkpoint, make_blocks


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(32, 127, (37,), generator=g)  # a learnable stream: a repeated random "sentence"
    return base.repeat(n // 37 + 1)[:n]


def _exponents(model) -> dict[str, np.ndarray]:
    return {n: np.asarray(m.out_exponent).copy() for n, m in quantized_layers(model).items()}


class _Stop(Exception):
    pass


def test_training_forward_is_the_accelerators_and_the_loss_decreases():
    model = tiny_model("tiny-llama")
    blocks = make_blocks(_ids(32 * 4), 32, 0)
    seen = {"steps": 0, "checked": 0}

    def forward(m, batch):
        logits = default_forward(m, batch)
        if seen["checked"] < 2:  # the values training sees are exactly the accelerator's ...
            assert backend_of(m) == "accelerator"
            with torch.no_grad():
                want = default_forward(m, batch)
                assert torch.equal(logits.detach(), want)
                set_backend(m, "fake")  # ... which are not the fake-quantized model's
                fake = default_forward(m, batch)
                set_backend(m, "accelerator")
            assert not torch.equal(want, fake)
            seen["checked"] += 1
        return logits

    def callback(step, loss):
        assert backend_of(model) == "accelerator"
        seen["steps"] = step

    res = fpm(model, blocks, WASQConfig(weight_bits=4), TrainConfig(epochs=2, lr=3e-3, progress=False),
              backend="accelerator", outputs=OutputCalibration(tokens=64), forward=forward, callback=callback)
    assert res.train.backend == "accelerator" and seen["steps"] == res.train.steps == 8 and seen["checked"] == 2
    assert res.train.losses[-1] < 0.8 * res.train.losses[0]
    cal = res.extra["output_calibration"]
    assert res.extra["backend"] == "accelerator" and cal["recalibrate"] == "never"
    assert [e["when"] for e in cal["events"]] == ["before training"] and cal["events"][0]["tokens"] == 64
    # every layer has calibrated exponents; the trained model still runs on the accelerator
    assert all(m.out_exponent is not None and m.backend == "accelerator" for m in quantized_layers(model).values())


def test_saved_checkpoint_runs_accelerator_exact_with_its_exponents(tmp_path):
    model = tiny_model("tiny-llama")
    blocks = make_blocks(_ids(32 * 3, seed=2), 32, 0)
    fpm(model, blocks, WASQConfig(weight_bits=4), TrainConfig(max_steps=2, lr=1e-3, progress=False),
        backend="accelerator", outputs=OutputCalibration(tokens=32))
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    want = _exponents(model)
    got = _exponents(loaded)
    assert want.keys() == got.keys() and all(np.array_equal(want[n], got[n]) for n in want)
    set_backend(loaded, "accelerator")  # no recalibration needed
    x = blocks.input_ids[:1]
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_fake_backend_calibrates_after_training_and_opt_trains_on_the_accelerator():
    blocks = make_blocks(_ids(32 * 2, seed=3), 32, 0)
    m1 = tiny_model("tiny-llama")
    res = fpm(m1, blocks, WASQConfig(weight_bits=4), TrainConfig(max_steps=1, progress=False),
              outputs=OutputCalibration(tokens=32))
    assert res.train.backend == "fake" and backend_of(m1) == "fake"
    assert [e["when"] for e in res.extra["output_calibration"]["events"]] == ["after training"]
    assert all(m.out_exponent is not None for m in quantized_layers(m1).values())
    # without outputs= the fake backend calibrates nothing (the Python API as before)
    m2 = tiny_model("tiny-llama")
    res = fpm(m2, blocks, WASQConfig(weight_bits=4), TrainConfig(max_steps=1, progress=False))
    assert "output_calibration" not in res.extra and all(m.out_exponent is None for m in quantized_layers(m2).values())
    m3 = tiny_model("tiny-llama")
    res = opt(m3, blocks, WASQConfig(weight_bits=4), TrainConfig(max_steps=1, progress=False),
              layers=["model.layers.1.mlp.down_proj"], backend="accelerator")
    assert res.train.backend == "accelerator" and res.extra["output_calibration"]["tokens"] == 2048


def test_recalibrate_every_epoch_and_resume_restores_the_exponents(tmp_path):
    blocks = make_blocks(_ids(32 * 2, seed=4), 32, 0)
    cfg = TrainConfig(epochs=2, lr=2e-2, save_every=1, progress=False)
    out = OutputCalibration(tokens=64, recalibrate="epoch")
    start = tiny_model("tiny-llama")
    full_model = copy.deepcopy(start)
    full = fpm(full_model, blocks, WASQConfig(weight_bits=4), cfg, backend="accelerator", outputs=out,
               state_dir=tmp_path / "a")
    assert [e["when"] for e in full.extra["output_calibration"]["events"]] == ["before training", "epoch 1"]

    def stop(step, loss):
        if step == 3:  # in epoch 1, after its recalibration
            raise _Stop

    with pytest.raises(_Stop):
        fpm(copy.deepcopy(start), blocks, WASQConfig(weight_bits=4), cfg, backend="accelerator", outputs=out,
            state_dir=tmp_path / "b", callback=stop)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-00000003"
    m = copy.deepcopy(start)
    res = fpm(m, blocks, WASQConfig(weight_bits=4), cfg, backend="accelerator", outputs=out,
              state_dir=tmp_path / "b", resume=True)
    assert res.train.resumed_from == 3 and res.train.losses == full.train.losses
    want, got = _exponents(full_model), _exponents(m)
    assert all(np.array_equal(want[n], got[n]) for n in want)
    for (n, a), (_, b) in zip(full_model.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a, b), n
    # another backend cannot resume this run
    with pytest.raises(ValueError, match=r"cannot resume: .*backend: checkpoint 'accelerator' != now 'fake'"):
        fpm(copy.deepcopy(start), blocks, WASQConfig(weight_bits=4), cfg, outputs=out, state_dir=tmp_path / "b",
            resume=True)


def test_init_runs_the_post_training_method_first():
    blocks = make_blocks(_ids(32 * 2, seed=5), 32, 0)
    config = WASQConfig(weight_bits=4, method="adaround", method_options={"adaround_iters": 5})
    ref = tiny_model("tiny-llama")
    quantize_(ref, config, calibration=calibration_batches(blocks, 64))
    want = {n: m.export().codes for n, m in quantized_layers(ref).items()}
    model = tiny_model("tiny-llama")
    got = {}

    def forward(m, batch):  # before the first optimizer step: the post-training method's codes
        if not got:
            got.update({n: layer.export().codes for n, layer in quantized_layers(m).items()})
        return default_forward(m, batch)

    fpm(model, blocks, config, TrainConfig(max_steps=1, progress=False), backend="accelerator",
        outputs=OutputCalibration(tokens=64), forward=forward)
    assert want.keys() == got.keys() and all(np.array_equal(want[n], got[n]) for n in want)


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"backend": "gpu"}, ValueError, "fpm: backend must be one of 'fake', 'accelerator', got 'gpu'"),
    ({"outputs": 2048}, TypeError, "fpm: outputs must be an OutputCalibration or None, got int"),
])
def test_backend_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        fpm(tiny_model("tiny-llama"), make_blocks(_ids(64), 32, 0), WASQConfig(weight_bits=4),
            TrainConfig(max_steps=1, progress=False), **kwargs)


@pytest.mark.parametrize("kwargs, msg", [
    ({"tokens": 0}, "OutputCalibration.tokens must be a positive int, got 0"),
    ({"out_bits": 1}, "OutputCalibration.out_bits"),
    ({"headroom": 0.5}, "OutputCalibration.headroom must be a finite number >= 1, got 0.5"),
    ({"recalibrate": "step"}, "OutputCalibration.recalibrate must be one of 'never', 'epoch', 'end', got 'step'"),
])
def test_output_calibration_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        OutputCalibration(**kwargs)


def test_fasteropt_refuses_per_epoch_recalibration():
    with pytest.raises(ValueError, match="fasteropt: recalibrate='epoch' is not supported .*use opt"):
        fasteropt(tiny_model("tiny-llama"), make_blocks(_ids(64), 32, 0), WASQConfig(weight_bits=4),
                  TrainConfig(max_steps=1, progress=False), layers=["model.layers.1.mlp.down_proj"],
                  backend="accelerator", outputs=OutputCalibration(recalibrate="epoch"))


# --------------------------------------------------------------------------- CLI


TINY = ["--model", "tiny-llama", "--context", "32", "--tokens", "256", "--no-progress", "--weight-bits", "4"]


def test_cli_finetune_on_the_accelerator_then_eval_the_checkpoint(tmp_path, text, capsys):
    out = tmp_path / "run"
    rc = cli.main(["finetune", *TINY, "--data", text, "--max-steps", "3", "--lr", "1e-3", "--backend", "accelerator",
                   "--calib-tokens", "64", "--eval-tokens", "96", "--eval-split", "all", "-o", str(out)])
    assert rc == 0
    msg = capsys.readouterr().out
    assert "static output exponents calibrated on 64 training tokens (before training); trained on the accelerator" in msg
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["train"]["backend"] == "accelerator" and summary["backend"] == "accelerator"
    assert summary["eval"]["backend"] == "accelerator" and summary["eval"]["outputs"] > 0
    # the checkpoint evaluates accelerator-exact as it is, to the same perplexity
    rc = cli.main(["eval", "--model", str(out / "model"), "--data", text, "--split", "all", "--context", "32",
                   "--max-tokens", "96", "--backend", "accelerator", "--json", "--no-progress"])
    assert rc == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["backend"] == "accelerator" and ev["perplexity"] == pytest.approx(summary["eval"]["perplexity"], rel=1e-9)


def test_cli_fake_backend_checkpoint_also_has_exponents(tmp_path, text, capsys):
    out = tmp_path / "fake"
    assert cli.main(["finetune", *TINY, "--data", text, "--max-steps", "1", "--calib-tokens", "32",
                     "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["backend"] == "fake"
    assert [e["when"] for e in summary["output_calibration"]["events"]] == ["after training"]
    assert cli.main(["eval", "--model", str(out / "model"), "--data", text, "--split", "all", "--context", "32",
                     "--max-tokens", "64", "--backend", "accelerator", "--json", "--no-progress"]) == 0


@pytest.mark.parametrize("extra, msg", [
    (["--recalibrate", "epoch"], "--recalibrate epoch applies to --backend accelerator"),
    (["--method", "fasteropt", "--backend", "accelerator", "--recalibrate", "epoch"],
     "--recalibrate epoch does not work with fasteropt"),
    (["--backend", "accelerator", "--init", "awq-dyngroup"],
     "--backend accelerator: awq-dyngroup SF4 .* is not executable by the SFx accelerator"),
    (["--init-option", "adaround_iters=5"], "--init-option sets a knob of the --init method: give --init METHOD"),
    (["--init", "adaround", "--init-option", "adaround_itrs=5"], "--init adaround: unknown method option"),
])
def test_cli_errors(tmp_path, text, capsys, extra, msg):
    assert cli.main(["finetune", *TINY, "--data", text, "--max-steps", "1", "-o", str(tmp_path / "e"), *extra]) == 2
    assert re.search(msg, capsys.readouterr().err)



def test_cli_init_option_needs_key_value(tmp_path, text, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", *TINY, "--data", text, "--init", "adaround", "--init-option", "adaround_iters",
                  "-o", str(tmp_path / "e")])
    assert "argument --init-option: expected KEY=VALUE (e.g. adaround_iters=50), got 'adaround_iters'" in \
        capsys.readouterr().err

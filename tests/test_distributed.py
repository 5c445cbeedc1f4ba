"""Multi-process fine-tuning (docs/distributed.md): two ranks on CPU (gloo) through ``accelerate launch``
train like one process with twice the batch, rank 0 alone writes and prints, with global figures; a
launch that accelerate sees as one process while the environment says several is an error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from superfloat import cli
from superfloat.sw.wasq import train as train_mod

ARGS = ["--method", "fpm", "--model", "tiny-gpt2", "--weight-bits", "4", "--context", "32", "--tokens", "256",
        "--max-steps", "3", "--no-progress", "--json"]


def _accelerate() -> str:
    exe = Path(sys.executable).with_name("accelerate")
    if not exe.is_file():
        pytest.skip("the accelerate launcher is not installed beside this python")
    return str(exe)


def test_two_ranks_train_like_one_process_with_twice_the_batch(tmp_path, text, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    out2 = tmp_path / "two"
    # the documented command for N CPU processes on one machine (no GPU here: the ranks use gloo)
    proc = subprocess.run([_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                           "-m", "superfloat.cli", "finetune", *ARGS, "--data", text, "-o", str(out2)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints
    two = json.loads(lines[0])
    assert two["world"] == 2 and two["train"]["world"] == 2
    assert two["train"]["tokens"] == 3 * 2 * 32  # global: 3 steps x 2 ranks x one 32-token block
    assert sorted(p.name for p in out2.iterdir()) == ["finetune.json", "model", "train_state"]
    assert json.loads((out2 / "finetune.json").read_text())["train"]["losses"] == two["train"]["losses"]

    out1 = tmp_path / "one"  # one process, the same global batches
    assert cli.main(["finetune", *ARGS, "--batch-size", "2", "--data", text, "-o", str(out1)]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["world"] == 1 and one["train"]["tokens"] == two["train"]["tokens"]
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-5)  # gradients averaged
    a, b = load_file(out1 / "model" / "model.safetensors"), load_file(out2 / "model" / "model.safetensors")
    assert set(a) == set(b)
    differing = sum(int((a[k] != b[k]).sum()) for k in a if not a[k].is_floating_point())
    codes = sum(a[k].numel() for k in a if not a[k].is_floating_point())
    assert differing <= codes // 10_000, f"{differing} of {codes} codes differ"
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()) < 1e-5


def test_launch_that_accelerate_sees_as_one_process_is_an_error(tmp_path, text, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    # what `accelerate launch --cpu --num_processes 2` gives its one process (no MPI)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert cli.main(["finetune", *ARGS, "--data", text, "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert ("accelerate launch --cpu was asked for several processes (--num_processes > 1 or --num_machines > 1) "
            "but started only this one: accelerate starts several CPU processes only through MPI") in err
    assert "accelerate launch --multi_gpu --num_processes N -m superfloat.cli finetune" in err
    assert not (tmp_path / "a").exists()
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("ACCELERATE_NUM_PROCESSES", "2")
    assert cli.main(["finetune", *ARGS, "--data", text, "-o", str(tmp_path / "b")]) == 2
    assert ("the environment says 2 processes (ACCELERATE_NUM_PROCESSES=2) but accelerate sees 1: the processes "
            "would train alone and write the same files") in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_NUM_PROCESSES")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    blocks = train_mod.make_blocks(list(range(64)), 16, 0)
    with pytest.raises(train_mod.DistributedLaunchError, match=r"says 4 processes on this machine \(LOCAL_WORLD_SIZE"
                                                               r"=4\) but accelerate sees 1"):
        train_mod.train(torch.nn.Linear(2, 2), blocks, train_mod.TrainConfig(max_steps=1, progress=False))


def test_launched_ranks_without_gpus_train_on_cpu(monkeypatch):
    monkeypatch.setattr(train_mod, "_has_accelerator_device", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_mod._accelerator_kwargs(None) == {"cpu": True}
    assert train_mod._accelerator_kwargs({"cpu": False}) == {"cpu": False}  # the caller's choice stands
    monkeypatch.setattr(train_mod, "_has_accelerator_device", lambda: True)
    assert train_mod._accelerator_kwargs({"mixed_precision": "no"}) == {"mixed_precision": "no"}  # GPUs: nccl
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(train_mod, "_has_accelerator_device", lambda: False)
    assert train_mod._accelerator_kwargs(None) == {}  # not launched: accelerate decides

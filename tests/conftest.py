"""Suite-wide settings. `make test` runs two pytest-xdist workers on two cores: one
torch thread each keeps them from oversubscribing the CPUs."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.fixture()
def text(tmp_path):
    """A small text file (240 short lines, ``corpus.txt``) for ``--data PATH`` of the CLI tests."""
    lines = [f"Line {i}: to be, or not to be, that is the question {i % 7}." for i in range(240)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)

"""Documentation examples run as doctests, and generated tables match their command."""
from __future__ import annotations

import doctest
import re
from pathlib import Path

import numpy as np
import pytest

from superfloat.cli.info import code_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _doctest_markdown(path: Path) -> None:
    text = path.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python examples in {path}"
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    np.set_printoptions(legacy=False)
    test = parser.get_doctest("\n".join(blocks), {}, path.name, str(path), 0)
    runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} doc example(s) failed in {path.name}"


def test_sfx_format_examples():
    _doctest_markdown(DOCS / "sfx-format.md")


def test_sf4_table_in_docs_is_the_command_output():
    assert code_table(4) in (DOCS / "sfx-format.md").read_text()


def test_code_table_rejects_wide_formats():
    with pytest.raises(ValueError, match=r"bits <= 8"):
        code_table(12)


def test_accelerator_exact_examples():
    _doctest_markdown(DOCS / "accelerator-exact.md")


def test_wasq_examples():
    """docs/wasq.md's worked example (tiny-llama): quantize_, export, checkpoint round trip, a method, formats."""
    _doctest_markdown(DOCS / "wasq.md")

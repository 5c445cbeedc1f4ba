"""``sfx bench rtl``'s verification counts: 10^6 codes per configuration on both simulators by
default, 2*10^4 with ``--quick``, and the documented reduced mode (``SFX_BENCH_RTL_VERIFY_CODES``)."""
from __future__ import annotations

import pytest

from superfloat.bench import rtl


def test_default_quick_and_reduced_counts(monkeypatch):
    monkeypatch.delenv(rtl.VERIFY_CODES_ENV, raising=False)
    assert rtl.verify_codes(False) == {"verilator": 10 ** 6, "icarus": 10 ** 6}
    assert rtl.verify_codes(True) == {"verilator": 20_000, "icarus": 20_000}
    monkeypatch.setenv(rtl.VERIFY_CODES_ENV, "verilator=1000000, icarus=20000")
    assert rtl.verify_codes(False) == {"verilator": 1_000_000, "icarus": 20_000}
    monkeypatch.setenv(rtl.VERIFY_CODES_ENV, "icarus=5")
    assert rtl.verify_codes(True) == {"verilator": 20_000, "icarus": 5}


@pytest.mark.parametrize("bad", ["questa=10", "icarus=0", "icarus", "verilator=1e6"])
def test_bad_reduced_mode_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv(rtl.VERIFY_CODES_ENV, bad)
    with pytest.raises(ValueError, match=r"SFX_BENCH_RTL_VERIFY_CODES=.*expected simulator=N pairs such as "
                                         r"'verilator=1000000,icarus=20000'"):
        rtl.verify_codes(False)

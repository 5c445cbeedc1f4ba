"""The command printed beside every figure of ``sfx bench ptq`` runs and asks for the configuration measured."""
from __future__ import annotations

import pytest

from superfloat.bench import ptq
from superfloat.cli import build_parser
from superfloat.cli.wasq import config_from_args
from superfloat.sw.wasq.config import WASQConfig


def _cells():
    for method in ptq.METHOD_ORDER:
        for codes in (("int_asym",) if method == "asym" else ("sfx",) if method in ptq.SFX_ONLY else ("sfx", "int")):
            for w, a in ptq.CONFIGS:
                if not (method == "clip" and a is None):  # as the bench: clipping acts on activations only
                    yield method, codes, w, a


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("method,codes,w,a", list(_cells()))
def test_printed_eval_command_parses_to_the_measured_config(parser, method, codes, w, a):
    b = ptq.BUDGET[False]
    cmd = ptq._eval_cmd(method, w, a, codes, b).split()
    assert cmd[:2] == ["sfx", "eval"]
    args = parser.parse_args(cmd[1:])
    got = config_from_args(args)
    opts = {"awq_grid": b["awq_grid"], "adaround_iters": b["adaround_iters"]}
    want = WASQConfig(method=method, weight_bits=w, act_bits=a, codes=codes, method_options=opts)
    assert got.method == want.method and got.codes == want.codes
    assert (got.weight_bits, got.act_bits, got.group_size, got.act_exponent) == \
        (want.weight_bits, want.act_bits, want.group_size, want.act_exponent)
    assert got.options == want.options
    assert (args.max_tokens, args.calib_tokens, args.context) == (b["eval_tokens"], b["calib_tokens"], b["context"])

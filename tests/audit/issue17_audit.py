#!/usr/bin/env python3
"""Issue 17 audit: every bad input a new user might try, run through the `sfx` command line.

Usage (from anywhere, with the superfloat venv active):

    OMP_NUM_THREADS=1 python tests/audit/issue17_audit.py            # all cases
    OMP_NUM_THREADS=1 python tests/audit/issue17_audit.py -k nan     # cases whose name contains 'nan'
    OMP_NUM_THREADS=1 python tests/audit/issue17_audit.py --fresh    # re-create the base checkpoint first

A base checkpoint is made once with `sfx quantize -m tiny-gpt2 -w 4 -a 8 -o base`; each
checkpoint case copies it, changes one thing and runs `sfx eval`, `sfx generate` and
`sfx cosim --engine reference` on the copy. Flag cases run one command with one bad value.

Classes: "clear error" (nonzero exit, no traceback, last stderr line names the thing it is
about), "unclear error" (nonzero exit, no traceback, but the message does not name the
file/tensor/field/flag), "traceback" (a Python traceback was printed), "silent" (exit 0
although the input is bad, or a NaN result), "ok" (valid input that works), "refused"
(valid input refused). Rows go to build/audit/rows.json (and rows.md; $SFX_BUILD_DIR/audit when set); the committed
table of the last full run is tests/audit/issue17_audit.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

# scratch checkpoints and the rows go under the build directory, never the source tree
HERE = Path(os.environ.get("SFX_BUILD_DIR") or "build").resolve() / "audit"
HERE.mkdir(parents=True, exist_ok=True)
WORK = HERE / "work"
BASE = HERE / "base"
SFX = shutil.which("sfx") or "sfx"
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
QUANTIZE = ["quantize", "-m", "tiny-gpt2", "-w", "4", "-a", "8"]
LAYER = "transformer.h.0.attn.c_attn"
EMB = "transformer.wte.weight"

# --------------------------------------------------------------------------- mutations


def st_path(d: Path) -> Path:
    return d / "model.safetensors"


def read_st(d: Path):
    raw = st_path(d).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(d: Path, header, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    st_path(d).write_bytes(struct.pack("<Q", len(h)) + h + data)


def hdr(fn):
    def m(d: Path):
        header, data = read_st(d)
        fn(header)
        write_st(d, header, data)
    return m


def cfg(fn, nohash=False):
    def m(d: Path):
        p = d / "sfx_config.json"
        info = json.loads(p.read_text())
        fn(info)
        if nohash:
            info.pop("config_sha256", None)  # what the error message tells a user to do to accept a hand edit
        p.write_text(json.dumps(info, indent=2))
    return m


def reseal(d: Path) -> None:
    subprocess.run([PY, "-c", "import sys; from superfloat.sw.wasq.checkpoint import reseal_checkpoint as r; "
                              "r(sys.argv[1])", str(d)], check=True, env=ENV)


def tensor_bytes(name: str, fn, resealed=False):
    """fn(bytearray of the tensor's bytes, dtype) edits them in place."""
    def m(d: Path):
        header, data = read_st(d)
        meta = header[name]
        lo, hi = meta["data_offsets"]
        buf = bytearray(data)
        part = bytearray(buf[lo:hi])
        fn(part, meta["dtype"])
        buf[lo:hi] = part
        write_st(d, header, bytes(buf))
        if resealed:
            reseal(d)
    return m


def set_float(value):
    def fn(part: bytearray, dt: str):
        fmt = {"F32": "<f", "F64": "<d"}[dt]
        part[:struct.calcsize(fmt)] = struct.pack(fmt, value)
    return fn


def set_column0(value):
    """element [r, 0] of every row of a [257, 128] float32 tensor (finite, loads; overflows later)"""
    def fn(part: bytearray, dt: str):
        for r in range(len(part) // (128 * 4)):
            part[r * 512:r * 512 + 4] = struct.pack("<f", value)
    return fn


def set_byte(i, value):
    def fn(part: bytearray, dt: str):
        part[i] = value
    return fn


def flip_byte(i, mask=0x01):
    def fn(part: bytearray, dt: str):
        part[i] ^= mask
    return fn


def rm(name):
    def m(d: Path):
        (d / name).unlink()
    return m


def write(name, text):
    def m(d: Path):
        (d / name).write_text(text)
    return m


def both(*ms):
    def m(d: Path):
        for f in ms:
            f(d)
    return m


def add_tensor(d: Path) -> None:
    header, data = read_st(d)
    header["extra.tensor"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
    write_st(d, header, data + b"\0" * 8)
    reseal(d)


def empty_dir(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


def to_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_text("not a checkpoint\n")


def vanish(d: Path) -> None:
    shutil.rmtree(d)


# --------------------------------------------------------------------------- commands on a checkpoint

def eval_cmd(ck):
    return ["eval", "-m", str(ck), "--max-tokens", "16", "--no-progress", "--no-baseline", "--json"]


def gen_cmd(ck):
    return ["generate", "-c", str(ck), "-p", "Hello", "-n", "4"]


def cosim_cmd(ck):
    return ["cosim", "-c", str(ck), "--layer", "all", "--engine", "reference", "--tokens", "8", "--no-progress"]


ALL3 = (eval_cmd, gen_cmd, cosim_cmd)

# (case, mutation, names: substrings the message must contain, commands, expect)
CKPT_CASES = [
    # issue item 1
    ("hdr-no-data_offsets", hdr(lambda h: h[EMB].pop("data_offsets")), [EMB, "data_offsets"], ALL3, "error"),
    ("hdr-entry-is-string", hdr(lambda h: h.__setitem__(EMB, "oops")), [EMB], ALL3, "error"),
    ("hdr-unknown-dtype", hdr(lambda h: h[EMB].__setitem__("dtype", "F99")), [EMB, "dtype"], ALL3[:1], "error"),
    ("hdr-shape-wrong-size", hdr(lambda h: h[EMB].__setitem__("shape", [1, 2])), [EMB], ALL3[:1], "error"),
    ("hdr-shape-negative", hdr(lambda h: h[EMB].__setitem__("shape", [-1, 128])), [EMB, "shape"], ALL3[:1], "error"),
    ("hdr-offsets-beyond-file", hdr(lambda h: h[EMB].__setitem__("data_offsets", [10**9, 10**9 + 257 * 128 * 4])),
     [EMB], ALL3[:1], "error"),
    ("hdr-offsets-overlap", hdr(lambda h: h[f"{LAYER}.bias"].__setitem__("data_offsets", h[f"{LAYER}.scale"]
                                                                           ["data_offsets"][:1] + [h[f"{LAYER}.scale"]["data_offsets"][0] + 384 * 4])),
     ["overlap"], ALL3[:1], "error"),
    ("hdr-metadata-not-strings", hdr(lambda h: h.__setitem__("__metadata__", {"format": 5})), ["__metadata__"],
     ALL3[:1], "error"),
    ("hdr-header-is-array", lambda d: write_st(d, [1, 2], b""), ["model.safetensors"], ALL3[:1], "error"),
    ("hdr-garbage-bytes", lambda d: st_path(d).write_bytes(b"\x10\0\0\0\0\0\0\0" + b"\xff" * 64),
     ["model.safetensors"], ALL3[:1], "error"),
    ("hdr-size-huge", lambda d: st_path(d).write_bytes(struct.pack("<Q", 2**63) + st_path(d).read_bytes()[8:]),
     ["model.safetensors"], ALL3[:1], "error"),
    ("safetensors-truncated-half", lambda d: st_path(d).write_bytes(st_path(d).read_bytes()[:700000]),
     ["model.safetensors", "truncated"], ALL3, "error"),
    ("safetensors-empty-file", lambda d: st_path(d).write_bytes(b""), ["model.safetensors"], ALL3[:1], "error"),
    ("safetensors-missing", rm("model.safetensors"), ["model.safetensors"], ALL3, "error"),
    ("hdr-extra-tensor-resealed", add_tensor, ["extra.tensor"], ALL3[:1], "error"),
    # issue item 2
    ("cfg-layer-null", cfg(lambda i: i["layers"].__setitem__(LAYER, None)), [LAYER], ALL3, "error"),
    ("cfg-layer-null-nohash", cfg(lambda i: i["layers"].__setitem__(LAYER, None), nohash=True), [LAYER], ALL3, "error"),
    ("cfg-base_model-no-config", cfg(lambda i: i["base_model"].pop("config")), ["base_model"], ALL3, "error"),
    ("cfg-base_model-no-config-nohash", cfg(lambda i: i["base_model"].pop("config"), nohash=True),
     ["base_model.config"], ALL3, "error"),
    # more sfx_config.json fields (config_sha256 deleted, as its message suggests for hand edits)
    ("cfg-format_version-99", cfg(lambda i: i.__setitem__("format_version", 99)), ["format_version"], ALL3[:1], "error"),
    ("cfg-format_version-string", cfg(lambda i: i.__setitem__("format_version", "2")), ["format_version"], ALL3[:1],
     "error"),
    ("cfg-format-missing", cfg(lambda i: i.pop("format")), ["format"], ALL3[:1], "error"),
    ("cfg-bits-string", cfg(lambda i: i["layers"][LAYER].__setitem__("bits", "4"), nohash=True), [LAYER, "bits"],
     ALL3[:1], "error"),
    ("cfg-bits-8-contradicts-codes", cfg(lambda i: i["layers"][LAYER].__setitem__("bits", 8), nohash=True),
     [LAYER, "bits"], ALL3, "error"),
    ("cfg-bits-3-codes-out-of-range", cfg(lambda i: i["layers"][LAYER].__setitem__("bits", 3), nohash=True),
     [LAYER], ALL3[:1], "error"),
    ("cfg-bits-99", cfg(lambda i: i["layers"][LAYER].__setitem__("bits", 99), nohash=True), [LAYER, "bits"], ALL3[:1],
     "error"),
    ("cfg-bits-missing", cfg(lambda i: i["layers"][LAYER].pop("bits"), nohash=True), [LAYER, "bits"], ALL3[:1], "error"),
    ("cfg-in_features-0", cfg(lambda i: i["layers"][LAYER].__setitem__("in_features", 0), nohash=True),
     [LAYER, "in_features"], ALL3[:1], "error"),
    ("cfg-in_features-wrong", cfg(lambda i: i["layers"][LAYER].__setitem__("in_features", 64), nohash=True),
     [LAYER], ALL3[:1], "error"),
    ("cfg-out_bits-null", cfg(lambda i: i["layers"][LAYER].__setitem__("out_bits", None), nohash=True),
     [LAYER, "out_bits"], (eval_cmd, cosim_cmd), "either"),
    ("cfg-out_bits-1", cfg(lambda i: i["layers"][LAYER].__setitem__("out_bits", 1), nohash=True),
     [LAYER, "out_bits"], ALL3[:1], "error"),
    ("cfg-act_bits-string", cfg(lambda i: i["layers"][LAYER].__setitem__("act_bits", "eight"), nohash=True),
     [LAYER, "act_bits"], ALL3[:1], "error"),
    ("cfg-act_exponent-static-uncalibrated", cfg(lambda i: i["layers"][LAYER].__setitem__("act_exponent", "static"),
                                                 nohash=True), [LAYER, "act_amax"], ALL3[:1], "error"),
    ("cfg-act_amax-negative", cfg(lambda i: i["layers"][LAYER].__setitem__("act_amax", -1.0), nohash=True),
     [LAYER, "act_amax"], ALL3[:1], "error"),
    ("cfg-scale_kind-bad", cfg(lambda i: i["layers"][LAYER].__setitem__("scale_kind", "log"), nohash=True),
     [LAYER, "scale_kind"], ALL3[:1], "error"),
    ("cfg-scale_kind-pow2-with-scale", cfg(lambda i: i["layers"][LAYER].__setitem__("scale_kind", "pow2"), nohash=True),
     [LAYER], ALL3[:1], "error"),
    ("cfg-weight_scale-tensor", cfg(lambda i: i["layers"][LAYER].__setitem__("weight_scale", "tensor"), nohash=True),
     [LAYER], ALL3[:1], "error"),
    ("cfg-bias-false", cfg(lambda i: i["layers"][LAYER].__setitem__("bias", False), nohash=True), [LAYER, "bias"],
     ALL3[:1], "error"),
    ("cfg-out_exponent-false", cfg(lambda i: i["layers"][LAYER].__setitem__("out_exponent", False), nohash=True),
     [f"{LAYER}.out_exponent"], ALL3[:1], "error"),
    ("cfg-layer-unknown-name", cfg(lambda i: i["layers"].__setitem__("transformer.h.9.attn.c_attn",
                                                                     dict(i["layers"][LAYER])), nohash=True),
     ["transformer.h.9.attn.c_attn"], ALL3[:1], "error"),
    ("cfg-layers-empty", cfg(lambda i: i.__setitem__("layers", {}), nohash=True), ["layers"], ALL3[:1], "error"),
    ("cfg-layers-array", cfg(lambda i: i.__setitem__("layers", []), nohash=True), ["layers"], ALL3[:1], "error"),
    ("cfg-quant_config-null", cfg(lambda i: i.__setitem__("quant_config", None), nohash=True), ["quant_config"],
     ALL3[:1], "error"),
    ("cfg-quant_config-weight_bits-string", cfg(lambda i: i["quant_config"].__setitem__("weight_bits", "x"),
                                                nohash=True), ["quant_config"], ALL3[:1], "error"),
    ("cfg-quant_config-unknown-key", cfg(lambda i: i["quant_config"].__setitem__("bogus", 1), nohash=True),
     ["quant_config"], ALL3[:1], "either"),
    ("cfg-activations-null", cfg(lambda i: i.__setitem__("activations", None), nohash=True), [], ALL3[:1], "either"),
    ("cfg-activations-bits-string", cfg(lambda i: i["activations"].__setitem__("bits", "x"), nohash=True),
     ["activations"], ALL3[:1], "either"),
    ("cfg-static_exponents-unknown", cfg(lambda i: i["activations"].__setitem__("static_exponents", {"nope": 3}),
                                         nohash=True), ["nope"], ALL3[:1], "error"),
    ("cfg-dtype-int8", cfg(lambda i: i.__setitem__("dtype", "int8"), nohash=True), ["dtype"], ALL3[:1], "error"),
    ("cfg-rounding-bad", cfg(lambda i: i.__setitem__("rounding", "up"), nohash=True), ["rounding"], ALL3[:1], "error"),
    ("cfg-aliases-value-int", cfg(lambda i: i["aliases"].__setitem__("lm_head.weight", 5), nohash=True), ["aliases"],
     ALL3[:1], "error"),
    ("cfg-aliases-unknown-target", cfg(lambda i: i["aliases"].__setitem__("lm_head.weight", "nope.weight"),
                                       nohash=True), ["nope.weight"], ALL3[:1], "error"),
    ("cfg-architecture-unknown", cfg(lambda i: i["base_model"].__setitem__("architecture", "NoSuchLM"), nohash=True),
     ["architecture"], ALL3[:1], "error"),
    ("cfg-n_embd-string", cfg(lambda i: i["base_model"]["config"].__setitem__("n_embd", "big"), nohash=True),
     ["base_model"], ALL3[:1], "error"),
    ("cfg-n_layer-2", cfg(lambda i: i["base_model"]["config"].__setitem__("n_layer", 2), nohash=True),
     ["transformer.h.2"], ALL3[:1], "error"),
    ("cfg-n_positions-8", cfg(lambda i: i["base_model"]["config"].__setitem__("n_positions", 8), nohash=True),
     ["transformer.wpe.weight"], ALL3[:1], "error"),
    ("cfg-vocab_size-100", cfg(lambda i: i["base_model"]["config"].__setitem__("vocab_size", 100), nohash=True),
     [EMB], ALL3[:1], "error"),
    ("cfg-sha256-missing", cfg(lambda i: i.pop("sha256")), ["sha256"], ALL3[:1], "error"),
    ("cfg-sha256-wrong-digest", cfg(lambda i: i["sha256"].__setitem__(EMB, "0" * 64)), [EMB, "SHA-256"], ALL3[:1],
     "error"),
    ("cfg-sha256-not-hex", cfg(lambda i: i["sha256"].__setitem__(EMB, "xyz")), ["sha256"], ALL3[:1], "error"),
    ("cfg-config_sha256-deleted", cfg(lambda i: i.pop("config_sha256")), [], ALL3, "ok"),
    ("cfg-hand-edit-detected", cfg(lambda i: i["layers"][LAYER].__setitem__("act_bits", 4)), [LAYER, "config_sha256"],
     ALL3[:1], "error"),
    ("cfg-not-json", write("sfx_config.json", '{"format": "superfloat-wasq-checkpoint", "lay'), ["sfx_config.json"],
     ALL3[:1], "error"),
    ("cfg-is-array", write("sfx_config.json", "[]"), ["sfx_config.json"], ALL3[:1], "error"),
    ("cfg-is-empty", write("sfx_config.json", ""), ["sfx_config.json"], ALL3[:1], "error"),
    # issue item 3
    ("tokenizer.json-deleted", rm("tokenizer.json"), ["tokenizer.json"], ALL3, "error"),
    ("tokenizer_config.json-deleted", rm("tokenizer_config.json"), ["tokenizer_config.json"], ALL3[:1], "error"),
    ("tokenizer.json-edited", write("tokenizer.json", "{}"), ["tokenizer.json"], ALL3[:1], "error"),
    ("tokenizer.json-garbage-resealed", both(write("tokenizer.json", "{not json"), reseal), ["tokenizer"], ALL3,
     "error"),
    ("sfx_config.json-deleted", rm("sfx_config.json"), ["sfx_config.json"], ALL3, "error"),
    ("config.json-deleted", rm("config.json"), [], ALL3, "ok"),
    ("generation_config.json-deleted", rm("generation_config.json"), [], ALL3[1:2], "ok"),
    # issue item 4
    ("nan-embedding", tensor_bytes(EMB, set_float(math.nan)), [EMB], ALL3, "error"),
    ("nan-embedding-resealed", tensor_bytes(EMB, set_float(math.nan), resealed=True), [EMB, "NaN"], ALL3, "error"),
    ("huge-embedding-overflows-in-ln_1-resealed", tensor_bytes(EMB, set_column0(3.0e38), resealed=True),
     ["transformer.h.0.ln_1"], ALL3, "error"),
    ("inf-embedding-resealed", tensor_bytes(EMB, set_float(math.inf), resealed=True), [EMB], ALL3[:1], "error"),
    ("nan-position-embedding-resealed", tensor_bytes("transformer.wpe.weight", set_float(math.nan), resealed=True),
     ["transformer.wpe.weight"], ALL3[:1], "error"),
    ("nan-layernorm-resealed", tensor_bytes("transformer.h.0.ln_1.weight", set_float(math.nan), resealed=True),
     ["transformer.h.0.ln_1.weight"], ALL3[:1], "error"),
    ("inf-bias-resealed", tensor_bytes(f"{LAYER}.bias", set_float(-math.inf), resealed=True), [f"{LAYER}.bias"],
     ALL3, "error"),
    ("nan-scale-resealed", tensor_bytes(f"{LAYER}.scale", set_float(math.nan), resealed=True), [f"{LAYER}.scale"],
     ALL3[:1], "error"),
    ("zero-scale-resealed", tensor_bytes(f"{LAYER}.scale", set_float(0.0), resealed=True), [f"{LAYER}.scale"],
     ALL3[:1], "error"),
    ("huge-scale-resealed", tensor_bytes(f"{LAYER}.scale", set_float(1e308), resealed=True), [LAYER], ALL3[:1],
     "error"),
    ("flipped-byte-codes", tensor_bytes(f"{LAYER}.codes", flip_byte(100)), [f"{LAYER}.codes"], ALL3, "error"),
    ("flipped-byte-exponent", tensor_bytes(f"{LAYER}.exponent", flip_byte(3, 0x80)), [f"{LAYER}.exponent"], ALL3[:1],
     "error"),
    ("flipped-byte-out_exponent", tensor_bytes(f"{LAYER}.out_exponent", flip_byte(0)), [f"{LAYER}.out_exponent"],
     ALL3[:1], "error"),
    ("code-out-of-range-resealed", tensor_bytes(f"{LAYER}.codes", set_byte(5, 200), resealed=True),
     [f"{LAYER}.codes"], ALL3, "error"),
    ("exponent-nonzero-float-scale-resealed", tensor_bytes(f"{LAYER}.exponent", set_byte(0, 3), resealed=True),
     [f"{LAYER}.exponent"], ALL3[:1], "error"),
    ("out_exponent-extreme-resealed", tensor_bytes(f"{LAYER}.out_exponent", set_byte(0, 0x80), resealed=True),
     [LAYER], (eval_cmd, cosim_cmd), "either"),
    # the directory itself
    ("ckpt-empty-dir", empty_dir, ["sfx_config.json"], ALL3, "error"),
    ("ckpt-is-a-file", to_file, ["ckpt-is-a-file"], ALL3, "error"),
    ("ckpt-nonexistent", vanish, ["ckpt-nonexistent"], ALL3, "error"),
    # controls
    ("ckpt-intact", lambda d: None, [], ALL3, "ok"),
]

# --------------------------------------------------------------------------- flag cases
# (case, argv (CK = the intact checkpoint), names, expect, timeout)
CK = "{CK}"
FLAG_CASES = [
    # issue item 6
    ("quantize --act-exponent static --calib-tokens 0", QUANTIZE + ["--act-exponent", "static", "--calib-tokens", "0",
                                                                    "-o", "{OUT}"], ["--calib-tokens"], "error", 120),
    ("quantize --act-exponent static --calib-tokens 1", QUANTIZE + ["--act-exponent", "static", "--calib-tokens", "1",
                                                                    "-o", "{OUT}"], ["--calib-tokens"], "error", 120),
    ("cosim --float-model tiny-nosuch", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--tokens", "8",
                                         "--float-model", "tiny-nosuch", "--no-progress"], ["tiny-nosuch"], "error", 120),
    ("cosim --fmax -5", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--fmax", "-5",
                         "--no-progress"], ["--fmax"], "error", 120),
    ("cosim --fmax 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--fmax", "0", "--no-progress"],
     ["--fmax"], "error", 120),
    ("cosim --fmax nan", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--fmax", "nan",
                          "--no-progress"], ["--fmax"], "error", 120),
    ("cosim --fmax inf", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--fmax", "inf",
                          "--no-progress"], ["--fmax"], "error", 120),
    ("cosim --fmax 100 (valid)", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--fmax", "100",
                                  "--tokens", "4", "--no-progress"], [], "ok", 120),
    ("generate --top-p 2", ["generate", "-c", CK, "-p", "Hi", "-n", "4", "--sample", "--top-p", "2"], ["--top-p"],
     "error", 120),
    ("generate --top-p 0", ["generate", "-c", CK, "-p", "Hi", "-n", "4", "--sample", "--top-p", "0"], ["--top-p"],
     "error", 120),
    ("generate --top-p nan", ["generate", "-c", CK, "-p", "Hi", "-n", "4", "--sample", "--top-p", "nan"], ["--top-p"],
     "error", 120),
    ("generate --top-p 1 (valid)", ["generate", "-c", CK, "-p", "Hi", "-n", "4", "--sample", "--top-p", "1"], [],
     "ok", 120),
    ("eval --context 2048 > n_positions", ["eval", "-m", CK, "--context", "2048", "--max-tokens", "16",
                                           "--no-progress", "--no-baseline"], ["--context", "1024"], "error", 120),
    ("eval --context 5000 (float model)", ["eval", "-m", "tiny-gpt2", "--context", "5000", "--max-tokens", "16",
                                           "--no-progress"], ["--context"], "error", 120),
    ("cosim --data --context 5000", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--data",
                                     "shakespeare", "--max-tokens", "16", "--context", "5000", "--no-progress"],
     ["--context"], "error", 120),
    ("cosim --tokens 5000 > n_positions", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference",
                                           "--prompt", "word " * 1200, "--tokens", "1100", "--no-progress"],
     ["1024"], "error", 180),
    ("generate -n 1100 past n_positions", ["generate", "-c", CK, "-p", "Hi", "-n", "1100"], ["1024"], "error", 300),
    # sfx eval
    ("eval --context 0", ["eval", "-m", CK, "--context", "0"], ["--context"], "error", 60),
    ("eval --context -1", ["eval", "-m", CK, "--context", "-1"], ["--context"], "error", 60),
    ("eval --context nan", ["eval", "-m", CK, "--context", "nan"], ["--context"], "error", 60),
    ("eval --context 1 (valid: each token predicted from the one before)", ["eval", "-m", CK, "--context", "1",
                                                                             "--max-tokens", "16", "--no-progress",
                                                                             "--no-baseline"], [], "ok", 120),
    ("eval --stride 0", ["eval", "-m", CK, "--stride", "0"], ["--stride"], "error", 60),
    ("eval --stride > --context", ["eval", "-m", CK, "--context", "8", "--stride", "16", "--max-tokens", "32",
                                   "--no-progress", "--no-baseline"], ["stride"], "error", 120),
    ("eval --max-tokens 1", ["eval", "-m", CK, "--max-tokens", "1"], ["--max-tokens"], "error", 60),
    ("eval --max-tokens abc", ["eval", "-m", CK, "--max-tokens", "abc"], ["--max-tokens"], "error", 60),
    ("eval --batch-size 0", ["eval", "-m", CK, "--batch-size", "0"], ["--batch-size"], "error", 60),
    ("eval -w 1", ["eval", "-m", "tiny-gpt2", "-w", "1"], ["--weight-bits"], "error", 60),
    ("eval -w 17", ["eval", "-m", "tiny-gpt2", "-w", "17"], ["--weight-bits"], "error", 60),
    ("eval -a 0", ["eval", "-m", "tiny-gpt2", "-w", "4", "-a", "0"], ["--act-bits"], "error", 60),
    ("eval -m tiny-nosuch", ["eval", "-m", "tiny-nosuch", "--max-tokens", "16"], ["tiny-nosuch"], "error", 120),
    ("eval -m /nonexistent/dir", ["eval", "-m", "/nonexistent/dir", "--max-tokens", "16"], ["/nonexistent/dir"],
     "error", 120),
    ("eval -d /nonexistent.txt", ["eval", "-m", CK, "-d", "/nonexistent.txt", "--max-tokens", "16", "--no-progress"],
     ["/nonexistent.txt"], "error", 120),
    ("eval -d empty file", ["eval", "-m", CK, "-d", "{EMPTY}", "--max-tokens", "16", "--no-progress"], ["empty"],
     "error", 120),
    ("eval -d shakespeare:NOPLAY", ["eval", "-m", CK, "-d", "shakespeare:NOPLAY", "--max-tokens", "16",
                                    "--no-progress"], ["NOPLAY"], "error", 120),
    ("eval --headroom 0.5", ["eval", "-m", CK, "--headroom", "0.5"], ["--headroom"], "error", 60),
    ("eval --out-bits 1", ["eval", "-m", CK, "--out-bits", "1"], ["--out-bits"], "error", 60),
    ("eval --float-model tiny-nosuch", ["eval", "-m", CK, "--max-tokens", "16", "--no-progress",
                                       "--float-model", "tiny-nosuch"], ["tiny-nosuch"], "error", 120),
    ("eval --backend accelerator (valid)", ["eval", "-m", CK, "--max-tokens", "16", "--no-progress", "--no-baseline",
                                            "--backend", "accelerator"], [], "ok", 120),
    # sfx quantize
    ("quantize -w 0", ["quantize", "-m", "tiny-gpt2", "-w", "0", "-o", "{OUT}"], ["--weight-bits"], "error", 60),
    ("quantize -w 17", ["quantize", "-m", "tiny-gpt2", "-w", "17", "-o", "{OUT}"], ["--weight-bits"], "error", 60),
    ("quantize -w abc", ["quantize", "-m", "tiny-gpt2", "-w", "abc", "-o", "{OUT}"], ["--weight-bits"], "error", 60),
    ("quantize -m tiny-nosuch", ["quantize", "-m", "tiny-nosuch", "-w", "4", "-o", "{OUT}"], ["tiny-nosuch"], "error",
     120),
    ("quantize --calib-tokens -5", QUANTIZE + ["--calib-tokens", "-5", "-o", "{OUT}"], ["--calib-tokens"], "error", 60),
    ("quantize --calib-data /nonexistent.txt", QUANTIZE + ["--act-exponent", "static", "--calib-data",
                                                           "/nonexistent.txt", "-o", "{OUT}"], ["/nonexistent.txt"],
     "error", 120),
    ("quantize --headroom 0", QUANTIZE + ["--headroom", "0", "-o", "{OUT}"], ["--headroom"], "error", 60),
    ("quantize --headroom nan", QUANTIZE + ["--headroom", "nan", "-o", "{OUT}"], ["--headroom"], "error", 60),
    ("quantize --group-size 0", QUANTIZE + ["--group-size", "0", "-o", "{OUT}"], ["--group-size"], "error", 120),
    ("quantize --group-size -4", QUANTIZE + ["--group-size", "-4", "-o", "{OUT}"], ["--group-size"], "error", 120),
    ("quantize --group-size abc", QUANTIZE + ["--group-size", "abc", "-o", "{OUT}"], ["--group-size"], "error", 120),
    ("quantize --group-size 7 (valid: shorter last group)", ["quantize", "-m", "tiny-gpt2", "-w", "4", "--group-size",
                                                             "7", "--packed", "{OUT}.safetensors"], [], "ok", 120),
    ("quantize --smoothquant 2", QUANTIZE + ["--smoothquant", "2", "-o", "{OUT}"], ["--smoothquant"], "error", 60),
    ("quantize --gptq-damp -1", QUANTIZE + ["--gptq-damp=-1", "-o", "{OUT}"], ["--gptq-damp"], "error", 60),
    ("quantize --gptq-block 0", QUANTIZE + ["--gptq-block", "0", "-o", "{OUT}"], ["--gptq-block"], "error", 60),
    ("quantize --out-bits 17", QUANTIZE + ["--out-bits", "17", "-o", "{OUT}"], ["--out-bits"], "error", 60),
    ("quantize -o existing (no --overwrite)", QUANTIZE + ["-o", CK], ["--overwrite"], "error", 120),
    ("quantize -o unwritable path", QUANTIZE + ["-o", "/proc/sfx-audit/ck"], ["/proc/sfx-audit"], "error", 120),
    ("quantize no -o and no --packed", QUANTIZE, ["--output"], "error", 120),
    # sfx generate
    ("generate --temperature -1", ["generate", "-c", CK, "-p", "Hi", "--temperature=-1"], ["--temperature"], "error",
     60),
    ("generate --temperature inf", ["generate", "-c", CK, "-p", "Hi", "--temperature", "inf"], ["--temperature"],
     "error", 60),
    ("generate --top-k -3", ["generate", "-c", CK, "-p", "Hi", "--top-k=-3"], ["--top-k"], "error", 60),
    ("generate -n -1", ["generate", "-c", CK, "-p", "Hi", "-n", "-1"], ["--max-new-tokens"], "error", 60),
    ("generate --seed -1", ["generate", "-c", CK, "-p", "Hi", "--seed", "-1"], ["--seed"], "error", 60),
    ("generate -c /nonexistent", ["generate", "-c", "/nonexistent/ck", "-p", "Hi", "-n", "4"], ["/nonexistent/ck"],
     "error", 120),
    ("generate -m tiny-nosuch", ["generate", "-m", "tiny-nosuch", "-p", "Hi", "-n", "4"], ["tiny-nosuch"], "error", 120),
    ("generate -p '' (valid: starts from BOS)", ["generate", "-c", CK, "-p", "", "-n", "4"], [], "ok", 120),
    ("generate -w 1", ["generate", "-m", "tiny-gpt2", "-p", "Hi", "-w", "1"], ["--weight-bits"], "error", 60),
    # sfx cosim
    ("cosim --rows 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--rows", "0", "--no-progress"],
     ["--rows"], "error", 120),
    ("cosim --rows -1", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--rows", "-1",
                         "--no-progress"], ["--rows"], "error", 120),
    ("cosim --cols 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--cols", "0", "--no-progress"],
     ["--cols"], "error", 120),
    ("cosim --k-max 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--k-max", "0",
                         "--no-progress"], ["--k-max"], "error", 120),
    ("cosim --k-max 64 < K", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--k-max", "64",
                              "--no-progress"], ["--k-max"], "error", 120),
    ("cosim --a-bits 1", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--a-bits", "1",
                          "--no-progress"], ["--a-bits"], "error", 120),
    ("cosim --a-bits 4 < layer's 8", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--a-bits", "4",
                                      "--no-progress"], ["--a-bits"], "error", 120),
    ("cosim --w-bits 20", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--w-bits", "20",
                           "--no-progress"], ["--w-bits"], "error", 120),
    ("cosim --out-bits 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--out-bits", "0",
                            "--no-progress"], ["--out-bits"], "error", 120),
    ("cosim --jobs 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--jobs", "0", "--no-progress"],
     ["--jobs"], "error", 120),
    ("cosim --jobs -2", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--jobs", "-2",
                         "--no-progress"], ["--jobs"], "error", 120),
    ("cosim --tokens 0", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--tokens", "0",
                          "--no-progress"], ["--tokens"], "error", 120),
    ("cosim --tokens -5", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--tokens", "-5",
                           "--no-progress"], ["--tokens"], "error", 120),
    ("cosim --tokens 500 > prompt", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--prompt",
                                     "Hello there", "--tokens", "500", "--no-progress"], ["--tokens"], "error", 120),
    ("cosim --layer nosuch", ["cosim", "-c", CK, "--layer", "nosuch", "--engine", "reference", "--no-progress"],
     ["nosuch"], "error", 120),
    ("cosim no --layer", ["cosim", "-c", CK, "--engine", "reference"], ["--layer"], "error", 60),
    ("cosim --headroom 0.5", ["cosim", "-c", CK, "--layer", "all", "--headroom", "0.5"], ["--headroom"], "error", 60),
    ("cosim --target nosuch", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--target", "nosuch",
                               "--no-progress"], ["nosuch"], "error", 120),
    ("cosim --calib-tokens 0", ["cosim", "-c", CK, "--layer", "all", "--calib-tokens", "0"], ["--calib-tokens"],
     "error", 60),
    ("cosim --max-tokens 1", ["cosim", "-c", CK, "--layer", "all", "--data", "shakespeare", "--max-tokens", "1"],
     ["--max-tokens"], "error", 60),
    ("cosim --data /nonexistent.txt", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--data",
                                       "/nonexistent.txt", "--max-tokens", "16", "--no-progress"],
     ["/nonexistent.txt"], "error", 120),
    ("cosim --split nosuch", ["cosim", "-c", CK, "--layer", "all", "--engine", "reference", "--data", "shakespeare",
                              "--split", "nosuch", "--max-tokens", "16", "--no-progress"], ["nosuch"], "error", 120),
    ("cosim -c /nonexistent", ["cosim", "-c", "/nonexistent/ck", "--layer", "all", "--engine", "reference"],
     ["/nonexistent/ck"], "error", 120),
    ("cosim --list-layers -c /nonexistent", ["cosim", "-c", "/nonexistent/ck", "--list-layers"], ["/nonexistent/ck"],
     "error", 60),
    # sfx synth / build-board (bad values must fail before any tool runs)
    ("synth --target nosuch", ["synth", "--target", "nosuch", "--out", "{OUT}"], ["nosuch"], "error", 90),
    ("synth --rows 0", ["synth", "--target", "ice40-up5k", "--rows", "0", "--out", "{OUT}"], ["--rows"], "error", 90),
    ("synth --rows -1", ["synth", "--target", "ice40-up5k", "--rows", "-1", "--out", "{OUT}"], ["--rows"], "error", 90),
    ("synth --cols abc", ["synth", "--target", "ice40-up5k", "--cols", "abc"], ["--cols"], "error", 60),
    ("synth --a-bits 1", ["synth", "--target", "ice40-up5k", "--a-bits", "1", "--out", "{OUT}"], ["--a-bits"], "error",
     90),
    ("synth --w-bits 17", ["synth", "--target", "ice40-up5k", "--w-bits", "17", "--out", "{OUT}"], ["--w-bits"],
     "error", 90),
    ("synth --out-bits 0", ["synth", "--target", "ice40-up5k", "--out-bits", "0", "--out", "{OUT}"], ["--out-bits"],
     "error", 90),
    ("synth --k-max 0", ["synth", "--target", "ice40-up5k", "--k-max", "0", "--out", "{OUT}"], ["--k-max"], "error",
     90),
    ("synth --freq -5", ["synth", "--target", "ice40-up5k", "--freq", "-5", "--out", "{OUT}"], ["--freq"], "error", 90),
    ("synth --freq 0", ["synth", "--target", "ice40-up5k", "--freq", "0", "--out", "{OUT}"], ["--freq"], "error", 90),
    ("synth --freq nan", ["synth", "--target", "ice40-up5k", "--freq", "nan", "--out", "{OUT}"], ["--freq"], "error",
     90),
    ("synth --timeout 0", ["synth", "--target", "ice40-up5k", "--timeout", "0", "--out", "{OUT}"], ["--timeout"],
     "error", 90),
    ("synth --timeout -1", ["synth", "--target", "ice40-up5k", "--timeout", "-1", "--out", "{OUT}"], ["--timeout"],
     "error", 90),
    ("synth --dsp-budget -1", ["synth", "--target", "ice40-up5k", "--dsp-budget", "-1", "--out", "{OUT}"],
     ["--dsp-budget"], "error", 90),
    ("synth --chunk-k 0", ["synth", "--target", "ice40-up5k", "--chunk-k", "0", "--out", "{OUT}"], ["--chunk-k"],
     "error", 90),
    ("synth --mul-stages -1", ["synth", "--target", "ice40-up5k", "--mul-stages", "-1", "--out", "{OUT}"],
     ["--mul-stages"], "error", 90),
    ("synth --seed -1", ["synth", "--target", "ice40-up5k", "--seed", "-1", "--out", "{OUT}"], ["--seed"], "error", 90),
    ("build-board --board nosuch", ["build-board", "--board", "nosuch", "--out", "{OUT}"], ["nosuch"], "error", 90),
    ("build-board --baud 0", ["build-board", "--board", "icebreaker", "--baud", "0", "--out", "{OUT}"], ["--baud"],
     "error", 90),
    ("build-board --baud -9600", ["build-board", "--board", "icebreaker", "--baud", "-9600", "--out", "{OUT}"],
     ["--baud"], "error", 90),
    ("build-board --clock-mhz -1", ["build-board", "--board", "icebreaker", "--clock-mhz", "-1", "--out", "{OUT}"],
     ["--clock-mhz"], "error", 90),
    ("build-board --clock-mhz 0", ["build-board", "--board", "icebreaker", "--clock-mhz", "0", "--out", "{OUT}"],
     ["--clock-mhz"], "error", 90),
    ("build-board --rows 0", ["build-board", "--board", "icebreaker", "--rows", "0", "--out", "{OUT}"], ["--rows"],
     "error", 90),
    ("build-board --timeout -1", ["build-board", "--board", "icebreaker", "--timeout", "-1", "--out", "{OUT}"],
     ["--timeout"], "error", 90),
    # sfx verify / verilog / bench / others
    ("verify --codes 0", ["verify", "--codes", "0"], ["--codes"], "error", 60),
    ("verify --codes -5", ["verify", "--codes", "-5"], ["--codes"], "error", 60),
    ("verify --config garbage", ["verify", "--config", "garbage", "--codes", "10"], ["garbage"], "error", 60),
    ("verify --config 0x0-a8w8o8", ["verify", "--config", "0x0-a8w8o8", "--codes", "10"], ["0x0-a8w8o8"], "error", 60),
    ("verify --config 2x2-a1w8o8", ["verify", "--config", "2x2-a1w8o8", "--codes", "10"], ["2x2-a1w8o8"], "error", 60),
    ("verify --seed -1", ["verify", "--seed", "-1"], ["--seed"], "error", 60),
    ("verilog --rows 0", ["verilog", "--rows", "0", "--cols", "2", "--a-bits", "8", "--w-bits", "8", "--out-bits", "8",
                          "-o", "{OUT}.v"], ["--rows"], "error", 60),
    ("verilog --rows 65", ["verilog", "--rows", "65", "--cols", "2", "--a-bits", "8", "--w-bits", "8", "--out-bits",
                           "8", "-o", "{OUT}.v"], ["--rows"], "error", 60),
    ("verilog --a-bits 1", ["verilog", "--rows", "2", "--cols", "2", "--a-bits", "1", "--w-bits", "8", "--out-bits",
                            "8", "-o", "{OUT}.v"], ["--a-bits"], "error", 60),
    ("verilog --k-max 0", ["verilog", "--rows", "2", "--cols", "2", "--a-bits", "8", "--w-bits", "8", "--out-bits", "8",
                           "--k-max", "0", "-o", "{OUT}.v"], ["--k-max"], "error", 60),
    ("verilog --dsp-pes -1", ["verilog", "--rows", "2", "--cols", "2", "--a-bits", "8", "--w-bits", "8", "--out-bits",
                              "8", "--dsp-pes", "-1", "-o", "{OUT}.v"], ["--dsp-pes"], "error", 60),
    ("verilog --dsp-pes 99 > PEs", ["verilog", "--rows", "2", "--cols", "2", "--a-bits", "8", "--w-bits", "8",
                                    "--out-bits", "8", "--dsp-pes", "99", "-o", "{OUT}.v"], ["--dsp-pes"], "error", 60),
    ("verilog --ops 0", ["verilog", "--rows", "2", "--cols", "2", "--a-bits", "8", "--w-bits", "8", "--out-bits", "8",
                         "--ip", "{OUT}", "--ops", "0"], ["--ops"], "error", 60),
    ("verilog -o under a file", ["verilog", "--rows", "2", "--cols", "2", "--a-bits", "8", "--w-bits", "8",
                                 "--out-bits", "8", "-o", "{EMPTY}/x.v"], ["empty.txt"], "error", 60),
    ("bench nosuch", ["bench", "nosuch"], ["nosuch"], "error", 60),
    ("table --bits 9", ["table", "--bits", "9"], ["--bits"], "error", 60),
    ("analyze --show -1", ["analyze", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}", "--show", "-1"], ["--show"],
     "error", 60),
    ("analyze --tokens 0", ["analyze", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}", "--tokens", "0"], ["--tokens"],
     "error", 60),
    ("analyze --context 0", ["analyze", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}", "--context", "0"], ["--context"],
     "error", 60),
    ("finetune --epochs 0", ["finetune", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}", "--epochs", "0"], ["--epochs"],
     "error", 60),
    ("finetune --tokens 0", ["finetune", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}", "--tokens", "0"], ["--tokens"],
     "error", 60),
    ("finetune --fraction 2", ["finetune", "--method", "opt", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}",
                               "--fraction", "2"], ["--fraction"], "error", 60),
    ("finetune --save-every 0", ["finetune", "-m", "tiny-gpt2", "-w", "4", "-o", "{OUT}", "--save-every", "0"],
     ["--save-every"], "error", 60),
    ("sweep --bits 1", ["sweep", "-o", "{OUT}", "--bits", "1"], ["--bits"], "error", 60),
]

# --------------------------------------------------------------------------- Python API cases (issue item 7)
API_CASES = [
    ("requantize int64 min toward_zero", "import numpy as np; from superfloat.sw import sfx; "
     "c, s = sfx.requantize(np.array([-2**63]), frac_bits=10, out_bits=8, rounding='toward_zero'); "
     "assert int(c[0]) == 255, f'code {int(c[0])}, expected 255'; print('ok', int(c[0]))", [], "ok"),
    ("requantize int64 min nearest_even", "import numpy as np; from superfloat.sw import sfx; "
     "c, s = sfx.requantize(np.array([-2**63]), frac_bits=10, out_bits=8); "
     "assert int(c[0]) == 255, f'code {int(c[0])}, expected 255'; print('ok', int(c[0]))", [], "ok"),
    ("requantize int64 max", "import numpy as np; from superfloat.sw import sfx; "
     "c, s = sfx.requantize(np.array([2**63 - 1]), frac_bits=10, out_bits=8); "
     "assert int(c[0]) == 127, f'code {int(c[0])}, expected 127'; print('ok', int(c[0]))", [], "ok"),
    ("requantize int64 min with shift -60", "import numpy as np; from superfloat.sw import sfx; "
     "c, s = sfx.requantize(np.array([-2**63, -1]), frac_bits=0, shift=-60, out_bits=8, rounding='toward_zero'); "
     "print('codes', c.tolist())", [], "ok"),
    ("requantize float input", "import numpy as np; from superfloat.sw import sfx; "
     "sfx.requantize(np.array([1.5]), frac_bits=10, out_bits=8)", ["acc"], "error"),
    ("requantize out_bits 1", "import numpy as np; from superfloat.sw import sfx; "
     "sfx.requantize(np.array([1]), frac_bits=10, out_bits=1)", ["out_bits"], "error"),
    ("encode exponent wrong shape", "import numpy as np; from superfloat.sw import sfx; "
     "sfx.encode(np.zeros((4, 8)), 8, np.zeros(3, dtype=np.int8))", ["exponent"], "error"),
    ("encode bits 1", "import numpy as np; from superfloat.sw import sfx; sfx.encode(np.zeros(4), 1, 0)", ["bits"],
     "error"),
    ("encode NaN input", "import numpy as np; from superfloat.sw import sfx; "
     "print(sfx.encode(np.array([np.nan, 1.0]), 8, 0))", ["NaN"], "error"),
    ("decode code out of range", "import numpy as np; from superfloat.sw import sfx; "
     "print(sfx.decode(np.array([300]), 8, 0))", ["300"], "error"),
    ("choose_exponent NaN", "import numpy as np; from superfloat.sw import sfx; "
     "print(sfx.choose_exponent(np.array([np.nan, 1.0]), 8))", ["NaN"], "error"),
]


# --------------------------------------------------------------------------- running and classifying

def last_line(text: str) -> str:
    lines = [ln.strip() for chunk in text.replace("\r", "\n").splitlines() for ln in [chunk] if ln.strip()]
    lines = [ln for ln in lines if not (ln.startswith("warnings.warn") or "Warning:" in ln and "error" not in ln)]
    return lines[-1] if lines else ""


def run(argv, timeout, cwd):
    t = time.time()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = "timeout"
    return rc, out, err, time.time() - t


def classify(rc, out, err, names, expect):
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in out:
        return "traceback", last_line(err)
    if rc == "timeout":
        return ("silent" if expect == "error" else "timeout"), "accepted: still running at the timeout"
    nan_out = "NaN" in out
    if rc == 0:
        msg = last_line(out)
        if expect == "error":
            return "silent", "exit 0: " + msg[:200]
        if nan_out and expect != "either":
            return "silent", "exit 0 with NaN: " + msg[:200]
        return "ok", msg[:200]
    msg = last_line(err) or last_line(out)
    if expect == "ok":
        return "refused", msg
    low = msg.lower()
    # a flag may be named by its parameter (--k-max: k_max, --dsp-budget: "DSP budget")
    missing = [n for n in names if n.lower() not in low and not (n.startswith("--") and any(
        a in low for a in (n[2:].replace("-", "_"), n[2:].replace("-", " "))))]
    if missing or not msg:
        return "unclear error", msg
    return "clear error", msg


def check_debris(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-") or
                  p.name.startswith(f".{name}.old-"))


def stale_cases(rows, only):
    """Issue item 5: kill `sfx quantize -o ck` at several moments of its save; then the next save must leave
    no `.ck.tmp-*` / `.ck.old-*` folder, and a checkpoint missing between the two renames is named."""
    d = WORK / "stale"
    if only and not any(o in "stale-save kill" for o in only):
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    ck = d / "ck"
    shutil.copytree(BASE, ck)
    leftovers = []
    for i, delay in enumerate((0.0, 0.05, 0.2, 0.5, 1.0)):
        p = subprocess.Popen([SFX, *QUANTIZE, "-o", "ck", "--overwrite"], cwd=d, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 120:
            if check_debris(d, "ck"):
                break
            time.sleep(0.005)
        time.sleep(delay)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        leftovers.append(check_debris(d, "ck"))
    killed_with_debris = sum(1 for x in leftovers if x)
    rc, out, err, _ = run([SFX, *QUANTIZE, "-o", "ck", "--overwrite"], 300, d)
    after = check_debris(d, "ck")
    cls = "ok" if rc == 0 and not after else "silent" if rc == 0 else "traceback" if "Traceback" in err else "refused"
    rows.append(dict(case="stale-save kill x5 then save again", command="sfx quantize ... -o ck --overwrite (SIGKILL "
                     "x5, then once more)", exit=rc, cls=cls, message=f"{killed_with_debris}/5 kills left debris; after "
                     f"the next save: {after or 'none left'}"))
    # a dead process's folders, planted
    for n in (".ck.tmp-999999-0123456789ab", ".ck.old-999999-0123456789ab"):
        (d / n).mkdir(exist_ok=True)
        (d / n / "junk").write_text("x")
    rc, out, err, _ = run([SFX, *QUANTIZE, "-o", "ck", "--overwrite"], 300, d)
    after = check_debris(d, "ck")
    cls = "ok" if rc == 0 and not after else "silent" if rc == 0 else "traceback" if "Traceback" in err else "refused"
    rows.append(dict(case="stale-save planted dead-pid folders", command="sfx quantize ... -o ck --overwrite",
                     exit=rc, cls=cls, message=f"after the save: {after or 'none left'}"))
    # killed between the two renames: only .ck.old-* is left
    shutil.rmtree(ck)
    shutil.copytree(BASE, d / ".ck.old-999999-0123456789ab")
    argv = [SFX, *eval_cmd(ck)]
    rc, out, err, _ = run(argv, 120, d)
    cls, msg = classify(rc, out, err, [".ck.old-999999-0123456789ab", "rename"], "error")
    rows.append(dict(case="stale-save only .ck.old-* left", command="sfx " + " ".join(argv[1:]), exit=rc, cls=cls,
                     message=msg))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", action="append", default=[], help="only cases whose name contains this (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="re-create the base checkpoint")
    ap.add_argument("--out", default=str(HERE / "rows.json"))
    ap.add_argument("--merge", action="store_true", help="replace only the rows of the cases run in --out")
    a = ap.parse_args()
    if a.fresh or not (BASE / "sfx_config.json").is_file():
        shutil.rmtree(BASE, ignore_errors=True)
        rc, out, err, _ = run([SFX, *QUANTIZE, "-o", str(BASE)], 600, HERE)
        if rc != 0:
            sys.exit(f"could not make the base checkpoint: {last_line(err)}")
    WORK.mkdir(exist_ok=True)
    (WORK / "empty.txt").write_text("")
    intact = WORK / "intact"
    shutil.rmtree(intact, ignore_errors=True)
    shutil.copytree(BASE, intact)
    want = lambda name: not a.k or any(k.lower() in name.lower() for k in a.k)  # noqa: E731
    rows = []

    def emit(row):
        rows.append(row)
        print(f"{row['cls']:<14} {row['case']:<45} | {row['message'][:150]}", flush=True)

    for name, mutate, names, cmds, expect in CKPT_CASES:
        if not want(name):
            continue
        for make in cmds:
            d = WORK / "ck" / name
            if d.is_dir():
                shutil.rmtree(d)
            elif d.exists():
                d.unlink()
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(BASE, d)
            mutate(d)
            argv = make(d)
            rc, out, err, dt = run([SFX, *argv], 180, WORK)
            cls, msg = classify(rc, out, err, names, expect)
            emit(dict(case=name, command="sfx " + " ".join(argv).replace(str(WORK) + "/", ""), exit=rc, cls=cls,
                      message=msg, seconds=round(dt, 1)))
    for name, argv, names, expect, timeout in FLAG_CASES:
        if not want(name):
            continue
        out_dir = WORK / "out" / name.replace(" ", "_").replace("/", "_")
        shutil.rmtree(out_dir.parent, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = [s.replace("{CK}", str(intact)).replace("{OUT}", str(out_dir)).replace("{EMPTY}", str(WORK / "empty.txt"))
                for s in argv]
        rc, out, err, dt = run([SFX, *argv], timeout, WORK)
        cls, msg = classify(rc, out, err, names, expect)
        shown = " ".join(s if len(s) < 60 else s[:20] + "..." for s in argv).replace(str(WORK) + "/", "")
        emit(dict(case=name, command="sfx " + shown, exit=rc, cls=cls, message=msg, seconds=round(dt, 1)))
    for name, code, names, expect in API_CASES:
        if not want(name):
            continue
        rc, out, err, dt = run([PY, "-c", code], 60, WORK)
        tb = "Traceback (most recent call last)" in err
        msg = last_line(err) or last_line(out)
        if expect == "ok":
            cls = "ok" if rc == 0 else "silent" if "AssertionError" in msg else "traceback"
        elif rc == 0:
            cls = "silent"
        else:  # an API raises: the exception's one line is the message (the traceback is the API's way)
            cls = "clear error" if all(n.lower() in msg.lower() for n in names) else "unclear error"
        del tb
        emit(dict(case=name, command="python -c " + code.split("; ", 2)[-1][:90], exit=rc, cls=cls, message=msg,
                  seconds=round(dt, 1)))
    stale_cases(rows, a.k)
    if rows and rows[-1].get("case", "").startswith("stale"):
        for r in rows[-3:]:
            print(f"{r['cls']:<14} {r['case']:<45} | {r['message'][:150]}", flush=True)
    if a.merge and Path(a.out).is_file():
        done = {r["case"] for r in rows}
        old = [r for r in json.loads(Path(a.out).read_text()) if r["case"] not in done]
        rows = old + rows
    Path(a.out).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    counts = {}
    for r in rows:
        counts[r["cls"]] = counts.get(r["cls"], 0) + 1
    cases = len({r["case"] for r in rows})
    print(f"\n{len(rows)} runs of {cases} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    md = ["| case | command | result class | message |", "|---|---|---|---|"]
    for r in rows:
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        md.append(f"| {esc(r['case'])} | `{esc(r['command'])}` | {r['cls']} | {esc(r['message'])[:300]} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

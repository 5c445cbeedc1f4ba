"""``sfx finetune``, ``sfx analyze`` and ``sfx sweep`` (WASQ training and analysis).

Registered from :mod:`superfloat.cli` (``SUBCOMMAND_MODULES``) and from
:mod:`superfloat.cli.wasq` (``EXTENSION_MODULES``); :func:`register` adds the
commands once whichever comes first. Options are spelled like ``sfx eval``'s
(``--model``, ``--data``, ``--weight-bits``, ``--act-bits``, ``--scale``, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from superfloat.cli import argtypes
from superfloat.cli.wasq import CLIError, _run, add_model_args, add_quant_args
from superfloat.sw.wasq.data import pad_id

__all__ = ["register", "cmd_finetune", "cmd_analyze", "cmd_sweep", "load_blocks"]

TRAIN_METHODS = ("vanilla", "fpm", "opt", "fasteropt", "lth")


# --------------------------------------------------------------------------- shared helpers


def _positive(name: str, kind=int, allow_zero: bool = False):
    """``type=`` for ``name``: a positive (or, with ``allow_zero``, non-negative) int or finite
    float (superfloat.cli.argtypes; argparse prefixes the message with the flag)."""
    from superfloat.cli import argtypes

    if kind is float:
        return argtypes.nonneg_float if allow_zero else argtypes.positive_float
    return argtypes.nonneg_int if allow_zero else argtypes.positive_int


def _fraction(s: str):
    if s == "cluster":
        return s
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fraction must be a number in (0, 1] or 'cluster', got {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"--fraction must be a number in (0, 1] or 'cluster', got {s}")
    return v


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    """The WASQConfig options of ``add_quant_args`` minus its ``--method`` (``finetune``
    uses ``--method`` for the training method; the quantizer is always SFx here)."""
    g = p.add_argument_group("quantization (WASQConfig; defaults in docs/wasq.md)")
    g.add_argument("--weight-bits", "-w", type=argtypes.sfx_bits, required=True, metavar="X",
                   help="SFx weight width, 2..16")
    g.add_argument("--act-bits", "-a", type=argtypes.sfx_bits, metavar="Y", help="SF Y inputs of every quantized layer "
                                                                    "(default: weight-only)")
    g.add_argument("--scale", dest="scale_kind", default="float", choices=("float", "pow2"),
                   help="weight scale: float per row (default) or power-of-two exponents")
    g.add_argument("--weight-scale", default="channel", choices=("channel", "tensor"))
    g.add_argument("--act-exponent", default="dynamic", choices=("dynamic",),
                   help="activation exponents: per token, on the fly (static ones are not trained here)")
    g.add_argument("--rounding", default="nearest_even", choices=("nearest_even", "toward_zero"))
    g.add_argument("--skip", nargs="*", metavar="GLOB", default=None,
                   help="module-name globs kept float (default: lm_head, embeddings, norms)")


def _config(args: argparse.Namespace, method: str = "sfx", bits: int | None = None):
    from superfloat.sw.wasq.config import DEFAULT_SKIP, WASQConfig

    init = getattr(args, "init", None)
    opts = dict(getattr(args, "init_option", None) or [])
    if opts and not init:
        raise CLIError("--init-option sets a knob of the --init method: give --init METHOD")
    try:
        return WASQConfig(weight_bits=args.weight_bits if bits is None else bits, act_bits=args.act_bits,
                          weight_scale=args.weight_scale, scale_kind=args.scale_kind,
                          act_exponent=args.act_exponent, rounding=args.rounding,
                          skip=tuple(args.skip) if args.skip is not None else DEFAULT_SKIP,
                          method=init if init else method, method_options=opts)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--init {init}: {e}" if init else str(e)) from None


def _key_value(s: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--init-option``: VALUE as JSON (numbers, true/false, null), else a string."""
    key, sep, value = s.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. adaround_iters=50), got {s!r}")
    try:
        v = json.loads(value)
    except ValueError:
        v = value
    return key.strip(), v


def _outputs(args: argparse.Namespace, config):
    """The :class:`OutputCalibration` of a run: every finetune checkpoint of a hardware-executable
    format gets calibrated static output exponents (None otherwise)."""
    from superfloat.sw.wasq.methods import OutputCalibration

    if not config.hardware_executable:
        if args.backend == "accelerator":
            raise CLIError(f"--backend accelerator: {config.describe()} is not executable by the SFx accelerator "
                           f"(software only); use SFx codes with per-channel scales")
        return None
    try:
        return OutputCalibration(tokens=args.calib_tokens, out_bits=args.out_bits, headroom=args.headroom,
                                 recalibrate=args.recalibrate)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _load(spec: str):
    from superfloat.sw.wasq.models import load_model

    try:
        lm = load_model(spec)
    except ValueError as e:
        raise CLIError(str(e)) from None
    from superfloat.sw.wasq.quantize import quantized_layers

    if quantized_layers(lm.model):
        raise CLIError(f"{spec} is already quantized (a WASQ checkpoint); start from the float model")
    return lm


def load_blocks(tokenizer: Any, data: str, split: str, context: int, tokens: int):
    """The first ``tokens`` tokens of ``data``/``split`` cut into blocks of ``context``."""
    from superfloat.sw.wasq.data import load_text, tokenize
    from superfloat.sw.wasq.train import make_blocks

    try:
        text = load_text(data, split)
        ids = tokenize(tokenizer, text, tokens)
        return make_blocks(ids, context, pad_id(tokenizer))
    except ValueError as e:
        raise CLIError(str(e)) from None


def _eval_ids(tokenizer: Any, data: str, split: str, tokens: int):
    from superfloat.sw.wasq.data import load_text, tokenize

    try:
        return tokenize(tokenizer, load_text(data, split), tokens)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _train_config(args: argparse.Namespace):
    from superfloat.sw.wasq.train import TrainConfig

    try:
        return TrainConfig(epochs=args.epochs, lr=args.lr, max_steps=args.max_steps, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                           scheduler=args.scheduler, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                           save_every=args.save_every, dropout=args.dropout, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _atomic_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- sfx finetune


def _process_state():
    """accelerate's process state (several processes under ``accelerate launch`` / ``torchrun``)."""
    from superfloat.sw.wasq.train import DistributedLaunchError, process_state

    try:
        return process_state()
    except DistributedLaunchError as e:
        raise CLIError(str(e)) from None


def cmd_finetune(args: argparse.Namespace) -> int:
    """``sfx finetune``; under several processes (docs/distributed.md) every rank trains its
    slice of each global batch, rank 0 alone writes the checkpoint, ``finetune.json`` and
    the output (the others wait for it), with global token and loss figures."""
    ps = _process_state()
    try:
        return _finetune(args, ps)
    except CLIError as e:
        if ps.num_processes > 1 and not ps.is_main_process:
            raise CLIError(f"[rank {ps.process_index}] {e}") from None
        raise
    finally:
        if ps.num_processes > 1:
            ps.destroy_process_group()


def _finetune(args: argparse.Namespace, ps) -> int:
    from superfloat.sw.wasq.evaluate import perplexity
    from superfloat.sw.wasq.methods import run_method

    main = ps.is_main_process
    out = Path(args.output)
    model_dir = out / "model"
    if model_dir.exists() and any(model_dir.iterdir()) and not (args.resume or args.overwrite):
        raise CLIError(f"{model_dir} already exists; pass --resume to continue that run or --overwrite to replace it")
    config = _config(args)
    cfg = _train_config(args)
    if args.recalibrate != "never" and args.backend != "accelerator":
        raise CLIError(f"--recalibrate {args.recalibrate} applies to --backend accelerator (with --backend fake the "
                       f"output exponents are calibrated once, after training)")
    if args.method == "fasteropt" and args.backend == "accelerator" and args.recalibrate == "epoch":
        raise CLIError("--recalibrate epoch does not work with fasteropt (the calibration pass cannot run while the "
                       "frozen prefix is cached); use --method opt, or --recalibrate never/end")
    outputs = _outputs(args, config)
    if args.overwrite and not args.resume and (out / "train_state").exists():
        import shutil

        if main:
            shutil.rmtree(out / "train_state")  # --overwrite starts afresh
        ps.wait_for_everyone()
    if args.method in ("opt", "fasteropt") and args.layers and args.analysis:
        raise CLIError("give either --layers or --analysis, not both")
    t0 = time.perf_counter()
    args._cpu0 = time.process_time()
    args._load0 = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    lm = _load(args.model)
    blocks = None
    kwargs: dict[str, Any] = {"outputs": outputs}
    if args.method != "vanilla":
        blocks = load_blocks(lm.tokenizer, args.data, args.split, args.context, args.tokens)
        kwargs.update(state_dir=out / "train_state", resume=args.resume, backend=args.backend)
    elif outputs is not None or config.needs_calibration:
        from superfloat.sw.wasq.methods import calibration_batches

        kwargs["calibration"] = calibration_batches(
            load_blocks(lm.tokenizer, args.data, args.split, args.context, args.calib_tokens), args.calib_tokens)
    eval_ids = None
    if args.eval_tokens:
        eval_ids = _eval_ids(lm.tokenizer, args.data, args.eval_split, args.eval_tokens)

    def ppl(model) -> float:
        return perplexity(model, eval_ids, context=args.context, progress=not args.no_progress,
                          pad_token_id=pad_id(lm.tokenizer)).perplexity

    if args.method in ("opt", "fasteropt"):
        from superfloat.cli.analysis import read_analysis

        kwargs.update(fraction=args.fraction)
        if args.layers:
            kwargs["layers"] = args.layers
        elif args.analysis:
            try:
                kwargs["analysis"] = read_analysis(args.analysis)
            except ValueError as e:
                raise CLIError(str(e)) from None
        else:
            kwargs["analysis_blocks"] = load_blocks(lm.tokenizer, args.data, args.split, args.context,
                                                    args.analysis_tokens)
    if args.method == "lth":
        kwargs.update(rounds=args.rounds, prune=args.prune, eval_fn=ppl if eval_ids is not None else None)
    try:
        res = run_method(args.method, lm.model, blocks, config, cfg, **kwargs)
        if args.method == "vanilla" and args.backend == "accelerator":
            from superfloat.sw.wasq.accelerator import set_backend

            set_backend(res.model, "accelerator")  # nothing trains; --eval-tokens evaluates accelerator-exact
    except ValueError as e:
        raise CLIError(str(e)) from None
    except KeyboardInterrupt:
        if main:
            print(f"interrupted; continue with the same command plus --resume (checkpoints in {out / 'train_state'})",
                  file=sys.stderr)
        return 130
    if not main:  # rank 0 evaluates and writes; the others wait for it (a failure there stops the launcher)
        ps.wait_for_everyone()
        return 0
    try:
        return _report(args, res, lm, blocks, eval_ids, ppl, out, model_dir, config, t0, ps.num_processes)
    finally:
        ps.wait_for_everyone()


def _report(args, res, lm, blocks, eval_ids, ppl, out: Path, model_dir: Path, config, t0: float, world: int) -> int:
    from superfloat.sw.wasq.checkpoint import save_checkpoint

    summary: dict[str, Any] = {"model": args.model, "data": args.data, "split": args.split, "context": args.context,
                               "calibration_tokens": blocks.n_tokens if blocks is not None else 0,
                               "calibration_blocks": len(blocks) if blocks is not None else 0,
                               "note": lm.note, "world": world, **res.summary()}
    if res.extra.get("analysis") is not None:
        from superfloat.cli.analysis import write_analysis

        write_analysis(res.extra["analysis"], out / "analysis")
        summary["analysis_dir"] = str(out / "analysis")
    if eval_ids is not None:
        from superfloat.sw.wasq.accelerator import accelerator_stats, backend_of, reset_accelerator_stats

        backend = backend_of(res.model)
        if backend == "accelerator":
            reset_accelerator_stats(res.model)
        summary["eval"] = {"split": args.eval_split, "tokens": int(eval_ids.numel()), "context": args.context,
                           "backend": backend, "perplexity": ppl(res.model)}
        if backend == "accelerator":
            st = accelerator_stats(res.model)
            summary["eval"].update(saturated=st["saturated"], outputs=st["outputs"], clamped_rows=st["clamped_rows"])
    try:
        summary["memory"] = save_checkpoint(res.model, model_dir, tokenizer=lm.tokenizer,
                                            overwrite=args.resume or args.overwrite, source=args.model, note=lm.note)
    except (FileExistsError, ValueError) as e:
        raise CLIError(str(e)) from None
    summary["checkpoint"] = str(model_dir)
    summary["total_seconds"] = time.perf_counter() - t0
    # what a bench needs to recognise and judge this run: the settings, CPU time beside wall
    # time (the machine may be shared), the load when it started, the torch threads
    import torch

    summary["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
    summary["cpu_seconds"] = time.process_time() - args._cpu0
    summary["load_avg_start"] = args._load0
    summary["torch_threads"] = torch.get_num_threads()
    _atomic_json(out / "finetune.json", summary)
    if args.json:
        print(json.dumps(summary, default=_json_default))
    else:
        tr = res.train
        line = f"{args.method}: {config.describe()} -> {model_dir}"
        if tr is not None:
            line += (f"; {tr.steps} steps, loss {tr.first_loss:.4f} -> {tr.last_loss:.4f}, "
                     f"{tr.tokens_per_s:.0f} tokens/s, {len(res.trained_layers)} layers trained")
            if tr.world > 1:
                line += f" ({tr.world} processes, global figures)"
        print(line)
        if args.method == "lth":
            for r in res.extra["rounds"]:
                print(f"  round {r['round']}: sparsity {r['sparsity']:.3f}, loss {r['loss']:.4f}"
                      + (f", perplexity {r['eval']:.3f}" if r.get("eval") is not None else ""))
        if "output_calibration" in summary:
            ev = [e for e in summary["output_calibration"]["events"] if "tokens" in e]
            if ev:
                print(f"  static output exponents calibrated on {ev[-1]['tokens']} training tokens "
                      f"({', '.join(e['when'] for e in ev)}); trained on the {summary.get('backend', 'fake')} backend")
        if "eval" in summary:
            e = summary["eval"]
            print(f"  perplexity on {args.data} ({args.eval_split}, {e['tokens']} tokens"
                  f"{', accelerator-exact' if e['backend'] == 'accelerator' else ''}): {e['perplexity']:.4f}"
                  + (f" ({e['saturated']} of {e['outputs']} output codes saturated)" if "saturated" in e else ""))
        if lm.note:
            print(f"note: {lm.note}")
    return 0


# --------------------------------------------------------------------------- sfx analyze


def cmd_analyze(args: argparse.Namespace) -> int:
    from superfloat.cli.analysis import write_analysis
    from superfloat.sw.wasq.analyze import analyze
    from superfloat.sw.wasq.config import DEFAULT_SKIP, WASQConfig

    if args.weight_bits is None:
        raise CLIError("--weight-bits is required (the quantization whose effect is analysed)")
    try:
        config = WASQConfig(weight_bits=args.weight_bits, act_bits=args.act_bits, weight_scale=args.weight_scale,
                            scale_kind=args.scale_kind, act_exponent=args.act_exponent, rounding=args.rounding,
                            skip=tuple(args.skip) if args.skip is not None else DEFAULT_SKIP, method=args.method)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    if config.act_bits is not None and config.act_exponent == "static":
        raise CLIError("sfx analyze supports dynamic activation exponents only")
    lm = _load(args.model)
    blocks = load_blocks(lm.tokenizer, args.data, args.split, args.context, args.tokens)
    try:
        an = analyze(lm.model, blocks, config, metric=args.metric, clusters=args.clusters,
                     progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from None
    csv_path, png_path = write_analysis(an, args.output, title=f"{args.model}: {config.describe()}, "
                                                              f"{an.tokens} tokens of {args.data}")
    summary = {"model": args.model, "data": args.data, "split": args.split, "context": args.context,
               "tokens": an.tokens, "quant_config": config.to_dict(), "metric": an.metric, "clusters": an.clusters,
               "layers": len(an), "critical": an.critical(), "top": [s.row() for s in an.ranked()[:10]],
               "csv": str(csv_path), "png": str(png_path), "note": lm.note}
    _atomic_json(Path(args.output) / "analysis.json", summary)
    if args.json:
        print(json.dumps(summary, default=_json_default))
    else:
        print(f"{len(an)} layers analysed on {an.tokens} tokens; {len(an.critical())} in the critical cluster; "
              f"wrote {csv_path} and {png_path}")
        for s in an.ranked()[:args.show]:
            print(f"  {s.rank:4d}  {s.layer:48s} deviation {s.deviation:8.4f}  rel_error {s.rel_error:8.4f}"
                  f"{'  critical' if s.critical else ''}")
    return 0


# --------------------------------------------------------------------------- sfx sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from superfloat.bench.sweep import SweepSpec, run_sweep, write_sweep

    try:
        spec = SweepSpec(models=tuple(args.model), bits=tuple(args.bits), contexts=tuple(args.context),
                         shots=tuple(args.shots), data=args.data, calib_tokens=args.tokens,
                         eval_tokens=args.eval_tokens, lr=args.lr, pretrain_steps=args.pretrain_steps,
                         scale_kind=args.scale_kind, seed=args.seed, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        rows = run_sweep(spec)
    except ValueError as e:
        raise CLIError(str(e)) from None
    paths = write_sweep(rows, args.output, spec)
    if args.json:
        print(json.dumps({"rows": rows, "files": [str(p) for p in paths]}, default=_json_default))
    else:
        print(Path(paths[0]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# --------------------------------------------------------------------------- registration


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (docs/wasq-methods.md)")
    g.add_argument("--epochs", type=_positive("--epochs"), default=3, metavar="N",
                   help="passes over the calibration text ('shots'; default 3, upstream's three-shot)")
    g.add_argument("--context", type=_positive("--context"), default=512, metavar="C",
                   help="tokens per training block (default 512)")
    g.add_argument("--tokens", type=_positive("--tokens"), default=8192, metavar="T",
                   help="calibration budget: the first T tokens of --data/--split (default 8192)")
    g.add_argument("--lr", type=_positive("--lr", float), default=1e-4,
                   help="AdamW learning rate (default 1e-4: on SmolLM2 at SF4 it beat 2e-5, see docs/wasq-methods.md)")
    g.add_argument("--max-steps", type=_positive("--max-steps"), default=None, metavar="S",
                   help="stop after S optimizer steps")
    g.add_argument("--batch-size", type=_positive("--batch-size"), default=1, metavar="B",
                   help="blocks per micro-batch (default 1)")
    g.add_argument("--grad-accum", type=_positive("--grad-accum"), default=1, metavar="K",
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--weight-decay", type=_positive("--weight-decay", float, True), default=0.0)
    g.add_argument("--warmup", type=_positive("--warmup", int, True), default=4, metavar="S",
                   help="linear warm-up steps (default 4)")
    g.add_argument("--scheduler", default="cosine", choices=("constant", "constant_with_warmup", "linear", "cosine"))
    g.add_argument("--max-grad-norm", type=_positive("--max-grad-norm", float, True), default=1.0,
                   help="gradient clipping (0: off; default 1.0)")
    g.add_argument("--seed", type=argtypes.nonneg_int, default=0)
    g.add_argument("--save-every", type=_positive("--save-every"), default=None, metavar="S",
                   help="also checkpoint every S steps (always: end of each epoch, end of run, Ctrl-C)")
    g.add_argument("--dropout", action="store_true", help="train with the model's dropout (default: off)")


def _add_accelerator_options(p: argparse.ArgumentParser) -> None:
    from superfloat.sw.wasq.ptq.config import METHODS as PTQ_METHODS

    g = p.add_argument_group("QAT on the accelerator's arithmetic, static output exponents "
                             "(docs/wasq-methods.md, docs/accelerator-exact.md)")
    g.add_argument("--backend", default="fake", choices=("fake", "accelerator"),
                   help="where the quantized layers compute while training: fake quantization (default), or "
                        "accelerator: the values the FPGA returns (SPEC section 8) with the fake-quantized layer's "
                        "gradients (straight through), static output exponents calibrated on the training text first")
    g.add_argument("--init", default=None, choices=tuple(m for m in PTQ_METHODS if m != "rtn"), metavar="METHOD",
                   help="initialise QAT from a post-training method (the pass 'sfx quantize --method METHOD' runs, "
                        "on --calib-tokens of the training text): " + ", ".join(m for m in PTQ_METHODS if m != "rtn")
                        + " (default: round to nearest)")
    g.add_argument("--init-option", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="a knob of the --init method (MethodOptions, docs/ptq-methods.md), e.g. adaround_iters=50, "
                        "gptq_damp=0.02; repeatable")
    g.add_argument("--calib-tokens", type=_positive("--calib-tokens"), default=2048, metavar="N",
                   help="training tokens that calibrate the static output exponents (and --init) (default 2048); "
                        "every checkpoint gets them, so 'sfx eval --model DIR/model --backend accelerator' runs it")
    g.add_argument("--out-bits", type=argtypes.sfx_bits, default=None, metavar="N",
                   help="output width of every quantized layer on the accelerator (default 16)")
    g.add_argument("--headroom", type=argtypes.float_range(1.0, None), default=None, metavar="H",
                   help="static output exponents leave this factor above the calibrated maximum (default: 4 for "
                        "outputs of 12 bits and more, else 1)")
    g.add_argument("--recalibrate", default="never", choices=("never", "epoch", "end"),
                   help="--backend accelerator: calibrate the output exponents once before training (never, "
                        "default), before every epoch (epoch) or before and after training (end)")


def register(sub) -> None:
    if "finetune" in getattr(sub, "choices", {}):
        return  # already registered (cli/__init__.py and cli/wasq.py both list this module)
    p = sub.add_parser("finetune", help="WASQ methods: vanilla, fpm, opt, fasteropt, lth (QAT to SFx)",
                       description="Quantize a float causal LM to SFx and train it (docs/wasq-methods.md). Writes "
                                   "DIR/model (a WASQ checkpoint: weights re-projected to the SFx grid), "
                                   "DIR/finetune.json and resumable training state in DIR/train_state.")
    p.add_argument("--method", default="fpm", choices=TRAIN_METHODS, help="default fpm")
    add_model_args(p)
    p.add_argument("--data", "-d", default="shakespeare", metavar="D",
                   help="calibration text: a file, shakespeare[:PLAY], wikitext-2, hf:NAME[:CONFIG] (default shakespeare)")
    p.add_argument("--split", default="train", choices=("train", "validation", "test", "all"),
                   help="split of --data to train on (default train)")
    _add_quant_options(p)
    _add_train_options(p)
    g = p.add_argument_group("opt / fasteropt")
    g.add_argument("--fraction", type=_fraction, default=0.25, metavar="F",
                   help="train the top F of the layers ranked by 'sfx analyze' (default 0.25), or 'cluster' for "
                        "the critical cluster")
    g.add_argument("--analysis", metavar="DIR", help="use this 'sfx analyze' output instead of analysing first")
    g.add_argument("--analysis-tokens", type=_positive("--analysis-tokens"), default=2048, metavar="T",
                   help="tokens for the built-in analysis (default 2048)")
    g.add_argument("--layers", nargs="+", metavar="NAME", help="train exactly these layers")
    g = p.add_argument_group("lth")
    g.add_argument("--rounds", type=_positive("--rounds", int, True), default=2, help="pruning rounds (default 2)")
    g.add_argument("--prune", type=argtypes.float_range(0.0, 1.0, open_low=True, open_high=True), default=0.2, help="fraction of surviving weights pruned per round (0.2)")
    _add_accelerator_options(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tokens", type=_positive("--eval-tokens", int, True), default=0, metavar="T",
                   help="perplexity on the first T tokens of --eval-split after training (and after each lth round)")
    g.add_argument("--eval-split", default="validation", choices=("train", "validation", "test", "all"))
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from DIR/train_state")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/model")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run(cmd_finetune))

    p = sub.add_parser("analyze", help="rank layers by activation deviation after quantization (CSV + PNG)",
                       description="Mean |output| of every quantized linear layer, float vs quantized, on calibration "
                                   "text; ranking, 1-D k-means clusters, DIR/layers.csv and DIR/layers.png "
                                   "(docs/wasq-methods.md).")
    add_model_args(p)
    p.add_argument("--data", "-d", default="shakespeare", metavar="D", help="calibration text (default shakespeare)")
    p.add_argument("--split", default="train", choices=("train", "validation", "test", "all"))
    add_quant_args(p)
    p.add_argument("--context", type=_positive("--context"), default=512, metavar="C")
    p.add_argument("--tokens", type=_positive("--tokens"), default=2048, metavar="T",
                   help="calibration tokens (default 2048)")
    p.add_argument("--metric", default="deviation", choices=("deviation", "rel_error"),
                   help="ranking: |q-f|/f of the mean |output| (upstream, default) or ||q-f||/||f||")
    p.add_argument("--clusters", type=_positive("--clusters"), default=2, help="k of the 1-D k-means (default 2)")
    p.add_argument("--show", type=_positive("--show", int, True), default=10, help="print the top N layers")
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run(cmd_analyze))

    p = sub.add_parser("sweep", help="upstream 'scaling law' P = f(n, c, shots, x): bits x context x shots x model",
                       description="Perplexity over weight bits x context length x QAT shots (x model), each beside "
                                   "the float model at the same context; writes sweep.md, sweep.csv, sweep.png.")
    p.add_argument("--model", "-m", nargs="+", default=["tiny-llama"], metavar="M",
                   help="model spec(s) (default tiny-llama)")
    p.add_argument("--data", "-d", default="shakespeare", metavar="D")
    p.add_argument("--bits", nargs="+", type=argtypes.sfx_bits, default=[4, 6, 8], metavar="X", help="SFx weight widths (4 6 8)")
    p.add_argument("--context", nargs="+", type=_positive("--context"), default=[64, 256], metavar="C",
                   help="calibration and evaluation window lengths (default 64 256)")
    p.add_argument("--shots", nargs="+", type=_positive("--shots", int, True), default=[0, 1, 3], metavar="S",
                   help="QAT epochs over the calibration text; 0 = vanilla (default 0 1 3)")
    p.add_argument("--tokens", type=_positive("--tokens"), default=4096, metavar="T",
                   help="calibration tokens per shot (default 4096)")
    p.add_argument("--eval-tokens", type=_positive("--eval-tokens"), default=4096, metavar="T",
                   help="held-out tokens evaluated (validation split; default 4096)")
    p.add_argument("--lr", type=_positive("--lr", float), default=1e-4, help="QAT learning rate (default 1e-4)")
    p.add_argument("--pretrain-steps", type=_positive("--pretrain-steps", int, True), default=0, metavar="S",
                   help="first train each float model S steps on the train split (for the random tiny models)")
    p.add_argument("--scale", dest="scale_kind", default="float", choices=("float", "pow2"))
    p.add_argument("--seed", type=argtypes.nonneg_int, default=0)
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run(cmd_sweep))

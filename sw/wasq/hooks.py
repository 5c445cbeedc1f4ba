"""Extension points of the core WASQ modules, filled by the integrations above them.

``quantize_`` and ``load_checkpoint`` run :data:`AFTER_QUANTIZE` on every model they return,
and ``save_checkpoint`` runs :data:`CHECKPOINT_FILES` before it seals a checkpoint directory.
The Hugging Face integration (:mod:`superfloat.sw.wasq.hf`) registers itself here when it
is imported, so the core never imports it (no import cycle); :func:`run` imports it first
whenever ``transformers`` is loaded, so a transformers model always gets its Hugging Face
identity and ``config.json`` (docs/huggingface.md).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__all__ = ["AFTER_QUANTIZE", "CHECKPOINT_FILES", "run"]

#: ``fn(model)``: after ``quantize_`` and ``load_checkpoint``
AFTER_QUANTIZE: list[Callable[[Any], None]] = []
#: ``fn(model, tmp_dir, info)``: extra files of a checkpoint being written (``info``: its sfx_config.json)
CHECKPOINT_FILES: list[Callable[[Any, Any, dict[str, Any]], None]] = []

#: integrations loaded on demand: module name -> the module whose presence asks for it
_PLUGINS = {"superfloat.sw.wasq.hf": "transformers"}


def _load_plugins() -> None:
    for plugin, needs in _PLUGINS.items():
        if needs in sys.modules and plugin not in sys.modules:
            importlib.import_module(plugin)


def run(hooks: list[Callable[..., None]], *args: Any) -> None:
    """Call every registered hook of ``hooks`` with ``args`` (after loading the integrations
    that the imported packages ask for)."""
    _load_plugins()
    for fn in list(hooks):
        fn(*args)

"""tomoe: convert a dense Hugging Face decoder LLM into a Mixture-of-Experts model by dynamic structural pruning.

``import tomoe`` imports neither torch nor transformers, so that the command line (``tomoe --help``, argument errors)
starts at once: the names that need them (``attach``, ``export_model``, ...) are imported on first use, and the
``tomoe`` model type is registered with transformers' Auto classes as soon as transformers itself is imported (at
once, if it already is), so ``import tomoe`` followed by ``AutoModelForCausalLM.from_pretrained(exported_dir)`` works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError

__version__ = "0.1.0"
__all__ = ["ToMoEConfig", "ToMoEError", "ToMoERouting", "attach", "export_model", "save_export", "__version__"]

# Public names whose modules import torch or transformers: name -> module that defines it.
_LAZY_NAMES = {"ToMoERouting": "tomoe.patch", "attach": "tomoe.patch", "export_model": "tomoe.export.build",
               "save_export": "tomoe.export.folder"}


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'tomoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Imports :mod:`tomoe.export`, which registers the tomoe model type, right after transformers is imported.

    It finds no module itself: for ``transformers`` it asks the other finders and extends the loader of what they
    find, so that executing transformers is followed by importing tomoe.export; it then leaves ``sys.meta_path``.
    A spec that someone only looks up (``importlib.util.find_spec``) and never loads changes nothing.
    """

    def __init__(self) -> None:
        self._asking_others = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or self._asking_others:
            return None
        self._asking_others = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._asking_others = False
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module("tomoe.export")  # registers the Auto classes

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    importlib.import_module("tomoe.export")  # registers the Auto classes
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())

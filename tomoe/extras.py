"""Optional dependencies: the extra that installs each one, and one clear error when a command needs a missing one.

``lm-eval`` (zero-shot evaluation) and ``matplotlib`` (``tomoe report``) are heavy and needed by one command each,
so ``pip install tomoe`` leaves them out; ``tomoe[eval]``, ``tomoe[report]`` and ``tomoe[all]`` install them.
``datasets`` (hub data: ``--data paper``, WikiText-2 without a local copy) comes with ``tomoe[datasets]`` and
``tomoe[eval]``.
"""

from __future__ import annotations

import importlib

from tomoe.errors import ToMoEError

# import name -> (distribution name, extra that installs it)
OPTIONAL = {"lm_eval": ("lm-eval", "eval"), "matplotlib": ("matplotlib", "report"), "datasets": ("datasets", "datasets")}


def require(module: str, purpose: str) -> None:
    """Import ``module`` (the command is about to use it); if that fails, raise a one-line ToMoEError naming the extra."""
    distribution, extra = OPTIONAL[module]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ToMoEError(f"{purpose} needs the optional package {distribution}, which is not installed; "
                         f"install it with `pip install 'tomoe[{extra}]'` (or `pip install -e '.[{extra}]'` in a checkout).") from None

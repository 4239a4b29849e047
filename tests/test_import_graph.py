"""The package's import structure: no import cycles (imports inside functions included), layers that import
downward only, and a command line that starts without torch or transformers."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
import_graph = sys.modules["import_graph"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(import_graph)

# Bottom-up: a module may import its own layer and those before it, never a later one. A module belongs to the layer
# of its longest listed prefix.
LAYERS = [
    ("foundation", ["tomoe.errors", "tomoe.config", "tomoe.extras", "tomoe.sample_text"]),
    ("families, nn, loading, data", ["tomoe.families", "tomoe.nn", "tomoe.loading", "tomoe.data"]),
    ("patch, losses, methods", ["tomoe.patch", "tomoe.losses", "tomoe.measure", "tomoe.baselines", "tomoe.methods"]),
    ("train", ["tomoe.run", "tomoe.train", "tomoe.baselines.runners"]),
    ("export", ["tomoe.export", "tomoe.export_formats"]),
    ("artifacts", ["tomoe.artifacts"]),
    ("evaluate, report, info", ["tomoe.evaluate", "tomoe.report", "tomoe.info", "tomoe.tasks"]),
    ("cli", ["tomoe.cli", "tomoe.__main__"]),
    ("facade", ["tomoe"]),  # the package itself only: every module is below it
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (module.startswith(prefix + ".") and prefix != "tomoe")]
    assert matches, f"{module} is in no layer: add it to LAYERS where it belongs"
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph():
    return import_graph.build_graph()


def test_no_import_cycles(graph):
    assert import_graph.find_cycles(graph.edges) == []


def test_cycle_finder_sees_function_level_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.find_cycles(edges) == [["a", "b", "c"]]


def test_layers_import_downward(graph):
    upward = [f"{importer} ({LAYERS[layer_of(importer)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
              for importer, targets in graph.edges.items() for target in sorted(targets)
              if layer_of(target) > layer_of(importer)]
    assert upward == []


def test_named_layers_in_order():
    order = [name for name, _ in LAYERS]
    for lower, higher in [("families, nn, loading, data", "patch, losses, methods"), ("patch, losses, methods", "train"),
                          ("train", "export"), ("export", "evaluate, report, info"), ("evaluate, report, info", "cli")]:
        assert order.index(lower) < order.index(higher)


def test_command_line_starts_without_torch_or_transformers():
    """`tomoe --help`, every `tomoe CMD --help` and an argument error import neither torch nor transformers."""
    script = (
        "import sys\n"
        "from tomoe.cli import COMMAND_MODULES, main\n"
        "for argv in [['--help'], *[[name, '--help'] for name in COMMAND_MODULES], ['convert', '--steps', 'many', '--out', 'x'], ['nonsense']]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    assert _last_printed_line(script, timeout=120) == "[]"


def test_import_tomoe_registers_the_model_type_once_transformers_loads():
    script = (
        "import sys\n"
        "import tomoe\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "from transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('tomoe')).__name__)\n"
    )
    assert _last_printed_line(script, timeout=300) == "TomoeConfig"


def _last_printed_line(script: str, timeout: int) -> str:
    """Run ``script`` in a fresh interpreter on this checkout; its last line of output (it must exit 0)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]

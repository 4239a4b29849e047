"""Installed size of tomoe's dependency closure, per extra, now and at an earlier commit.

For each row, pip resolves ``torch==2.13.0`` plus the dependencies that ``pyproject.toml`` (at a git ref, or the
working tree) declares for the chosen extras (``pip install --dry-run --ignore-installed --report``, nothing is
installed), and the size of every resolved distribution is summed from the files it installed in this environment
(so both sides are measured with the same wheels; a distribution that is not installed here is listed, not guessed).

    python scripts/install_size.py [--before REF]

Writes ``benchmarks/results/install_size.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TORCH = "torch==2.13.0"  # the README's pin: pip takes the CPU wheel


def declared_requirements(pyproject: dict, extras: tuple[str, ...]) -> list[str]:
    """The project's dependencies plus those of ``extras``, following ``tomoe[...]`` self-references."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    requirements, pending, seen = list(project["dependencies"]), list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            if requirement.startswith(f"{project['name']}["):
                pending.extend(name.strip() for name in requirement[requirement.index("[") + 1 : requirement.index("]")].split(","))
            else:
                requirements.append(requirement)
    return requirements


def resolve(requirements: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every distribution pip would install for ``requirements`` into an empty environment."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *requirements],
                       check=True)
        install = json.loads(report.read_text())["install"]
    return sorted((item["metadata"]["name"], item["metadata"]["version"]) for item in install)


def installed_bytes(name: str, version: str) -> int | None:
    """Bytes of the files ``name`` installed here, if the same version is installed."""
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if distribution.version != version:
        return None
    total = 0
    for file in distribution.files or []:
        path = Path(distribution.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def measure(label: str, pyproject: dict, extras: tuple[str, ...]) -> dict:
    resolved = resolve([TORCH, *declared_requirements(pyproject, extras)])
    sizes = {name: installed_bytes(name, version) for name, version in resolved}
    torch_bytes = sizes.get("torch") or 0
    total = sum(size for size in sizes.values() if size)
    return {
        "install": label,
        "distributions": len(resolved),
        "mb_total": round(total / 2**20, 1),
        "mb_without_torch": round((total - torch_bytes) / 2**20, 1),
        "not_measured": [f"{name}=={version}" for (name, version) in resolved if sizes[name] is None],
        "packages": {f"{name}=={version}": sizes[name] for name, version in resolved},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="8cf7611", help="git ref of the 'before' pyproject.toml (default: the commit before the extras)")
    args = parser.parse_args()
    before = tomllib.loads(subprocess.run(["git", "show", f"{args.before}:pyproject.toml"], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    now = tomllib.loads((REPO / "pyproject.toml").read_text())
    rows = [
        measure(f"before ({args.before}): pip install tomoe", before, ()),
        measure("now: pip install tomoe", now, ()),
        measure("now: pip install tomoe[report]", now, ("report",)),
        measure("now: pip install tomoe[test] (README / CI)", now, ("test",)),
        measure("now: pip install tomoe[all]", now, ("all",)),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "install_size.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Install size",
        "",
        f"`python scripts/install_size.py --before {args.before}`: the dependency closure pip resolves for `{TORCH}` plus each "
        "install, into an empty environment, measured as the bytes the same distributions occupy installed here.",
        "",
        "| install | distributions | MB | MB without torch | not measured |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {r['install']} | {r['distributions']} | {r['mb_total']} | {r['mb_without_torch']} | {', '.join(r['not_measured']) or '-'} |" for r in rows]
    (RESULTS / "install_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

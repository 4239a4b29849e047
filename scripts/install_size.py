"""Installed size of tomoe's dependency closure, per extra, now and at an earlier commit.

For each row, the dependency closure of ``torch==2.13.0`` plus the dependencies that ``pyproject.toml`` (at a git
ref, or the working tree) declares for the chosen extras is walked through the metadata of the distributions
installed in this environment (``Requires-Dist``, markers and extras evaluated; offline, seconds), and the size of
every distribution in it is summed from the files it installed here, so both sides are measured with the same wheels.
A requirement that is not installed here is listed, not guessed. (A ``pip install --dry-run`` resolution would
see the newest versions on the index instead and took over 15 minutes on this machine.)

    python scripts/install_size.py [--before REF]

Writes ``benchmarks/results/install_size.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    """(name, version) of every distribution in the closure of ``requirements``, walked through the metadata of the
    distributions installed here (``Requires-Dist`` with its markers and extras). A requirement that is not
    installed here is kept with version ``?`` and not followed."""
    found: dict[str, str] = {}
    pending = [Requirement(text) for text in requirements]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found.setdefault(name, "?")
            continue
        found[name] = distribution.version
        for text in distribution.requires or []:
            dependency = Requirement(text)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                pending.append(dependency)
    return sorted(found.items())


def installed_bytes(name: str, version: str) -> int | None:
    """Bytes of the files ``name`` installed here, if the same version is installed."""
    try:
        distribution = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if distribution.version != version:  # "?": not installed here
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
        f"`python scripts/install_size.py --before {args.before}`: the dependency closure of `{TORCH}` plus each install, "
        "walked through the installed distributions' metadata, measured as the bytes they occupy installed here.",
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

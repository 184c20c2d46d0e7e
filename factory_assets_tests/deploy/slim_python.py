"""``python slim_python.py REQUIREMENTS REPORT MODULE [ARGS...]``: runs ``python -m MODULE ARGS`` as
if only the distributions of REQUIREMENTS (and what they require) were installed beside
``factory_assets`` and the standard library, as in the serving image (Dockerfile, target serving):
importing a module of any other installed distribution raises ImportError. At exit, REPORT gets the
distributions whose modules were loaded."""
from __future__ import annotations

import atexit
import importlib.abc
import importlib.metadata as md
import json
import re
import runpy
import sys

from packaging.requirements import Requirement

BASE_IMAGE = {"pip", "setuptools", "wheel"}  # in python:3.11-slim already


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for these requirements (no extras): names, normalised."""
    todo, seen = [Requirement(r).name for r in requirements], set()
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def main() -> None:
    requirements_file, report, module, *args = sys.argv[1:]
    lines = [ln.split("#")[0].strip() for ln in open(requirements_file)]
    allowed = closure([ln for ln in lines if ln]) | BASE_IMAGE | {"factory-assets"}
    owners = {m: {_norm(d) for d in ds} for m, ds in md.packages_distributions().items()}

    class OnlyTheImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            top = name.split(".")[0]
            dists = owners.get(top)
            if dists and not dists & allowed and top not in sys.stdlib_module_names:
                raise ImportError(f"{name} ({', '.join(sorted(dists))}) is not in the serving image")
            return None

    sys.meta_path.insert(0, OnlyTheImage())
    before = set(sys.modules)  # this wrapper's own imports (packaging) are not the image's

    def write_report():
        used = {d for m in set(sys.modules) - before for d in owners.get(m.split(".")[0], set())}
        with open(report, "w") as f:
            json.dump(sorted(used), f)

    atexit.register(write_report)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

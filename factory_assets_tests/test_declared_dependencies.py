"""Every third-party import in ``factory_assets/`` is covered by ``[project].dependencies``,
so ``pip install .`` (without the test extra) gives a package that starts."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {_normalise(re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0]) for spec in specs}


def _imported_top_level_modules() -> dict[str, str]:
    """module -> first file importing it, for every absolute import in the package."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "factory_assets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module in ("factory_assets", "__future__"):
            continue
        dists = {_normalise(d) for d in distributions.get(module, [])}
        if _normalise(module) in declared:  # e.g. sagemaker v3: a declared metapackage whose parts provide it
            continue
        if not dists:
            missing.append(f"{module} (imported by {where}) is not installed at all")
        elif not dists & declared:
            missing.append(f"{module} (imported by {where}) comes from {sorted(dists)}, not declared")
    assert not missing, "\n".join(missing)


def test_the_fallback_mqtt_broker_is_a_main_dependency_not_a_test_one():
    # `factory-assets up` starts amqtt when no broker is given: a plain install must have it.
    assert "amqtt" in _declared()
    assert "amqtt" not in _declared("test")


def test_declared_libraries_the_design_names_are_kept():
    # pandas builds the UI's tables; sagemaker is used by the SageMaker training backend.
    assert {"pandas", "sagemaker"} <= _declared()

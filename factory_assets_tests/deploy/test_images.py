"""The two images of the Dockerfile (no Docker in CI, so the entry points run here as processes):
the serving image trains and serves with nothing but its own packages, without Dagster."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLIM = [sys.executable, str(Path(__file__).with_name("slim_python.py")), str(ROOT / "deploy" / "requirements-serving.txt")]


def _stages() -> list[tuple[str, str, list[str]]]:
    """(name, FROM image, instruction lines) of each stage of the Dockerfile."""
    stages: list = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            stages.append((m.group(2), m.group(1), []))
        elif stages and line.strip() and not line.startswith("#"):
            stages[-1][2].append(line)
    return stages


def _requirements() -> list[str]:
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "deploy" / "requirements-serving.txt").read_text().splitlines()]
    return [ln for ln in lines if ln]


def test_the_dockerfile_builds_a_platform_and_a_serving_image_and_serving_stays_the_default():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    stages = _stages()
    names = [s[0] for s in stages]
    assert {"platform", "serving"} <= set(names)
    assert names[-1] == "serving"  # `docker build -t factory-stock .` still builds the SageMaker container
    serving = "\n".join(stages[-1][2])
    assert "pip install --no-deps ." in serving and "requirements-serving.txt" in serving
    assert 'ENTRYPOINT ["python", "-m", "factory_assets.container"]' in serving
    platform = "\n".join(next(s for s in stages if s[0] == "platform")[2])
    assert re.search(r"pip install \.\s*$", platform, re.M) and "DAGSTER_HOME" in platform
    # the serving packages are declared dependencies, as declared, and Dagster is none of them
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(_requirements()) <= {d.split("#")[0].strip() for d in declared}
    assert not [r for r in _requirements() if r.startswith("dagster")]


def _slim(report: Path, module: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*SLIM, str(report), module, *args], **kw)


@pytest.mark.slow
def test_the_serving_image_trains_and_serves_with_its_own_packages_only(tmp_path):
    from factory_assets.simulation.datasets import write_simulated_dataset

    dataset = write_simulated_dataset(tmp_path / "dataset", n_train=8, n_valid=2, seed=3)
    ml = tmp_path / "opt_ml"
    for channel, folder in (("train", "train-imgs"), ("train_lst", "train-annots"),
                            ("validation", "valid-imgs"), ("validation_lst", "valid-annots")):
        (ml / "input" / "data").mkdir(parents=True, exist_ok=True)
        (ml / "input" / "data" / channel).symlink_to(Path(dataset) / folder, target_is_directory=True)
    (ml / "input" / "config").mkdir(parents=True)
    (ml / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"seed": "0", "n_augment": "0"}))
    env = {**os.environ, "SM_ML_ROOT": str(ml), "SAGEMAKER_BIND_TO_PORT": "0"}

    train = _slim(tmp_path / "train.json", "factory_assets.container", "train", env=env)
    assert train.wait(timeout=300) == 0, (ml / "output" / "failure").read_text() if (ml / "output" / "failure").exists() else ""
    assert (ml / "model" / "evaluation.json").exists()

    serve = _slim(tmp_path / "serve.json", "factory_assets.container", "serve", env=env, stdout=subprocess.PIPE,
                  text=True)
    try:
        line = serve.stdout.readline()
        assert line.startswith("serving "), line
        url = line.rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as r:
            assert r.status == 200
        jpeg = (Path(dataset) / "valid-imgs").glob("*.jpeg").__next__().read_bytes()
        request = urllib.request.Request(f"{url}/invocations", data=jpeg, headers={"Content-Type": "image/jpeg"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert len(json.loads(r.read())) == 3
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()

    # the CLI of the image starts too: `docker run --entrypoint factory-assets IMAGE serve --endpoint NAME`
    cli = _slim(tmp_path / "cli.json", "factory_assets.cli", "serve", "--help", stdout=subprocess.DEVNULL)
    assert cli.wait(timeout=60) == 0
    used = set()
    for name in ("train.json", "serve.json", "cli.json"):
        used |= set(json.loads((tmp_path / name).read_text()))
    assert not {d for d in used if d.startswith("dagster")}
    assert {"numpy", "opencv-python-headless"} <= used

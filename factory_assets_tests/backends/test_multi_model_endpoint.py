"""One SageMaker endpoint for the fleet: a ``Mode: MultiModel`` model over an S3 prefix (moto
plays the control plane and S3, our server the runtime), and our BYOC container's side of
SageMaker's multi-model contract, run as the image runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from factory_assets_tests.backends.conftest import BYOC_IMAGE
from factory_assets_tests.serving.test_multi_model import shifted

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_bytes():
    from factory_assets.simulation.datasets import write_simulated_dataset
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_simulated_dataset(Path(tmp) / "d", n_train=2, n_valid=1, seed=11)
        return sorted((dataset / "valid-imgs").rglob("*.jp*g"))[0].read_bytes()


def test_a_multi_model_endpoint_is_one_model_over_an_s3_prefix_and_our_runtime_answers_each_target_model(
        sm_config, small_model, image_bytes, moto_url):
    from factory_assets.backends.sagemaker import (EndpointFailed, deploy, deploy_multi_model, list_target_models,
                                                   upload_target_model)
    from factory_assets.serving.models import model_name
    from factory_assets.serving.predictor import UnknownModel
    from factory_assets.serving.server import build_server

    sm_config.algorithm, sm_config.endpoint_mode, sm_config.model_cache_bytes = "byoc", "multi", 64 * 1024 * 1024
    sm, s3 = sm_config.sagemaker_client(), sm_config.s3_client()
    state = deploy_multi_model(sm, sm_config, poll=0.01)
    assert state["action"] == "created" and state["status"] == "InService" and state["mode"] == "MultiModel"
    container = sm.describe_model(ModelName=state["model_name"])["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["Image"] == BYOC_IMAGE
    assert container["ModelDataUrl"] == sm_config.multi_model_uri() == state["model_data_url"]
    assert container["ModelDataUrl"].endswith(f"/multi-model/{sm_config.endpoint_name}/")
    assert container["Environment"] == {"SAGEMAKER_MULTI_MODEL": "true", "FACTORY_MODEL_CACHE_BYTES": "67108864"}
    variant = sm.describe_endpoint_config(EndpointConfigName=state["config"])["ProductionVariants"][0]
    assert variant["ModelName"] == state["model_name"]

    # every factory's model is an object under the prefix: a folder, or the registry's artifact bytes
    other = shifted(small_model.model, -2.0)
    first = model_name("factory-1", "txt-cam", small_model.version)
    second = model_name("factory-2", "txt-cam", other.version)
    assert upload_target_model(s3, sm_config, first, model_dir=small_model.model_dir)["uploaded"]
    assert upload_target_model(s3, sm_config, second, artifact=other.to_bytes())["uploaded"]
    assert list_target_models(s3, sm_config) == sorted([f"{first}.tar.gz", f"{second}.tar.gz"])
    assert not upload_target_model(s3, sm_config, first, model_dir=small_model.model_dir)["uploaded"]
    # adding models does not touch the endpoint; deploying the same again changes nothing
    again = deploy_multi_model(sm, sm_config, poll=0.01)
    assert again["action"] == "unchanged" and again["config"] == state["config"]
    with pytest.raises(EndpointFailed, match="multi-model endpoint"):
        deploy(sm, sm_config, version=small_model.version, image=BYOC_IMAGE, model_data_url="s3://b/k", poll=0.01)

    # the runtime: our server loads each TargetModel from the model's ModelDataUrl on first use
    runtime = build_server("127.0.0.1", 0, models_s3_url=container["ModelDataUrl"], s3_endpoint_url=moto_url).start()
    try:
        sm_config.runtime_endpoint_url = runtime.url
        with sm_config.predictor() as predictor:
            for name, model in ((first, small_model.model), (second, other)):
                prediction = predictor.predict(image_bytes, target_model=name)
                assert prediction.model_version == model.version
                assert prediction.probabilities == pytest.approx(model.predict_proba_bytes(image_bytes), abs=1e-6)
            with pytest.raises(UnknownModel):
                predictor.predict(image_bytes, target_model=model_name("factory-3", "txt-cam", "0123456789abcdef"))
        loaded = requests.get(f"{runtime.url}/models", timeout=10).json()["models"]
        assert {m["modelName"]: m["modelUrl"] for m in loaded} == {
            n: f"{sm_config.multi_model_uri()}{n}.tar.gz" for n in (first, second)}
    finally:
        runtime.stop()


def _unpack_as_sagemaker(archive: Path, models_dir: Path, name: str) -> Path:
    """SageMaker's part of a multi-model endpoint: unpack ``<target>.tar.gz`` into
    ``/opt/ml/models/<model_name>/model`` before ``POST /models``."""
    dest = models_dir / name / "model"
    dest.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_the_container_implements_sagemakers_multi_model_api(small_model, image_bytes, tmp_path):
    from factory_assets.backends.sagemaker.trainer import pack_model_dir
    from factory_assets.serving.cache import model_nbytes

    models = {"m-a": small_model.model, "m-b": shifted(small_model.model, 1.0), "m-c": shifted(small_model.model, 2.0)}
    root = tmp_path / "opt_ml"
    urls = {}
    for name, model in models.items():
        model.save(tmp_path / name)
        urls[name] = str(_unpack_as_sagemaker(pack_model_dir(tmp_path / name, tmp_path / f"{name}.tar.gz"),
                                              root / "models", name))
    room = int(model_nbytes(small_model.model) * 2.5)  # two of the three fit
    env = {**os.environ, "SM_ML_ROOT": str(root), "SAGEMAKER_BIND_TO_PORT": "0",
           "FACTORY_MODEL_CACHE_BYTES": str(room)}
    proc = subprocess.Popen([sys.executable, "-m", "factory_assets.container", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # no /opt/ml/model: multi-model mode
        assert line.startswith("serving multi-model ("), line
        url = line.rsplit(" ", 1)[1].strip()
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200  # ready with no model loaded

        def load(name, model_url=None):
            return requests.post(f"{url}/models", json={"model_name": name, "url": model_url or urls[name]},
                                 timeout=30)

        assert load("m-a").status_code == 200 and load("m-b").status_code == 200
        assert load("m-a").status_code == 409
        full = load("m-c")  # no room: 507, and nothing was unloaded to make some (SageMaker chooses)
        assert full.status_code == 507 and full.json()["error"] == "InsufficientStorage"

        page = requests.get(f"{url}/models", params={"max_results": 1}, timeout=10).json()
        assert [m["modelName"] for m in page["models"]] == ["m-a"] and page["models"][0]["modelUrl"] == urls["m-a"]
        rest = requests.get(f"{url}/models", params={"max_results": 1, "next_page_token": page["nextPageToken"]},
                            timeout=10).json()
        assert [m["modelName"] for m in rest["models"]] == ["m-b"] and "nextPageToken" not in rest
        assert requests.get(f"{url}/models/m-a", timeout=10).json()["modelUrl"] == urls["m-a"]
        assert requests.get(f"{url}/models/m-c", timeout=10).status_code == 404

        for name in ("m-a", "m-b"):
            r = requests.post(f"{url}/models/{name}/invoke", data=image_bytes, timeout=30,
                              headers={"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Target-Model": f"{name}.tar.gz"})
            assert r.status_code == 200 and r.headers["X-Model-Version"] == models[name].version
            assert r.json() == pytest.approx(models[name].predict_proba_bytes(image_bytes), abs=1e-6)
        assert requests.post(f"{url}/models/m-c/invoke", data=image_bytes, timeout=10,
                             headers={"Content-Type": "image/jpeg"}).status_code == 404

        assert requests.delete(f"{url}/models/m-b", timeout=10).status_code == 200
        assert requests.delete(f"{url}/models/m-b", timeout=10).status_code == 404
        assert requests.post(f"{url}/models/m-b/invoke", data=image_bytes, timeout=10,
                             headers={"Content-Type": "image/jpeg"}).status_code == 404
        assert load("m-c").status_code == 200  # room again
        assert [m["modelName"] for m in requests.get(f"{url}/models", timeout=10).json()["models"]] == ["m-a", "m-c"]

        # what SageMaker may not ask for: paths outside /opt/ml/models, nothing there, no JSON
        assert load("m-x", "/etc").status_code == 403
        assert load("m-x", str(root / "models" / "absent" / "model")).status_code == 404
        assert requests.post(f"{url}/models", data=b"{", timeout=10,
                             headers={"Content-Type": "application/json"}).status_code == 400
        # the web stack's bounds hold on these routes too
        assert requests.post(f"{url}/models", data=b" " * (6 * 1024 * 1024 + 1), timeout=30,
                             headers={"Content-Type": "application/json"}).status_code == 413
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_serving_image_declares_the_multi_model_capability():
    serving = (ROOT / "Dockerfile").read_text().split("AS serving", 1)[1]
    assert "LABEL com.amazonaws.sagemaker.capabilities.multi-models=true" in serving


def test_the_multi_model_settings_come_from_the_environment_and_are_checked_before_any_aws_call():
    from factory_assets.backends.sagemaker import SageMakerConfig, SageMakerConfigError

    env = {"FACTORY_SAGEMAKER_ENDPOINT_MODE": "multi", "FACTORY_SAGEMAKER_MODEL_CACHE_BYTES": "1048576",
           "FACTORY_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/r", "FACTORY_SAGEMAKER_BYOC_IMAGE_URI": "i"}
    cfg = SageMakerConfig.from_env(env)
    assert (cfg.endpoint_mode, cfg.model_cache_bytes) == ("multi", 1048576)
    with pytest.raises(SageMakerConfigError, match="multi-model endpoint needs FACTORY_SAGEMAKER_BUCKET"):
        cfg.validate(training=False, algorithm="byoc")
    with pytest.raises(SageMakerConfigError, match="ENDPOINT_MODE must be one of single, multi"):
        SageMakerConfig.from_env({**env, "FACTORY_SAGEMAKER_ENDPOINT_MODE": "many"}).validate(training=False)
    assert json.dumps(cfg.public_view())  # still shows in Dagster metadata

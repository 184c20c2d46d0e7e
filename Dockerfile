# Two images from one file (docs/scaling-out.md):
#
#   docker build -t factory-stock .                          the serving image (the default, last stage)
#   docker build --target serving  -t factory-stock .        the same, named
#   docker build --target platform -t factory-assets .       the platform image
#
# serving: the bring-your-own SageMaker container for our stock model (algorithm "byoc") and the
#   inference server, without Dagster: SageMaker runs `docker run IMAGE train` for training jobs and
#   `docker run IMAGE serve` for endpoints, both through `python -m factory_assets.container`;
#   `--entrypoint factory-assets IMAGE serve --endpoint NAME` follows an endpoint in MongoDB.
#   Its packages: deploy/requirements-serving.txt.
# platform: everything else, with Dagster: the code location (`dagster api grpc -m
#   factory_assets.definitions`), the webserver, the daemon, run workers, the ingester shards, the
#   twin API and the live updater (`factory-assets ...`).
# Not built in CI (no Docker there): the tests run the same entry points in processes, check that
# the serving entry points need nothing outside requirements-serving.txt, and that the deploy files
# name only these targets.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY factory_assets ./factory_assets
RUN pip install --upgrade pip


FROM base AS platform

RUN pip install .
# dagster.yaml and workspace.yaml are mounted here (deploy/compose.yaml) or rendered by Dagster's
# Helm chart; `factory-assets dagster-config --write $DAGSTER_HOME` writes a pair to start from.
ENV DAGSTER_HOME=/opt/dagster/dagster_home
RUN mkdir -p "$DAGSTER_HOME"
# code server, webserver, twin API
EXPOSE 4266 3000 8000
CMD ["factory-assets", "--help"]


FROM base AS serving

ENV SM_ML_ROOT=/opt/ml \
    SAGEMAKER_BIND_HOST=0.0.0.0 \
    SAGEMAKER_BIND_TO_PORT=8080
COPY deploy/requirements-serving.txt ./
# the package without its declared dependencies (Dagster among them), then what serving imports
RUN pip install --no-deps . && pip install -r requirements-serving.txt

# SageMaker multi-model endpoints (Mode MultiModel) accept only images that declare it
# (docs/multi-model.md): `serve` then hosts the models SageMaker loads through POST /models.
LABEL com.amazonaws.sagemaker.capabilities.multi-models=true
# Runs as the image's default user: SageMaker mounts /opt/ml (channels, model, output)
# owned by root and expects the container to write there.
EXPOSE 8080
ENTRYPOINT ["python", "-m", "factory_assets.container"]
CMD ["serve"]

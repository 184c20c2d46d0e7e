# The bring-your-own SageMaker container for our stock model (algorithm "byoc").
#   docker build -t factory-stock .
#   SageMaker runs `docker run IMAGE train` for training jobs and `docker run IMAGE serve`
#   for endpoints; both go through `python -m factory_assets.container`.
# Not built in CI (no Docker there): the tests run the same entry points against a
# temporary /opt/ml-shaped folder.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SM_ML_ROOT=/opt/ml \
    SAGEMAKER_BIND_HOST=0.0.0.0 \
    SAGEMAKER_BIND_TO_PORT=8080

WORKDIR /app
COPY pyproject.toml README.md ./
COPY factory_assets ./factory_assets
RUN pip install --upgrade pip && pip install .

# Runs as the image's default user: SageMaker mounts /opt/ml (channels, model, output)
# owned by root and expects the container to write there.
EXPOSE 8080
ENTRYPOINT ["python", "-m", "factory_assets.container"]
CMD ["serve"]

"""Our model in a SageMaker bring-your-own container (see the ``Dockerfile``).

``python -m factory_assets.container train``: the training-container contract
(``/opt/ml/input/config/hyperparameters.json`` with string values, channels under
``/opt/ml/input/data/<channel>/``, the model to ``/opt/ml/model``, a failure's
reason to ``/opt/ml/output/failure``). ``... serve``: our SageMaker-contract
inference server on port 8080 (``/ping``, ``/invocations``), stopping cleanly on
SIGTERM within 30 s; without ``/opt/ml/model`` (a multi-model endpoint) it hosts the
models SageMaker loads through ``POST /models`` (docs/multi-model.md). ``--ml-root`` (or ``SM_ML_ROOT``) points both at any
``/opt/ml``-shaped folder, which is how they run outside Docker.
"""

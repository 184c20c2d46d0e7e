"""What the run queue of a production Dagster instance keys on (docs/scaling-out.md).

- Concurrency pools: steps that load MongoDB hard (``pool=MONGODB_POOL``) and the steps that
  train or deploy a model, on SageMaker when that backend is chosen (``pool=SAGEMAKER_POOL``).
  The instance limits how many steps of each pool run at once across all runs
  (``dagster instance concurrency set POOL N``; ``factory-assets dagster-config``).
- The run tag ``FACTORY_TAG``: which factory's data a run works on. The instance's
  ``tag_concurrency_limits`` holds one limit per distinct value, so one factory's backlog cannot
  take every run slot. A run over several factories' data (retraining, the fleet's twin refresh)
  is tagged ``FLEET``.
"""
from __future__ import annotations

MONGODB_POOL = "mongodb"
SAGEMAKER_POOL = "sagemaker"
FACTORY_TAG = "factory"
FLEET = "fleet"


def factory_tags(factory_ids) -> dict[str, str]:
    """``{"factory": id}`` for a run over one factory's data, ``{"factory": "fleet"}`` otherwise."""
    ids = {str(f) for f in factory_ids if f is not None}
    return {FACTORY_TAG: ids.pop() if len(ids) == 1 else FLEET}

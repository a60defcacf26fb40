"""The operator's entry point: `python -m deeptune` (or `deeptune-operator`).

Importing this module registers every handler with kopf; `run()` starts kopf the way the Helm
chart's Deployment does, with a liveness endpoint and the metrics server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from deeptune import kube, observability
from deeptune.config import SETTINGS
from deeptune.handlers import finetunejob, modeldeployment  # noqa: F401  (registers the handlers)

PREFIX = "deeptune.dev"


@kopf.on.startup()
def configure(*, settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """Keep kopf's bookkeeping in our own annotations, and events for warnings only."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    # No handler needs a finalizer (status comes from one loop, not per-object timers); kopf removes
    # this one from objects an early build marked.
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.WARNING  # kopf's own log lines; our events are posted explicitly
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.batching.error_delays = (1, 2, 5, 10, 30, 60)
    kube.load_credentials()
    observability.serve(SETTINGS.metrics_port)
    logger.info("DeepTune operator started; metrics on :%d", SETTINGS.metrics_port)


def run() -> None:
    """Run until stopped, watching the configured namespaces (or the whole cluster)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not SETTINGS.namespaces,
            namespaces=SETTINGS.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{SETTINGS.liveness_port}/healthz",
        )
    )

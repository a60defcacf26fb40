"""The operator's entry point: `python -m deeptune` (or `deeptune-operator`).

`run()` reads the settings from the environment (the Helm chart sets them), builds the handlers on a
registry of their own (`deeptune.registration`) and starts kopf the way the chart's Deployment does,
with the liveness endpoint and the metrics server.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from deeptune import config, registration


def run() -> None:
    """Run until stopped, watching the configured namespaces (or the whole cluster)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # a line per watch event handled
    logging.getLogger("optuna").setLevel(logging.WARNING)  # a line per study a sweep's decision makes
    settings = config.from_environment()
    registry, _ = registration.build(settings)
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
        )
    )

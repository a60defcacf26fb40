"""A federation's children: the coordinator (trainer config, Job, headless Service) in its own
namespace, and one FineTuneJob per site in the site's namespace.

The sites' FineTuneJobs carry no owner reference: Kubernetes' garbage collector treats an owner in
another namespace as absent and would delete them. The uid label marks whose they are instead, and
the operator deletes them when the federation is gone.
"""

from __future__ import annotations

from deeptune.api.base import API_VERSION
from deeptune.api.federatedfinetune import FederatedFineTuneSpec, Site, site_spec
from deeptune.api.finetunejob import KIND as FINETUNEJOB
from deeptune.api.finetunejob import DatasetSpec, DataSource, FineTuneJobSpec
from deeptune.api.trainer import FEDERATION_PORT, Coordination
from deeptune.builders import finetunejob
from deeptune.builders.common import Manifest, Owner, child_name, labels, metadata, uid_label

FEDERATION = "deeptune.dev/federation"
"""On each site's FineTuneJob: `<namespace>/<name>` of the FederatedFineTune it belongs to."""
SITE = "site"
COORDINATOR_PORT_NAME = "flower"


def coordinator_service_name(owner: Owner) -> str:
    return child_name(owner.name, "coordinator")


def coordinator_address(owner: Owner) -> str:
    """Where the sites reach the coordinator: its headless Service's name, which cluster DNS answers
    with the pod's address from every namespace."""
    return f"{coordinator_service_name(owner)}.{owner.namespace}.svc:{FEDERATION_PORT}"


def site_name(owner: Owner) -> str:
    """The site's FineTuneJob (in the site's namespace): apart from any the site names itself."""
    return child_name(owner.name, "federated")


def coordinator_spec(template: FineTuneJobSpec) -> FineTuneJobSpec:
    """The template as the coordinator runs it: no rows (nothing to mount but the model and the
    output), no GPU (it only averages and saves), and the adapter unquantized (qlora's adapter is
    laid out as lora's; quantizing is a site's business)."""
    return template.model_copy(
        update={
            "dataset": DatasetSpec(source=DataSource(inline=[])),
            "method": "lora",
            "resources": template.resources.model_copy(update={"gpu": 0}),
            "output": template.output.model_copy(update={"quantized_export": "none"}),
        }
    )


def build_coordinator(
    owner: Owner, spec: FederatedFineTuneSpec, settings: finetunejob.ChildSettings
) -> list[Manifest]:
    """The coordinator's ConfigMap, Job and Service. Its Job keeps no result finalizer: the outcome
    the federation records is the Job's own condition."""
    template = coordinator_spec(spec.template)
    coordination = Coordination(rounds=spec.rounds, sites=len(spec.sites))
    config_map = finetunejob.build_config_map(owner, template, coordination)
    job = finetunejob.build_job(owner, template, settings)
    del job["metadata"]["finalizers"], job["spec"]["template"]["metadata"]["finalizers"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["ports"].append({"name": COORDINATOR_PORT_NAME, "containerPort": FEDERATION_PORT})
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, coordinator_service_name(owner), finetunejob.COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # sites connect while the coordinator loads the model
            "selector": {
                uid_label(owner.kind): owner.uid,
                "app.kubernetes.io/component": finetunejob.COMPONENT,
            },
            "ports": [
                {"name": COORDINATOR_PORT_NAME, "port": FEDERATION_PORT, "targetPort": FEDERATION_PORT}
            ],
        },
    }
    return [config_map, service, job]


def build_site(owner: Owner, spec: FederatedFineTuneSpec, site: Site) -> Manifest:
    """A site's FineTuneJob: the template with the site's rows and the coordinator's address."""
    meta: Manifest = {
        "name": site_name(owner),
        "namespace": site.namespace,
        "labels": labels(owner, SITE),
        "annotations": {FEDERATION: f"{owner.namespace}/{owner.name}"},
    }
    body = site_spec(spec.template, site, coordinator_address(owner))
    return {"apiVersion": API_VERSION, "kind": FINETUNEJOB, "metadata": meta, "spec": body}

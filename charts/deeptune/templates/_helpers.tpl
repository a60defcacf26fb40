{{/* The chart name, unless overridden. */}}
{{- define "deeptune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-<chart>, or <release> when it names the chart. */}}
{{- define "deeptune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "deeptune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard app.kubernetes.io labels, on every object of the chart. */}}
{{- define "deeptune.commonLabels" -}}
helm.sh/chart: {{ include "deeptune.chart" . }}
app.kubernetes.io/name: {{ include "deeptune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deeptune
{{- end }}

{{/* The labels of the operator's own objects (all but the CRDs, which serve every component). */}}
{{- define "deeptune.labels" -}}
{{ include "deeptune.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
What the operator's Deployment, Service and ServiceMonitor select on. The component label keeps
the selection off trainer pods, which also carry app.kubernetes.io/name=deeptune.
*/}}
{{- define "deeptune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deeptune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The selector labels as `key=value,key=value`, for DEEPTUNE_OPERATOR_POD_LABELS. */}}
{{- define "deeptune.selectorLabelPairs" -}}
{{- $pairs := list }}
{{- range $key, $value := include "deeptune.selectorLabels" . | fromYaml }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{- define "deeptune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deeptune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "deeptune.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
What the operator does in each namespace it serves (operator/deeptune/registration.py: the watches
and indexes; children.py: every write to a child; reconcilers/: which child gets which write):
- its custom resources: watch (kopf lists and watches), patch (kopf's annotations and status);
  update on .../finalizers because child owner references set blockOwnerDeletion, which the
  OwnerReferencesPermissionEnforcement admission plugin allows only to who may update them;
- FineTuneJobs also create: a FineTuneSweep's trials (created once, read back on conflict; a pruned
  trial is merge-patched to suspend it). Deleting a sweep deletes them by garbage collection. And a
  FederatedFineTune's sites, in the sites' namespaces: created once, suspended (patch) when the
  federation failed, and deleted (children.delete) once the federation is gone, since an owner
  reference cannot point across namespaces;
- Jobs: list and watch (an index), create (children.create, dry run first) and read back on
  conflict, patch: `suspend`, deadlines and the like, and the removal of the `deeptune.dev/result`
  finalizer (a JSON patch, children.release) once the status holds the result; delete: a failed
  federation's coordinator Job (it would wait for the failed site for ever);
- Pods: list and watch (indexes of trainer and serving pods; a live list when the cache lacks a
  pod a finished Job counts), get, and patch for one thing: removing the `deeptune.dev/result`
  finalizer that trainer pods get from the Job's pod template. Never create, and no
  exec/attach/portforward: metrics and the serving probe go over HTTP, not through the API;
- ConfigMaps: the trainer's configuration (created once, read back on conflict) and a
  ModelDeployment's Triton model repository (server-side apply: get for the owner check, patch, and
  create because an apply that creates an object is authorized as one); list and watch: indexes of
  both, so a deleted one is noticed and made again;
- serving children of a ModelDeployment, applied server-side (children.apply): Deployments,
  Services, HorizontalPodAutoscalers, NetworkPolicies, Prometheus Operator ServiceMonitors and KEDA
  ScaledObjects: get, create, patch. All but ServiceMonitors and ScaledObjects are also listed and
  watched (indexes by owner: a child deleted or edited by hand is put back); those two kinds may not
  be installed, so they are not watched. HPAs, ServiceMonitors, ScaledObjects and NetworkPolicies also
  delete, when a spec switches autoscaling (or keda), serviceMonitor or networkPolicy off
  (children.remove: only objects this ModelDeployment owns);
  everything else goes by garbage collection (owner references), never by the operator;
- Kueue's Workloads: list and watch, read only (where Kueue is installed): why a queued run waits;
- Events: create and patch (the operator posts core/v1 Events, events.py; events.k8s.io is the same
  data in the newer API, which other client libraries use).
No Secrets: the trainer and Triton read tokens through secretKeyRef; the operator never does.
The leader Lease is not here: it lives in the release's namespace only (deeptune.leaseRules).
*/}}
{{- define "deeptune.namespacedRules" -}}
- apiGroups: [deeptune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [deeptune.dev]
  resources: [modeldeployments, finetunesweeps, federatedfinetunes]
  verbs: [get, list, watch, patch]
- apiGroups: [deeptune.dev]
  resources: [finetunejobs/status, modeldeployments/status, finetunesweeps/status, federatedfinetunes/status]
  verbs: [get, patch]
- apiGroups: [deeptune.dev]
  resources: [finetunejobs/finalizers, modeldeployments/finalizers, finetunesweeps/finalizers, federatedfinetunes/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, create, patch, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/*
The leader Lease's name (DEEPTUNE_LEASE_NAME): one per release, so that two releases in one
namespace (say one per team, each with its own watchNamespaces) elect a leader each instead of
sharing one.
*/}}
{{- define "deeptune.leaseName" -}}
{{- include "deeptune.fullname" . }}
{{- end }}

{{/*
Leader election (operator/deeptune/leadership.py), in the release's namespace only, whatever
watchNamespaces is: the replicas contend for one coordination.k8s.io/v1 Lease, reading it (get),
making it when it does not exist yet (create) and taking, renewing and releasing it with a replace
(update, with the resourceVersion read). RBAC cannot restrict `create` by name (the name is not in
the request's URL), so create gets a rule of its own, and get/update are restricted to this
release's Lease: the operator can neither read nor take over any other Lease (another controller's,
another release's). No list, watch, patch or delete.
*/}}
{{- define "deeptune.leaseRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ include "deeptune.leaseName" . | quote }}]
  verbs: [get, update]
{{- end }}

{{/*
What kopf reads cluster-wide in any mode: CRDs, to find its resources and notice CRDs that come
and go. Only when serving a list of namespaces, kopf also watches namespaces, to start serving
one when it is created (without it, kopf logs a warning and assumes they exist).
*/}}
{{- define "deeptune.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}

{{/* costs.gpuHourPrices as the operator reads them: `nvidia.com/gpu=2.5,amd.com/gpu=1.9`. */}}
{{- define "deeptune.gpuHourPrices" -}}
{{- $pairs := list }}
{{- range $resource, $price := .Values.costs.gpuHourPrices }}
{{- $pairs = append $pairs (printf "%s=%v" $resource $price) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

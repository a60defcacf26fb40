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
What the operator does in each namespace it serves (operator/deeptune/kube.py, handlers/):
- its custom resources: watch (kopf lists and watches), patch (kopf's annotations and status);
  update on .../finalizers because child owner references set blockOwnerDeletion, which the
  OwnerReferencesPermissionEnforcement admission plugin allows only to who may update them;
- Jobs: watch (an index), create and read back on conflict (kube.ensure), patch (suspend/deadlines);
- Pods: read only (indexes of trainer and serving pods; metrics and the serving probe go over HTTP,
  not through the API);
- ConfigMaps: create and read back on conflict (kube.ensure), and the serving model repository:
  read (the owner check), create and patch (server-side apply, serverside.py, creates with `create`);
- serving children of a ModelDeployment, applied server-side (serverside.py): Deployments (also
  listed and watched: an index), Services, HorizontalPodAutoscalers, Prometheus Operator
  ServiceMonitors and NetworkPolicies: get, create, patch; HPAs, ServiceMonitors and NetworkPolicies
  also delete, when a spec switches autoscaling, serviceMonitor or networkPolicy off (only objects
  this ModelDeployment owns);
- Events: create and patch (the operator posts core/v1 Events, events.py; events.k8s.io is the same data in
  the newer API, which other client libraries use).
No Secrets: the trainer and Triton read tokens through secretKeyRef; the operator never does.
*/}}
{{- define "deeptune.namespacedRules" -}}
- apiGroups: [deeptune.dev]
  resources: [finetunejobs, modeldeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [deeptune.dev]
  resources: [finetunejobs/status, modeldeployments/status]
  verbs: [get, patch]
- apiGroups: [deeptune.dev]
  resources: [finetunejobs/finalizers, modeldeployments/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
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

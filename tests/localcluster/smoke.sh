#!/usr/bin/env bash
# End-to-end check of a running local test cluster (start it with up.sh):
# server version, /readyz, a CRD with a CEL validation rule, the Job
# controller, the scheduler (pod stays Pending without nodes, is bound once a
# Node object exists), the garbage collector, helm, and the cluster DNS (when
# up.sh started one). Cleans up after itself.
# Uses KUBECONFIG if set, else ${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}/kubeconfig.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
. "$HERE/versions.sh"
STATE="${DEEPTUNE_CLUSTER_DIR:-/tmp/deeptune-cluster}"
export KUBECONFIG="${KUBECONFIG:-$STATE/kubeconfig}"
export PATH="$LC_K8S_BIN:$LC_HELM_BIN:$PATH"   # kubectl and helm from build.sh

NS="smoke-$$"
NODE="smoke-node-$$"
CRD=widgets.smoke.deeptune.local
pass=0
fail=0

log() { printf '[smoke.sh] %s\n' "$*" >&2; }
ok()  { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }

# poll SECONDS COMMAND...: retry COMMAND every 0.5 s for up to SECONDS.
poll() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

cleanup() {
  kubectl delete namespace "$NS" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  kubectl delete node "$NODE" --ignore-not-found >/dev/null 2>&1 || true
  kubectl delete crd "$CRD" --ignore-not-found >/dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. version and readiness
v=$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
if [ "$v" = "$LC_K8S_VERSION" ]; then ok "server version $v"; else bad "server version is '$v', expected $LC_K8S_VERSION"; fi
if [ "$(kubectl get --raw /readyz)" = ok ]; then ok "/readyz"; else bad "/readyz"; fi

# 2. CRD with a CEL (x-kubernetes-validations) rule
kubectl apply -f - >/dev/null <<EOF
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: $CRD
spec:
  group: smoke.deeptune.local
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              replicas: {type: integer}
              maxReplicas: {type: integer}
            x-kubernetes-validations:
            - rule: "self.replicas <= self.maxReplicas"
              message: "replicas must not exceed maxReplicas"
EOF
# retried: kubectl wait fails at once while the new CRD has no status conditions yet
poll 60 kubectl wait --for=condition=Established "crd/$CRD" --timeout=30s
kubectl create namespace "$NS" >/dev/null
poll 30 kubectl -n "$NS" get widgets || true
if out=$(kubectl -n "$NS" apply -f - 2>&1 <<EOF
apiVersion: smoke.deeptune.local/v1
kind: Widget
metadata: {name: too-many}
spec: {replicas: 5, maxReplicas: 2}
EOF
); then
  bad "CEL rule did not reject an invalid Widget: $out"
elif grep -q "replicas must not exceed maxReplicas" <<<"$out"; then
  ok "CEL rule rejected an invalid Widget with its message"
else
  bad "invalid Widget rejected, but not with the rule's message: $out"
fi
if kubectl -n "$NS" apply -f - >/dev/null 2>&1 <<EOF
apiVersion: smoke.deeptune.local/v1
kind: Widget
metadata: {name: fine}
spec: {replicas: 1, maxReplicas: 2}
EOF
then ok "valid Widget accepted"; else bad "valid Widget rejected"; fi

# 3. Job controller creates a Pod; it stays Pending with no node
kubectl -n "$NS" create job smoke --image=busybox:1.36 -- sleep 3600 >/dev/null
job_pod() { kubectl -n "$NS" get pods -l batch.kubernetes.io/job-name=smoke -o name | grep -q pod/; }
if poll 60 job_pod; then ok "Job controller created a Pod"; else bad "no Pod for the Job"; fi
pod=$(kubectl -n "$NS" get pods -l batch.kubernetes.io/job-name=smoke -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
sched_tried() { grep -q "$pod" "$STATE/kube-scheduler.log"; }
unschedulable() { kubectl -n "$NS" get pod "$pod" -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}' | grep -qx Unschedulable; }
if [ -n "$pod" ] && poll 30 unschedulable; then ok "Pod $pod is Pending/Unschedulable (no nodes)"; else bad "Pod not marked Unschedulable"; fi
if [ -f "$STATE/kube-scheduler.log" ]; then
  if poll 10 sched_tried; then ok "scheduler log mentions $pod"; else bad "scheduler log does not mention $pod"; fi
fi

# 4. garbage collector removes the Job's pod after a background-propagated delete
kubectl -n "$NS" delete job smoke --cascade=background >/dev/null
pod_gone() { ! kubectl -n "$NS" get pod "$pod" >/dev/null 2>&1; }
if poll 60 pod_gone; then ok "garbage collector deleted the Job's Pod"; else bad "Job's Pod still there after deleting the Job"; fi

# 5. a hand-made Node; the scheduler binds a Pod to it
kubectl create -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels: {kubernetes.io/hostname: $NODE, kubernetes.io/os: linux, kubernetes.io/arch: amd64}
status:
  capacity: {cpu: "8", memory: 32Gi, pods: "110", nvidia.com/gpu: "1"}
  allocatable: {cpu: "8", memory: 32Gi, pods: "110", nvidia.com/gpu: "1"}
  conditions:
  - type: Ready
    status: "True"
    reason: KubeletReady
    message: fake node (no kubelet)
EOF
kubectl -n "$NS" create -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: gpu-pod}
spec:
  containers:
  - name: main
    image: busybox:1.36
    command: [sleep, "3600"]
    resources:
      limits: {nvidia.com/gpu: "1"}
EOF
bound() { [ "$(kubectl -n "$NS" get pod gpu-pod -o jsonpath='{.spec.nodeName}')" = "$NODE" ]; }
if poll 60 bound; then ok "scheduler bound gpu-pod to $NODE"; else
  bad "gpu-pod not bound: $(kubectl -n "$NS" get pod gpu-pod -o jsonpath='{.status.conditions}' 2>&1)"
fi
# No kubelet will ever confirm the deletion of a bound pod: force it.
kubectl -n "$NS" delete pod gpu-pod --grace-period=0 --force >/dev/null 2>&1 || true

# 6. helm
command -v helm >/dev/null || log "helm not found in $LC_HELM_BIN: run build.sh"
if hv=$(helm version --short 2>&1) && [[ "$hv" == "$LC_HELM_VERSION"* ]]; then ok "helm version $hv"; else bad "helm version: $hv"; fi
if out=$(helm list -A 2>&1); then ok "helm can talk to the cluster"; else bad "helm list -A: $out"; fi

# 7. cluster DNS: CoreDNS follows the API server, and names outside the cluster get
#    NXDOMAIN (nothing is forwarded off this machine)
if [ -f "$STATE/cluster-dns.env" ]; then
  # shellcheck disable=SC1091
  . "$STATE/cluster-dns.env"
  dns() { python3 "$HERE/dns_query.py" "$CLUSTER_DNS" "$@" 2>&1 || true; }
  api_ip=$(kubectl -n default get service kubernetes -o jsonpath='{.spec.clusterIP}')
  if [ "$(dns "kubernetes.default.svc.$CLUSTER_DOMAIN")" = "NOERROR $api_ip" ]; then
    ok "CoreDNS at $CLUSTER_DNS resolves kubernetes.default.svc.$CLUSTER_DOMAIN to $api_ip"
  else
    bad "kubernetes.default.svc.$CLUSTER_DOMAIN at $CLUSTER_DNS: $(dns "kubernetes.default.svc.$CLUSTER_DOMAIN")"
  fi
  kubectl -n "$NS" create service clusterip smoke-dns --tcp=80 >/dev/null
  svc_ip=$(kubectl -n "$NS" get service smoke-dns -o jsonpath='{.spec.clusterIP}')
  svc_resolves() { [ "$(dns "smoke-dns.$NS.svc.$CLUSTER_DOMAIN")" = "NOERROR $svc_ip" ]; }
  if poll 30 svc_resolves; then ok "a new Service resolves (smoke-dns.$NS.svc.$CLUSTER_DOMAIN)"; else
    bad "smoke-dns.$NS.svc.$CLUSTER_DOMAIN: $(dns "smoke-dns.$NS.svc.$CLUSTER_DOMAIN"), expected $svc_ip"
  fi
  if [ "$(dns example.com)" = NXDOMAIN ]; then ok "example.com: NXDOMAIN (not forwarded)"; else
    bad "example.com: $(dns example.com)"
  fi
else
  log "no cluster DNS in $STATE (DEEPTUNE_CLUSTER_DNS=off, or up.sh not run as root): skipped"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

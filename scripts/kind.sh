#!/usr/bin/env bash
# Herald on a real Kubernetes cluster, for those who have Docker and kind (this repository's
# CI machines have neither; the chart and the operator are tested there with helm,
# kubernetes-validate and mock API servers instead). What it does:
#   1. creates a kind cluster (name: $KIND_CLUSTER, default herald) unless it exists;
#   2. builds the image (Dockerfile) and loads it into the cluster;
#   3. installs the chart (bundled single-node NATS) into namespace $NAMESPACE;
#   4. applies examples/ (a MailDomain with verification Skip and an SmtpAccount) and waits
#      until the operator made the DKIM Secret and the MailDomain is Ready;
#   5. runs the #[ignore]d real-cluster tests (operator reconcile, Kubernetes resource
#      source) against the same cluster, with the current kubeconfig context.
# Usage: scripts/kind.sh [--keep]   (--keep: leave the cluster running afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-herald}
namespace=${NAMESPACE:-mail}
image=herald:kind
keep=no
[ "${1:-}" = "--keep" ] && keep=yes

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind.sh: $tool is required" >&2; exit 2; }
done
helm=$(command -v helm || echo .tools/bin/helm)
[ -x "$helm" ] || { echo "kind.sh: helm is required (scripts/install-deps.sh --dev)" >&2; exit 2; }

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster"
fi
kubectl config use-context "kind-$cluster"

docker build -t "$image" .
kind load docker-image "$image" --name "$cluster"

kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
"$helm" upgrade --install herald charts/herald --namespace "$namespace" --wait --timeout 5m \
  --set image.repository=herald --set image.tag=kind --set image.pullPolicy=Never \
  --set nats.enabled=true --set nats.replicas=1 \
  --set hostname=mail.example.test

kubectl -n "$namespace" apply -f examples/
kubectl -n "$namespace" wait maildomain --all --for=condition=Ready --timeout=3m
kubectl -n "$namespace" get maildomains
kubectl -n "$namespace" get secrets -l herald.dev/maildomain

HERALD_TEST_NAMESPACE=$namespace cargo test --ignore-rust-version -p herald-operator \
  --test real_cluster -- --ignored
HERALD_TEST_NAMESPACE=$namespace cargo test --ignore-rust-version -p herald-core \
  --test kube_source -- --ignored real_cluster

if [ "$keep" = no ]; then
  kind delete cluster --name "$cluster"
fi
echo "kind.sh: all real-cluster checks passed"

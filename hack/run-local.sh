#!/usr/bin/env bash
# Runs ScopeHold locally against a real kube-apiserver (with embedded etcd) on
# loopback: builds everything (the API server is cached after the first build),
# installs the CRDs, starts the controller with its custody service, applies
# examples/ and shows what the controller made of them. Stops everything on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Building the local kube-apiserver (first run: ~4 minutes) and ScopeHold"
APISERVER=$(tests/apiserver/build.sh)
cargo build --quiet --bin scopehold

STATE=$(mktemp -d /tmp/scopehold-local.XXXXXX)
cleanup() {
  [[ -n ${CONTROLLER_PID:-} ]] && kill "$CONTROLLER_PID" 2>/dev/null || true
  [[ -n ${APISERVER_PID:-} ]] && kill "$APISERVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$STATE"
}
trap cleanup EXIT

step "Starting kube-apiserver v1.36.3 + etcd on 127.0.0.1 (RBAC on)"
# The API server exits when its stdin closes; a FIFO held open by this shell
# ties its life to this script.
mkfifo "$STATE/stdin"
"$APISERVER" --dir "$STATE/apiserver" <"$STATE/stdin" >"$STATE/apiserver.out" 2>"$STATE/apiserver.log" &
APISERVER_PID=$!
exec 3>"$STATE/stdin"
for _ in $(seq 1 1800); do
  grep -q '^ready ' "$STATE/apiserver.out" 2>/dev/null && break
  kill -0 "$APISERVER_PID" 2>/dev/null || { tail -20 "$STATE/apiserver.log"; exit 1; }
  sleep 0.1
done
export KUBECONFIG="$STATE/apiserver/kubeconfig"
echo "API server: $(head -1 "$STATE/apiserver.out" | cut -d' ' -f2)"

step "Installing the CRDs (kubectl apply -f crds/)"
kubectl apply -f crds/
kubectl wait --for condition=Established crd/agentidentities.scopehold.dev crd/secretgrants.scopehold.dev --timeout=30s

step "Starting the controller"
target/debug/scopehold controller --metrics-listen 127.0.0.1:0 --custody-listen 127.0.0.1:0 \
  --custody-plaintext --node-service-account scopehold-system/scopehold-node >"$STATE/controller.log" 2>&1 &
CONTROLLER_PID=$!
for _ in $(seq 1 200); do grep -q 'caches synced' "$STATE/controller.log" && break; sleep 0.1; done

step "1. Store one API key (a Secret)"
kubectl apply -f examples/01-secret.yaml
step "2. Create one agent identity"
kubectl apply -f examples/02-agent.yaml
step "3. Grant only that key"
kubectl apply -f examples/03-grant.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Active secretgrant/claude-code-supabase --timeout=30s

step "What the controller made of it"
kubectl get agentidentities,secretgrants
kubectl get secretgrant claude-code-supabase -o jsonpath='{.status}' | python3 -m json.tool

step "Audit lines so far (controller stdout, target=audit)"
grep '"target":"audit"' "$STATE/controller.log" || true

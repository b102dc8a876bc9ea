#!/usr/bin/env bash
# Runs ScopeHold locally on a real single-node Kubernetes (hack/cluster.sh: the
# test kube-apiserver, kube-controller-manager, kube-scheduler, kubelet v1.36.3,
# containerd, runc), installs the Helm chart, and walks the five steps and the
# incident path with a real agent pod, reading its files with `kubectl exec`.
#
#   ./hack/run-local.sh              walk through, then tear everything down
#   ./hack/run-local.sh --keep       leave the cluster up; prints its KUBECONFIG
#   ./hack/run-local.sh --in-process the fallback for machines where containerd
#                                    cannot run: API server + controller + node
#                                    plugin, kubelet's part played in-process
#
# Run as root. The first run builds everything (Go components, images; see
# README for the times); later runs reuse the caches under ~/.cache/scopehold.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec </dev/null

keep=no
mode=real
for arg in "$@"; do
  case $arg in
    --keep) keep=yes ;;
    --in-process) mode=in-process ;;
    *)
      echo "usage: $0 [--keep] [--in-process]" >&2
      exit 2
      ;;
  esac
done

for dir in /usr/local/go/bin "$HOME/go/bin" "$HOME/.cargo/bin"; do
  [[ -d $dir && :$PATH: != *:$dir:* ]] && PATH="$dir:$PATH"
done
export PATH

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
run() {
  printf '$ %s\n' "$*"
  "$@"
}

echo "==> building scopehold and kubectl-scopehold" >&2
cargo build --locked --quiet --bin scopehold --bin kubectl-scopehold

in_process() {
  exec target/debug/kubectl-scopehold demo
}
[[ $mode == in-process ]] && in_process

started=$SECONDS
DIR=/tmp/shn-local
if [[ -f $DIR/supervisor.pid ]] && kill -0 "$(cat "$DIR/supervisor.pid")" 2>/dev/null; then
  echo "==> a cluster kept by an earlier run is up; stopping it first" >&2
  hack/cluster.sh stop "$DIR"
fi
# helm, as hack/test.sh installs it.
HELM=${SCOPEHOLD_HELM:-${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}/bin/helm}
HELM_VERSION=v3.21.4
if [[ $("$HELM" version --template '{{.Version}}' 2>/dev/null) != "$HELM_VERSION" ]]; then
  echo "==> installing helm $HELM_VERSION" >&2
  GOBIN=$(dirname "$HELM") go install -trimpath -ldflags "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi

echo "==> starting a real node (hack/cluster.sh start $DIR)" >&2
if ! hack/cluster.sh start "$DIR" >/dev/null; then
  echo "==> the real node did not start (logs: $DIR/logs, $DIR/supervisor.log);" >&2
  echo "==> falling back to the in-process demo" >&2
  hack/cluster.sh stop "$DIR" || true
  in_process
fi
# shellcheck disable=SC1091
source "$DIR/env"
export KUBECONFIG
if [[ $keep == no ]]; then
  trap 'echo "==> tearing down" >&2; hack/cluster.sh stop "$DIR"' EXIT
fi
k() { kubectl "$@"; }
scopehold() { target/debug/kubectl-scopehold "$@"; }

say "Installing the chart (helm install with $DIR/values.yaml: local image, host network, loopback addresses)"
run "$HELM" install scopehold charts/scopehold -n scopehold-system --create-namespace -f "$DIR/values.yaml" --wait --timeout 5m
k -n scopehold-system get pods -o wide

ns=demo
k create namespace "$ns" >/dev/null
say "Step 1: store one API key (a Kubernetes Secret)"
run kubectl -n "$ns" apply -f examples/01-secret.yaml
say "Step 2: create one agent identity (ServiceAccount + AgentIdentity)"
run kubectl -n "$ns" apply -f examples/02-agent.yaml
say "Step 3: grant only that key (SecretGrant: SUPABASE_SERVICE_KEY, not SUPABASE_URL)"
run kubectl -n "$ns" apply -f examples/03-grant.yaml
say "Step 4: resolve it at runtime (a real pod on this node mounts the CSI volume)"
sed 's#image: busybox:1.36#image: scopehold.local/busybox:static#' examples/04-agent-pod.yaml | kubectl -n "$ns" apply -f -
run kubectl -n "$ns" wait --for=condition=Ready pod/claude-code --timeout=120s
run kubectl -n "$ns" exec claude-code -- ls -l /var/run/secrets/scopehold/
run kubectl -n "$ns" exec claude-code -- cat /var/run/secrets/scopehold/supabase-key
echo
say "Step 5: see the audit entry (Event, JSON log line, kubectl scopehold audit)"
sleep 1
run kubectl -n "$ns" get events --field-selector reason=SecretResolved -o custom-columns=REASON:.reason,REGARDING:.regarding.name,POD:.related.name,NOTE:.note
kubectl -n scopehold-system logs -l app.kubernetes.io/component=controller --tail=-1 | grep '"SecretResolved"' | grep "\"$ns\"" | head -1
run scopehold audit -n "$ns"

say "Incident: the key was pasted into a chat. Who received it?"
run scopehold exposure supabase -n "$ns"
say "Rotate the Secret: the running pod holds the new value within a second"
run kubectl -n "$ns" patch secret supabase -p '{"stringData":{"SUPABASE_SERVICE_KEY":"rotated-key-after-incident"}}'
sleep 1
run kubectl -n "$ns" exec claude-code -- cat /var/run/secrets/scopehold/supabase-key
echo
say "Revoke every grant on it: the file is gone from the running pod"
run scopehold exposure supabase -n "$ns" --revoke --yes
sleep 1
run kubectl -n "$ns" exec claude-code -- ls -l /var/run/secrets/scopehold/
say "Done in $((SECONDS - started))s."
if [[ $keep == yes ]]; then
  cat <<EOF

The cluster stays up. Look around:
  export KUBECONFIG=$KUBECONFIG
  kubectl get pods -A
  kubectl apply -f examples/      # images: scopehold.local/busybox:static is available
Stop it with: hack/cluster.sh stop $DIR
EOF
fi

#!/usr/bin/env bash
# The whole test suite with its set-up — the README's test command, and what CI
# runs (.ci/run calls this). Works from a fresh clone, with no stdin, on a Debian
# machine that already has Rust, Go and kubectl: installs what else is missing,
# builds (or reuses) the real kube-apiserver and the peers' tools (helm,
# csi-sanity), then runs every test. Tests run as root (they mount tmpfs).
set -euo pipefail

TEST_CMD=(cargo test --locked)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Nothing here may wait for input.
exec </dev/null

log() { echo "==> $*" >&2; }

# Non-login shells may lack the toolchains' directories on PATH.
for dir in /usr/local/go/bin "$HOME/go/bin" "$HOME/.cargo/bin"; do
  if [[ -d $dir && :$PATH: != *:$dir:* ]]; then
    PATH="$dir:$PATH"
  fi
done
export PATH

# --- preinstalled toolchains: fail early and clearly if one is missing ----------
for tool in cargo go /usr/bin/kubectl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (preinstalled on CI machines)" >&2; exit 1; }
done

# --- Debian packages: installed only when their command is missing --------------
# command → package. flock serializes the apiserver build; mount/umount are used by
# the node plugin's tmpfs tests; cc links Rust build scripts.
declare -A APT_PKGS=(
  [flock]=util-linux
  [sha256sum]=coreutils
  [mount]=mount
  [cc]=gcc
  [git]=git
  [curl]=curl
  [python3]=python3
)
missing=()
for cmd in "${!APT_PKGS[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${APT_PKGS[$cmd]}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# tests/proxy.rs drives Python `requests` through the proxy sidecar, as agents do.
if ! python3 -c 'import requests' 2>/dev/null; then
  log "installing python requests"
  python3 -m pip install -q requests 2>/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-requests
  }
fi

# --- Go tools from the Go module proxy ------------------------------------------
# Pinned, built once into a cached directory that goes on PATH.
GO_TOOLS_BIN="${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}/bin"
mkdir -p "$GO_TOOLS_BIN"
[[ :$PATH: == *:$GO_TOOLS_BIN:* ]] || PATH="$GO_TOOLS_BIN:$PATH"
export PATH

# helm, for tests/helm.rs (which installs it the same way when run without this
# script; keep the two in sync). The -X flags set what helm's Makefile sets: the
# version, and v1.36 as the default Kubernetes version of `helm template`/`lint`
# (a plain `go install` leaves both empty, i.e. v1.20). ~2-4 min on 2 cores.
HELM_VERSION=v3.21.4
SCOPEHOLD_HELM="$GO_TOOLS_BIN/helm"
if [[ $("$SCOPEHOLD_HELM" version --template '{{.Version}}' 2>/dev/null) != "$HELM_VERSION" ]]; then
  log "installing helm $HELM_VERSION into $GO_TOOLS_BIN"
  GOBIN="$GO_TOOLS_BIN" go install -trimpath -ldflags "\
-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=36 \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
export SCOPEHOLD_HELM
log "using $("$SCOPEHOLD_HELM" version --short)"

# csi-sanity, for tests/csi_sanity.rs (which builds it the same way when run
# without this script; keep the two in sync). `go install` names the binary
# without its version, so a stamp file records which one is cached.
CSI_SANITY_VERSION=v5.4.0
SCOPEHOLD_CSI_SANITY="$GO_TOOLS_BIN/csi-sanity"
if [[ ! -x $SCOPEHOLD_CSI_SANITY || $(cat "$GO_TOOLS_BIN/.csi-sanity-version" 2>/dev/null) != "$CSI_SANITY_VERSION" ]]; then
  log "installing csi-sanity $CSI_SANITY_VERSION into $GO_TOOLS_BIN"
  GOBIN="$GO_TOOLS_BIN" go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  echo "$CSI_SANITY_VERSION" >"$GO_TOOLS_BIN/.csi-sanity-version"
fi
export SCOPEHOLD_CSI_SANITY
log "using $SCOPEHOLD_CSI_SANITY ($CSI_SANITY_VERSION)"

# --- the real kube-apiserver (cached; a cold build takes ~4 min on 2 cores) -------
log "kube-apiserver test binary"
SCOPEHOLD_APISERVER_BIN=$(tests/apiserver/build.sh)
# Every test binary would otherwise ask build.sh again; this one answer is enough.
export SCOPEHOLD_APISERVER_BIN
log "using $SCOPEHOLD_APISERVER_BIN"

# --- the real node's parts (tests/e2e_node.rs; docs/real-node.md) ----------------
# kubelet, kube-controller-manager, kube-scheduler from the same Go module (cached;
# ~5 min cold, less with the apiserver's Go build cache warm), and the images
# (pause, busybox agent, the static musl ScopeHold image; cached by content hash).
# hack/cluster.sh installs containerd, runc and the CNI plugins when missing.
log "kubelet, kube-controller-manager, kube-scheduler"
SCOPEHOLD_NODE_BIN_DIR=$(tests/apiserver/build.sh node)
export SCOPEHOLD_NODE_BIN_DIR
log "using $SCOPEHOLD_NODE_BIN_DIR"
log "container images (hack/image.sh)"
mkdir -p target
SCOPEHOLD_IMAGES=$PWD/target/scopehold-images.txt
hack/image.sh >"$SCOPEHOLD_IMAGES"
export SCOPEHOLD_IMAGES

log "${TEST_CMD[*]}"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
set +e
"${TEST_CMD[@]}" 2>&1 | tee "$results"
status=${PIPESTATUS[0]}
# A test binary's node tears down after the binary exits: wait for it (it holds
# the node lock until everything is undone).
flock -w 300 /run/scopehold-node.lock true
set -e
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$results"
exit "$status"

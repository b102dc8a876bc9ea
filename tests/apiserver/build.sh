#!/usr/bin/env bash
# Builds (once) the real kube-apiserver + etcd test binary from this Go module and
# prints its path on stdout. Everything else goes to stderr, so callers can do
#   bin=$(tests/apiserver/build.sh)
#
# `build.sh node` builds the node components of the same Kubernetes version from
# the same module (kubelet, kube-controller-manager, kube-scheduler: go.mod's
# `tool` block keeps their requirements) and prints the directory holding them:
#   dir=$(tests/apiserver/build.sh node)   # $dir/kubelet, $dir/kube-scheduler, …
#
# The binary is cached under ${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}, keyed by a
# hash of every input that changes it (go.mod, go.sum, main.go, this script, the Go
# toolchain), so a cold build (several minutes, 2 cores) happens once per machine and
# input set, not once per test run or per test binary.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

readonly K8S_VERSION=v1.36.3
readonly K8S_MINOR=36

readonly NODE_COMPONENTS=(kubelet kube-controller-manager kube-scheduler)

what=${1:-apiserver}
case $what in
  apiserver | node) ;;
  *)
    echo "usage: $0 [apiserver|node]" >&2
    exit 2
    ;;
esac

cache_dir=${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}
# `go version` is run here, inside the module, so a toolchain switch that go.mod's
# `go`/`toolchain` lines trigger is part of the key.
key=$({ sha256sum go.mod go.sum main.go build.sh; go version; echo "$what"; } | sha256sum | cut -c1-16)
out="$cache_dir/$what-$key"

# A node build's output is a directory; it exists only once complete (renamed into
# place), so -e is the test for both.
if [[ -e $out ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache_dir"
# Several test binaries (or CI and a developer) may ask at once: one builds, the
# others wait and then reuse its result instead of compiling in parallel on 2 cores.
exec 9>"$cache_dir/apiserver.lock"
if ! flock -n 9; then
  echo "waiting for another build of the test kube-apiserver to finish…" >&2
  flock 9
fi
if [[ -e $out ]]; then
  echo "$out"
  exit 0
fi

# Build to a temporary name and rename: a killed build never leaves a file at $out
# that the -e check above would accept.
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$K8S_MINOR"
start=$SECONDS
if [[ $what == node ]]; then
  echo "building ${NODE_COMPONENTS[*]} $K8S_VERSION (~5 min cold, ~2 min with the apiserver's Go build cache warm)…" >&2
  mkdir -p "$tmp"
  packages=()
  for c in "${NODE_COMPONENTS[@]}"; do packages+=("k8s.io/kubernetes/cmd/$c"); done
  CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp/" "${packages[@]}" >&2
  mv -f "$tmp" "$out"
  echo "built $out in $((SECONDS - start))s" >&2
  echo "$out"
  exit 0
fi

echo "building kube-apiserver $K8S_VERSION (first run takes several minutes)…" >&2
# -mod=readonly (Go's default, made explicit against a GOFLAGS=-mod=mod in the
# environment): the build must never rewrite go.mod/go.sum. The replace list pins
# every k8s.io staging module to the matching v0.36.x; never `go get -u` here, it
# raises shared dependencies (otelgrpc, cel-go, …) past what the apiserver supports.
CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp" . >&2
mv -f "$tmp" "$out"
echo "built $out in $((SECONDS - start))s" >&2
echo "$out"

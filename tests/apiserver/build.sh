#!/usr/bin/env bash
# Builds (once) the real kube-apiserver + etcd test binary from this Go module and
# prints its path on stdout. Everything else goes to stderr, so callers can do
#   bin=$(tests/apiserver/build.sh)
#
# The binary is cached under ${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}, keyed by a
# hash of every input that changes it (go.mod, go.sum, main.go, this script, the Go
# toolchain), so a cold build (several minutes, 2 cores) happens once per machine and
# input set, not once per test run or per test binary.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

readonly K8S_VERSION=v1.36.3
readonly K8S_MINOR=36

cache_dir=${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}
# `go version` is run here, inside the module, so a toolchain switch that go.mod's
# `go`/`toolchain` lines trigger is part of the key.
key=$({ sha256sum go.mod go.sum main.go build.sh; go version; } | sha256sum | cut -c1-16)
out="$cache_dir/apiserver-$key"

if [[ -x $out ]]; then
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
if [[ -x $out ]]; then
  echo "$out"
  exit 0
fi

# Build to a temporary name and rename: a killed build never leaves a file at $out
# that the -x check above would accept.
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT

echo "building kube-apiserver $K8S_VERSION (first run takes several minutes)…" >&2
start=$SECONDS
# -mod=readonly (Go's default, made explicit against a GOFLAGS=-mod=mod in the
# environment): the build must never rewrite go.mod/go.sum. The replace list pins
# every k8s.io staging module to the matching v0.36.x; never `go get -u` here, it
# raises shared dependencies (otelgrpc, cel-go, …) past what the apiserver supports.
CGO_ENABLED=0 go build -mod=readonly -trimpath \
  -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$K8S_MINOR" \
  -o "$tmp" . >&2
mv -f "$tmp" "$out"
echo "built $out in $((SECONDS - start))s" >&2
echo "$out"

#!/usr/bin/env bash
# Runs ScopeHold locally: builds the binaries and runs `kubectl scopehold demo`,
# which builds (first run, ~4 minutes) or reuses a real kube-apiserver with etcd
# on loopback, installs the CRDs, starts the controller (with custody) and the
# node plugin, plays kubelet, and walks the five steps and the incident path.
# Run as root: the node plugin mounts a tmpfs. Everything is cleaned up on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "==> building scopehold and kubectl-scopehold" >&2
cargo build --locked --quiet --bin scopehold --bin kubectl-scopehold
exec target/debug/kubectl-scopehold demo

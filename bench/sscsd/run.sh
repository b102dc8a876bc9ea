#!/usr/bin/env bash
# Side by side: ScopeHold (examples/bench_publish) and the Secrets Store CSI Driver
# v1.6.1 (examples/bench_sscsd), same kube-apiserver binary, same client
# (KubeletPlayer), same phases, interleaved (ScopeHold, SSCSD) for ROUNDS rounds,
# then per-round ratios and their medians (ratios.py). Run as root (tmpfs mounts):
#
#   sudo bench/sscsd/run.sh [ROUNDS]        # default 3 rounds, ~1.5 min each
#
# Outputs stay in .cache/bench-sscsd/<UTC time>/ (A<i>.out ScopeHold, B<i>.out SSCSD).
# Not part of the test suite: it is a benchmark; quiet the machine first.
set -euo pipefail
rounds=${1:-3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

sscsd=$("$here/build.sh")
apiserver=${SCOPEHOLD_APISERVER_BIN:-$(tests/apiserver/build.sh)}
cargo build --release --locked --bin scopehold --example bench_publish --example bench_sscsd >&2
out="$repo/.cache/bench-sscsd/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
{
  echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
  echo "machine $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
} > "$out/machine.txt"
for i in $(seq 1 "$rounds"); do
  echo "== round $i/$rounds ScopeHold $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  SCOPEHOLD_APISERVER_BIN=$apiserver target/release/examples/bench_publish \
    --scopehold target/release/scopehold \
    --sequential 200 --sequential-full 100 --concurrent 500 --concurrency 32 \
    --resolves 20 --concurrent-resolves 32 --micro 20 --local-cycles 10 \
    > "$out/A$i.out" 2> "$out/A$i.err"
  echo "== round $i/$rounds SSCSD $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  SCOPEHOLD_APISERVER_BIN=$apiserver target/release/examples/bench_sscsd --sscsd "$sscsd" \
    --sequential 200 --sequential-full 100 --concurrent 500 --concurrency 32 \
    > "$out/B$i.out" 2> "$out/B$i.err"
done
python3 "$here/ratios.py" "$out" | tee "$out/summary.txt"

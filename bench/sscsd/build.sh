#!/usr/bin/env bash
# Builds (once) the Secrets Store CSI Driver v1.6.1 and a fake provider for the
# side-by-side benchmark, from the Go module proxy, and prints the directory that
# holds them (secrets-store-csi-driver, fake-provider, crds/) on stdout.
#
# Cached under .cache/sscsd-<hash of the inputs> in the repository (ignored by git):
# this script, the provider, the logging stub and the Go toolchain.
#
# Two facts of the module proxy shape this (BENCHMARKS.md, "Side by side"):
# - v1.6.1 is the newest SSCSD the proxy serves (v1.6.2 and v1.7.0 answer 403);
# - monis.app/mlog (used by SSCSD's main for its logging set-up only) answers 403,
#   so mlog/ stands in for it through a `replace`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
readonly MODULE=sigs.k8s.io/secrets-store-csi-driver
readonly VERSION=v1.6.1

key=$({ sha256sum "$here/build.sh" "$here/provider/main.go" "$here/mlog/go.mod" "$here/mlog/mlog.go"; go version; echo "$VERSION"; } | sha256sum | cut -c1-16)
out="$repo/.cache/sscsd-$key"
if [[ -x $out/secrets-store-csi-driver && -x $out/fake-provider ]]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sscsd-build.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
echo "downloading $MODULE@$VERSION from the Go module proxy…" >&2
dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "$MODULE@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[[ -d $dir ]] || { echo "go mod download gave no directory" >&2; exit 1; }
src="$work/sscsd"
cp -r "$dir" "$src"
chmod -R u+w "$src"
cp -r "$here/mlog" "$work/mlog"
mkdir -p "$src/benchprovider"
cp "$here/provider/main.go" "$src/benchprovider/main.go"
(cd "$src" && go mod edit -replace monis.app/mlog=../mlog)

echo "building the driver and the fake provider (a few minutes on 2 cores)…" >&2
start=$SECONDS
mkdir -p "$out.tmp"
(cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" \
  -o "$out.tmp/secrets-store-csi-driver" ./cmd/secrets-store-csi-driver >&2)
(cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" \
  -o "$out.tmp/fake-provider" ./benchprovider >&2)
cp -r "$src/charts/secrets-store-csi-driver/crds" "$out.tmp/crds"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "built $out in $((SECONDS - start))s" >&2
echo "$out"

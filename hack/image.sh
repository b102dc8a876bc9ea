#!/usr/bin/env bash
# Builds the local test node's container images without a Docker engine, as OCI
# image archives (umoci), cached by a hash of their contents, and prints one line
# per image on stdout:   <image reference> <archive path>
# (everything else goes to stderr). hack/cluster.sh imports them into its
# containerd with `ctr images import`; nothing is pushed anywhere.
#
#   scopehold.local/pause:3.10       a static pause program (hack/image/pause.c, gcc -static)
#   scopehold.local/busybox:static   Debian's busybox-static with every applet linked,
#                                    the agent image of the end-to-end tests
#   scopehold.local/curl:dev         the busybox image plus Debian's curl and the shared
#                                    libraries it loads (an agent that calls HTTPS APIs
#                                    through the proxy sidecar; busybox wget cannot CONNECT)
#   scopehold.local/scopehold:dev    the static musl `scopehold` and `kubectl-scopehold`,
#                                    laid out like the Dockerfile's final stage
#                                    (distroless/static:nonroot): /scopehold,
#                                    /kubectl-scopehold, passwd/group with nonroot
#                                    65532, CA bundle, /tmp, user 65532:65532,
#                                    entrypoint /scopehold
#
# The ScopeHold binaries come from `cargo build --target x86_64-unknown-linux-musl`
# (dev profile: the Dockerfile's `dist` build, release with fat LTO, takes ~15-22 min
# cold on 2 cores; the image layout is the same). SCOPEHOLD_IMAGE_PROFILE=dist builds
# what the Dockerfile ships (the memory figures in BENCHMARKS.md), =release a plain one.
# Missing Debian packages (umoci, busybox-static, gcc, musl-tools) are installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec </dev/null

log() { echo "==> $*" >&2; }

cache_dir=${SCOPEHOLD_CACHE:-$HOME/.cache/scopehold}/images
mkdir -p "$cache_dir"
profile=${SCOPEHOLD_IMAGE_PROFILE:-dev}
musl=x86_64-unknown-linux-musl

# --- tools --------------------------------------------------------------------
declare -A APT_PKGS=([umoci]=umoci [gcc]=gcc [musl-gcc]=musl-tools [curl]=curl)
missing=()
for cmd in "${!APT_PKGS[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${APT_PKGS[$cmd]}")
done
[[ -x /bin/busybox ]] || missing+=(busybox-static)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
  log "adding the Rust target $musl"
  rustup target add "$musl" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pack <name:tag> <rootfs dir> <archive> [umoci config flags...]
# An OCI layout with one image, one layer holding the rootfs, tarred for `ctr import`.
pack() {
  local ref=$1 rootfs=$2 archive=$3
  shift 3
  local tag=${ref##*:} layout="$work/layout-$RANDOM" bundle="$work/bundle-$RANDOM"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack --image "$layout:$tag" "$bundle" >&2
  cp -a "$rootfs/." "$bundle/rootfs/"
  umoci repack --image "$layout:$tag" "$bundle"
  umoci config --image "$layout:$tag" "$@"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$archive.tmp" .
  mv -f "$archive.tmp" "$archive"
}

# cached <name> <key> → prints the archive path if present
archive_path() { echo "$cache_dir/$1-$2.tar"; }

# --- pause --------------------------------------------------------------------
pause_ref=scopehold.local/pause:3.10
key=$({ sha256sum hack/image/pause.c hack/image.sh; gcc --version | head -1; } | sha256sum | cut -c1-16)
pause_tar=$(archive_path pause "$key")
if [[ ! -f $pause_tar ]]; then
  log "building $pause_ref"
  mkdir -p "$work/pause"
  gcc -static -O2 -s -o "$work/pause/pause" hack/image/pause.c
  pack "$pause_ref" "$work/pause" "$pause_tar" --config.entrypoint /pause --config.user 65535:65535
fi
echo "$pause_ref $pause_tar"

# busybox_root <dir>: busybox with every applet linked in <dir>/bin, root and
# nobody in passwd/group, a sticky /tmp (the agent images' common root).
busybox_root() {
  local root=$1
  mkdir -p "$root/bin" "$root/tmp" "$root/etc"
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
}

# --- busybox agent image --------------------------------------------------------
busybox_ref=scopehold.local/busybox:static
key=$({ sha256sum /bin/busybox hack/image.sh; } | sha256sum | cut -c1-16)
busybox_tar=$(archive_path busybox "$key")
if [[ ! -f $busybox_tar ]]; then
  log "building $busybox_ref"
  root="$work/busybox"
  busybox_root "$root"
  pack "$busybox_ref" "$root" "$busybox_tar" --config.cmd /bin/sh --config.env PATH=/bin
fi
echo "$busybox_ref $busybox_tar"

# --- curl agent image -------------------------------------------------------------
curl_ref=scopehold.local/curl:dev
curl_bin=$(command -v curl)
# The dynamic loader and every library curl loads, by their resolved paths.
mapfile -t curl_libs < <(ldd "$curl_bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
key=$({ sha256sum /bin/busybox hack/image.sh "$curl_bin"; for lib in "${curl_libs[@]}"; do sha256sum "$(readlink -f "$lib")"; done; } | sha256sum | cut -c1-16)
curl_tar=$(archive_path curl "$key")
if [[ ! -f $curl_tar ]]; then
  log "building $curl_ref (${#curl_libs[@]} libraries)"
  root="$work/curl"
  busybox_root "$root"
  mkdir -p "$root/usr/bin"
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  cp "$curl_bin" "$root/usr/bin/curl"
  for lib in "${curl_libs[@]}"; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  # Copied to the paths curl asks for (/lib64/ld-linux-x86-64.so.2,
  # /lib/x86_64-linux-gnu/…), where the loader looks without an ld.so.cache.
  pack "$curl_ref" "$root" "$curl_tar" --config.cmd /bin/sh --config.env PATH=/usr/bin:/bin
fi
echo "$curl_ref $curl_tar"

# --- scopehold ------------------------------------------------------------------
scopehold_ref=scopehold.local/scopehold:dev
if [[ -n ${SCOPEHOLD_IMAGE_BINARIES:-} ]]; then
  bin_dir=$SCOPEHOLD_IMAGE_BINARIES
else
  log "cargo build --target $musl --profile $profile (scopehold, kubectl-scopehold)"
  CC_x86_64_unknown_linux_musl=musl-gcc cargo build --locked --quiet --target "$musl" \
    --profile "$profile" --bin scopehold --bin kubectl-scopehold >&2
  out_profile=$profile
  [[ $profile == dev ]] && out_profile=debug
  bin_dir="target/$musl/$out_profile"
fi
key=$({ sha256sum "$bin_dir/scopehold" "$bin_dir/kubectl-scopehold" hack/image.sh /etc/ssl/certs/ca-certificates.crt; } | sha256sum | cut -c1-16)
scopehold_tar=$(archive_path scopehold "$key")
if [[ ! -f $scopehold_tar ]]; then
  log "building $scopehold_ref"
  root="$work/scopehold"
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  install -m 0755 "$bin_dir/scopehold" "$root/scopehold"
  install -m 0755 "$bin_dir/kubectl-scopehold" "$root/kubectl-scopehold"
  # What distroless/static-debian12:nonroot holds besides the binaries.
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  printf 'root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n' >"$root/etc/group"
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  pack "$scopehold_ref" "$root" "$scopehold_tar" --config.entrypoint /scopehold --config.user 65532:65532 \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
fi
echo "$scopehold_ref $scopehold_tar"

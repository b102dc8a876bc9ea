#!/usr/bin/env bash
# A real single-node Kubernetes v1.36.3 on this machine, for the end-to-end tests
# and for newcomers: the test kube-apiserver (+etcd), kube-controller-manager,
# kube-scheduler, containerd + runc (Debian) and a kubelet, all on loopback, with
# locally built images (hack/image.sh) imported into containerd.
# Facts and traps behind every setting: docs/real-node.md.
#
#   hack/cluster.sh up DIR     start, print "ready <kubeconfig>" on stdout, then run
#                              until stdin closes (or SIGTERM/SIGINT) and tear
#                              everything down. Tests spawn this with a piped stdin:
#                              when the test process dies, the cluster goes too.
#   hack/cluster.sh start DIR  the same, detached (stdin not watched); prints
#                              `export KUBECONFIG=...` once the node is Ready.
#   hack/cluster.sh stop DIR   stop a started cluster and tear it down.
#   hack/cluster.sh down DIR   tear down what a killed supervisor left (idempotent).
#
# DIR must be a short absolute path (kubelet's socket paths live below it; the
# unix socket limit is 107 bytes), e.g. /tmp/shn. Everything the node writes goes
# below DIR except what Kubernetes hard-codes; teardown undoes all of it by the
# PIDs and state recorded in DIR: processes (containerd's shims matched by their
# -address argument), mounts below DIR, sysctls kubelet sets, iptables chains,
# cgroup directories, /var/lib/kubelet/device-plugins, /var/log/containers
# links, the CNI bridge and IPAM/cache entries, /run/containerd, /opt/containerd.
#
# DIR/values.yaml holds the chart values this node needs (image, pull policy,
# host networking, API server and custody addresses, kubelet directory);
# DIR/env holds shell variables (KUBECONFIG, NODE_NAME, KUBELET_DIR, ...).
#
# Only one node can run on a machine (kubelet's ports and hard-coded paths): a
# second `up` waits for the first to finish (flock on /run/scopehold-node.lock).
#
# Inputs (optional; built or found when unset): SCOPEHOLD_APISERVER_BIN,
# SCOPEHOLD_NODE_BIN_DIR (kubelet, kube-controller-manager, kube-scheduler),
# SCOPEHOLD_IMAGES (a file of "<ref> <archive>" lines from hack/image.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly CGROUP_ROOT=scopehold-node
readonly BRIDGE=scopehold0
readonly POD_SUBNET=10.244.250.0/24
readonly CNI_NETWORK=scopehold
readonly LOCK=/run/scopehold-node.lock
readonly SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)
# Paths outside DIR that kubelet/containerd/CNI create; teardown removes the ones
# that did not exist before `up`.
readonly HOST_PATHS=(/var/lib/kubelet/device-plugins /var/lib/kubelet /var/log/containers
  /run/containerd /opt/containerd /var/lib/cni/results /var/lib/cni)

log() { echo "==> [cluster] $*" >&2; }
die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

usage() { die "usage: $0 up|start|stop|down DIR"; }

(($# == 2)) || usage
cmd=$1
D=$2
[[ $D == /* ]] || die "DIR must be an absolute path"
D=${D%/}

for dir in /usr/local/go/bin "$HOME/go/bin" "$HOME/.cargo/bin" /usr/sbin /sbin; do
  [[ -d $dir && :$PATH: != *:$dir:* ]] && PATH="$dir:$PATH"
done
export PATH

# --- recorded processes -----------------------------------------------------------
# record NAME PID; stop_recorded NAME [grace seconds]
record() { echo "$2" >"$D/pids/$1"; }

alive() { kill -0 "$1" 2>/dev/null; }

stop_pid() {
  local pid=$1 grace=${2:-10} i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
}

stop_recorded() {
  local file="$D/pids/$1"
  [[ -f $file ]] || return 0
  stop_pid "$(cat "$file")" "${2:-10}"
  rm -f "$file"
}

# PIDs of containerd shims serving our containerd (matched by `-address <our socket>`).
our_shims() {
  local sock="$D/containerd/containerd.sock" pid args
  for pid in /proc/[0-9]*; do
    pid=${pid#/proc/}
    args=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || continue
    [[ $args == *containerd-shim* && $args == *"-address $sock "* ]] && echo "$pid"
  done
  return 0
}

# Every process in our cgroup subtree (the pods' processes).
cgroup_pids() {
  local dir="/sys/fs/cgroup/pids/$CGROUP_ROOT"
  [[ -d $dir ]] || dir="/sys/fs/cgroup/memory/$CGROUP_ROOT"
  [[ -d $dir ]] || return 0
  find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

# --- teardown ---------------------------------------------------------------------
teardown() {
  set +e
  [[ -d $D/pids ]] || return 0
  log "tearing down $D"
  stop_recorded kubelet 10
  # The pods' processes, then the shims that watched them (children first: a shim
  # killed first would leave its container running).
  local i pid
  for ((i = 0; i < 30; i++)); do
    local pids
    pids=$(cgroup_pids)
    [[ -z $pids ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.2
  done
  for pid in $(our_shims); do stop_pid "$pid" 3; done
  stop_recorded containerd 10
  stop_recorded kube-scheduler 5
  stop_recorded kube-controller-manager 5
  stop_recorded kube-apiserver 10

  # Mounts below DIR (pods' volumes and tmpfs, container rootfs, sandbox shm,
  # netns), deepest first; then DIR's own shared bind mount.
  local mounts m
  for ((i = 0; i < 5; i++)); do
    mounts=$(awk -v d="$D" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
    [[ -z $mounts ]] && break
    while read -r m; do
      m=$(printf '%b' "$m") # mountinfo escapes spaces as \040
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done <<<"$mounts"
  done

  # Network: the bridge and the CNI cache entries of our network.
  if [[ ! -f $D/before/bridge ]] && ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link delete "$BRIDGE"
  fi
  if [[ -d /var/lib/cni/results ]]; then
    find /var/lib/cni/results -maxdepth 1 -name "$CNI_NETWORK-*" -delete
  fi
  if [[ -f $D/before/netns ]]; then
    local ns
    for ns in $(ls /run/netns 2>/dev/null); do
      grep -qx "$ns" "$D/before/netns" || ip netns delete "$ns" 2>/dev/null
    done
  fi

  # iptables chains kubelet created (v4 and v6), with the rules that jump to them.
  local tool table chain
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle; do
      for chain in $("$tool" -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }'); do
        grep -qx "$tool $table $chain" "$D/before/chains" 2>/dev/null && continue
        "$tool" -w -t "$table" -S 2>/dev/null | grep -- "-j $chain\( \|$\)" | sed 's/^-A /-D /' |
          while read -r rule; do
            # shellcheck disable=SC2086
            "$tool" -w -t "$table" $rule 2>/dev/null
          done
        "$tool" -w -t "$table" -F "$chain" 2>/dev/null
        "$tool" -w -t "$table" -X "$chain" 2>/dev/null
      done
    done
  done

  # Sysctls kubelet set.
  if [[ -f $D/before/sysctls ]]; then
    local name value
    while read -r name value; do
      [[ $(sysctl -n "$name" 2>/dev/null) == "$value" ]] || sysctl -q -w "$name=$value" >/dev/null
    done <"$D/before/sysctls"
  fi

  # Cgroup directories, in every hierarchy, deepest first.
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d $h$CGROUP_ROOT ]] || continue
    find "$h$CGROUP_ROOT" -depth -type d -exec rmdir {} + 2>/dev/null
  done

  # Host paths created on our behalf; links into DIR in /var/log/containers.
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$D/*" -delete
  fi
  local p
  for p in "${HOST_PATHS[@]}"; do
    grep -qx "$p" "$D/before/paths" 2>/dev/null && continue
    # Did not exist before `up`: everything in it is this node's.
    [[ -e $p ]] && rm -rf "$p"
  done

  if [[ -n $(awk -v d="$D" 'index($5, d "/") == 1 || $5 == d' /proc/self/mountinfo) ]]; then
    log "mounts remain below $D; not removing it"
  else
    rm -rf "${D:?}"/{apiserver,containerd,kubelet,logs-pods,cni,runc,scopehold-state,pids,before}
  fi
  log "teardown done"
}

# --- start ------------------------------------------------------------------------
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what (logs: $D/logs)"
    sleep 0.2
  done
}

ensure_packages() {
  declare -A pkgs=([containerd]=containerd [runc]=runc [iptables]=iptables [ip]=iproute2 [flock]=util-linux)
  local missing=() c
  for c in "${!pkgs[@]}"; do command -v "$c" >/dev/null || missing+=("${pkgs[$c]}"); done
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

record_before() {
  mkdir -p "$D/before"
  local name tool table
  for name in "${SYSCTLS[@]}"; do echo "$name $(sysctl -n "$name")"; done >"$D/before/sysctls"
  for p in "${HOST_PATHS[@]}"; do [[ -e $p ]] && echo "$p"; done >"$D/before/paths"
  ls /run/netns 2>/dev/null >"$D/before/netns" || true
  ip link show "$BRIDGE" >/dev/null 2>&1 && touch "$D/before/bridge"
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle; do
      "$tool" -w -t "$table" -S 2>/dev/null | awk -v t="$tool $table" '$1 == "-N" { print t, $2 }'
    done
  done >"$D/before/chains"
  return 0
}

# Lets kubelet (cgroupfs driver, cgroup v1) use /<CGROUP_ROOT> in every hierarchy.
make_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/; do
    mkdir -p "$h$CGROUP_ROOT"
  done
  local cpuset=/sys/fs/cgroup/cpuset
  if [[ -d $cpuset/$CGROUP_ROOT ]]; then
    cat "$cpuset/cpuset.cpus" >"$cpuset/$CGROUP_ROOT/cpuset.cpus"
    cat "$cpuset/cpuset.mems" >"$cpuset/$CGROUP_ROOT/cpuset.mems"
  fi
}

write_configs() {
  local sock="$D/containerd/containerd.sock"
  mkdir -p "$D/containerd" "$D/cni/net.d" "$D/kubelet" "$D/logs-pods" "$D/scopehold-state"
  cat >"$D/containerd/config.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$D/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "scopehold.local/pause:3.10"
  # Essential on these VMs (no CAP_SYS_RESOURCE): without it every sandbox fails
  # with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$D/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
EOF
  # Pods without host networking get an isolated bridge: no gateway, no masquerade,
  # no route off the bridge (the network rule: nothing leaves this machine).
  cat >"$D/cni/net.d/10-scopehold.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$POD_SUBNET" }]],
        "dataDir": "$D/cni/ipam"
      }
    },
    { "type": "loopback" }
  ]
}
EOF
  cat >"$D/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
containerRuntimeEndpoint: unix://$sock
address: 127.0.0.1
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
failSwapOn: false
podLogsDir: $D/logs-pods
# Republish cadence of requiresRepublish CSI volumes follows the pod sync period.
syncFrequency: 20s
# Local images cannot be pulled again: never garbage-collect them, never evict.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
EOF
}

import_images() {
  local ref archive base
  while read -r ref archive; do
    [[ -n $ref ]] || continue
    base=${ref%:*}
    ctr -a "$D/containerd/containerd.sock" -n k8s.io images import --base-name "$base" "$archive" >/dev/null
  done <"$1"
}

up() {
  local watch_stdin=$1
  mkdir -p "$D"
  [[ ! -d $D/pids ]] || die "$D holds a cluster's state (run: $0 down $D)"
  ensure_packages
  local node_name
  node_name=$(hostname | tr '[:upper:]' '[:lower:]')
  # The API server reaches kubelet (exec, logs) by the node's Hostname address:
  # it must resolve to loopback, where kubelet listens.
  if [[ $(getent ahostsv4 "$node_name" | awk 'NR == 1 { print $1 }') != 127.* ]]; then
    die "the hostname $node_name must resolve to a 127.0.0.0/8 address (kubelet serves on 127.0.0.1)"
  fi

  # Inputs, built once and cached (see the scripts).
  local apiserver=${SCOPEHOLD_APISERVER_BIN:-}
  [[ -n $apiserver ]] || apiserver=$("$ROOT/tests/apiserver/build.sh")
  local node_bins=${SCOPEHOLD_NODE_BIN_DIR:-}
  [[ -n $node_bins ]] || node_bins=$("$ROOT/tests/apiserver/build.sh" node)
  local images=${SCOPEHOLD_IMAGES:-}
  if [[ -z $images ]]; then
    images="$D/images.txt"
    "$ROOT/hack/image.sh" >"$images"
  fi

  exec 8>"$LOCK"
  if ! flock -n 8; then
    log "another node runs on this machine; waiting for it to stop"
    flock 8
  fi
  local started=$SECONDS
  mkdir -p "$D/pids" "$D/logs"
  record_before
  trap 'stop_waiter || true; teardown' EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT

  write_configs
  make_cgroups
  # Bidirectional mount propagation (the node plugin's tmpfs mounts reach kubelet
  # and the pods) needs the kubelet directory on a shared mount; / is private here.
  mount --bind "$D/kubelet" "$D/kubelet"
  mount --make-rshared "$D/kubelet"

  log "kube-apiserver"
  "$apiserver" --dir "$D/apiserver" --exit-on-stdin-close=false </dev/null >"$D/logs/apiserver.out" 2>"$D/logs/apiserver.log" 8>&- &
  record kube-apiserver $!
  log "containerd"
  containerd --config "$D/containerd/config.toml" </dev/null >"$D/logs/containerd.log" 2>&1 8>&- &
  record containerd $!
  wait_for 120 "kube-apiserver" grep -q '^ready ' "$D/logs/apiserver.out"
  local kubeconfig="$D/apiserver/kubeconfig"
  local server
  server=$(awk '/^ready / { print $2 }' "$D/logs/apiserver.out")

  log "kube-controller-manager, kube-scheduler"
  "$node_bins/kube-controller-manager" --kubeconfig "$kubeconfig" \
    --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
    --service-account-private-key-file "$D/apiserver/sa.key" --root-ca-file "$D/apiserver/ca.crt" \
    --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
    </dev/null >"$D/logs/kube-controller-manager.log" 2>&1 8>&- &
  record kube-controller-manager $!
  "$node_bins/kube-scheduler" --kubeconfig "$kubeconfig" \
    --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 \
    </dev/null >"$D/logs/kube-scheduler.log" 2>&1 8>&- &
  record kube-scheduler $!

  wait_for 60 "containerd" ctr -a "$D/containerd/containerd.sock" version
  log "importing images"
  import_images "$images"

  log "kubelet (node $node_name)"
  "$node_bins/kubelet" --config "$D/kubelet-config.yaml" --kubeconfig "$kubeconfig" \
    --root-dir "$D/kubelet" --cert-dir "$D/kubelet/pki" --hostname-override "$node_name" --v 1 \
    </dev/null >"$D/logs/kubelet.log" 2>&1 8>&- &
  record kubelet $!
  wait_for 120 "node $node_name Ready" \
    kubectl --kubeconfig "$kubeconfig" wait --for=condition=Ready "node/$node_name" --timeout=1s
  wait_for 60 "the default ServiceAccount" \
    kubectl --kubeconfig "$kubeconfig" -n default get serviceaccount default

  local port=${server##*:}
  cat >"$D/env" <<EOF
export KUBECONFIG=$kubeconfig
NODE_NAME=$node_name
KUBELET_DIR=$D/kubelet
APISERVER_HOST=127.0.0.1
APISERVER_PORT=$port
SCOPEHOLD_STATE_DIR=$D/scopehold-state
EOF
  # The chart values this node needs (docs/real-node.md explains each).
  cat >"$D/values.yaml" <<EOF
image:
  repository: scopehold.local/scopehold
  tag: dev
  pullPolicy: Never
hostNetwork: true
apiServer:
  host: 127.0.0.1
  port: $port
custody:
  address: 127.0.0.1
  port: 19443
metrics:
  port: 18080
proxyInjector:
  port: 19444
  url: https://127.0.0.1:19444/mutate-pods
  sidecarPort: 19501
node:
  kubeletDir: $D/kubelet
  stateDir: $D/scopehold-state
  healthPort: 19808
  metricsPort: 19810
EOF
  log "node Ready after $((SECONDS - started))s"
  echo "ready $kubeconfig"

  # The waiter must not hold the node lock (fd 8) and dies with us.
  if [[ $watch_stdin == yes ]]; then
    # A background job's stdin is /dev/null unless redirected explicitly.
    exec 3<&0
    cat <&3 >/dev/null 8>&- &
  else
    sleep infinity </dev/null 8>&- &
  fi
  WAITER=$!
  echo $$ >"$D/supervisor.pid"
  wait "$WAITER" || true
}

WAITER=
stop_waiter() {
  # (errexit is on: a failed kill here would end the EXIT trap early.)
  if [[ -n $WAITER ]]; then kill "$WAITER" 2>/dev/null || true; fi
}

case $cmd in
  up) up yes ;;
  start)
    mkdir -p "$D"
    rm -f "$D/supervisor.out"
    setsid "$0" _detached "$D" </dev/null >"$D/supervisor.out" 2>"$D/supervisor.log" &
    deadline=$((SECONDS + 900))
    until grep -q '^ready ' "$D/supervisor.out" 2>/dev/null; do
      if ! kill -0 $! 2>/dev/null || ((SECONDS > deadline)); then
        cat "$D/supervisor.log" >&2
        die "the cluster did not start"
      fi
      sleep 0.5
    done
    echo "export KUBECONFIG=$(awk '/^ready / { print $2 }' "$D/supervisor.out")"
    ;;
  _detached) up no ;;
  stop)
    if [[ -f $D/supervisor.pid ]]; then
      pid=$(cat "$D/supervisor.pid")
      stop_pid "$pid" 60
      rm -f "$D/supervisor.pid"
    fi
    teardown
    ;;
  down) teardown ;;
  *) usage ;;
esac

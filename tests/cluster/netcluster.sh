#!/usr/bin/env bash
# A SLURM cluster on one machine: each host is a network namespace with its own address and name.
#
#   netcluster.sh up N [ROOT]          N hosts <P>-h1..hN + controller <P>-ctl, slurmctld/slurmd/munged started
#   netcluster.sh down [ROOT]          stop what `up` started (by pid and namespace), remove its /etc/hosts lines
#   netcluster.sh run [ROOT] CMD...    run a client command (sbatch, squeue, ...) on the controller host
#   netcluster.sh kill-host HOST [ROOT]    SIGKILL every process of the host (its slurmd, steps, ranks)
#   netcluster.sh cut-host HOST [ROOT]     unplug the host's cluster cable: silence, no reset (power loss, partition)
#   netcluster.sh heal-host HOST [ROOT]    plug it back in
#   netcluster.sh start-slurmd HOST [ROOT] (re)start the host's slurmd
#
# ROOT (default /tmp/cityseg-netcluster) holds slurm.conf, logs, spool and state; P is $CITYSEG_NETCLUSTER_PREFIX
# (default cs). Needs root, iproute2, nsenter, slurmctld/slurmd/munge. Addresses are private and exist only in
# the namespaces made here: cluster network 10.77.0.0/24 on eth0 (controller .1, host i .1i), and a second
# "management" network 10.78.0.0/24 on mgmt0 that carries each host's default route, so that picking the
# interface of the default route (instead of the route to the rendezvous host) is a visible mistake.
# Daemons start with `nsenter --net=...` (not `ip netns exec`, which remounts /sys: slurmd then finds no cgroup fs).
set -euo pipefail

P=${CITYSEG_NETCLUSTER_PREFIX:-cs}
HOSTS_TAG="# cityseg-netcluster $P"
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "netcluster: $*" >&2; exit 1; }
ns() { [[ -e /run/netns/$1 ]]; }
in_ns() { local name=$1; shift; nsenter --net="/run/netns/$name" "$@"; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2; shift 2
    local deadline=$(( SECONDS + limit ))
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || die "no $what after ${limit} s; logs in $ROOT"
        sleep 0.3
    done
}

start_daemon() {  # start_daemon NAME NAMESPACE|- CMD...: background, own session, pid in ROOT/pids/NAME
    local name=$1 netns=$2; shift 2
    local -a prefix=()
    [[ $netns == - ]] || prefix=(nsenter --net="/run/netns/$netns")
    setsid "${prefix[@]}" "$@" >"$ROOT/log/$name.out" 2>&1 < /dev/null &
    echo $! > "$ROOT/pids/$name"
}

add_link() {  # add_link HOST IFNAME BRIDGE ADDR: a veth from HOST's IFNAME to BRIDGE in the bridge namespace
    local host=$1 ifname=$2 bridge=$3 addr=$4 port="${1#"$P"-}-${2:0:1}"
    ip -n "$P-br" link add "$port" type veth peer name "$ifname" netns "$P-$host"
    ip -n "$P-br" link set "$port" master "$bridge" up
    ip -n "$P-$host" addr add "$addr/24" dev "$ifname"
    ip -n "$P-$host" link set "$ifname" up
}

write_conf() {  # write_conf N
    local n=$1 host i
    host=$(hostname -s)
    local nodes="$P-h[1-$n]"
    cat > "$ROOT/slurm.conf" <<EOF
ClusterName=cityseg-$P
SlurmctldHost=$host(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$ROOT/munge/munge.socket,cred_expire=5
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/spool/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
# no systemd/cgroups here: track processes by parent pid, no binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
# a host that comes back registers as usable again; one silent for SlurmdTimeout s is declared DOWN
ReturnToService=2
SlurmdTimeout=20
# longer than the 30 s a launcher agent would give its workers: the checkpoint gets the time it needs
KillWait=50
MinJobAge=600
GresTypes=gpu
# preemption: a job in 'high' requeues a job of 'low' after SIGTERM and GraceTime seconds
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
    for (( i = 1; i <= n; i++ )); do
        echo "NodeName=$P-h$i NodeAddr=10.77.0.1$i NodeHostname=$host CPUs=32 Gres=gpu:4 State=UNKNOWN" >> "$ROOT/slurm.conf"
    done
    cat >> "$ROOT/slurm.conf" <<EOF
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=high Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
    echo "NodeName=$nodes Name=gpu File=$ROOT/dev/gpu[0-3]" > "$ROOT/gres.conf"
}

up() {
    local n=${1:?usage: netcluster.sh up N [ROOT]} i
    [[ $EUID == 0 ]] || die "needs root (network namespaces, slurmd)"
    ns "$P-br" && die "namespace $P-br exists: a cluster with prefix $P is up (netcluster.sh down, or set CITYSEG_NETCLUSTER_PREFIX)"
    mkdir -p "$ROOT"/{state,spool,log,pids,dev,munge}
    chmod 755 "$ROOT"
    echo "$n" > "$ROOT/hosts"
    # the network: a bridge namespace, the controller and N hosts
    for name in br ctl $(seq -f 'h%g' 1 "$n"); do
        ip netns add "$P-$name"
        ip -n "$P-$name" link set lo up
    done
    ip -n "$P-br" link add br0 type bridge
    ip -n "$P-br" link add br1 type bridge
    ip -n "$P-br" link set br0 up
    ip -n "$P-br" link set br1 up
    add_link ctl eth0 br0 10.77.0.1
    for (( i = 1; i <= n; i++ )); do
        add_link "h$i" mgmt0 br1 "10.78.0.1$i"   # first, so it is also the first interface listed
        add_link "h$i" eth0 br0 "10.77.0.1$i"
        ip -n "$P-h$i" route add default via 10.78.0.1 dev mgmt0 onlink
    done
    { echo "10.77.0.1 $P-ctl $HOSTS_TAG"
      for (( i = 1; i <= n; i++ )); do echo "10.77.0.1$i $P-h$i $HOSTS_TAG"; done; } >> /etc/hosts
    # fake GPUs: SLURM only checks that each gres File= exists
    for i in 0 1 2 3; do mknod -m 666 "$ROOT/dev/gpu$i" c 1 3; done
    write_conf "$n"
    # one munged on a private socket serves every host (the filesystem is shared)
    chown munge:munge "$ROOT/munge"; chmod 700 "$ROOT/munge"
    dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$ROOT/munge/munge.key"; chmod 400 "$ROOT/munge/munge.key"
    start_daemon munged - runuser -u munge -- munged --foreground --force --key-file="$ROOT/munge/munge.key" \
        --socket="$ROOT/munge/munge.socket" --pid-file="$ROOT/munge/munged.pid" \
        --log-file="$ROOT/munge/munged.log" --seed-file="$ROOT/munge/munged.seed"
    wait_for 30 "munged socket" test -S "$ROOT/munge/munge.socket"
    start_daemon slurmctld "$P-ctl" slurmctld -D -i -f "$ROOT/slurm.conf"
    for (( i = 1; i <= n; i++ )); do start_slurmd "h$i"; done
    wait_for 60 "$n idle hosts" all_idle "$n"
    echo "netcluster: $n hosts up ($P-h1..$P-h$n, controller $P-ctl); clients: $0 run $ROOT squeue"
}

start_slurmd() {
    local host=${1#"$P"-}
    start_daemon "slurmd-$host" "$P-$host" slurmd -D -N "$P-$host" -f "$ROOT/slurm.conf"
}

all_idle() {
    local count
    count=$(SLURM_CONF="$ROOT/slurm.conf" in_ns "$P-ctl" sinfo -h -N -p debug -o '%t' | grep -c '^idle$')
    (( count == $1 ))
}

host_pids() { ip netns pids "$P-${1#"$P"-}"; }

kill_host() {  # every process whose network namespace is the host's: slurmd, slurmstepd, the ranks
    local host=${1#"$P"-} pids deadline=$(( SECONDS + 15 ))
    while pids=$(host_pids "$host"); [[ -n $pids ]]; do  # again and again: one may be forking right now
        pids=$(ps -o pid= -o stat= -p $(echo $pids) | awk '$2 !~ /^Z/ {print $1}' || true)
        [[ -n $pids ]] || break  # only zombies left: dead, waiting for their parent to reap them
        kill -KILL $pids 2>/dev/null || true
        if (( SECONDS > deadline )); then
            die "processes of $host still alive after SIGKILL: $(ps -o pid=,stat=,args= -p $(echo $pids) | tr '\n' ';')"
        fi
        sleep 0.2
    done
}

set_cable() {  # set_cable HOST up|down: the bridge end of the host's cluster link
    ip -n "$P-br" link set "${1#"$P"-}-e" "$2"
}

down() {
    local name pid
    if [[ -f $ROOT/slurm.conf ]] && ns "$P-ctl" && [[ -S $ROOT/munge/munge.socket ]]; then
        SLURM_CONF="$ROOT/slurm.conf" timeout 10 nsenter --net="/run/netns/$P-ctl" scancel --full \
            --partition=debug,high >/dev/null 2>&1 || true
    fi
    for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
        for pid in $(ip netns pids "$name"); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    for pid in "$ROOT"/pids/*; do  # munged (root namespace), and anything that outlived its namespace
        [[ -f $pid ]] && kill -TERM "$(cat "$pid")" 2>/dev/null || true
    done
    for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
        ip netns del "$name"
    done
    if grep -q -- "$HOSTS_TAG\$" /etc/hosts; then
        local kept; kept=$(grep -v -- "$HOSTS_TAG\$" /etc/hosts)
        printf '%s\n' "$kept" > /etc/hosts   # in place: /etc/hosts may be a bind mount
    fi
    echo "netcluster: $P down"
}

cmd=${1:-}
shift || true
case $cmd in
    up) ROOT=$(realpath -m "${2:-/tmp/cityseg-netcluster}"); up "${1:-}" ;;
    down) ROOT=$(realpath -m "${1:-/tmp/cityseg-netcluster}"); down ;;
    run) ROOT=$(realpath -m "${1:?usage: netcluster.sh run ROOT CMD...}"); shift
         SLURM_CONF="$ROOT/slurm.conf" exec nsenter --net="/run/netns/$P-ctl" "$@" ;;
    kill-host) ROOT=$(realpath -m "${2:-/tmp/cityseg-netcluster}"); kill_host "${1:?host}" ;;
    cut-host) ROOT=$(realpath -m "${2:-/tmp/cityseg-netcluster}"); set_cable "${1:?host}" down ;;
    heal-host) ROOT=$(realpath -m "${2:-/tmp/cityseg-netcluster}"); set_cable "${1:?host}" up ;;
    start-slurmd) ROOT=$(realpath -m "${2:-/tmp/cityseg-netcluster}"); start_slurmd "${1:?host}" ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac

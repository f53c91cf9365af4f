#!/usr/bin/env bash
# A SLURM cluster on localhost for the tests and for trying `detrforge submit`: one node
# ("localhost"), or with `up --nodes N` (N <= 4) N nodes n1..nN, each its own slurmd on this host.
#
#   launch/slurm/cluster.sh install | up [--nodes N] | down | status | purge | env | mlflow-uri [DATABASE]
#
# Everything the cluster owns (configuration, spool, logs, pid files, the munge key and socket, a
# private MariaDB for accounting) lives under one folder: $DETRFORGE_SLURM_HOME, by default
# .cache/slurm in the repository. Daemons run in the background without systemd. Clients and jobs
# find the cluster through SLURM_CONF, which `up` prints and launch/slurm/env.sh exports.
# Every subcommand is idempotent; a daemon is trusted only when the PID in its pid file is alive,
# has the expected process name and names this cluster's folder in its command line or
# environment, so stale pid files left by an old machine state are harmless.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
SLURM_HOME=${DETRFORGE_SLURM_HOME:-$REPO_ROOT/.cache/slurm}
case $SLURM_HOME in /*) ;; *) SLURM_HOME=$PWD/$SLURM_HOME ;; esac
SLURM_HOME=${SLURM_HOME%/}
case $SLURM_HOME in *[[:space:]]*) echo "cluster.sh: error: DETRFORGE_SLURM_HOME='$SLURM_HOME' contains whitespace, which slurm.conf cannot hold; choose another folder" >&2; exit 1 ;; esac
# Four ports away from SLURM's defaults (6817-6819), so a system cluster is untouched, and derived
# from the folder, so two checkouts on one machine run two clusters side by side. Below 20000:
# submitit picks MASTER_PORT in 20000-60000.
PORT_BASE=${DETRFORGE_SLURM_PORT_BASE:-$((10000 + $(cksum <<<"$SLURM_HOME" | cut -d' ' -f1) % 2000 * 4))}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
MARIADB_PORT=$((PORT_BASE + 3))
CLUSTER_NAME=detrforge
ACCOUNT=detrforge
UP_TIMEOUT_S=${DETRFORGE_SLURM_UP_TIMEOUT_S:-90}
NODES=1
MAX_NODES=4

ETC=$SLURM_HOME/etc
RUN=$SLURM_HOME/run
LOG=$SLURM_HOME/log
MUNGE_DIR=$SLURM_HOME/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MARIADB_DIR=$SLURM_HOME/mariadb
MARIADB_SOCKET=$MARIADB_DIR/mariadbd.sock
MARKER=$SLURM_HOME/.detrforge-slurm-home
export SLURM_CONF=$ETC/slurm.conf
# Debian installs the daemons in /usr/sbin, which a non-login shell may not have on its PATH.
export PATH=$PATH:/usr/sbin:/sbin

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS_START_ORDER=(munged mariadbd slurmdbd slurmctld)

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes

pid_file() { echo "$RUN/$1.pid"; }

# Is PID alive, called NAME, and does it belong to this cluster's folder?
pid_is_ours() {
    local pid=$1 name=$2
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' \
        | grep -qF -- "$SLURM_HOME/"
}

# Prints the PID of our running daemon NAME (from its pid file) or fails. A slurmd's pid file is
# named after its node (slurmd-n1) when several run here; its process is still called slurmd.
daemon_pid() {
    local name=$1 file pid
    file=$(pid_file "$name")
    [[ -f $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    pid_is_ours "$pid" "${name%%-*}" && echo "$pid"
}

# The slurmd pid-file names this folder holds (slurmd, slurmd-n1, ...), running or not.
slurmd_names() {
    local file
    for file in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do
        [[ -e $file ]] && basename "$file" .pid
    done
    return 0
}

# The slurmd names of the configured nodes.
wanted_slurmds() {
    if ((NODES == 1)); then echo slurmd; else node_names | sed 's/^/slurmd-/'; fi
}

wait_gone() {  # PID SECONDS
    local pid=$1 deadline=$((SECONDS + $2))
    while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.2; done
    [[ ! -d /proc/$pid ]]
}

# Stops the named daemons together: TERM to each, then KILL to any still alive after 15 s.
stop_daemons() {
    local name pid pids=()
    for name in "$@"; do
        if pid=$(daemon_pid "$name"); then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$(pid_file "$name")"
    done
    for pid in "${pids[@]}"; do
        wait_gone "$pid" 15 || { log "pid $pid did not stop, killing it"; kill -KILL "$pid" 2>/dev/null || true; }
    done
}

# PIDs of this process and its ancestors: they may carry SLURM_CONF (a shell that sourced env.sh)
# and must never be swept.
own_lineage() {
    local pid=$$
    while [[ $pid -gt 1 ]]; do
        echo "$pid"
        pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 1)
    done
}

# Job processes (and step daemons) left behind after the daemons stopped: their environment names
# this cluster's SLURM_CONF and a job id, or they are a slurmstepd started by our slurmd.
sweep_job_processes() {
    local lineage pid env comm found=()
    lineage=" $(own_lineage | tr '\n' ' ') "
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ $lineage == *" $pid "* ]] && continue
        env=$(tr '\0' '\n' 2>/dev/null <"$dir/environ") || continue
        grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env" || continue
        comm=$(cat "$dir/comm" 2>/dev/null || true)
        if [[ $comm == slurmstepd ]] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then found+=("$pid"); fi
    done
    ((${#found[@]})) || return 0
    log "stopping ${#found[@]} leftover job process(es): ${found[*]}"
    kill -TERM "${found[@]}" 2>/dev/null || true
    sleep 2
    kill -KILL "${found[@]}" 2>/dev/null || true
}

# ---------------------------------------------------------------- install

is_installed() {
    local cmd
    for cmd in slurmctld slurmd slurmdbd sinfo sbatch munged mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null || return 1
    done
}

cmd_install() {
    if is_installed; then log "packages already installed"; return 0; fi
    [[ $(id -u) == 0 ]] || die "installing needs root: run 'apt-get install ${PACKAGES[*]}' as root, then rerun"
    local policy=/usr/sbin/policy-rc.d created_policy=0
    # Without it the packages' scripts try to start system-wide daemons, which we do not want.
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    local rc=0
    if ! apt-cache show slurmctld >/dev/null 2>&1; then apt-get update -qq || rc=$?; fi
    ((rc)) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" >/dev/null || rc=$?
    if ((created_policy)); then rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get failed (exit $rc) installing ${PACKAGES[*]}"
    is_installed || die "apt-get finished but the SLURM/munge/MariaDB commands are still missing"
    log "installed ${PACKAGES[*]}"
}

# ---------------------------------------------------------------- configuration

# shellcheck source=launch/slurm/conf.sh
source "$SCRIPT_DIR/conf.sh"

# Writes FILE from stdin; returns 0 when its content changed.
replace_if_changed() {
    local file=$1 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
    mv -f "$tmp" "$file"
}

any_daemon_running() {
    local name
    for name in "${DAEMONS_START_ORDER[@]}" $(slurmd_names); do daemon_pid "$name" >/dev/null && return 0; done
    return 1
}

prepare_folder() {
    if [[ -d $SLURM_HOME && ! -e $MARKER && -n $(ls -A "$SLURM_HOME") ]]; then
        die "$SLURM_HOME exists, is not empty and was not made by this script; set DETRFORGE_SLURM_HOME to another folder"
    fi
    mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE_DIR" "$MARIADB_DIR" "$SLURM_HOME/spool/slurmctld" "$SLURM_HOME/spool/slurmd"
    local node
    for node in $(node_names); do mkdir -p "$SLURM_HOME/spool/slurmd-$node"; done
    touch "$MARKER"
    # munged refuses folders that others may write to.
    chmod 755 "$SLURM_HOME" "$ETC" "$RUN" "$LOG" && chmod 700 "$MUNGE_DIR"
    local changed=0
    write_slurm_conf | replace_if_changed "$ETC/slurm.conf" && changed=1
    write_gres_conf | replace_if_changed "$ETC/gres.conf" && changed=1
    write_slurmdbd_conf | replace_if_changed "$ETC/slurmdbd.conf" && changed=1
    chmod 600 "$ETC/slurmdbd.conf"
    if ((changed)) && any_daemon_running; then
        log "configuration changed: restarting the daemons"
        stop_all_daemons
    fi
}

# ---------------------------------------------------------------- starting

start_munged() {
    [[ -f $MUNGE_DIR/munge.key ]] || {
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chmod 400 "$MUNGE_DIR/munge.key"
    }
    # --force: a socket left by a killed munged would otherwise block the start.
    munged --force --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$(pid_file munged)" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1
}

mariadb_sql() { mariadb --no-defaults --socket="$MARIADB_SOCKET" -u root -N -e "$1"; }

start_mariadbd() {
    local data=$MARIADB_DIR/data
    if [[ ! -d $data/mysql ]]; then
        rm -rf "$data"
        mariadb-install-db --no-defaults --datadir="$data" --user=root --skip-test-db \
            --auth-root-authentication-method=socket >>"$LOG/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
    fi
    setsid mariadbd --no-defaults --datadir="$data" --socket="$MARIADB_SOCKET" \
        --port="$MARIADB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --user=root \
        --pid-file="$(pid_file mariadbd)" --log-error="$LOG/mariadbd.log" \
        --innodb-buffer-pool-size=32M --max-connections=40 </dev/null >>"$LOG/mariadbd.log" 2>&1 &
    wait_for "MariaDB" 60 mariadb_sql "SELECT 1"
    mariadb_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'detrforge';
                 GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

# MLflow's backend store for runs on this cluster (a server, since SQLite's locking does not work
# on the shared file systems of real clusters): database `mlflow` for users, `mlflow_tests` for
# the test suite (which recreates it), both owned by user `mlflow`.
MLFLOW_DB_USER=mlflow
MLFLOW_DB_PASSWORD=detrforge
ensure_mlflow_database() {
    mariadb_sql "CREATE DATABASE IF NOT EXISTS mlflow CHARACTER SET utf8mb4;
                 CREATE USER IF NOT EXISTS '$MLFLOW_DB_USER'@'127.0.0.1' IDENTIFIED BY '$MLFLOW_DB_PASSWORD';
                 GRANT ALL ON mlflow.* TO '$MLFLOW_DB_USER'@'127.0.0.1';
                 GRANT ALL ON mlflow_tests.* TO '$MLFLOW_DB_USER'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

# The SQLAlchemy URI of a database in this cluster's MariaDB (needs the pymysql driver).
mlflow_uri() { echo "mysql+pymysql://$MLFLOW_DB_USER:$MLFLOW_DB_PASSWORD@127.0.0.1:$MARIADB_PORT/${1:-mlflow}"; }

start_slurmdbd() { slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1; wait_for "slurmdbd" 60 sacctmgr -n -P list cluster; }
start_slurmctld() { slurmctld -f "$SLURM_CONF" </dev/null >>"$LOG/slurmctld.log" 2>&1; }
start_slurmd() { slurmd -f "$SLURM_CONF" -N localhost </dev/null >>"$LOG/slurmd.log" 2>&1; }
# One of several slurmd on this host: `slurmd -N n2` serves node n2 on its own port.
start_node_slurmd() { slurmd -f "$SLURM_CONF" -N "$1" </dev/null >>"$LOG/slurmd-$1.log" 2>&1; }

wait_for() {  # WHAT SECONDS COMMAND...
    local what=$1 seconds=$2 deadline=$((SECONDS + $2))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${seconds}s; see the logs in $LOG"
        sleep 0.5
    done
}

ensure_daemon() {
    local name=$1 pid
    if pid=$(daemon_pid "$name"); then return 0; fi
    rm -f "$(pid_file "$name")"
    log "starting $name"
    case $name in slurmd-*) start_node_slurmd "${name#slurmd-}" ;; *) "start_$name" ;; esac
    wait_for "$name pid file" 30 daemon_pid "$name"
}

# The cluster and an account in slurmdbd, so sacct (which submitit relies on) knows every job.
register_accounting() {
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME" \
        || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" \
        || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER_NAME" description=tests organization=detrforge >/dev/null
    sacctmgr -n -P list association where user=root account="$ACCOUNT" format=user | grep -qx root \
        || sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER_NAME" >/dev/null
}

node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -n1; }

wait_node_ready() {
    local node=$1 deadline=$((SECONDS + UP_TIMEOUT_S)) state resumed=0
    while :; do
        state=$(node_state "$node" || true)
        case $state in idle | mixed | allocated | completing) return 0 ;; esac
        # A node remembered as down or drained from an old state: put it back in service.
        if [[ $state =~ ^(down|drain) ]] && ((!resumed)); then
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        ((SECONDS < deadline)) || die "node '$node' is '${state:-unknown}' after ${UP_TIMEOUT_S}s; see $LOG/slurmctld.log and $LOG/slurmd*.log"
        sleep 0.5
    done
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "the test cluster runs its daemons as root (SlurmUser=root), as CI containers do; run this as root"
    cmd_install
    prepare_folder
    local name
    for name in munged mariadbd slurmdbd; do ensure_daemon "$name"; done
    register_accounting
    ensure_mlflow_database
    local fresh_controller=0
    daemon_pid slurmctld >/dev/null || fresh_controller=1
    for name in slurmctld $(wanted_slurmds); do ensure_daemon "$name"; done
    for name in $(node_names); do wait_node_ready "$name"; done
    # A controller that starts again recovers (and requeues) the jobs of its last run, e.g. after
    # a crash or a reboot; on a test cluster they would only hold resources that tests wait for.
    if ((fresh_controller)); then cancel_jobs; fi
    log "cluster up: $(sinfo -h -N -o '%N %T' | sort -u | paste -sd, | sed 's/,/, /g')"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------- stopping

# slurmctld saves its state through slurmdbd, which writes to MariaDB; all of them need munge.
stop_all_daemons() {
    # shellcheck disable=SC2046
    stop_daemons $(slurmd_names) slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
}

cancel_jobs() {
    daemon_pid slurmctld >/dev/null || return 0
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ') || return 0
    [[ -n ${jobs// /} ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
}

cmd_down() {
    [[ -d $SLURM_HOME ]] || { log "nothing to stop: $SLURM_HOME does not exist"; return 0; }
    cancel_jobs
    stop_all_daemons
    sweep_job_processes
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MARIADB_SOCKET"
    log "cluster down"
}

cmd_status() {
    local name pid rc=0
    echo "SLURM_CONF=$SLURM_CONF"
    for name in "${DAEMONS_START_ORDER[@]}" $(slurmd_names); do
        if pid=$(daemon_pid "$name"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; rc=1; fi
    done
    [[ -n $(slurmd_names) ]] || { echo "slurmd: stopped"; rc=1; }
    if ((rc == 0)); then
        sinfo -N -o "%N %P %T %C %G" || rc=1
        squeue -o "%i %P %j %T %r" || rc=1
    fi
    return $rc
}

cmd_purge() {
    cmd_down
    if [[ -d $SLURM_HOME ]]; then
        [[ -e $MARKER ]] || die "$SLURM_HOME was not made by this script; not removing it"
        rm -rf -- "$SLURM_HOME"
        log "removed $SLURM_HOME"
    fi
}

main() {
    case ${1:-} in
    install) cmd_install ;;
    up)
        if [[ ${2:-} == --nodes ]]; then NODES=${3:-}; elif [[ ${2:-} == --nodes=* ]]; then NODES=${2#--nodes=}; fi
        [[ $NODES =~ ^[1-9][0-9]*$ ]] && ((NODES <= MAX_NODES)) || die "--nodes must be 1..$MAX_NODES, got '$NODES'"
        cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    purge) cmd_purge ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    mlflow-uri) mlflow_uri "${2:-mlflow}" ;;
    *) echo "usage: $0 install|up [--nodes N]|down|status|purge|env|mlflow-uri [DATABASE]   (state in \$DETRFORGE_SLURM_HOME, default .cache/slurm)" >&2; exit 2 ;;
    esac
}

main "$@"

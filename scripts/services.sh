#!/usr/bin/env bash
# Run RabbitMQ and PostgreSQL for development/tests from Debian's packages,
# listening on loopback only, with all state under <repo>/.services/.
#
#   scripts/services.sh start    # install if needed (root + apt), start, wait, print env
#   scripts/services.sh stop     # stop both (fine if not running)
#   scripts/services.sh status   # exit 0 only if both are up (every node, clustered)
#   scripts/services.sh env      # eval "$(scripts/services.sh env)"
#   scripts/services.sh rabbitmqctl ARGS...   # rabbitmqctl against node 1 (tests, ops);
#                                             # SYNC_RABBIT_NODE=K: against node K
#   scripts/services.sh stop-node K | start-node K   # one node of a cluster (faults)
#
# Ports can be overridden: SYNC_AMQP_PORT, SYNC_DIST_PORT, SYNC_EPMD_PORT,
# SYNC_MGMT_PORT, SYNC_PROM_PORT, SYNC_PG_PORT (and SYNC_RABBIT_NODENAME);
# SYNC_SERVICES_DIR moves the state out of <repo>/.services.
#
# SYNC_RABBIT_NODES=N (default 1) runs a RabbitMQ cluster of N nodes on this machine:
# node K is named after SYNC_RABBIT_NODENAME with K appended from the second on
# (sync@localhost, sync2@localhost, ...), listens on each base port + K-1 and keeps its
# state in .services/rabbitmq-cluster/nodeK; all share one epmd. Give the same N to
# every command. `env` then also prints SYNC_AMQP_URLS and SYNC_MANAGEMENT_URLS (every
# node's, comma-separated); SYNC_AMQP_URL and SYNC_MANAGEMENT_URL stay node 1's, since
# clients take one URL. See docs/cluster.md.
# Users with Docker can use `docker compose up` instead.
set -euo pipefail

# --- configuration -----------------------------------------------------------

# Resolve the repo root from this file, not the cwd, so it works from anywhere.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
SVC_DIR="${SYNC_SERVICES_DIR:-$ROOT/.services}"

AMQP_PORT="${SYNC_AMQP_PORT:-5673}"
DIST_PORT="${SYNC_DIST_PORT:-25673}"
EPMD_PORT="${SYNC_EPMD_PORT:-4370}"
MGMT_PORT="${SYNC_MGMT_PORT:-15673}"
PROM_PORT="${SYNC_PROM_PORT:-15693}"
PG_PORT="${SYNC_PG_PORT:-5433}"
NODENAME="${SYNC_RABBIT_NODENAME:-sync@localhost}"
NODES="${SYNC_RABBIT_NODES:-1}"

APP_USER=sync
APP_PASS=sync
APP_DB=sync
DATABASE_URL="postgresql://$APP_USER:$APP_PASS@127.0.0.1:$PG_PORT/$APP_DB"

# The /usr/sbin wrappers switch to the rabbitmq user; these run as the caller.
RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_START_TIMEOUT=60
EPMD="$(command -v epmd || echo /usr/lib/erlang/bin/epmd)"
NODE_ENV=()   # set by node_env
NODE_PID=()   # by node, set by rabbit_start

PG_DIR="$SVC_DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_RUN="$PG_DIR/run"
PG_LOG="$PG_DIR/log"
PG_SUPERUSER=postgres   # bootstrap superuser name, fixed so it does not depend on who ran initdb

log() { echo "services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
is_root() { [[ "$(id -u)" == 0 ]]; }

# --- packages ----------------------------------------------------------------

# Bin dir of the highest installed PostgreSQL major version (empty if none).
pg_bin_dir() {
    local d v best="" best_v=0
    for d in /usr/lib/postgresql/*/bin; do
        v="${d#/usr/lib/postgresql/}"; v="${v%/bin}"
        [[ "$v" =~ ^[0-9]+$ && -x "$d/initdb" && -x "$d/pg_ctl" ]] || continue
        if ((v > best_v)); then best="$d"; best_v="$v"; fi
    done
    echo "$best"
}

packages_present() {
    [[ -x "$RMQ_BIN/rabbitmq-server" && -x "$RMQ_BIN/rabbitmqctl" && -n "$(pg_bin_dir)" ]]
}

install_packages() {
    packages_present && return 0
    if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
        log "RabbitMQ and/or PostgreSQL are not installed."
        log "Install them (Debian/Ubuntu: sudo apt-get install -y rabbitmq-server postgresql),"
        log "or run as root on Debian/Ubuntu so this script can, or use: docker compose up"
        exit 1
    fi
    log "installing rabbitmq-server and postgresql with apt-get ..."
    # Keep the packages' postinst from starting system-wide instances: we run our own.
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e "$policy" ]]; then
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
    fi
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        rabbitmq-server postgresql; } >&2 || die "apt-get install failed"
    packages_present || die "packages installed but binaries not found under $RMQ_BIN or /usr/lib/postgresql/*/bin"
}

# --- RabbitMQ ----------------------------------------------------------------

# Node K (1..NODES): its name, ports and directory. One node keeps the layout it always
# had; a cluster lives apart, so neither finds the other's data (a node that was in a
# cluster waits for its peers at boot).
node_name() {
    if (($1 == 1)); then echo "$NODENAME"; else echo "${NODENAME%@*}$1@${NODENAME#*@}"; fi
}
node_dir() {
    if ((NODES == 1)); then echo "$SVC_DIR/rabbitmq"; else echo "$SVC_DIR/rabbitmq-cluster/node$1"; fi
}
amqp_url() { echo "amqp://$APP_USER:$APP_PASS@127.0.0.1:$((AMQP_PORT + $1 - 1))/"; }
mgmt_url() { echo "http://127.0.0.1:$((MGMT_PORT + $1 - 1))"; }
all_urls() {   # all_urls amqp_url|mgmt_url: every node's, comma-separated
    local k urls=()
    for ((k = 1; k <= NODES; k++)); do urls+=("$("$1" "$k")"); done
    (IFS=,; echo "${urls[*]}")
}

# Every rabbitmq-* call for node K gets the same env, so CLI tools find that node (same
# epmd port, same cookie in HOME) and never touch a system-wide instance.
node_env() {
    local k="$1" dir
    dir="$(node_dir "$k")"
    NODE_ENV=(
        HOME="$dir/home"
        RABBITMQ_NODENAME="$(node_name "$k")"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$((AMQP_PORT + k - 1))"
        RABBITMQ_DIST_PORT="$((DIST_PORT + k - 1))"
        ERL_EPMD_PORT="$EPMD_PORT"
        ERL_EPMD_ADDRESS=127.0.0.1
        RABBITMQ_MNESIA_BASE="$dir/mnesia"
        RABBITMQ_LOG_BASE="$dir/log"
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
        RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
        ERL_CRASH_DUMP="$dir/log/erl_crash.dump"   # not in the caller's cwd
        # Erlang distribution (node <-> node, node <-> CLI) on loopback only, too.
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    )
}

rmq() {   # rmq K TOOL ARGS...: a RabbitMQ CLI tool against node K
    local k="$1" tool="$2"
    shift 2
    node_env "$k"
    env "${NODE_ENV[@]}" "$RMQ_BIN/$tool" "$@"
}

# Is node K registered with our epmd? Quick, and unlike rabbitmqctl it does not spawn a
# stray epmd when nothing is running.
rabbit_registered() {
    local names name
    name="$(node_name "$1")"
    names="$("$EPMD" -port "$EPMD_PORT" -names 2>/dev/null)" || return 1
    [[ "$names" == *"name ${name%@*} at port"* ]]
}

# The process in node K's pid file is alive: the node of that name is ours, not one of
# another SYNC_RABBIT_NODES or SYNC_SERVICES_DIR.
rabbit_ours() {
    local pid
    pid="$(cat "$(node_dir "$1")/rabbitmq.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

rabbit_running() {
    rabbit_registered "$1" && rabbit_ours "$1" && rmq "$1" rabbitmqctl -q -t 5 await_startup >/dev/null 2>&1
}

rabbit_write_config() {
    local k="$1" dir cookie first
    dir="$(node_dir "$k")"
    mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
    # The Erlang cookie must exist, be private, and be stable across restarts; the nodes
    # of a cluster (and the CLI tools) share node 1's.
    cookie="$dir/home/.erlang.cookie"
    first="$(node_dir 1)/home/.erlang.cookie"
    if ((k > 1)); then
        [[ -s "$first" ]] || die "node 1 was never started here: run '$0 start' first"
        cp "$first" "$cookie"
    elif [[ ! -s "$cookie" ]]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cookie")
    fi
    chmod 600 "$cookie"
    : >"$dir/rabbitmq-env.conf"   # keep /etc/rabbitmq/rabbitmq-env.conf out of it
    # What `rabbitmq-plugins enable --offline` writes, without booting a VM for it.
    echo "[rabbitmq_consistent_hash_exchange,rabbitmq_management,rabbitmq_prometheus]." \
        >"$dir/enabled_plugins"
    cat >"$dir/rabbitmq.conf" <<CONF
# Generated by scripts/services.sh; rewritten on every start.
listeners.tcp.default = 127.0.0.1:$((AMQP_PORT + k - 1))
management.tcp.ip = 127.0.0.1
management.tcp.port = $((MGMT_PORT + k - 1))
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $((PROM_PORT + k - 1))

# Thousands of per-device queues: no per-object stats in management or prometheus.
management_agent.disable_metrics_collector = true
management.disable_stats = true
prometheus.return_per_object_metrics = false

# A fleet: every connected device holds a connection. With the kernel's socket buffers
# (they grow to tcp_wmem/tcp_rmem's maximum, 4 MiB here) a connection cost the broker
# about 4 MB; with 32 KiB about 0.2 MB (docs/operations.md, "Broker tuning for fleets").
# SYNC_RABBIT_TCP_BUFFER sets the size in bytes; set but empty, the kernel's are kept.
$(size="${SYNC_RABBIT_TCP_BUFFER-32768}"; [[ -z "$size" ]] \
    || printf 'tcp_listen_options.%s = %s\n' sndbuf "$size" recbuf "$size" buffer "$size")
# Setting any tcp_listen_options replaces RabbitMQ's defaults: these restate them, with
# room in the accept queue for a fleet reconnecting at once (the kernel caps it at somaxconn).
tcp_listen_options.backlog = 4096
tcp_listen_options.nodelay = true
tcp_listen_options.linger.on = true
tcp_listen_options.linger.timeout = 0
tcp_listen_options.exit_on_close = false
# Proposed to clients; aio-pika answers with its own (the URL's ?heartbeat=, 60 unless
# given), which the broker takes. A dead device's connection is closed after two missed
# heartbeats and stops counting against its account's max-connections.
heartbeat = 60
# Per connection; a device account is held to fewer by its user limits (set when the
# device is registered: broker/accounts.py DEVICE_LIMITS).
channel_max = 128

# Created on first boot only (fresh mnesia); ensure_rabbit_user covers the rest.
default_vhost = /
default_user = $APP_USER
default_pass = $APP_PASS
default_user_tags.administrator = true
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*

log.file.level = info
log.console = false
CONF
    if ((NODES > 1)); then
        # A blank node joins the first listed node it reaches; a clustered one ignores this.
        echo "cluster_formation.peer_discovery_backend = classic_config" >>"$dir/rabbitmq.conf"
        local i
        for ((i = 1; i <= NODES; i++)); do
            echo "cluster_formation.classic_config.nodes.$i = $(node_name "$i")" >>"$dir/rabbitmq.conf"
        done
    fi
}

# Start node K in the background; its pid goes to NODE_PID[K].
rabbit_launch() {
    local k="$1" dir
    dir="$(node_dir "$k")"
    rabbit_write_config "$k"
    rm -f "$dir/rabbitmq.pid"   # stale after a crash/kill; the node writes a fresh one
    log "starting rabbitmq ($(node_name "$k"), amqp 127.0.0.1:$((AMQP_PORT + k - 1))) ..."
    node_env "$k"
    # setsid+nohup: the node must outlive this script and its terminal.
    nohup setsid env "${NODE_ENV[@]}" "$RMQ_BIN/rabbitmq-server" \
        >>"$dir/log/startup.log" 2>&1 </dev/null &
    NODE_PID[k]=$!
}

# await_startup fails at once while the node is not yet registered with epmd,
# so retry it until it succeeds, the server process dies, or time runs out.
rabbit_wait_ready() {
    local k="$1" pid="${NODE_PID[$1]}" dir deadline=$((SECONDS + RMQ_START_TIMEOUT))
    dir="$(node_dir "$k")"
    until rmq "$k" rabbitmqctl -q -t 10 await_startup >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$dir/log/startup.log" >&2 || true
            die "rabbitmq-server $(node_name "$k") exited during startup; see $dir/log/"
        fi
        ((SECONDS < deadline)) || die "rabbitmq $(node_name "$k") not ready after ${RMQ_START_TIMEOUT}s; see $dir/log/"
        sleep 1
    done
}

# Nodes 1..NODES (or the ones given) up: the running ones are waited for, the others
# started. A new cluster forms around node 1, which boots alone first; the nodes of a
# known cluster boot together, as each waits for the peers it last saw running.
rabbit_start() {
    local k launch=() wait=()
    for k in "$@"; do
        if rabbit_registered "$k"; then
            rabbit_ours "$k" || die "another RabbitMQ node named $(node_name "$k") runs on epmd port $EPMD_PORT (another SYNC_RABBIT_NODES or SYNC_SERVICES_DIR?): stop it first"
            log "rabbitmq already running ($(node_name "$k"))"
            NODE_PID[k]="$(cat "$(node_dir "$k")/rabbitmq.pid")"
        else
            launch+=("$k")
        fi
        wait+=("$k")
    done
    if ((NODES > 1)) && [[ "${launch[0]:-}" == 1 && ! -d "$(node_dir 1)/mnesia/$NODENAME" ]]; then
        rabbit_launch 1
        rabbit_wait_ready 1
        launch=("${launch[@]:1}")
    fi
    for k in "${launch[@]}"; do rabbit_launch "$k"; done
    for k in "${wait[@]}"; do rabbit_wait_ready "$k"; done
}

# The nodes node K sees running in its cluster: "name1","name2",...
rabbit_cluster_members() {
    local status
    status="$(rmq "$1" rabbitmqctl -q cluster_status --formatter json 2>/dev/null)" || return 1
    status="${status#*\"running_nodes\":[}"
    echo "${status%%]*}"
}

# default_user only applies to a fresh node; repair an older data dir here (users are
# cluster-wide: once, on node 1).
ensure_rabbit_user() {
    rmq 1 rabbitmqctl -q authenticate_user "$APP_USER" "$APP_PASS" >/dev/null 2>&1 && return 0
    log "creating rabbitmq user $APP_USER"
    rmq 1 rabbitmqctl -q add_user "$APP_USER" "$APP_PASS" >/dev/null 2>&1 \
        || rmq 1 rabbitmqctl -q change_password "$APP_USER" "$APP_PASS" >/dev/null
    rmq 1 rabbitmqctl -q set_user_tags "$APP_USER" administrator >/dev/null
    rmq 1 rabbitmqctl -q set_permissions -p / "$APP_USER" '.*' '.*' '.*' >/dev/null
}

rabbit_stop() {   # rabbit_stop K
    local k="$1"
    if rabbit_registered "$k"; then   # also stops a node that is still booting or hung
        log "stopping rabbitmq ($(node_name "$k")) ..."
        rmq "$k" rabbitmqctl -q shutdown >/dev/null 2>&1 || rmq "$k" rabbitmqctl -q stop >/dev/null 2>&1 || true
    else
        log "rabbitmq not running ($(node_name "$k"))"
    fi
    rm -f "$(node_dir "$k")/rabbitmq.pid"
}

rabbit_stop_all() {
    local k pids=()
    for ((k = 1; k <= NODES; k++)); do
        rabbit_stop "$k" &
        pids+=($!)
    done
    wait "${pids[@]}"
    # Our private epmd (started by the nodes/CLI) would otherwise linger forever; it
    # stays while some node still uses it.
    if ! "$EPMD" -port "$EPMD_PORT" -names 2>/dev/null | grep -q '^name '; then
        "$EPMD" -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    fi
}

# --- PostgreSQL --------------------------------------------------------------

# initdb/pg_ctl refuse to run as root: use the postgres OS user then.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# psql as the bootstrap superuser over our private unix socket (trust auth).
pg_psql() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$PG_PORT" -U "$PG_SUPERUSER" "$@"
}

pg_running() {
    [[ -f "$PG_DATA/PG_VERSION" ]] || return 1
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 \
        && "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
}

# As root the data dir is owned by postgres, and CI clones under `mktemp -d`
# (0700, root): postgres must be able to traverse every ancestor directory.
pg_fix_permissions() {
    is_root || return 0
    # Top-down, so a blocked parent does not make its children look blocked too.
    local d="$SVC_DIR" ancestors=() i
    while [[ "$d" != / ]]; do
        d="$(dirname "$d")"
        ancestors=("$d" "${ancestors[@]}")
    done
    for i in "${ancestors[@]}"; do
        if ! runuser -u postgres -- test -x "$i"; then
            log "note: chmod o+x $i (so the postgres user can reach $PG_DATA)"
            chmod o+x "$i"
        fi
    done
    chmod 755 "$SVC_DIR"
    chown -R postgres: "$PG_DIR"
}

pg_init() {
    mkdir -p "$PG_DIR" "$PG_RUN" "$PG_LOG"
    pg_fix_permissions
    local sock="$PG_RUN/.s.PGSQL.$PG_PORT"
    ((${#sock} <= 100)) || die "socket path too long for PostgreSQL (${#sock} > 100): $sock; move the repo to a shorter path"
    if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
        log "initdb $PG_DATA ..."
        # local (socket) = trust for admin; TCP = password, like the docker image.
        as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=scram-sha-256 >"$PG_LOG/initdb.log" 2>&1 \
            || { cat "$PG_LOG/initdb.log" >&2; die "initdb failed"; }
        echo "include_if_exists = 'sync-services.conf'" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
    fi
    # Rewritten each start so port overrides take effect; quoting handles odd paths.
    as_pg tee "$PG_DATA/sync-services.conf" >/dev/null <<EOF
# Generated by scripts/services.sh; rewritten on every start.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '${PG_RUN//\'/\'\'}'
max_connections = 200
EOF
}

# A postmaster.pid left by a killed server can name a PID that now belongs to
# another process (or a not-yet-reaped zombie), which makes postgres refuse to
# start: drop it unless that PID is a live postgres process.
pg_clear_stale_pid() {
    local pidfile="$PG_DATA/postmaster.pid" pid stat
    [[ -f "$pidfile" ]] || return 0
    pid="$(head -n1 "$pidfile")"
    stat="$(cat "/proc/$pid/stat" 2>/dev/null || true)"   # "PID (comm) STATE ..."
    if [[ ! "$pid" =~ ^[0-9]+$ || "$stat" != *"(postgres) "[!Z]* ]]; then
        log "removing stale $pidfile (pid ${pid:-?})"
        rm -f "$pidfile"
    fi
}

pg_start() {
    if pg_running; then
        log "postgresql already running (127.0.0.1:$PG_PORT)"
    else
        pg_init
        pg_clear_stale_pid
        log "starting postgresql (127.0.0.1:$PG_PORT) ..."
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG/postgresql.log" -w -t 60 start >/dev/null \
            || { tail -n 30 "$PG_LOG/postgresql.log" >&2; die "postgresql failed to start"; }
    fi
    ensure_pg_db
}

ensure_pg_db() {
    pg_psql -d postgres <<EOF
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$APP_USER') THEN
    CREATE ROLE $APP_USER LOGIN SUPERUSER PASSWORD '$APP_PASS';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $APP_DB OWNER $APP_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$APP_DB') \gexec
EOF
}

pg_stop() {
    if [[ -f "$PG_DATA/PG_VERSION" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
        log "stopping postgresql ..."
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    else
        log "postgresql not running"
    fi
}

# --- commands ----------------------------------------------------------------

print_env() {
    echo "export SYNC_AMQP_URL=$(amqp_url 1)"
    echo "export SYNC_DATABASE_URL=$DATABASE_URL"
    # syncctl sends the operator's credentials here: it must be this node's, moved ports too.
    echo "export SYNC_MANAGEMENT_URL=$(mgmt_url 1)"
    if ((NODES > 1)); then
        echo "export SYNC_AMQP_URLS=$(all_urls amqp_url)"
        echo "export SYNC_MANAGEMENT_URLS=$(all_urls mgmt_url)"
    fi
}

cmd_start() {
    local t0=$SECONDS k
    install_packages
    PG_BIN="$(pg_bin_dir)"
    mkdir -p "$SVC_DIR"
    pg_start
    rabbit_start $(seq 1 "$NODES")
    ensure_rabbit_user
    if ((NODES > 1)); then
        rabbit_check_cluster
        # Classic device queues would all live on the node registration talks to;
        # spread them (quorum ones spread by their own x-queue-leader-locator).
        rmq 1 rabbitmqctl -q set_policy --apply-to queues device-queues '^device\.' \
            '{"queue-master-locator":"min-masters"}' >/dev/null
    fi
    log "ready in $((SECONDS - t0))s:"
    for ((k = 1; k <= NODES; k++)); do
        log "  amqp:       $(amqp_url "$k")"
        log "  management: $(mgmt_url "$k")/ ($APP_USER/$APP_PASS)"
        log "  prometheus: http://127.0.0.1:$((PROM_PORT + k - 1))/metrics"
    done
    log "  postgresql: $DATABASE_URL"
    print_env
}

# Every node is running, in node 1's cluster.
rabbit_check_cluster() {
    local members k
    members="$(rabbit_cluster_members 1)" || die "rabbitmq: cluster_status on $(node_name 1) failed"
    for ((k = 2; k <= NODES; k++)); do
        [[ "$members" == *"\"$(node_name "$k")\""* ]] \
            || die "rabbitmq: $(node_name "$k") is not in $(node_name 1)'s cluster (running: $members); see $(node_dir "$k")/log/"
    done
}

cmd_stop() {
    packages_present || { log "services not installed; nothing to stop"; return 0; }
    PG_BIN="$(pg_bin_dir)"
    rabbit_stop_all
    pg_stop
}

# One line per node: running (in the cluster, when there is one) or not.
rabbit_status() {
    if ((NODES == 1)); then
        if rabbit_running 1; then echo "rabbitmq:   running  $(amqp_url 1)"; return 0; fi
        echo "rabbitmq:   stopped"
        return 1
    fi
    local k ok=0 members=""
    for ((k = 1; k <= NODES; k++)); do
        if rabbit_running "$k"; then
            members="$(rabbit_cluster_members "$k")" || members=""
            break
        fi
    done
    for ((k = 1; k <= NODES; k++)); do
        if [[ "$members" == *"\"$(node_name "$k")\""* ]]; then
            echo "rabbitmq:   running  $(amqp_url "$k")  ($(node_name "$k"), clustered)"
        else
            echo "rabbitmq:   stopped  ($(node_name "$k"))"
            ok=1
        fi
    done
    return "$ok"
}

cmd_status() {
    local ok=0
    if packages_present; then
        PG_BIN="$(pg_bin_dir)"
        rabbit_status || ok=1
        if pg_running; then echo "postgresql: running  $DATABASE_URL"
        else echo "postgresql: stopped"; ok=1; fi
    else
        echo "rabbitmq/postgresql: not installed"; ok=1
    fi
    return "$ok"
}

# A fault for the tests, for real: PostgreSQL stopped and started again, data kept.
cmd_restart_postgresql() {
    PG_BIN="$(pg_bin_dir)"
    pg_stop
    pg_start
}

# Faults for the tests, for real: one node of the cluster stopped, and started again
# (it rejoins with its data).
node_arg() {
    [[ "${1:-}" =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= NODES)) \
        || die "node must be 1..$NODES (SYNC_RABBIT_NODES=$NODES), not '${1:-}'"
}

usage() {
    echo "usage: $0 {start|stop|status|env|restart-postgresql|stop-node K|start-node K|rabbitmqctl ARGS...}" >&2
    exit 2
}

main() {
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SYNC_RABBIT_NODES must be a number from 1, not '$NODES'"
    if [[ "${1:-}" == rabbitmqctl ]]; then
        shift
        local k="${SYNC_RABBIT_NODE:-1}"
        node_arg "$k"
        rmq "$k" rabbitmqctl "$@"
        return
    fi
    case "${1:-}" in
        stop-node | start-node)
            [[ $# -eq 2 ]] || usage
            node_arg "$2"
            if [[ "$1" == stop-node ]]; then rabbit_stop "$2"; else rabbit_start "$2"; fi
            return
            ;;
    esac
    [[ $# -eq 1 ]] || usage
    case "$1" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) print_env ;;
        restart-postgresql) cmd_restart_postgresql ;;
        *) usage ;;
    esac
}

main "$@"

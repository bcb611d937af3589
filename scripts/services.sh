#!/usr/bin/env bash
# Run RabbitMQ and PostgreSQL for development/tests from Debian's packages,
# listening on loopback only, with all state under <repo>/.services/.
#
#   scripts/services.sh start    # install if needed (root + apt), start, wait, print env
#   scripts/services.sh stop     # stop both (fine if not running)
#   scripts/services.sh status   # exit 0 only if both are up
#   scripts/services.sh env      # eval "$(scripts/services.sh env)"
#   scripts/services.sh rabbitmqctl ARGS...   # rabbitmqctl against our node (tests, ops)
#
# Ports can be overridden: SYNC_AMQP_PORT, SYNC_DIST_PORT, SYNC_EPMD_PORT,
# SYNC_MGMT_PORT, SYNC_PROM_PORT, SYNC_PG_PORT (and SYNC_RABBIT_NODENAME).
# Users with Docker can use `docker compose up` instead.
set -euo pipefail

# --- configuration -----------------------------------------------------------

# Resolve the repo root from this file, not the cwd, so it works from anywhere.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
SVC_DIR="$ROOT/.services"

AMQP_PORT="${SYNC_AMQP_PORT:-5673}"
DIST_PORT="${SYNC_DIST_PORT:-25673}"
EPMD_PORT="${SYNC_EPMD_PORT:-4370}"
MGMT_PORT="${SYNC_MGMT_PORT:-15673}"
PROM_PORT="${SYNC_PROM_PORT:-15693}"
PG_PORT="${SYNC_PG_PORT:-5433}"
NODENAME="${SYNC_RABBIT_NODENAME:-sync@localhost}"

APP_USER=sync
APP_PASS=sync
APP_DB=sync
AMQP_URL="amqp://$APP_USER:$APP_PASS@127.0.0.1:$AMQP_PORT/"
DATABASE_URL="postgresql://$APP_USER:$APP_PASS@127.0.0.1:$PG_PORT/$APP_DB"

RMQ_DIR="$SVC_DIR/rabbitmq"
# The /usr/sbin wrappers switch to the rabbitmq user; these run as the caller.
RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_START_TIMEOUT=60
EPMD="$(command -v epmd || echo /usr/lib/erlang/bin/epmd)"

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

# Every rabbitmq-* call gets the same env, so CLI tools find our node (same
# epmd port, same cookie in HOME) and never touch a system-wide instance.
RMQ_ENV=(
    HOME="$RMQ_DIR/home"
    RABBITMQ_NODENAME="$NODENAME"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$AMQP_PORT"
    RABBITMQ_DIST_PORT="$DIST_PORT"
    ERL_EPMD_PORT="$EPMD_PORT"
    ERL_EPMD_ADDRESS=127.0.0.1
    RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
    RABBITMQ_LOG_BASE="$RMQ_DIR/log"
    RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
    RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
    RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
    RABBITMQ_PID_FILE="$RMQ_DIR/rabbitmq.pid"
    ERL_CRASH_DUMP="$RMQ_DIR/log/erl_crash.dump"   # not in the caller's cwd
    # Erlang distribution (node <-> CLI) on loopback only, too.
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
)

rmq() {
    local tool="$1"; shift
    env "${RMQ_ENV[@]}" "$RMQ_BIN/$tool" "$@"
}

# Is our node registered with our epmd? Quick, and unlike rabbitmqctl it does
# not spawn a stray epmd when nothing is running.
rabbit_registered() {
    local names
    names="$("$EPMD" -port "$EPMD_PORT" -names 2>/dev/null)" || return 1
    [[ "$names" == *"name ${NODENAME%@*} at port"* ]]
}

rabbit_running() {
    rabbit_registered && rmq rabbitmqctl -q -t 5 await_startup >/dev/null 2>&1
}

rabbit_write_config() {
    mkdir -p "$RMQ_DIR/home" "$RMQ_DIR/mnesia" "$RMQ_DIR/log"
    # The Erlang cookie must exist, be private, and be stable across restarts.
    local cookie="$RMQ_DIR/home/.erlang.cookie"
    if [[ ! -s "$cookie" ]]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cookie")
    fi
    chmod 600 "$cookie"
    : >"$RMQ_DIR/rabbitmq-env.conf"   # keep /etc/rabbitmq/rabbitmq-env.conf out of it
    cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# Generated by scripts/services.sh; rewritten on every start.
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $PROM_PORT

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
EOF
}

rabbit_start() {
    if rabbit_running; then
        log "rabbitmq already running ($NODENAME)"
    else
        rabbit_write_config
        rmq rabbitmq-plugins -q enable --offline \
            rabbitmq_management rabbitmq_prometheus rabbitmq_consistent_hash_exchange >/dev/null
        rm -f "$RMQ_DIR/rabbitmq.pid"   # stale after a crash/kill; the node writes a fresh one
        log "starting rabbitmq ($NODENAME, amqp 127.0.0.1:$AMQP_PORT) ..."
        # setsid+nohup: the node must outlive this script and its terminal.
        nohup setsid env "${RMQ_ENV[@]}" "$RMQ_BIN/rabbitmq-server" \
            >>"$RMQ_DIR/log/startup.log" 2>&1 </dev/null &
        rabbit_wait_ready $!
    fi
    ensure_rabbit_user
}

# await_startup fails at once while the node is not yet registered with epmd,
# so retry it until it succeeds, the server process dies, or time runs out.
rabbit_wait_ready() {
    local pid="$1" deadline=$((SECONDS + RMQ_START_TIMEOUT))
    until rmq rabbitmqctl -q -t 10 await_startup >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$RMQ_DIR/log/startup.log" >&2 || true
            die "rabbitmq-server exited during startup; see $RMQ_DIR/log/"
        fi
        ((SECONDS < deadline)) || die "rabbitmq not ready after ${RMQ_START_TIMEOUT}s; see $RMQ_DIR/log/"
        sleep 1
    done
}

# default_user only applies to a fresh node; repair an older data dir here.
ensure_rabbit_user() {
    rmq rabbitmqctl -q authenticate_user "$APP_USER" "$APP_PASS" >/dev/null 2>&1 && return 0
    log "creating rabbitmq user $APP_USER"
    rmq rabbitmqctl -q add_user "$APP_USER" "$APP_PASS" >/dev/null 2>&1 \
        || rmq rabbitmqctl -q change_password "$APP_USER" "$APP_PASS" >/dev/null
    rmq rabbitmqctl -q set_user_tags "$APP_USER" administrator >/dev/null
    rmq rabbitmqctl -q set_permissions -p / "$APP_USER" '.*' '.*' '.*' >/dev/null
}

rabbit_stop() {
    if rabbit_registered; then   # also stops a node that is still booting or hung
        log "stopping rabbitmq ($NODENAME) ..."
        rmq rabbitmqctl -q shutdown >/dev/null 2>&1 || rmq rabbitmqctl -q stop >/dev/null 2>&1 || true
    else
        log "rabbitmq not running"
    fi
    rm -f "$RMQ_DIR/rabbitmq.pid"
    # Our private epmd (started by the node/CLI) would otherwise linger forever.
    "$EPMD" -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
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
    echo "export SYNC_AMQP_URL=$AMQP_URL"
    echo "export SYNC_DATABASE_URL=$DATABASE_URL"
    # syncctl sends the operator's credentials here: it must be this node's, moved ports too.
    echo "export SYNC_MANAGEMENT_URL=http://127.0.0.1:$MGMT_PORT"
}

cmd_start() {
    local t0=$SECONDS
    install_packages
    PG_BIN="$(pg_bin_dir)"
    mkdir -p "$SVC_DIR"
    pg_start
    rabbit_start
    log "ready in $((SECONDS - t0))s:"
    log "  amqp:       $AMQP_URL"
    log "  management: http://127.0.0.1:$MGMT_PORT/ ($APP_USER/$APP_PASS)"
    log "  prometheus: http://127.0.0.1:$PROM_PORT/metrics"
    log "  postgresql: $DATABASE_URL"
    print_env
}

cmd_stop() {
    packages_present || { log "services not installed; nothing to stop"; return 0; }
    PG_BIN="$(pg_bin_dir)"
    rabbit_stop
    pg_stop
}

cmd_status() {
    local ok=0
    if packages_present; then
        PG_BIN="$(pg_bin_dir)"
        if rabbit_running; then echo "rabbitmq:   running  $AMQP_URL"
        else echo "rabbitmq:   stopped"; ok=1; fi
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

usage() {
    echo "usage: $0 {start|stop|status|env|restart-postgresql|rabbitmqctl ARGS...}" >&2
    exit 2
}

main() {
    if [[ "${1:-}" == rabbitmqctl ]]; then
        shift
        rmq rabbitmqctl "$@"
        return
    fi
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

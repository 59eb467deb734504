# The operations centre for tests/e2e/fleet.sh: a three-node RabbitMQ cluster on this machine
# (Debian's rabbitmq-server, its MQTT plugin over TLS with client certificates, durable
# subscriptions on quorum queues), the hosts' users and permissions from deploy/fleet, and the
# login check (dom0-broker fleet login-check) bound in as RabbitMQ's HTTP authentication.
# Sourced; expects W (work dir), BIN (dom0-broker's directory), ROOT_DIR.

RMQ=/usr/lib/rabbitmq/bin
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Certificates: one CA; the nodes (127.0.0.1, localhost); one client certificate per host and operator.
make_certs() {
  local d=$W/pki; mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=fleet test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  local name
  for name in server "$@"; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$d/$name.ext"
    openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
      -extfile "$d/$name.ext" -out "$d/$name.pem" 2>/dev/null
  done
  chmod 644 "$d"/*.key
}

# node_env N: the environment of node N (its own dirs and ports; one shared cookie and epmd).
node_env() {
  local n=$1
  echo "RABBITMQ_NODENAME=rabbit$n@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
RABBITMQ_NODE_PORT=${AMQP[$n]} RABBITMQ_DIST_PORT=${DIST[$n]} \
RABBITMQ_MNESIA_BASE=$W/rabbit$n/mnesia RABBITMQ_LOG_BASE=$W/rabbit$n/log \
RABBITMQ_CONFIG_FILE=$W/rabbit$n/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$ROOT_DIR/deploy/fleet/enabled_plugins \
RABBITMQ_PID_FILE=$W/rabbit$n/pid RABBITMQ_ADVANCED_CONFIG_FILE=$W/rabbit$n/advanced.config \
HOME=$W/home ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD RABBITMQ_USE_LONGNAME=false"
}

ctl() { local n=$1; shift; env $(node_env "$n") "$RMQ/rabbitmqctl" -n "rabbit$n@localhost" "$@"; }

write_node_config() {
  local n=$1
  mkdir -p "$W/rabbit$n"/{mnesia,log}
  : > "$W/rabbit$n/advanced.config"; echo "[]." > "$W/rabbit$n/advanced.config"
  # The cluster's configuration (deploy/fleet/rabbitmq.conf) with this node's ports and files.
  sed -e "s|@AMQP_PORT@|${AMQP[$n]}|; s|@MQTTS_PORT@|${MQTTS[$n]}|; s|@PROMETHEUS_PORT@|${PROM[$n]}|" \
      -e "s|@PKI@|$W/pki|g; s|@LOGIN_CHECK@|127.0.0.1:$LOGIN_PORT|g" \
      "$ROOT_DIR/deploy/fleet/rabbitmq.conf" > "$W/rabbit$n/rabbitmq.conf"
}

start_node() {
  local n=$1
  env $(node_env "$n") "$RMQ/rabbitmq-server" > "$W/rabbit$n/stdout.log" 2>&1 &
  echo $! > "$W/rabbit$n/server.pid"
}

wait_node() { ctl "$1" wait "$W/rabbit$1/pid" --timeout 120 >/dev/null; }

# start_cluster: ports, configs, the login check, three nodes in parallel, nodes 2 and 3 joined to 1.
start_cluster() {
  mkdir -p "$W/home"; echo "fleet-e2e-cookie-$(date +%s%N)" > "$W/home/.erlang.cookie"; chmod 400 "$W/home/.erlang.cookie"
  EPMD=$(free_port); LOGIN_PORT=$(free_port)
  AMQP=(); DIST=(); MQTTS=(); PROM=()
  local n
  for n in 1 2 3; do AMQP[$n]=$(free_port); DIST[$n]=$(free_port); MQTTS[$n]=$(free_port); PROM[$n]=$(free_port); done
  for n in 1 2 3; do write_node_config "$n"; done
  "$BIN/dom0-broker" fleet login-check --listen "127.0.0.1:$LOGIN_PORT" --users "$W/fleet-users" \
    2> "$W/login-check.log" & LOGIN_PID=$!
  for n in 1 2 3; do start_node "$n"; done
  for n in 1 2 3; do wait_node "$n"; done
  for n in 2 3; do
    ctl "$n" stop_app >/dev/null
    ctl "$n" join_cluster rabbit1@localhost >/dev/null
    ctl "$n" start_app >/dev/null
  done
}

# restart_all: after a full stop, the nodes must start together (one alone waits for its peers' tables).
restart_all() { local n; for n in 1 2 3; do start_node "$n"; done; for n in 1 2 3; do wait_node "$n"; done; }

stop_node() { ctl "$1" stop >/dev/null 2>&1 || true; }
kill_node() { local pid; pid=$(cat "$W/rabbit$1/pid" 2>/dev/null) && kill -9 "$pid" 2>/dev/null || true; }

stop_cluster() {
  local n
  for n in 1 2 3; do stop_node "$n"; done
  kill "${LOGIN_PID:-}" 2>/dev/null || true
  env ERL_EPMD_PORT="${EPMD:-4369}" epmd -kill >/dev/null 2>&1 || true
}

# $W/bin/rabbitmqctl: rabbitmqctl on node N (default 1), for deploy/fleet/add-host.sh.
make_ctl_wrapper() {
  mkdir -p "$W/bin"
  printf '#!/bin/sh\nexec env %s %s/rabbitmqctl -n rabbit%s@localhost "$@"\n' "$(node_env "${1:-1}")" "$RMQ" "${1:-1}" > "$W/bin/rabbitmqctl"
  chmod +x "$W/bin/rabbitmqctl"
}

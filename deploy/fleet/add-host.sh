#!/bin/sh
# Adds a host (or an operator) to the operations centre. Run on one node of the cluster.
#
#   add-host.sh host  NAME USERS_FILE     # a Dom0: writes only fleet/NAME/out/..., reads only fleet/NAME/in/...
#   add-host.sh operator NAME USERS_FILE  # an operator: reads every host's tree, writes every host's in tree
#
# The password is read from standard input; its salted hash is appended to USERS_FILE (the file
# `dom0-broker fleet login-check --users` serves). RABBITMQCTL (default rabbitmqctl) runs the commands;
# DOM0_BROKER (default dom0-broker) hashes the password. RabbitMQ maps MQTT's `/` to `.` in topic
# permissions: names have no dots (the VM id grammar). docs/fleet.md: adding a host, step by step.
set -eu
kind=$1 name=$2 users=$3
ctl=${RABBITMQCTL:-rabbitmqctl}
case "$name" in *[!a-z0-9_-]*|"") echo "add-host.sh: $name: not a host id ([a-z0-9_-])" >&2; exit 64;; esac
password=$(head -n1)
[ -n "$password" ] || { echo "add-host.sh: no password on standard input" >&2; exit 64; }
# The internal user exists for its permissions; its internal password is never used (the login
# check authenticates), so it gets a random one.
$ctl add_user "$name" "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
# Its queues: mqtt-subscription-<client id>qos0|1, client ids fleet-NAME (a host) or fleet-NAME.<suffix> (an operator's tool).
q="^mqtt-subscription-fleet-$name(\\.[a-z0-9]+)?qos[01]\$"
$ctl set_permissions -p / "$name" "$q" "^(amq\\.topic|${q#^})" "^(amq\\.topic|${q#^})" >/dev/null
case "$kind" in
  host)     $ctl set_topic_permissions -p / "$name" amq.topic "^fleet\\.$name\\.out\\..*" "^fleet\\.$name\\.in\\..*" >/dev/null ;;
  operator) $ctl set_topic_permissions -p / "$name" amq.topic '^fleet\.[^.]+\.in\..*' '^fleet\..*' >/dev/null ;;
  *) echo "add-host.sh: kind must be host or operator" >&2; exit 64 ;;
esac
printf '%s\n' "$password" | ${DOM0_BROKER:-dom0-broker} fleet hash-password "$name" >> "$users"

#!/usr/bin/env bash
# The OpenRC services of deploy/alpine under real OpenRC: Debian's `openrc` package (the real
# openrc-run, rc-service and supervise-daemon) in a root of its own, run in a mount and PID
# namespace made here (no container engine, no mock). Root is needed (chroot, namespaces).
#
#   ./tests/e2e/openrc.sh        # builds the static binaries if needed; about a minute
#
# Shown: start, status, stop, restart; supervise-daemon respawning a SIGKILLed service;
# checkconfig refusing a bad config and a bad policy (start refused, one-line reason);
# `reload` applying a new policy; the guest agent's service starting and waiting for its channel.
# Every step prints `RESULT <step> ok|FAIL ...`; the script fails on the first FAIL or a missing one.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT_DIR=$PWD
[ "$(id -u)" = 0 ] || { echo "openrc.sh: needs root (chroot, namespaces)" >&2; exit 1; }

[ -x target/static/dom0-broker ] && [ -x target/static/domu-agent ] || ./scripts/build-static >/dev/null

# Debian's OpenRC, downloaded once (from the mirror apt is configured with) and kept.
CACHE=$ROOT_DIR/target/openrc-debs
mkdir -p "$CACHE"
if ! ls "$CACHE"/openrc_*.deb >/dev/null 2>&1; then
  (cd "$CACHE" && apt-get download openrc libeinfo1 librc1 >/dev/null 2>&1) || {
    apt-get update -qq && (cd "$CACHE" && apt-get download openrc libeinfo1 librc1 >/dev/null)
  }
fi
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || { echo "openrc.sh: busybox missing (apt-get install busybox-static)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/openrc-e2e.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
R=$WORK/root
mkdir -p "$R"/{bin,sbin,etc/init.d,etc/conf.d,etc/dom0-broker,etc/domu-agent,run,var/log,var/run,proc,tmp,dev,usr/bin}
for d in "$CACHE"/*.deb; do dpkg-deb -x "$d" "$R"; done
# OpenRC's own binaries are dynamic: their libraries (and the loader) from this machine.
for exe in "$R"/sbin/openrc-run "$R"/sbin/supervise-daemon "$R"/sbin/rc-service "$R"/lib/rc/bin/*; do
  LD_LIBRARY_PATH=$R/lib/x86_64-linux-gnu ldd "$exe" 2>/dev/null | grep -o '/[^ ]*' || true
done | sort -u | while read -r lib; do
  [ -e "$R$lib" ] || { mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"; }
done
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ -e "$R/bin/$applet" ] || [ -e "$R/sbin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
cp target/static/dom0-broker target/static/domu-agent "$R/usr/bin/"
cp deploy/alpine/dom0-broker.initd "$R/etc/init.d/dom0-broker"
cp deploy/alpine/domu-agent.initd "$R/etc/init.d/domu-agent"
cp deploy/alpine/dom0-broker.confd "$R/etc/conf.d/dom0-broker"
cp deploy/alpine/domu-agent.confd "$R/etc/conf.d/domu-agent"
cp deploy/alpine/policy.toml "$R/etc/dom0-broker/policy.toml"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$R/etc/dom0-broker/dom0-broker.toml" <<EOT
socket_dir = "/var/run"
listen = "127.0.0.1:$PORT"
policy = "/etc/dom0-broker/policy.toml"
EOT
cat > "$R/etc/domu-agent/domu-agent.toml" <<'EOT'
vm = "sys-usb"
device = "/dev/hvc-later"
keepalive_secs = 5
EOT
echo "127.0.0.1 localhost" > "$R/etc/hosts"
: > "$R/etc/insserv.conf"   # Debian's OpenRC reads it for LSB dependencies
mkdir -p "$R"/etc/runlevels/{sysinit,boot,default,nonetwork,shutdown} "$R"/usr/local/etc/{init.d,conf.d} "$R"/lib/rc/init.d
# What boot would have mounted (the services `need localmount`): nothing to do in this root.
cat > "$R/etc/init.d/localmount" <<'EOT'
#!/sbin/openrc-run
description="Local filesystems (already there in this root)"
start() { return 0; }
EOT
chmod +x "$R/etc/init.d/localmount"

# The scenario, run inside the root by OpenRC's tools.
cat > "$R/scenario.sh" <<'EOT'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# The state OpenRC keeps (what its init would have made at boot).
for d in daemons exclusive failed hotplugged inactive options scheduled started starting stopping tmp wasinactive; do
  mkdir -p /run/openrc/$d
done
echo default > /run/openrc/softlevel
result() { echo "RESULT $1 $2"; }
pid_of() { pidof dom0-broker | tr ' ' '\n' | head -n1; }
wait_for() { # wait_for SECONDS COMMAND...: until COMMAND succeeds
  n=$(( $1 * 10 )); shift
  while [ $n -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; n=$((n - 1)); done
  return 1
}
answering() { dom0-broker status --broker "mqtt://127.0.0.1:$PORT"; }

rc-service dom0-broker start && wait_for 10 answering && result start ok || result start FAIL
rc-service dom0-broker status | grep -q started && result status ok || result status FAIL
old=$(pid_of)
kill -9 "$old"
if wait_for 15 sh -c "p=\$(pidof dom0-broker) && [ -n \"\$p\" ] && [ \"\$p\" != \"$old\" ]" && wait_for 10 answering; then
  result respawn ok
else
  result respawn FAIL
fi
rc-service dom0-broker status | grep -q started && result status-after-respawn ok || result status-after-respawn FAIL
# reload: a new policy (vm-gui may read app/) is applied; a broken one is refused, the old stays.
sed -i 's/^roles = \["client"\]$/roles = ["client"]\nsubscribe = ["app\/#"]/' /etc/dom0-broker/policy.toml
rc-service dom0-broker reload && wait_for 10 grep -q "policy reloaded" /var/log/dom0-broker.log \
  && result reload ok || result reload FAIL
cp /etc/dom0-broker/policy.toml /tmp/policy.good
echo '[vm.vm-gui]' > /etc/dom0-broker/policy.toml
echo 'publish = ["a/#/b"]' >> /etc/dom0-broker/policy.toml
if rc-service dom0-broker reload >/tmp/reload.out 2>&1; then
  result reload-refused FAIL
else
  grep -q "wildcard" /tmp/reload.out && result reload-refused ok || result reload-refused FAIL
fi
cp /tmp/policy.good /etc/dom0-broker/policy.toml
rc-service dom0-broker restart && wait_for 10 answering && result restart ok || result restart FAIL
rc-service dom0-broker stop && ! pidof dom0-broker >/dev/null && result stop ok || result stop FAIL
# checkconfig refuses a bad config and a bad policy: the service does not start.
cp /etc/dom0-broker/dom0-broker.toml /tmp/config.good
echo 'listen = "0.0.0.0:1883"' > /etc/dom0-broker/dom0-broker.toml
if rc-service dom0-broker start >/tmp/start.out 2>&1; then result bad-config FAIL; else
  grep -q "not loopback" /tmp/start.out && ! pidof dom0-broker >/dev/null && result bad-config ok || result bad-config FAIL
fi
cp /tmp/config.good /etc/dom0-broker/dom0-broker.toml
echo '[vm.vm-gui]' > /etc/dom0-broker/policy.toml
echo 'publish = ["a/#/b"]' >> /etc/dom0-broker/policy.toml
if rc-service dom0-broker start >/tmp/start.out 2>&1; then result bad-policy FAIL; else
  grep -q "wildcard" /tmp/start.out && ! pidof dom0-broker >/dev/null && result bad-policy ok || result bad-policy FAIL
fi
cp /tmp/policy.good /etc/dom0-broker/policy.toml
# The guest's service: starts supervised and waits for its channel (absent here) without exiting.
rc-service domu-agent start && wait_for 10 grep -q "channel not available yet" /var/log/domu-agent.log \
  && rc-service domu-agent status | grep -q started && result agent-start ok || result agent-start FAIL
rc-service domu-agent stop && ! pidof domu-agent >/dev/null && result agent-stop ok || result agent-stop FAIL
echo "--- /var/log/dom0-broker.log"; tail -n 20 /var/log/dom0-broker.log
echo "--- start refusals"; cat /tmp/start.out
EOT
chmod +x "$R/scenario.sh"
sed -i "s/\$PORT/$PORT/g" "$R/scenario.sh"

out=$(timeout 300 unshare --mount --pid --fork --mount-proc="$R/proc" chroot "$R" /scenario.sh 2>&1) || true
echo "$out"
status=0
for step in start status respawn status-after-respawn reload reload-refused restart stop bad-config bad-policy agent-start agent-stop; do
  if ! grep -q "^RESULT $step ok" <<<"$out"; then
    echo "openrc.sh: step '$step' failed or did not run" >&2
    status=1
  fi
done
[ $status = 0 ] && echo "PASS: the services under real OpenRC (Debian's openrc $(dpkg-deb -f "$CACHE"/openrc_*.deb Version))"
exit $status

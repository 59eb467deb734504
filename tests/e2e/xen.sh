#!/usr/bin/env bash
# The whole scenario on real Xen 4.17 (Debian's hypervisor under QEMU/TCG): a PV Dom0 running
# dom0-broker (embedded broker) and two PV DomUs on their Xen channels, configured as deployed:
#   sys-usb  its agent serves a disk (a directory of the initramfs);
#   vm-gui   its agent, and an application using the agent's local endpoints (`domu-agent call`,
#            and a raw MQTT client on the agent's TCP endpoint).
# Each agent finds its channel by name (`channel = "msg"`, resolved through xenstore by the agent
# itself); the channels follow deploy/alpine/xl-channel.cfg, dummies first (the xl 4.17 bug).
# The binaries are the static ones (no libc in the guests).
#
# Driven inside Dom0; every check prints `RESULT <step> ok|FAIL ...` on the serial console, and a
# missing RESULT line fails with the step's name. Needs root, ~200 MB of Debian packages (cached in
# $CACHE between runs on a machine, checked), ~2 GB of disk, 3 GB of RAM.
#
#   ./tests/e2e/xen.sh                    # ~3 min with a warm cache (QEMU itself ~100 s)
#   BREAK=raw ./tests/e2e/xen.sh          # sys-usb's tty put back in cooked mode: must fail
#   BREAK=xl  ./tests/e2e/xen.sh          # no dummy channels (the xl workaround removed): must fail
# MIRROR=http://... overrides the Debian mirror taken from this machine's apt sources.
# XEN_CPU overrides QEMU's CPU model. The default hides SMAP/SMEP (Xen 4.17's PV Dom0 dies at once
# under TCG with them) and XSAVE/AVX: with them, about one run in two had processes in Dom0 crash at
# random (segfaults in glibc, bash, even init) — register state lost across context switches under
# QEMU 7.2's TCG; without them, no crash in the runs since.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${CACHE:-/var/cache/xen-msg-e2e}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xen-msg-xen.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
BREAK=${BREAK:-}
say() { echo "== [$(date +%T)] $*"; }
fail() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root"

# The Debian mirror: MIRROR, else the first one this machine's apt is configured with.
mirror_from_apt() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/{print $2; exit}' "$f" | grep -m1 . && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1=="deb" && $2 !~ /^\[/ {print $2; exit} $1=="deb" && $2 ~ /^\[/ {print $3; exit}' "$f" | grep -m1 . && return 0
  done
  return 1
}
MIRROR=${MIRROR:-$(mirror_from_apt)} || fail "no Debian mirror in the apt sources; give MIRROR=..."
MIRROR=${MIRROR%/}

miss=""
for p in qemu-system-x86 busybox-static cpio kmod file debootstrap e2fsprogs xz-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || miss="$miss $p"
done
if [ -n "$miss" ]; then say "apt-get install$miss"; apt-get update -q >/dev/null; apt-get install -y -q --no-install-recommends $miss >/dev/null; fi
mkdir -p "$CACHE"

# Debian's kernel (for Dom0 and the DomUs), cached as an extracted package.
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
KVER=${pkg#linux-image-}
KROOT=$CACHE/kernel-$KVER
if [ ! -f "$KROOT/.done" ] || [ ! -f "$KROOT/boot/vmlinuz-$KVER" ]; then
  say "kernel $KVER"
  rm -rf "$KROOT" "$CACHE/debs"; mkdir -p "$CACHE/debs" "$KROOT"
  (cd "$CACHE/debs" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$CACHE"/debs/"${pkg}"_*.deb "$KROOT"; depmod -b "$KROOT" "$KVER"; touch "$KROOT/.done"
fi

# The DomUs boot the kernel's ELF image (xl then has nothing to decompress: its XZ decoder failed
# one `xl create` in five under TCG with "unable to XZ decompress kernel"), extracted once, checked.
if ! file "$KROOT/vmlinux" 2>/dev/null | grep -q "ELF 64-bit"; then
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$KROOT/boot/vmlinuz-$KVER" | head -n1 | cut -d: -f1)
  [ -n "$off" ] || fail "no XZ payload in vmlinuz-$KVER"
  # xz stops at the end of the stream and complains about what follows it: the ELF is checked instead.
  tail -c +$((off + 1)) "$KROOT/boot/vmlinuz-$KVER" | xz -dcq > "$KROOT/vmlinux" 2>/dev/null || true
  file "$KROOT/vmlinux" | grep -q "ELF 64-bit" || fail "could not extract the ELF kernel from vmlinuz-$KVER"
fi

./scripts/build-static >/dev/null   # quick when up to date; never a stale binary
file target/static/domu-agent | grep -q "static" || fail "target/static/domu-agent is not static"

# The guests' initramfs (also stage 1 of Dom0: mount the ext4 root): busybox and the static agent.
STAGE=$WORK/stage
mkdir -p "$STAGE"/{bin,sbin,proc,sys,dev,tmp,run,etc,newroot,disks,lib/mods}
cp "$(command -v busybox)" "$STAGE/bin/busybox"
cp target/static/domu-agent "$STAGE/bin/domu-agent"
: > "$STAGE/lib/mods/order.dom0"
for m in virtio_pci virtio_blk ext4; do
  modprobe -d "$KROOT" -S "$KVER" --show-depends $m | awk '$1=="insmod"{print $2}' | while read -r f; do
    b=$(basename "$f"); cp -n "$f" "$STAGE/lib/mods/$b"; grep -qx "$b" "$STAGE/lib/mods/order.dom0" || echo "$b" >> "$STAGE/lib/mods/order.dom0"
  done
done
cat > "$STAGE/etc/domu-agent.toml" <<'EOF_CONF'
# As deploy/alpine/domu-agent.toml: the channel found by its name.
channel = "msg"
keepalive_secs = 5
local_socket = "/run/domu-agent.sock"
mqtt_socket = "/run/domu-agent/mqtt.sock"
legacy_socket = "/run/domu-agent/legacy.sock"
EOF_CONF
cat > "$STAGE/init" <<'EOF_INIT'
#!/bin/busybox sh
export PATH=/bin:/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp /newroot /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
role=$(sed -n 's/.*testrole=\([a-z0-9-]*\).*/\1/p' /proc/cmdline)
brk=$(sed -n 's/.*testbreak=\([a-z]*\).*/\1/p' /proc/cmdline)
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "GUEST $role $(up) $*" > /dev/console; }
ip link set lo up 2>/dev/null
case "$role" in
  dom0)
    while read -r m; do [ -n "$m" ] && insmod /lib/mods/$m 2>/dev/null; done < /lib/mods/order.dom0
    for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
    mount -t ext4 /dev/vda /newroot || exec sh
    mount -o move /dev /newroot/dev; umount /proc /sys
    exec switch_root /newroot /sbin/xen-test-init ;;
  sys-usb)
    mount -t tmpfs tmpfs /disks
    mkdir -p /disks/usb0/docs
    echo "report from a Xen DomU" > /disks/usb0/docs/report.txt
    # The echo channel: Dom0 times the platform's own round trip on it.
    ( while ! t=$(domu-agent channel echo 2>/dev/null); do sleep 0.5; done
      while ! stty -F "$t" raw -echo 2>/dev/null; do sleep 0.2; done
      say "echo channel on $t"; cat < "$t" > "$t" ) &
    RUST_LOG=info domu-agent run --config /etc/domu-agent.toml --vm sys-usb --disks /disks > /tmp/agent.log 2>&1 &
    if [ "$brk" = raw ]; then
      # Deliberately broken: once the agent holds its tty in raw mode, put it back in cooked mode.
      while ! grep -q "session up" /tmp/agent.log; do sleep 0.2; done
      stty -F "$(domu-agent channel msg)" sane; say "BREAK: tty put back in cooked mode"
    fi
    tail -f /tmp/agent.log > /dev/console ;;
  vm-gui)
    # An application that tries to be sys-usb first: the agent started with the other VM's name.
    RUST_LOG=info domu-agent run --config /etc/domu-agent.toml --vm sys-usb --local-socket /run/pose.sock \
      --mqtt-socket none --legacy-socket none > /tmp/pose.log 2>&1 &
    pose=$!
    for i in $(seq 600); do grep -q "refused the session" /tmp/pose.log && break; sleep 0.2; done
    say "pose-agent: $(grep -c 'refused the session' /tmp/pose.log) refusal(s) from Dom0"
    kill $pose; sleep 1
    RUST_LOG=info domu-agent run --config /etc/domu-agent.toml --vm vm-gui --mqtt-listen 127.0.0.1:1883 > /tmp/agent.log 2>&1 &
    for i in $(seq 1200); do grep -q "session up" /tmp/agent.log && break; sleep 0.2; done
    say "agent session up"
    call() { domu-agent call --timeout-ms 20000 "$@" > /tmp/call.out 2>&1; rc=$?
             tr '\n' ' ' < /tmp/call.out; [ $rc = 0 ] || echo "(exit $rc)"; }
    say "GUI-RESULT list_disks $(call list_disks)"
    say "GUI-RESULT list_files $(call list_files disk=usb0)"
    say "GUI-RESULT footprint $(call get_file_footprint disk=usb0 filepath=docs/report.txt)"
    echo "made in vm-gui" > /tmp/new.txt
    say "GUI-RESULT create_file $(call create_file disk=usb0 filepath=from-gui.txt data=@/tmp/new.txt)"
    # The same application, as a raw MQTT client on the agent's TCP endpoint, claims to be sys-usb
    # in a request's `sender` (CONNECT "app", PUBLISH QoS 0, DISCONNECT).
    { printf '\020\017\000\004MQTT\004\002\000\074\000\003app'
      printf '\060\106\000\037system/disks/list_disks/request{"sender":"sys-usb","request_id":"p"}'
      sleep 1; printf '\340\000'; } | nc 127.0.0.1 1883 > /dev/null 2>&1
    say "GUI-RESULT pose-sender sent"
    say "GUI-RESULT chain $(domu-agent call --repeat 50 --timeout-ms 20000 list_disks | grep 'round trip')"
    # A 4 MiB upload while the application keeps asking: its round trips during the upload beside
    # its idle ones. Twice: chunks of 64 KiB, then of 16 KiB (the default). A chunk crosses each
    # channel whole, so a small request may wait for the chunk in progress at each hop.
    dd if=/dev/urandom of=/tmp/up.bin bs=1024 count=4096 2> /dev/null
    say "GUI-RESULT idle $(domu-agent call --repeat 30 --timeout-ms 20000 list_disks | grep 'round trip')"
    for chunk in 65536 16384; do
      ( t0=$(up); domu-agent call --timeout-ms 60000 --chunk-bytes $chunk create_file disk=usb0 filepath=up-$chunk.bin data=@/tmp/up.bin > /tmp/up.out 2>&1
        echo "rc=$? secs=$(awk -v a="$t0" -v b="$(up)" 'BEGIN{printf "%.2f", b - a}')" >> /tmp/up.out ) &
      up=$!
      sleep 0.1   # the call has read its file and sent its first chunks
      say "GUI-RESULT during-$chunk $(domu-agent call --repeat 30 --timeout-ms 20000 list_disks | grep 'round trip')"
      kill -0 $up 2> /dev/null && still="still uploading" || still="upload over before the last"
      wait $up
      say "GUI-RESULT upload-$chunk $(tr '\n' ' ' < /tmp/up.out) ($still) sent $(sha256sum /tmp/up.bin | cut -c1-64) landed $(domu-agent call --json get_file_footprint disk=usb0 filepath=up-$chunk.bin | sed -n 's/.*"footprint":"\([0-9a-f]*\)".*/\1/p')"
    done
    while true; do
      if domu-agent call --timeout-ms 1000 list_disks > /dev/null 2>&1; then say "GUI-SERVED"; fi
      sleep 0.2
    done ;;
esac
EOF_INIT
chmod +x "$STAGE/init"
(cd "$STAGE" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.img"

# Dom0's root: debootstrap minbase + the Xen packages, cached (checked by its package list).
PKGS=xen-hypervisor-4.17-amd64,xen-utils-4.17,xen-utils-common,xenstore-utils,qemu-system-xen,kmod,procps,mosquitto-clients,iproute2,coreutils
R=$CACHE/dom0root
if [ ! -f "$R/.debootstrap-done" ] || [ "$(cat "$R/.debootstrap-done")" != "$PKGS $MIRROR" ]; then
  rm -rf "$R"; say "debootstrap bookworm minbase + xen packages from $MIRROR (a few minutes, once)"
  debootstrap --variant=minbase --include="$PKGS" bookworm "$R" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail "$CACHE/debootstrap.log"; fail debootstrap; }
  rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/usr/share/doc/* "$R"/usr/share/man/*
  echo "$PKGS $MIRROR" > "$R/.debootstrap-done"
fi
D=$WORK/dom0root
cp -a "$R" "$D"
rm -rf "$D"/lib/modules/*; mkdir -p "$D/lib/modules"; cp -a "$KROOT/lib/modules/$KVER" "$D/lib/modules/"
cp "$KROOT/vmlinux" "$D/root/vmlinux"; cp "$WORK/initrd.img" "$D/root/initrd.img"
cp target/static/dom0-broker "$D/usr/local/bin/dom0-broker"
cp deploy/alpine/policy.toml "$D/root/policy.toml"
grep -q '^XENCONSOLED_ARGS=' "$D/etc/default/xen" 2>/dev/null \
  || echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >> "$D/etc/default/xen"
# The guests' channels, as deploy/alpine/xl-channel.cfg says: dummies first (xl 4.17 drops the
# first channel), then `msg`; sys-usb also gets an `echo` channel for the probe.
for vm in sys-usb vm-gui; do
  if [ "$BREAK" = xl ]; then
    channels="\"name=msg, connection=socket, path=/var/run/$vm-msg.sock\""
  else
    channels="\"name=dummy0, connection=pty\", \"name=dummy1, connection=pty\", \"name=msg, connection=socket, path=/var/run/$vm-msg.sock\""
  fi
  [ $vm = sys-usb ] && channels="$channels, \"name=echo, connection=socket, path=/var/run/sys-usb-echo.sock\""
  brk=""; [ "$BREAK" = raw ] && [ $vm = sys-usb ] && brk=" testbreak=raw"
  cat > "$D/etc/xen/$vm.cfg" <<EOF_CFG
name = "$vm"
type = "pv"
kernel = "/root/vmlinux"
ramdisk = "/root/initrd.img"
extra = "console=hvc0 testrole=$vm quiet$brk"
memory = 256
vcpus = 1
on_poweroff = "destroy"
channel = [ $channels ]
EOF_CFG
done
cat > "$D/sbin/xen-test-init" <<'EOF_XINIT'
#!/bin/bash
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec > /dev/console 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[dom0 $(up)] $*"; }
result() { log "RESULT $*"; }
finish() { log "XEN-TEST-END rc=$1"; sync; sleep 1; echo o > /proc/sysrq-trigger; sleep 30; }
die() { result "$1 FAIL $2"; log "---- dom0-broker ----"; tail -n 30 /tmp/dom0*.log
        for g in sys-usb vm-gui; do log "---- $g console ----"; tail -n 25 /var/log/xen/console/guest-$g.log 2>/dev/null; done
        finish 1; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run; mkdir -p /run/lock /run/xen /run/xenstored
mount -t tmpfs tmpfs /tmp; mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
hostname dom0
ip link set lo up
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback; do modprobe $m 2>/dev/null; done
mount -t xenfs xenfs /proc/xen
mkdir -p /var/log/xen/console
/etc/init.d/xen start >/dev/null 2>&1; log "xen toolstack started"; T_XEN=$(up)
# waitfor FILE PATTERN SECONDS STEP: until PATTERN is in FILE, else the step fails.
waitfor() { for _ in $(seq $(($3 * 10))); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
            die "$4" "no '$2' in $1 within $3 s"; }
ms_since() { awk -v a="$1" -v b="$(up)" 'BEGIN{printf "%d", (b - a) * 1000}'; }
dom0-broker run --socket-dir /var/run --listen 127.0.0.1:1883 --policy /root/policy.toml 2> /tmp/dom0.log &
BROKER=$!
waitfor /tmp/dom0.log "watching for channel sockets" 60 broker-start
stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 -v -t system/supervision/links/notification -t system/disk/new_file/notification > /tmp/notes.txt 2>&1 &
for vm in sys-usb vm-gui; do
  xl create /etc/xen/$vm.cfg > /tmp/xl-$vm.log 2>&1 || { cat /tmp/xl-$vm.log; die create-$vm "xl create failed"; }
done
log "DomUs created"; T_CREATED=$(up)
# Each guest's channels as xl wrote them in xenstore (device/console/N/name): `msg` must be there.
for vm in sys-usb vm-gui; do
  dom=$(xl domid $vm); names=""
  for n in $(xenstore-list /local/domain/$dom/device/console 2>/dev/null); do
    names="$names $(xenstore-read /local/domain/$dom/device/console/$n/name 2>/dev/null)"
  done
  case " $names " in
    *" msg "*) ;;
    *) die channels-$vm "no channel named msg in $vm's xenstore (channels:${names:- none}): xl 4.17 dropped the first channel= entry, the dummy channels of deploy/alpine/xl-channel.cfg are missing" ;;
  esac
done
result channels ok "both guests have their msg channel in xenstore"
GUI=/var/log/xen/console/guest-vm-gui.log
waitfor /tmp/dom0.log "link{vm=sys-usb}: session up" 300 session-sys-usb
waitfor /tmp/dom0.log "link{vm=vm-gui}: CONNECT with another VM's client id refused" 300 pose-client-id
result pose-client-id ok "vm-gui's agent claiming sys-usb's name got CONNACK 'identifier rejected'"
waitfor /tmp/dom0.log "link{vm=vm-gui}: session up" 300 session-vm-gui
for vm in sys-usb vm-gui; do
  waitfor /tmp/notes.txt "\"vm\":\"$vm\",\"state\":\"session_up\"" 30 linked-$vm
done
result linked ok "mosquitto_sub on Dom0 sees both VMs' sessions up"
result boot ok "Dom0's toolstack up at ${T_XEN} s (Dom0 uptime), DomUs created at ${T_CREATED} s, both sessions up at $(up) s"
waitfor "$GUI" "GUI-RESULT list_disks" 120 list_disks
grep "GUI-RESULT list_disks" "$GUI" | grep -q usb0 && result list_disks ok || die list_disks "$(grep 'GUI-RESULT list_disks' "$GUI")"
waitfor "$GUI" "GUI-RESULT list_files" 60 list_files
grep "GUI-RESULT list_files" "$GUI" | grep -q "docs/report.txt" && result list_files ok || die list_files "$(grep 'GUI-RESULT list_files' "$GUI")"
want=$(echo "report from a Xen DomU" | sha256sum | cut -d' ' -f1)
waitfor "$GUI" "GUI-RESULT footprint" 60 footprint
grep "GUI-RESULT footprint" "$GUI" | grep -q "$want" && result footprint ok "equals sha256sum: $want" || die footprint "$(grep 'GUI-RESULT footprint' "$GUI")"
waitfor "$GUI" "GUI-RESULT create_file" 60 create_file
grep "GUI-RESULT create_file" "$GUI" | grep -q " ok" && result create_file ok || die create_file "$(grep 'GUI-RESULT create_file' "$GUI")"
waitfor /tmp/notes.txt '"filepath":"from-gui.txt"' 60 new_file
result new_file ok "announced on system/disk/new_file/notification"
waitfor /tmp/dom0.log 'link{vm=vm-gui}: refused topic="system/disks/list_disks/request" reason=sender check failed: sender is "sys-usb"' 60 pose-sender
result pose-sender ok "a request from vm-gui with sender sys-usb refused"
# The platform's own round trip (the echo channel), then the chain's (measured in vm-gui).
sleep 1
rc=0; /usr/local/bin/dom0-broker probe-channel /var/run/sys-usb-echo.sock --count 100 > /tmp/probe.txt 2>&1 || rc=$?
probe=$(cat /tmp/probe.txt)
[ $rc = 0 ] || die channel-rtt "rc=$rc $probe $(ls -l /var/run/*.sock 2>&1 | tr '\n' ' ')"
ch=$(sed -n 's/.*p50 \([0-9.]*\) us.*/\1/p' /tmp/probe.txt)
result channel-rtt ok "$probe"
waitfor "$GUI" "GUI-RESULT chain" 300 chain-rtt
chain=$(grep "GUI-RESULT chain" "$GUI" | sed -n 's/.*p50 \([0-9.]*\) us.*/\1/p' | head -n1)
[ -n "$chain" ] || die chain-rtt "$(grep 'GUI-RESULT chain' "$GUI")"
ratio=$(awk -v c="$chain" -v x="$ch" 'BEGIN{printf "%.2f", c / (2 * x)}')
met=$(awk -v r="$ratio" 'BEGIN{print (r <= 1.10) ? "met" : "NOT met"}')
# A figure, not a verdict: the step passes when the chain answers; the ratio is reported.
result chain-rtt ok "vm-gui -> sys-usb -> vm-gui p50 $chain us = $ratio x two channel round trips p50 $ch us (target <= 1.10: $met)"
# A 4 MiB upload from vm-gui while its application keeps asking, twice (chunks of 64 KiB, then
# 16 KiB, the default): landed whole; the application's p99 during each upload beside its idle p99, and the
# upload's time (figures: TCG's timing is not the machine's).
waitfor "$GUI" "GUI-RESULT upload-16384" 600 upload
idle99=$(grep -a "GUI-RESULT idle" "$GUI" | sed -n 's/.*p99 \([0-9.]*\) us.*/\1/p' | head -n1)
figures=""
for chunk in 65536 16384; do
  upl=$(grep -a "GUI-RESULT upload-$chunk" "$GUI" | head -n1)
  echo "$upl" | grep -q "rc=0" || die upload "$upl"
  sent=$(echo "$upl" | sed -n 's/.* sent \([0-9a-f]*\).*/\1/p')
  got=$(echo "$upl" | sed -n 's/.* landed \([0-9a-f]*\).*/\1/p')
  [ -n "$sent" ] && [ "$sent" = "$got" ] || die upload "chunks of $chunk: footprint sent $sent, on sys-usb's disk $got"
  busy99=$(grep -a "GUI-RESULT during-$chunk" "$GUI" | sed -n 's/.*p99 \([0-9.]*\) us.*/\1/p' | head -n1)
  secs=$(echo "$upl" | sed -n 's/.* secs=\([0-9.]*\).*/\1/p')
  figures="$figures; chunks of $((chunk / 1024)) KiB: p99 $busy99 us during the upload ($(awk -v b="$busy99" -v i="$idle99" 'BEGIN{ if (i > 0) printf "%.2f", b / i; else print "?" }') x idle), the upload $secs s ($(awk -v s="$secs" 'BEGIN{ if (s > 0) printf "%.2f", 4.194304 / s; else print "?" }') MB/s of file data)"
done
result upload ok "4 MiB uploaded twice from vm-gui, same sha256 on sys-usb's disk; the application's p99 idle $idle99 us$figures"
# dom0-broker restarted: vm-gui served again within 2 x keepalive (10 s).
waitfor "$GUI" "GUI-SERVED" 60 served-before-restart
kill -TERM $BROKER; wait $BROKER || true
t0=$(up); served_before=$(grep -c GUI-SERVED "$GUI")
dom0-broker run --socket-dir /var/run --listen 127.0.0.1:1883 --policy /root/policy.toml 2> /tmp/dom0b.log &
waitfor /tmp/dom0b.log "link{vm=vm-gui}: session up" 30 restart-session
t_session=$(ms_since "$t0")
for _ in $(seq 300); do [ "$(grep -c GUI-SERVED "$GUI")" -gt "$served_before" ] && break; sleep 0.1; done
t_served=$(ms_since "$t0")
[ "$(grep -c GUI-SERVED "$GUI")" -gt "$served_before" ] || die restart "vm-gui not served again within 30 s"
[ "$t_served" -le 10000 ] && verdict=ok || verdict=FAIL
result restart $verdict "vm-gui's session back ${t_session} ms and a request answered ${t_served} ms after dom0-broker restarted (limit 2 x keepalive = 10000 ms)"
[ $verdict = ok ] || die restart "too slow"
ERR=$(grep -c -E " (ERROR|WARN) " /tmp/dom0b.log || true)
log "dom0-broker (second run) WARN/ERROR lines: $ERR"
result PASS ok
xl destroy vm-gui 2>/dev/null; xl destroy sys-usb 2>/dev/null
finish 0
EOF_XINIT
chmod +x "$D/sbin/xen-test-init" "$D/usr/local/bin/dom0-broker"
XENGZ=$(ls "$D"/boot/xen-4.17-amd64.gz); zcat "$XENGZ" > "$WORK/xen-4.17-amd64"
mke2fs -q -F -t ext4 -L dom0root -d "$D" "$WORK/dom0.ext4" 2G
say "booting Xen, Dom0 and two DomUs under QEMU (TCG)${BREAK:+, broken: $BREAK}"
t0=$(date +%s)
timeout "${BOOT_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu "${XEN_CPU:-max,-smap,-smep,-xsave,-avx,-avx2}" -m 3G -smp 2 -display none -no-reboot -nic none \
  -kernel "$WORK/xen-4.17-amd64" \
  -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2" \
  -initrd "$KROOT/boot/vmlinuz-$KVER root=/dev/vda console=hvc0 testrole=dom0,$WORK/initrd.img" \
  -drive file="$WORK/dom0.ext4",if=virtio,format=raw \
  -chardev file,id=ser,path="$WORK/serial.log" -serial chardev:ser > "$WORK/qemu.err" 2>&1 || true
say "QEMU ran $(( $(date +%s) - t0 )) s"
grep -a -E 'RESULT|XEN-TEST-END|BREAK|GUEST .* (pose|echo)' "$WORK/serial.log" | cut -c1-300 || true
cp "$WORK/serial.log" "${XEN_SERIAL_LOG:-$ROOT/target/xen-serial.log}" 2>/dev/null || true
status=0
for step in channels linked boot pose-client-id list_disks list_files footprint create_file new_file pose-sender channel-rtt chain-rtt upload restart PASS; do
  if ! grep -a -q "RESULT $step ok" "$WORK/serial.log"; then
    echo "xen.sh: step '$step' failed or did not run" >&2; status=1; break
  fi
done
if [ $status != 0 ]; then
  fails=$(grep -a "RESULT .* FAIL" "$WORK/serial.log" | head -n1 | cut -c1-300)
  [ -n "$fails" ] && echo "xen.sh: $fails" >&2
  if grep -a -q "Primary console has invalid configuration" "$WORK/serial.log"; then
    echo "xen.sh: xl rejected the first channel (the xl 4.17 bug): the dummy channels are missing" >&2
  fi
  if grep -a -q -E "segfault at|Segmentation fault|line [0-9]+: +[0-9]+ Aborted|Kernel panic" "$WORK/serial.log"; then
    echo "xen.sh: processes crashed under emulation (segfault/abort in the serial log): the TCG platform, not a verdict on the code; see XEN_CPU" >&2
  fi
  if grep -a -q "BREAK: tty put back in cooked mode" "$WORK/serial.log"; then
    echo "xen.sh: sys-usb's channel tty was not raw: its MQTT bytes were mangled by the line discipline" >&2
  fi
  say "FAIL (serial log: ${XEN_SERIAL_LOG:-$ROOT/target/xen-serial.log})"
  exit 1
fi
say "PASS"

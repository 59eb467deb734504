#!/bin/bash
# End-to-end on real Xen: QEMU (TCG) boots Xen 4.17 (Debian's hypervisor), a Debian PV Dom0 running
# dom0-broker, and a PV DomU (busybox initramfs) running domu-agent on its Xen channel tty. Dom0's
# mosquitto_pub/sub then ask the DomU's agent the disk commands through the real channel, and
# dom0-broker is restarted under it. Adapted from ../shared/testbed/xen-testbed.sh.
#
# Needs root, ~200 MB of Debian packages (debootstrap), ~1.5 GB of disk, 3 GB of RAM; takes a few
# minutes. Not part of CI. Result lines (RESULT ...) are read from the serial console.
#   WORK=/tmp/xen-msg-xen  ./tests/e2e/xen-agent.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-${TMPDIR:-/tmp}/xen-msg-xen}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
say() { echo "== [$(date +%T)] $*"; }
fail() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root"
miss=""
for p in qemu-system-x86 busybox-static cpio kmod file debootstrap e2fsprogs; do dpkg -s "$p" >/dev/null 2>&1 || miss="$miss $p"; done
if [ -n "$miss" ]; then say "apt-get install$miss"; apt-get update -q >/dev/null; apt-get install -y -q --no-install-recommends $miss >/dev/null; fi
mkdir -p "$WORK"

KROOT=$WORK/kernel
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
KVER=${pkg#linux-image-}
if [ ! -f "$KROOT/boot/vmlinuz-$KVER" ]; then
  mkdir -p "$WORK/debs"; (cd "$WORK/debs" && apt-get download -q "$pkg" >/dev/null)
  rm -rf "$KROOT"; mkdir -p "$KROOT"; dpkg-deb -x "$WORK"/debs/"${pkg}"_*.deb "$KROOT"; depmod -b "$KROOT" "$KVER"
fi
cargo build -j2 --release -p dom0-broker -p domu-agent --bin dom0-broker --bin domu-agent >/dev/null

# One initramfs for both: stage 1 of Dom0 (mount the ext4 root) and the DomU (the agent).
STAGE=$(mktemp -d "$WORK/stage.XXXX")
mkdir -p "$STAGE"/{bin,sbin,proc,sys,dev,tmp,newroot,disks,lib/mods}
cp /bin/busybox "$STAGE/bin/busybox"
cp target/release/domu-agent "$STAGE/bin/domu-agent"
for lib in $(ldd target/release/domu-agent | grep -o '/[^ ]*'); do mkdir -p "$STAGE$(dirname "$lib")"; cp -L "$lib" "$STAGE$lib"; done
: > "$STAGE/lib/mods/order.dom0"
for m in virtio_pci virtio_blk ext4; do
  modprobe -d "$KROOT" -S "$KVER" --show-depends $m | awk '$1=="insmod"{print $2}' | while read -r f; do
    b=$(basename "$f"); cp -n "$f" "$STAGE/lib/mods/$b"; grep -qx "$b" "$STAGE/lib/mods/order.dom0" || echo "$b" >> "$STAGE/lib/mods/order.dom0"
  done
done
cat > "$STAGE/init" <<'EOF_INIT'
#!/bin/busybox sh
export PATH=/bin:/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
role=$(sed -n 's/.*testrole=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
case "$role" in
  dom0)
    while read -r m; do [ -n "$m" ] && insmod /lib/mods/$m 2>/dev/null; done < /lib/mods/order.dom0
    for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
    mount -t ext4 /dev/vda /newroot || exec sh
    mount -o move /dev /newroot/dev; umount /proc /sys
    exec switch_root /newroot /sbin/xen-test-init ;;
  domu)
    mount -t tmpfs tmpfs /disks
    mkdir -p /disks/usb0/docs
    echo "report from a Xen DomU" > /disks/usb0/docs/report.txt
    echo "[domu] starting domu-agent on /dev/hvc1" > /dev/console
    # /dev/hvc1 exists from boot; opening it fails (ENODEV) until Dom0's backend connects: the
    # agent waits and retries by itself.
    RUST_LOG=info /bin/domu-agent run --vm vm-sys-usb --device /dev/hvc1 --disks /disks --keepalive 2 > /dev/console 2>&1
    poweroff -f ;;
esac
EOF_INIT
chmod +x "$STAGE/init"
(cd "$STAGE" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.img"
rm -rf "$STAGE"

R=$WORK/dom0root
if [ ! -f "$R/.debootstrap-done" ]; then
  rm -rf "$R"; say "debootstrap bookworm minbase + xen packages (a few minutes)"
  debootstrap --variant=minbase \
    --include=xen-hypervisor-4.17-amd64,xen-utils-4.17,xen-utils-common,xenstore-utils,qemu-system-xen,kmod,procps,mosquitto-clients,iproute2 \
    bookworm "$R" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || { tail "$WORK/debootstrap.log"; fail debootstrap; }
  rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/usr/share/doc/* "$R"/usr/share/man/*
  touch "$R/.debootstrap-done"
fi
rm -rf "$R"/lib/modules/*; mkdir -p "$R/lib/modules"; cp -a "$KROOT/lib/modules/$KVER" "$R/lib/modules/"
cp "$KROOT/boot/vmlinuz-$KVER" "$R/root/vmlinuz"; cp "$WORK/initrd.img" "$R/root/initrd.img"
cp target/release/dom0-broker "$R/usr/local/bin/dom0-broker"
cat > "$R/root/policy.toml" <<'EOF_POLICY'
[vm."*"]
roles = ["agent"]
[vm.vm-sys-usb]
roles = ["disk-provider"]
EOF_POLICY
# xl 4.17 (Debian) rejects the first channel: a dummy first (its socket name is not *-msg.sock).
cat > "$R/etc/xen/domu1.cfg" <<'EOF_CFG'
name = "domu1"
type = "pv"
kernel = "/root/vmlinuz"
ramdisk = "/root/initrd.img"
extra = "console=hvc0 testrole=domu quiet"
memory = 256
vcpus = 1
on_poweroff = "destroy"
channel = [ "connection=socket, path=/var/run/vm-dummy.sock, name=dummy", "connection=socket, path=/var/run/vm-sys-usb-msg.sock, name=msg" ]
EOF_CFG
cat > "$R/sbin/xen-test-init" <<'EOF_XINIT'
#!/bin/bash
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec > /dev/console 2>&1
log() { echo "[dom0 $(cut -d' ' -f1 /proc/uptime)] $*"; }
finish() { log "XEN-TEST-END rc=$1"; sync; sleep 1; echo o > /proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run; mkdir -p /run/lock /run/xen /run/xenstored
mount -t tmpfs tmpfs /tmp; mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
hostname dom0
# minbase brings no interface up; the broker listens on loopback.
ip link set lo up
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback; do modprobe $m 2>/dev/null; done
mount -t xenfs xenfs /proc/xen
mkdir -p /var/log/xen/console
/etc/init.d/xen start >/dev/null 2>&1; log "xen toolstack started"
waitfor() { for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; log "RESULT FAIL no '$2' in $1"; tail -20 "$1"; finish 1; }
# dom0-broker first: the DomU's socket appears later (inotify picks it up).
dom0-broker run --socket-dir /var/run --listen 127.0.0.1:1883 --policy /root/policy.toml 2> /tmp/dom0.log &
BROKER=$!
waitfor /tmp/dom0.log "watching for channel sockets" 30
xl create /etc/xen/domu1.cfg > /tmp/xl.log 2>&1 || { cat /tmp/xl.log; finish 1; }
log "DomU created"
waitfor /tmp/dom0.log "session up vm=vm-sys-usb" 180
log "RESULT the DomU's agent has a session through the real Xen channel"
stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 -d -v -t 'system/+/+/response/dom0' > /tmp/sub.txt 2>&1 &
SUB=$!
waitfor /tmp/sub.txt "received SUBACK" 20
mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -t system/disks/list_disks/request -m '{"sender":"dom0","request_id":"x1"}'
waitfor /tmp/sub.txt '"request_id":"x1"' 60
grep x1 /tmp/sub.txt | grep -q '"id":"usb0"' && log "RESULT list_disks answered by the DomU: $(grep x1 /tmp/sub.txt)"
want=$(echo "report from a Xen DomU" | sha256sum | cut -d' ' -f1)
mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -t system/disks/get_file_footprint/request -m '{"sender":"dom0","request_id":"x2","disk":"usb0","filepath":"docs/report.txt"}'
waitfor /tmp/sub.txt '"request_id":"x2"' 60
grep x2 /tmp/sub.txt | grep -q "$want" && log "RESULT footprint equals sha256sum" || { log "RESULT FAIL footprint"; finish 1; }
log "restarting dom0-broker"
kill -TERM $BROKER; wait $BROKER
kill $SUB 2>/dev/null
dom0-broker run --socket-dir /var/run --listen 127.0.0.1:1883 --policy /root/policy.toml 2> /tmp/dom0b.log &
waitfor /tmp/dom0b.log "session up vm=vm-sys-usb" 60
stdbuf -oL mosquitto_sub -h 127.0.0.1 -p 1883 -d -v -t 'system/+/+/response/dom0' > /tmp/sub2.txt 2>&1 &
waitfor /tmp/sub2.txt "received SUBACK" 20
mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -t system/disks/list_disks/request -m '{"sender":"dom0","request_id":"x3"}'
waitfor /tmp/sub2.txt '"request_id":"x3"' 60
log "RESULT answered again after the restart"
log "---- dom0-broker (second run) ----"; grep -E "attached|session" /tmp/dom0b.log | head
log "---- DomU console ----"; cat /var/log/xen/console/guest-domu1.log 2>/dev/null | tail -20
log "RESULT PASS"
xl destroy domu1 2>/dev/null
finish 0
EOF_XINIT
chmod +x "$R/sbin/xen-test-init" "$R/usr/local/bin/dom0-broker"
# stdbuf comes from coreutils (in minbase).
XENGZ=$(ls "$R"/boot/xen-4.17-amd64.gz); zcat "$XENGZ" > "$WORK/xen-4.17-amd64"
mke2fs -q -F -t ext4 -L dom0root -d "$R" "$WORK/dom0.ext4" 2G
rm -f "$WORK/serial.log"
say "booting Xen, Dom0 and the DomU under QEMU (TCG)"
timeout "${BOOT_TIMEOUT:-900}" qemu-system-x86_64 -accel tcg -cpu max,-smap,-smep -m 3G -smp 2 -display none -no-reboot -nic none \
  -kernel "$WORK/xen-4.17-amd64" \
  -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2" \
  -initrd "$KROOT/boot/vmlinuz-$KVER root=/dev/vda console=hvc0 testrole=dom0,$WORK/initrd.img" \
  -drive file="$WORK/dom0.ext4",if=virtio,format=raw \
  -chardev file,id=ser,path="$WORK/serial.log" -serial chardev:ser > "$WORK/qemu.err" 2>&1 || true
grep -a -E 'RESULT|XEN-TEST-END' "$WORK/serial.log" | cut -c1-240
grep -q 'RESULT PASS' "$WORK/serial.log" && { say "PASS"; exit 0; } || { say "FAIL (full log: $WORK/serial.log)"; exit 1; }

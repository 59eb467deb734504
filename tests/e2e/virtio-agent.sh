#!/bin/bash
# End-to-end on a real guest kernel: QEMU boots Debian's kernel with a busybox initramfs that runs
# domu-agent on a real hvc tty (a virtconsole port, served by QEMU's chardev socket server — the
# same code that serves Xen channels); dom0-broker runs on the host and bridges that socket.
# Dom0-side mosquitto_pub/sub then ask the guest's agent the disk commands, and dom0-broker is
# restarted under it. Adapted from ../shared/testbed/virtio-testbed.sh (QEMU under TCG here).
#
# Needs root (installs qemu-system-x86 busybox-static cpio kmod file mosquitto-clients and
# downloads Debian's kernel package). Not part of ./scripts/test (it takes a minute and ~200 MB).
#   WORK=/tmp/xen-msg-e2e  ./tests/e2e/virtio-agent.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-${TMPDIR:-/tmp}/xen-msg-e2e}
say() { echo "== [$(date +%T)] $*"; }
fail() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root"

miss=""
for p in qemu-system-x86 busybox-static cpio kmod file mosquitto-clients; do dpkg -s "$p" >/dev/null 2>&1 || miss="$miss $p"; done
if [ -n "$miss" ]; then say "apt-get install$miss"; apt-get update -q >/dev/null; apt-get install -y -q --no-install-recommends $miss >/dev/null; fi

mkdir -p "$WORK"
KROOT=$WORK/kernel
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$pkg" ] || { apt-get update -q >/dev/null; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
KVER=${pkg#linux-image-}
if [ ! -f "$KROOT/boot/vmlinuz-$KVER" ]; then
  mkdir -p "$WORK/debs"; (cd "$WORK/debs" && apt-get download -q "$pkg" >/dev/null)
  rm -rf "$KROOT"; mkdir -p "$KROOT"; dpkg-deb -x "$WORK"/debs/"${pkg}"_*.deb "$KROOT"
  depmod -b "$KROOT" "$KVER"
fi
say "kernel $KVER"

cargo build -j2 --release -p dom0-broker -p domu-agent --bin dom0-broker --bin domu-agent >/dev/null
AGENT=$ROOT/target/release/domu-agent
DOM0=$ROOT/target/release/dom0-broker

# The initramfs: busybox, the virtio modules, domu-agent and the libraries it links.
STAGE=$(mktemp -d "$WORK/stage.XXXX")
mkdir -p "$STAGE"/{bin,sbin,proc,sys,dev,tmp,disks,lib/mods}
cp /bin/busybox "$STAGE/bin/busybox"
file "$STAGE/bin/busybox" | grep -q 'statically linked' || fail "busybox is not static"
cp "$AGENT" "$STAGE/bin/domu-agent"
for lib in $(ldd "$AGENT" | grep -o '/[^ ]*'); do mkdir -p "$STAGE$(dirname "$lib")"; cp -L "$lib" "$STAGE$lib"; done
: > "$STAGE/lib/mods/order"
for m in virtio_pci virtio_console; do
  modprobe -d "$KROOT" -S "$KVER" --show-depends $m | awk '$1=="insmod"{print $2}' | while read -r f; do
    b=$(basename "$f"); cp -n "$f" "$STAGE/lib/mods/$b"; grep -qx "$b" "$STAGE/lib/mods/order" || echo "$b" >> "$STAGE/lib/mods/order"
  done
done
cat > "$STAGE/init" <<'EOF_INIT'
#!/bin/busybox sh
export PATH=/bin:/sbin
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
while read -r m; do [ -n "$m" ] && insmod /lib/mods/$m 2>/dev/null; done < /lib/mods/order
mount -t tmpfs tmpfs /disks
mkdir -p /disks/usb0/docs /disks/usb1
echo "report from a real guest" > /disks/usb0/docs/report.txt
echo "[init] starting domu-agent" > /dev/console
# The agent opens /dev/hvc0 itself (retrying until the port exists), raw mode, exclusive.
RUST_LOG=info /bin/domu-agent run --vm vm-e2e --device /dev/hvc0 --disks /disks --keepalive 2 > /dev/console 2>&1
echo "[init] agent exited" > /dev/console
poweroff -f
EOF_INIT
chmod +x "$STAGE/init"
(cd "$STAGE" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.img"
rm -rf "$STAGE"

SOCKS=$WORK/sockets; rm -rf "$SOCKS"; mkdir -p "$SOCKS"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/policy.toml" <<'EOF_POLICY'
[vm."*"]
roles = ["agent"]
[vm.vm-e2e]
roles = ["disk-provider"]
EOF_POLICY
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

rm -f "$WORK/serial.log" "$WORK/dom0.log" "$WORK/sub.txt"
say "booting the guest (QEMU, TCG)"
qemu-system-x86_64 -accel tcg -cpu max -m 512 -smp 1 -display none -no-reboot -nic none \
  -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.img" \
  -append "console=ttyS0 panic=-1 quiet" \
  -chardev file,id=ser,path="$WORK/serial.log" -serial chardev:ser \
  -device virtio-serial -device virtconsole,chardev=msg,name=msg \
  -chardev socket,id=msg,path="$SOCKS/vm-e2e-msg.sock",server=on,wait=off > "$WORK/qemu.err" 2>&1 &
pids+=($!)
start_dom0() {
  "$DOM0" run --socket-dir "$SOCKS" --listen "127.0.0.1:$PORT" --policy "$WORK/policy.toml" 2>> "$WORK/dom0.log" &
  DOM0PID=$!; pids+=($DOM0PID)
}
start_dom0
wait_grep() { # file pattern seconds
  for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  say "--- $1"; tail -30 "$1" || true; fail "no '$2' in $1 within $3 s"
}
wait_grep "$WORK/serial.log" "session up" 180
say "the guest's agent has a session through dom0-broker"

sub_out=$WORK/sub.txt; : > "$sub_out"
subscribe() { # a Dom0 subscriber; returns once it has its SUBACK
  stdbuf -oL mosquitto_sub -p "$PORT" -d -v -t 'system/+/+/response/dom0' >> "$sub_out" 2>&1 &
  SUBPID=$!; pids+=($SUBPID)
  wait_grep "$sub_out" "received SUBACK" 10
}
subscribe
ask() { mosquitto_pub -p "$PORT" -q 1 -t "$1/request" -m "$2"; }
ask system/disks/list_disks '{"sender":"dom0","request_id":"e1"}'
wait_grep "$sub_out" '"request_id":"e1"' 30
grep '"e1"' "$sub_out" | grep -q '"id":"usb0"' || fail "list_disks: $(grep e1 "$sub_out")"
ask system/disks/get_file_footprint '{"sender":"dom0","request_id":"e2","disk":"usb0","filepath":"docs/report.txt"}'
wait_grep "$sub_out" '"request_id":"e2"' 30
want=$(echo "report from a real guest" | sha256sum | cut -d' ' -f1)
grep '"e2"' "$sub_out" | grep -q "$want" || fail "footprint: $(grep e2 "$sub_out")"
ask system/disks/create_file '{"sender":"dom0","request_id":"e3","disk":"usb1","filepath":"a/b.txt","data":"aGVsbG8K"}'
wait_grep "$sub_out" '"request_id":"e3"' 30
ask system/disks/get_file_footprint '{"sender":"dom0","request_id":"e4","disk":"usb0","filepath":"../../etc/passwd"}'
wait_grep "$sub_out" '"request_id":"e4"' 30
grep '"e4"' "$sub_out" | grep -q '"forbidden"' || fail "traversal: $(grep e4 "$sub_out")"
say "list_disks, get_file_footprint, create_file, traversal refused: answered by the real guest"

say "restarting dom0-broker under the running guest"
kill -TERM "$DOM0PID"; wait "$DOM0PID" || true
start_dom0
wait_grep "$WORK/serial.log" "Dom0 asked to start over" 60
wait_grep "$WORK/dom0.log" "watching for channel sockets" 10
# The embedded broker restarted with dom0-broker: the operator's subscriber connects again.
kill "$SUBPID" 2>/dev/null || true; : > "$sub_out"
subscribe
ask system/disks/list_disks '{"sender":"dom0","request_id":"e5"}'
wait_grep "$sub_out" '"request_id":"e5"' 60
say "after the restart the guest answered again without restarting its agent"
grep -c "agent starting" "$WORK/serial.log" | grep -qx 1 || fail "the agent restarted"
say "PASS"

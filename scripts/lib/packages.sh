# Sourced by scripts/test, scripts/bench and scripts/reliability: the Debian packages the system
# tests and benchmarks drive (mosquitto, mosquitto_pub/sub, socat). Missing ones are installed
# when run as root with apt-get (from the machine's own apt sources); otherwise it stops with the
# install line. Uses `phase` when the caller defines it.
need=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v socat >/dev/null || need+=(socat)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if declare -F phase >/dev/null; then phase "installing ${need[*]}"; else echo "installing ${need[*]}" >&2; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "$(basename "$0") needs Debian packages; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi

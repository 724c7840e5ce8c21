#!/usr/bin/env bash
# Start this machine's stage of a multi-machine pipeline (run it on every machine).
#
#   launch/node.sh --nnodes 2 --node-rank 0 --master-addr 192.168.50.1 --iface en5 -- \
#       generate --model ~/models/deepseek-67b --prompt "Hello" --chat
#
# --nnodes N         number of machines (one pipeline stage each)
# --node-rank R      this machine's rank, 0 on the master (which also prints the output)
# --master-addr IP   numeric IPv4 address of machine 0 on the fast link (not a hostname)
# --master-port P    TCP port on machine 0 (default 29500; open it in the firewall)
# --iface IF         the network interface of the fast link on THIS machine (e.g. en5, bridge0)
# --threads T        intra-op threads (default: all cores of this machine)
# Everything after -- is passed to `python -m torch_pp` (generate, doctor, ...).
# TORCH_PP_PYTHON picks the Python (default: the repo's .venv if present, else python3).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "launch/node.sh: $*" >&2; exit 2; }

NNODES="" NODE_RANK="" MASTER_ADDR="" MASTER_PORT=29500 IFACE="" THREADS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --master-addr) MASTER_ADDR=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    --iface) IFACE=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -n "$NNODES" ] && [ -n "$NODE_RANK" ] && [ -n "$MASTER_ADDR" ] || die "--nnodes, --node-rank and --master-addr are required"
[ $# -gt 0 ] || die "give the torch_pp command after --, e.g. -- generate --prompt Hello"
[[ "$NNODES" =~ ^[0-9]+$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || die "--nnodes and --node-rank must be numbers"
[ "$NODE_RANK" -lt "$NNODES" ] || die "--node-rank $NODE_RANK must be below --nnodes $NNODES"
if ! [[ "$MASTER_ADDR" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  die "--master-addr must be machine 0's numeric IPv4 address on the fast link, not '$MASTER_ADDR': hostnames (.local above all) can resolve to Wi-Fi or IPv6 and the ranks never meet"
fi
if [ "$NNODES" -gt 1 ]; then
  [ -n "$IFACE" ] || die "--iface is required with several machines: Gloo may otherwise advertise 127.0.0.1 and the other machine hangs"
  case "$IFACE" in lo|lo0) die "--iface $IFACE is the loopback interface; with several machines give the interface of the link between them (e.g. en5, or bridge0 for Thunderbolt)";; esac
fi
if [ -n "$IFACE" ]; then
  if [ -d /sys/class/net ]; then
    [ -e "/sys/class/net/$IFACE" ] || die "no network interface '$IFACE' here; interfaces: $(ls /sys/class/net | tr '\n' ' ')"
  elif command -v ifconfig >/dev/null; then
    ifconfig "$IFACE" >/dev/null 2>&1 || die "no network interface '$IFACE' here; see: networksetup -listallhardwareports"
  fi
  export GLOO_SOCKET_IFNAME=$IFACE
fi
if [ -z "$THREADS" ]; then
  THREADS=$(getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)
fi
export OMP_NUM_THREADS=$THREADS
PY=${TORCH_PP_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 1 \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m torch_pp "$@"

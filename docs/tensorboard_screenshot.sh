#!/usr/bin/env bash
# Screenshot of TensorBoard's Scalars dashboard for a run or sweep directory (used for README's picture).
#   docs/tensorboard_screenshot.sh outputs/multirun/<date>/<time> docs/tensorboard.png
# Needs Debian's chromium. The legacy Scalars view draws SVG, which headless Chromium renders without a GPU.
set -euo pipefail
logdir=$1 out=$2 port=${PORT:-6123}
python -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -s "http://127.0.0.1:$port/data/runs" | grep -q tensorboard && break; sleep 1; done
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
  --window-size=1400,900 --virtual-time-budget=30000 --screenshot="$out" \
  "http://127.0.0.1:$port/?darkMode=false#scalars&tagFilter=%5E(train%2Floss%7Cval%2F)&_smoothingWeight=0"

#!/usr/bin/env bash
# `flora bench serve` on an earlier commit and on this tree, in ABBA order, each with every
# serving process's CPU time accounted (scripts/process_cpu.py): the before/after of a change to
# the serving path, side by side on one machine. Logs and CSVs go to $OUT.
#
#   scripts/serve_ab.sh b94b0a5 docs/benchmarks/logs/serve-ab
set -euo pipefail
BEFORE=${1:?usage: scripts/serve_ab.sh REV OUT}
OUT=$(realpath -m "${2:?usage: scripts/serve_ab.sh REV OUT}")
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
OLD=$(mktemp -d /tmp/flora-before-XXXX)
git -C "$HERE" worktree add -q --detach "$OLD" "$BEFORE"
trap 'stop; git -C "$HERE" worktree remove --force "$OLD"' EXIT
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0 FLORA_ADMIN_KEY=${FLORA_ADMIN_KEY:-flr_admin_bench}

stop() { pkill -INT -f "serve run" || true; sleep 8; pkill -9 -f "ray::" || true; }

run() {  # tag tree
  local tag=$1 tree=$2
  stop
  export FLORA_DATA_DIR=$(mktemp -d) PYTHONPATH=$tree/platform:$tree
  (cd "$tree" && nohup "$HERE/.venv/bin/serve" run deployments/starcoder.yaml > "$OUT/$tag-serve.log" 2>&1 &)
  for _ in $(seq 1 60); do
    sleep 3
    curl -s -o /dev/null -w "%{http_code}" localhost:8000/readyz | grep -q 200 && break
  done
  (cd "$tree" && $PY "$HERE/scripts/process_cpu.py" $PY -m flora.cli bench serve \
      --config deployments/starcoder.yaml --out "$OUT" --name "$tag") > "$OUT/$tag.log" 2>&1
  grep -E "^\| (HTTP|engine)|×|Ingress|Proxy" "$OUT/$tag.log" | sed "s/^/$tag /"
}
run before-1 "$OLD"
run after-1 "$HERE"
run after-2 "$HERE"
run before-2 "$OLD"

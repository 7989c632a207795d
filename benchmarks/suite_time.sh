#!/usr/bin/env bash
# Wall time of the test suite: the suite before the redesign (commit 8aa588a) from a
# cold compilation cache, then today's suite cold, then warm, back to back.
# Run from the repository root with the venv of the README's two commands, on a quiet
# machine (check `uptime` first). Usage: bash benchmarks/suite_time.sh [OLD_COMMIT]
set -euo pipefail
old_commit=${1:-8aa588a}
repo=$(pwd)
python=$repo/.venv/bin/python
tmp=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$tmp/old" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$repo" worktree add --detach "$tmp/old" "$old_commit" >/dev/null 2>&1

run() {  # label, folder, cache
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
  local start=$(date +%s)
  (cd "$2" && JAX_COMPILATION_CACHE_DIR=$3 "$python" -m pytest -q -p no:cacheprovider | tail -1)
  echo "$1: $(( $(date +%s) - start )) s wall"
}
run "suite at $old_commit, cold" "$tmp/old" "$tmp/cache_old"
run "suite now, cold" "$repo" "$tmp/cache_new"
run "suite now, warm" "$repo" "$tmp/cache_new"

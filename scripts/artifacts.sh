#!/usr/bin/env bash
# The committed comparison's expensive artifacts, kept in the repository as a DVC remote (`artifacts/`,
# content-addressed, the remote `artifacts` of .dvc/config): every pretrain stage's outputs (the encoders, hours
# of CPU) and the mine stage's pairs. A fresh clone restores them and `dvc repro` then rebuilds only the cheap
# stages (shards, byte-identical; features; evaluation; report). Features are not kept (34 MB per run).
#
#   bash scripts/artifacts.sh push   # after trainings: the finished stages' outputs into artifacts/ (then git add)
#   bash scripts/artifacts.sh pull   # in a fresh clone: what artifacts/ holds of the committed dvc.lock
#   bash scripts/artifacts.sh prune  # drop from artifacts/ what the committed dvc.lock no longer names
set -euo pipefail
cd "$(dirname "$0")/.."

# the kept stages of dvc.lock whose outputs are in the workspace as the lock records them
finished() {
  python - <<'EOF'
import subprocess, yaml
lock = yaml.safe_load(open("dvc.lock"))["stages"]
kept = [s for s in lock if s.startswith("pretrain.") or s == "mine"]
if kept:
    # `dvc status` names each stage whose outputs are missing or differ from the lock (or whose inputs changed
    # since): push only the others (one pass over dvc.yaml; stage targets would cost a pass each)
    out = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True, check=True).stdout
    import json
    stale = set(json.loads(out or "{}"))
    kept = [s for s in kept if s not in stale]
print(" ".join(kept))
EOF
}

case "${1:-}" in
  push)
    s=$(finished)
    [ -n "$s" ] || { echo "artifacts.sh: no finished pretrain or mine stage in the workspace" >&2; exit 1; }
    dvc push -q -r artifacts $s
    echo "artifacts.sh: pushed $(wc -w <<<"$s") stages; commit them: git add artifacts dvc.lock" ;;
  pull)   # every output of the lock that artifacts/ holds (one pass over dvc.yaml: stage targets cost one each)
    dvc pull -q -r artifacts --allow-missing
    find data -mindepth 1 -type d -empty -delete   # the directories of outputs it does not hold, left empty
    echo "artifacts.sh: restored what artifacts/ holds of the committed dvc.lock; dvc repro rebuilds the rest" ;;
  prune)
    dvc gc -q -f -w -c -r artifacts ;;
  *)
    echo "usage: bash scripts/artifacts.sh push|pull|prune" >&2; exit 2 ;;
esac

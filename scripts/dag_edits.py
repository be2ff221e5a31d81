"""Which stages does one edit invalidate?  The table of issue #12, measured with DVC on a fresh clone.

    python scripts/dag_edits.py [--ref HEAD] [--out benchmarks/results/dag-edits.json]

Clones REF of this repository into a temp dir (the committed dvc.lock, no data), then for each edit below
applies it, runs `dvc status --json` and counts the stages whose *code or params* dependencies changed (a
fresh clone has no data, so every stage's data deps read as deleted; those are not what an edit
invalidates). Each edit is undone before the next. The clean clone's count comes first (0 when the committed
dvc.lock was made on exactly this code and these params); each edit's row counts the stages it adds to it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.utils import atomic_write_json  # noqa: E402


def append(path: str, text: str):
    def edit(root: Path):
        p = root / path
        p.write_text((p.read_text() if p.exists() else "") + text)
    return edit


def set_param(keys: list[str], value):
    def edit(root: Path):
        p = root / "params.yaml"
        data = yaml.safe_load(p.read_text())
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        p.write_text(yaml.safe_dump(data, sort_keys=False))
    return edit


EDITS = [
    ("a comment in pipeline/methods/byol.py", append("pipeline/methods/byol.py", "\n# edited\n")),
    ("a statement in pipeline/methods/byol.py", append("pipeline/methods/byol.py", "\nEDITED = 1\n")),
    ("a new file in pipeline/methods/", append("pipeline/methods/new_idea.py", "EDITED = 1\n")),
    ("pipeline/losses/triplet.py", append("pipeline/losses/triplet.py", "\nEDITED = 1\n")),
    ("train.checkpoint_every", set_param(["train", "checkpoint_every"], 7)),
    ("train.num_workers", set_param(["train", "num_workers"], 1)),
    ("train.knn_monitor (the shared default)", set_param(["train", "knn_monitor"], [5000, 1000])),
    ("dataset.root (same images elsewhere)", set_param(["dataset", "root"], "/elsewhere/cifar10-jpg")),
    ("evaluate.batch_size", set_param(["evaluate", "batch_size"], 17)),
    ("pipeline/params.py", append("pipeline/params.py", "\nEDITED = 1\n")),
    ("pipeline/models/encoder_io.py", append("pipeline/models/encoder_io.py", "\nEDITED = 1\n")),
    ("pipeline/eval/knn.py", append("pipeline/eval/knn.py", "\nEDITED = 1\n")),
]


def sh(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def invalidated(root: Path) -> list[str]:
    """Stages with a changed .py dependency or a changed param."""
    status = json.loads(sh(["dvc", "status", "--json"], root) or "{}")
    out = []
    for stage, entries in status.items():
        for e in entries:
            deps = e.get("changed deps", {}) if isinstance(e, dict) else {}
            if any(path.endswith(".py") or isinstance(change, dict) for path, change in deps.items()):
                out.append(stage)
                break
    return sorted(out)


def summary(stages: list[str]) -> str:
    kinds = Counter(s.split(".", 1)[0] for s in stages)
    if not kinds:
        return "none"
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return listed + (f" ({', '.join(stages)})" if len(stages) <= 4 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="HEAD")
    ap.add_argument("--out", default="benchmarks/results/dag-edits.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "clone"
        sh(["git", "clone", "-q", str(REPO), str(root)], REPO)
        sh(["git", "checkout", "-q", sh(["git", "rev-parse", a.ref], REPO).strip()], root)
        rows = [{"edit": "none (the clone as committed)", "stages": invalidated(root)}]
        for name, edit in EDITS:
            edit(root)
            try:
                rows.append({"edit": name, "stages": invalidated(root)})
            finally:
                sh(["git", "checkout", "-q", "--", "."], root)
                sh(["git", "clean", "-qfd", "pipeline"], root)
    base = set(rows[0]["stages"])
    print("| edit | stages marked changed |\n|---|---|")
    for n, r in enumerate(rows):
        r["added"] = r["stages"] if n == 0 else sorted(set(r["stages"]) - base)
        print(f"| {r['edit']} | {summary(r['added'])} |")
    atomic_write_json({"ref": a.ref, "rows": rows}, a.out)


if __name__ == "__main__":
    main()

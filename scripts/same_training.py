"""Does the current code train a run exactly as an older commit did?

    python scripts/same_training.py COMMIT [RUN ...] [--steps N]

Trains each run for N steps on the real shards (data/shards) with the code and params.yaml of COMMIT and
of the working tree, in throw-away roots, and compares the checkpoints (method state with momentum
encoders and queues, optimizer state, RNG) tensor by tensor, bit-equal. Training is deterministic on CPU
(per-batch seeds, seeded init), so equal states after N steps mean the
refactor between the commits left the run unchanged; only then is `dvc commit` of its stale stages honest.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN = """
import sys, yaml
from pathlib import Path
from pipeline.params import validate
from pipeline.train.trainer import train
p = validate(yaml.safe_load(open(sys.argv[1])))
train(p, sys.argv[2], Path(sys.argv[3]), max_steps=int(sys.argv[4]))
"""


def tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    out = {}

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
    walk("", obj)
    return out


def train_in(tree: Path, run: str, root: Path, steps: int) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for d in ("shards", "pairs"):  # pairs: SePP-ID pair runs read the mine stage's output
        if (REPO / "data" / d).exists():
            os.symlink(REPO / "data" / d, root / "data" / d)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", TRAIN, str(tree / "params.yaml"), run, str(root), str(steps)],
                   cwd=root, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = root / "data/checkpoints" / run / "last.pt"  # max_steps stops after a checkpoint
    if ck.exists():
        return ck
    models = root / "data/models" / run   # an untrained (random) run: its encoder, in either commit's format
    return next((models / n for n in ("encoder.safetensors", "encoder.pt") if (models / n).exists()), models / "encoder.pt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit")
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    import yaml
    p = yaml.safe_load(open(REPO / "params.yaml"))
    runs = a.runs or list(p["runs"]) + list(p.get("pair_runs") or {})
    differ = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), a.commit], cwd=REPO, check=True)
        try:
            for run in runs:
                ck_old = train_in(old, run, Path(tmp) / "root-old" / run, a.steps)
                ck_new = train_in(REPO, run, Path(tmp) / "root-new" / run, a.steps)
                t_old, t_new = tensors(ck_old), tensors(ck_new)
                same = t_old.keys() == t_new.keys() and all(torch.equal(t_old[k], t_new[k]) for k in t_old)
                print(f"{run}: {'identical' if same else 'DIFFERENT'} after {a.steps} steps ({len(t_new)} tensors)", flush=True)
                if not same:
                    differ.append(run)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

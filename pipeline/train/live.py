"""Live training logs in DVCLive's layout, written while a run trains, so `dvc metrics show`, `dvc plots show`,
`dvc exp show` and the VS Code extension see a run before its stage ends.

`data/live/<run>/` (`pipeline.paths.live`): `metrics.json` (the latest values and their step) and
`plots/metrics/<group>/<name>.tsv` (`timestamp  step  <name>` rows, DVCLive's own columns), with
`train/loss` and `train/lr` every `train.sync_every` steps (when the trainer syncs with the device anyway)
and `epoch/<key>` after each epoch (loss terms, kNN-200 monitor). Written by the main process only; no DVC
output (the encoder, summary and curve are), so wall-clock timestamps never reach a hash. A resumed run drops
the rows past its checkpoint's step before it appends, so the log matches an uninterrupted run's steps.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from pipeline.utils import atomic_write_text


class LiveLog:
    def __init__(self, directory: str | Path, resume_step: int = 0, enabled: bool = True):
        self.dir, self.enabled, self.latest = Path(directory), enabled, {}
        if not enabled:
            return
        if resume_step == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self._truncate(resume_step)
            if (self.dir / "metrics.json").exists():
                self.latest = json.loads((self.dir / "metrics.json").read_text())
        (self.dir / "plots" / "metrics").mkdir(parents=True, exist_ok=True)

    def _truncate(self, step: int) -> None:
        for tsv in (self.dir / "plots" / "metrics").rglob("*.tsv"):
            lines = tsv.read_text().splitlines()
            kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[1]) <= step]
            atomic_write_text("\n".join(kept) + "\n", tsv)

    def log(self, step: int, group: str, values: dict) -> None:
        """Append one row per finite number of `values` at `step` under `group` ("train" / "epoch")."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        for name, v in values.items():
            if name == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            tsv = self.dir / "plots" / "metrics" / group / f"{name}.tsv"
            if not tsv.exists():
                tsv.parent.mkdir(parents=True, exist_ok=True)
                tsv.write_text(f"timestamp\tstep\t{name}\n")
            with open(tsv, "a") as f:
                f.write(f"{now}\t{step}\t{v:.6g}\n")
            self.latest.setdefault(group, {})[name] = round(float(v), 6)
        self.latest["step"] = step
        atomic_write_text(json.dumps(self.latest, indent=2, sort_keys=True) + "\n", self.dir / "metrics.json")

"""Every artifact path of the pipeline, in one place.

Stage scripts build paths here and pass them down; library code never spells `data/models`. The DAG
generator (`pipeline.dag`) writes `dvc.yaml`'s outputs from the same functions, so a stage writes
exactly what the DAG declares. All paths are relative to the project root (DVC runs every stage there).
"""
from __future__ import annotations

import os
from pathlib import Path

DATA = Path("data")
REPORTS = Path("reports")


def shards(dataset: str) -> Path:
    return DATA / "shards" / dataset


def remote_cache() -> Path:
    """Local copies of remote webdataset shards (`pipeline.data.remote`); machine-local, no DVC output."""
    return DATA / "cache" / "shards"


def pairs(dataset: str) -> Path:
    return DATA / "pairs" / dataset


def encoder(run: str) -> Path:
    """The encoder's weights (safetensors: `backbone.<timm key>` and `heads.<head>.<key>`); its config beside it."""
    return DATA / "models" / run / "encoder.safetensors"


def encoder_config(run: str) -> Path:
    """The encoder's JSON config (architecture, timm name and kwargs, image size, mean/std, method, run, seed)."""
    return encoder_config_of(encoder(run))


def encoder_config_of(weights: str | os.PathLike) -> Path:
    """The config beside an encoder's weights file (also for an encoder outside the project layout)."""
    return Path(weights).with_suffix(".json")


def export_dir(run: str) -> Path:
    """`python -m pipeline.export <run>`: a timm-loadable folder (config.json + model.safetensors); no DVC output."""
    return DATA / "exports" / run


def train_summary(run: str) -> Path:
    """The pretrain stage's summary (steps, timings, monitor): cached with the encoder, so DVC's run-cache can
    restore a whole pretrain stage; the evaluate stage publishes it as `pretrain_metrics(run)`."""
    return DATA / "models" / run / "train.json"


def train_curve(run: str) -> Path:
    """The per-epoch curve of a pretrain stage (cached; published as `curve(run)`)."""
    return DATA / "models" / run / "curve.csv"


def checkpoints(run: str) -> Path:
    """Resume state: deliberately no DVC output, so a finished stage's outputs (and DVC's run-cache) hold none."""
    return DATA / "checkpoints" / run


def live(run: str) -> Path:
    """Live training logs in DVCLive's layout (`pipeline.train.live`): runtime only, no DVC output."""
    return DATA / "live" / run


def features(run: str) -> Path:
    return DATA / "features" / run


def shard_metrics() -> Path:
    return REPORTS / "metrics" / "shard.json"


def mine_metrics() -> Path:
    return REPORTS / "metrics" / "mine.json"


def pretrain_metrics(run: str) -> Path:
    """Git-tracked copy of `train_summary(run)` (what `dvc metrics show` and the report read)."""
    return REPORTS / "metrics" / "pretrain" / f"{run}.json"


def evaluate_metrics(run: str) -> Path:
    return REPORTS / "metrics" / "evaluate" / f"{run}.json"


def summary_metrics(run: str) -> Path:
    """One short row per run (kNN-200, linear, semi 1 % / 10 %, views/s, seed): `pipeline.eval.summary`."""
    return REPORTS / "metrics" / "summary" / f"{run}.json"


def predictions(run: str) -> Path:
    return REPORTS / "predictions" / f"{run}.parquet"


def curve(run: str) -> Path:
    """Git-tracked copy of `train_curve(run)` (what `dvc plots` and the report read)."""
    return REPORTS / "plots" / "pretrain" / f"{run}.csv"


def report_outputs() -> list[Path]:
    return [REPORTS / "report.md", REPORTS / "report.html", REPORTS / "figures"]


def origin_root(cwd: Path | None = None) -> Path:
    """The project checkout the user works in, also when DVC runs a stage in a temporary copy.

    `dvc exp run --temp` and `dvc queue start` run stages in `<project>/.dvc/tmp/exps/.../<copy>`; a
    machine-local relative path (`dataset.root: ../shared/...`) means the user's checkout, not the copy.
    """
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def local_path(path: str | os.PathLike) -> Path:
    """A machine-local input path from params (e.g. `dataset.root`): relative ones resolve from `origin_root()`."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else origin_root() / path

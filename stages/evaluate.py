"""evaluate stage: `python -m stages.evaluate <run>` -> the run's evaluate metrics (JSON) and test predictions (parquet).

Reads the cached (memory-mapped) features of the run (features stage) and runs kNN, linear and
semi-supervised protocols on the training device. The predictions file has one row per test image:
`index` (test position), `label`, and one column per protocol (`knn_<k>`, `linear`,
`semi_<pct>_<learner>_s<seed>`), so any two runs can be compared image by image.
"""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import params, paths
from pipeline.cli import main, params_and_run
from pipeline.eval.feature_cache import load_features
from pipeline.eval.protocols import evaluate_features
from pipeline.utils import atomic_write_bytes, atomic_write_json, atomic_write_with


def predictions_table(labels: np.ndarray, preds: dict[str, np.ndarray]) -> pa.Table:
    """index int32, label int16, then one int16 column per protocol in the given order (-1 = no prediction)."""
    cols = {"index": np.arange(len(labels), dtype=np.int32), "label": np.asarray(labels).astype(np.int16)}
    for name, pred in preds.items():
        if len(pred) != len(labels):
            raise ValueError(f"predictions {name}: {len(pred)} rows for {len(labels)} test images")
        cols[name] = np.asarray(pred).astype(np.int16)
    return pa.table(cols)


def write_predictions(path: Path, labels: np.ndarray, preds: dict[str, np.ndarray]) -> None:
    table = predictions_table(labels, preds)
    atomic_write_with(path, lambda f: pq.write_table(table, f))


def evaluate_run(p: dict, name: str, feat_dir: Path, metrics_path: Path, predictions_path: Path) -> dict:
    """Evaluate one run's features from `feat_dir`; write its metrics and predictions where the caller says."""
    train, test = load_features(feat_dir, "train"), load_features(feat_dir, "test")
    if train[0].shape[1] != test[0].shape[1]:
        raise params.DataError(f"{feat_dir}: train and test features differ in width "
                               f"({train[0].shape[1]} vs {test[0].shape[1]}); rerun: dvc repro -f features.{name}")
    spec, seed = params.run_spec(p, name), params.training_seed(p, name)
    metrics, preds = evaluate_features(train, test, p["evaluate"], seed=seed, return_predictions=True)
    write_predictions(predictions_path, test[1], preds)
    atomic_write_json({"run": name, "method": spec["method"], "backbone": spec["backbone"],
                       "base_run": params.base_run(p, name), "seed": seed,
                       **metrics}, metrics_path)
    return metrics


def publish_training_record(name: str) -> None:
    """Git-tracked copies of the pretrain stage's summary and curve (which DVC caches with the encoder, so
    its run-cache can restore a whole pretrain stage): what `dvc metrics`, `dvc plots` and the report read."""
    for src, dst in ((paths.train_summary(name), paths.pretrain_metrics(name)), (paths.train_curve(name), paths.curve(name))):
        if not src.exists():
            raise params.DataError(f"{src}: missing (run the pretrain stage first: dvc repro pretrain.{name})")
        data = src.read_bytes()
        if dst == paths.curve(name):   # + loss_rel: every run's loss on one axis in `dvc plots show`
            from pipeline.eval.summary import with_relative_loss

            data = with_relative_loss(data.decode()).encode()
        atomic_write_bytes(data, dst)


def write_summary(p: dict, name: str, metrics: dict) -> None:
    """The run's one-row summary (pipeline.eval.summary) beside its full metrics."""
    import json

    from pipeline.eval.summary import run_summary

    pretrain = json.loads(paths.pretrain_metrics(name).read_text())
    # keyed by the run: DVC then names the columns `<run>.knn200`, ... (short, unique across runs)
    atomic_write_json({name: run_summary({"seed": pretrain.get("seed"), **metrics}, pretrain, p["evaluate"]["semi_learner"])},
                      paths.summary_metrics(name))


def run(argv):
    p, name = params_and_run(argv, "evaluate")
    publish_training_record(name)
    metrics_path, predictions_path = paths.evaluate_metrics(name), paths.predictions(name)
    metrics = evaluate_run(p, name, paths.features(name), metrics_path, predictions_path)
    write_summary(p, name, metrics)
    print(f"evaluate {name}: knn {metrics['knn']}, linear {metrics['linear']['top1']:.2f}% "
          f"(converged: {metrics['linear']['converged']}) -> {metrics_path}, {predictions_path}")


if __name__ == "__main__":
    main(run)

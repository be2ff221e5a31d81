"""evaluate stage: `python stages/evaluate.py <run>` -> reports/metrics/evaluate/<run>.json.

Reads the cached features of the run (features stage) and runs kNN, linear and semi-supervised protocols.
"""
from pathlib import Path

from pipeline import params
from pipeline.cli import main, params_and_run
from pipeline.eval.features import load_features
from pipeline.eval.protocols import evaluate_features
from pipeline.utils import atomic_write_json


def run(argv):
    p, name = params_and_run(argv, "evaluate")
    feat_dir = Path("data/features") / name
    train, test = load_features(feat_dir / "train.npz"), load_features(feat_dir / "test.npz")
    if train[0].shape[1] != test[0].shape[1]:
        raise params.DataError(f"{feat_dir}: train and test features differ in width "
                               f"({train[0].shape[1]} vs {test[0].shape[1]}); rerun: dvc repro -f features@{name}")
    spec = params.run_spec(p, name)
    metrics = evaluate_features(train, test, p["evaluate"], seed=p["seed"])
    out = Path("reports/metrics/evaluate") / f"{name}.json"
    atomic_write_json({"run": name, "method": spec["method"], "backbone": spec["backbone"], **metrics}, out)
    print(f"evaluate {name}: knn {metrics['knn']}, linear {metrics['linear']['top1']:.2f}% -> {out}")


if __name__ == "__main__":
    main(run)

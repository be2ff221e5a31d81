"""features stage: `python stages/features.py <run>` -> data/features/<run>/{train,test}.npz.

Frozen-backbone features of every train and test image (no augmentation), extracted once per encoder
and reused by every evaluation protocol.
"""
from pathlib import Path

from pipeline import params
from pipeline.cli import main, params_and_run
from pipeline.data.shards import read_manifest
from pipeline.eval.features import extract_features, save_features
from pipeline.models.encoder_io import load_encoder
from pipeline.utils import pick_device


def run(argv):
    p, name = params_and_run(argv, "features")
    ds, ev = p["dataset"], p["evaluate"]
    shard_dir = Path("data/shards") / ds["name"]
    read_manifest(shard_dir)  # fail fast, naming the missing shard stage, before loading any weights
    backbone, state = load_encoder(Path("data/models") / name / "encoder.pt")
    if state["image_size"] != ds["image_size"]:
        raise params.DataError(f"data/models/{name}/encoder.pt: trained at image_size {state['image_size']}, "
                               f"params say dataset.image_size {ds['image_size']}; rerun its pretrain stage (dvc repro)")
    device = pick_device()
    out = Path("data/features") / name
    for split in ("train", "test"):
        # evaluate.train_subset also bounds extraction: features no protocol will read are never computed
        limit = ev["train_subset"] if split == "train" else 0
        feats, labels, keys = extract_features(backbone, shard_dir, split, ds["image_size"], ds["mean"], ds["std"],
                                               ev["batch_size"], device, limit=limit)
        save_features(out / f"{split}.npz", feats, labels, keys)
        print(f"features {name} {split}: {feats.shape[0]} x {feats.shape[1]} -> {out / f'{split}.npz'}")


if __name__ == "__main__":
    main(run)

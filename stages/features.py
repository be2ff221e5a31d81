"""features stage: `python -m stages.features <run>` (or under torchrun) -> data/features/<run>/.

Frozen-backbone features of every train and test image (no augmentation), extracted once per encoder
and reused by every evaluation protocol: `<split>.npy` (float32, memory-mapped), `<split>-labels.npy`,
`<split>-keys.npy` for split in train, test (`pipeline.eval.features.load_features` reads them).
Under torchrun every rank extracts a contiguous share of the batches and rank 0 writes them in order.
"""
from pipeline import params, paths
from pipeline.launch import relaunch
from pipeline.cli import main, params_and_run
from pipeline.data.eval_view import DEFAULT_CROP_RATIO
from pipeline.data.shards import read_manifest
from pipeline.eval.features import extract_features_to
from pipeline.models.encoder_io import load_encoder
from pipeline import dist
from pipeline.device import claim_device
from pipeline.utils import naming_disk_full, remove_stale_temps


def run(argv):
    relaunch("stages.features", argv)   # the launcher is a runtime setting (pipeline/launch.py)
    p, name = params_and_run(argv, "features")
    ds, ev = p["dataset"], p["evaluate"]
    shard_dir = paths.shards(ds["name"])
    read_manifest(shard_dir)  # fail fast, naming the missing shard stage, before loading any weights
    encoder = paths.encoder(name)
    backbone, state = load_encoder(encoder)
    if state["image_size"] != ds["image_size"]:
        raise params.DataError(f"{encoder}: trained at image_size {state['image_size']}, "
                               f"params say dataset.image_size {ds['image_size']}; rerun its pretrain stage (dvc repro)")
    dist.init_from_env()
    device = claim_device()
    out = paths.features(name)
    if dist.is_main() and out.is_dir():
        remove_stale_temps(out)   # a killed run's temp files: DVC caches this directory whole
    for split in ("train", "test"):
        # evaluate.train_subset also bounds extraction: features no protocol will read are never computed
        limit = ev["train_subset"] if split == "train" else 0
        with naming_disk_full(out / f"{split}.npy"):
            n, d = extract_features_to(out, split, backbone, shard_dir, ds["image_size"], ds["mean"], ds["std"],
                                       ev["batch_size"], device, limit=limit, num_workers=ev.get("num_workers", 0),
                                       crop_ratio=ev.get("crop_ratio", DEFAULT_CROP_RATIO))
        if dist.is_main():
            print(f"features {name} {split}: {n} x {d} -> {out / f'{split}.npy'}")
    dist.barrier()


if __name__ == "__main__":
    main(run)

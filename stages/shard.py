"""shard stage: source dataset -> data/shards/<dataset.name>/{train,test}/shard-*.tar + manifest."""
import shutil

from pipeline import params, paths
from pipeline.cli import main
from pipeline.data.shards import write_shards
from pipeline.data.sources import open_source
from pipeline.utils import atomic_write_json, naming_disk_full


def run(argv):
    p = params.load(methods=())
    # dataset.root is machine-local: a relative one means the user's checkout, also from a `dvc exp` copy
    dataset = {**p["dataset"], **({"root": str(paths.local_path(p["dataset"]["root"]))} if "root" in p["dataset"] else {})}
    out = paths.shards(dataset["name"])
    try:
        with naming_disk_full(out):
            stats = write_shards(open_source(dataset), out, p["shard"]["samples_per_shard"],
                                 p["seed"], p["shard"]["skip_corrupt"], p["shard"].get("max_images", 0),
                                 workers=p["shard"].get("workers", 0))
    except BaseException:
        # write_shards fills a sibling temp directory and renames it at the end: a failure leaves it behind,
        # holding the space a full disk needs back
        shutil.rmtree(out.with_name(out.name + ".tmp"), ignore_errors=True)
        raise
    atomic_write_json({"dataset": dataset["name"], **stats}, paths.shard_metrics())
    print(f"shard: {stats['images']} images in {stats['shards']} shards, {stats['skipped_corrupt']} skipped")


if __name__ == "__main__":
    main(run)

"""shard stage: source dataset -> data/shards/<dataset.name>/{train,test}/shard-*.tar + manifest."""
from pathlib import Path

from pipeline import params
from pipeline.cli import main
from pipeline.data.shards import write_shards
from pipeline.data.sources import open_source
from pipeline.utils import atomic_write_json


def run(argv):
    p = params.load()
    source = open_source(p["dataset"])
    stats = write_shards(source, Path("data/shards") / p["dataset"]["name"], p["shard"]["samples_per_shard"],
                         p["seed"], p["shard"]["skip_corrupt"], p["shard"].get("max_images", 0),
                         workers=p["shard"].get("workers", 0))
    atomic_write_json({"dataset": p["dataset"]["name"], **stats}, Path("reports/metrics/shard.json"))
    print(f"shard: {stats['images']} images in {stats['shards']} shards, {stats['skipped_corrupt']} skipped")


if __name__ == "__main__":
    main(run)

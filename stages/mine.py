"""mine stage (SePP-ID semantic sampler): `python -m stages.mine` -> data/pairs/<dataset>/, reports/metrics/mine.json.

Encodes K original training images with the encoder of run `mine.encoder_run`, mines the pairs whose cosine
lies in [mine.min_sim, mine.max_sim], writes them (and the random control) as parquet and as pair shards.
"""
import sys

from pipeline import dist, params, paths
from pipeline.launch import relaunch
from pipeline.cli import main
from pipeline.mining.sampler import mine
from pipeline.utils import atomic_write_json, naming_disk_full


def run(argv):
    relaunch("stages.mine", argv)   # the launcher is a runtime setting (pipeline/launch.py)
    if argv:
        raise params.ParamError("usage: python -m stages.mine  (settings under mine: in params.yaml)")
    p = params.load(methods=())   # no method code: the encoder artifact is self-contained
    dist.init_from_env()   # under the launcher the ranks share the encoding (pipeline.mining.sampler.mine)
    with naming_disk_full(paths.pairs(p["dataset"]["name"])):   # the pair shards' tar writer names no file
        metrics = mine(p)
    if metrics is None:
        return
    atomic_write_json(metrics, paths.mine_metrics())
    s = metrics["semantic"]
    acc = "n/a" if s["pair_accuracy"] is None else f"{100 * s['pair_accuracy']:.1f}%"
    print(f"mine: {s['pairs']} pairs over {s['anchors_covered']} of {metrics['K']} anchors "
          f"({s['mean_positives_per_anchor']:.1f} positives per anchor), pair accuracy {acc}; "
          f"{metrics['random']['pairs']} random pairs -> data/pairs/{metrics['dataset']}")
    if s["warning"]:
        print(f"warning: mine: {s['warning']}", file=sys.stderr, flush=True)
    elif s["pairs"] == 0:
        print(f"warning: mine: no pair in [{metrics['min_sim']}, {metrics['max_sim']}]: the pair runs train on the originals only",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(run)

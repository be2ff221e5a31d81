"""pretrain stage: `python -m stages.pretrain <run>` (or under torchrun) -> data/models/<run>/encoder.safetensors + encoder.json."""
from pathlib import Path

from pipeline.launch import relaunch
from pipeline.cli import main, params_and_run
from pipeline.params import run_spec
from pipeline.train.checkpoint import RunPaths
from pipeline.train.trainer import train


def run(argv):
    relaunch("stages.pretrain", argv)   # the launcher is a runtime setting (pipeline/launch.py)
    p, name = params_and_run(argv, "pretrain")
    # the stage chooses where its inputs and outputs live; checkpoints stay outside its DVC outputs
    paths = RunPaths.for_run(Path("."), p["dataset"]["name"], name, run_spec(p, name).get("pairs"))
    s = train(p, name, paths=paths)
    print(f"pretrain {name}: {s.get('steps', 0)} steps, {s.get('wall_time_s', 0):.0f} s, {s.get('views_per_s', 0):.0f} views/s")


if __name__ == "__main__":
    main(run)

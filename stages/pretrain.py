"""pretrain stage: `python stages/pretrain.py <run>` (or under torchrun) -> data/models/<run>/encoder.pt."""
from pipeline.cli import main, params_and_run
from pipeline.train.trainer import train


def run(argv):
    p, name = params_and_run(argv, "pretrain")
    s = train(p, name)
    print(f"pretrain {name}: {s.get('steps', 0)} steps, {s.get('wall_time_s', 0):.0f} s, {s.get('views_per_s', 0):.0f} views/s")


if __name__ == "__main__":
    main(run)

"""pretrain stage: `python stages/pretrain.py <run>` (or under torchrun) -> data/models/<run>/encoder.pt."""
from pipeline import params
from pipeline.cli import main
from pipeline.train.trainer import train


def run(argv):
    if len(argv) != 1:
        raise params.ParamError("usage: python stages/pretrain.py <run>  (a name under runs: in params.yaml)")
    p = params.load()
    params.method_config(p, argv[0])  # the run must exist before anything starts
    s = train(p, argv[0])
    print(f"pretrain {argv[0]}: {s.get('steps', 0)} steps, {s.get('wall_time_s', 0):.0f} s, {s.get('views_per_s', 0):.0f} views/s")


if __name__ == "__main__":
    main(run)

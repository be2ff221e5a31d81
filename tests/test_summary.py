"""The per-run summary metrics file: six short numbers from the evaluate and pretrain records."""
from pipeline.eval.summary import run_summary


def test_summary_picks_knn200_linear_semi_and_views():
    evaluation = {"seed": 2, "knn": {"10": 50.0, "200": 61.234}, "linear": {"top1": 70.456, "converged": True},
                  "semi": {"0.01": {"label_spreading": {"mean": 30.111}, "logreg": {"mean": 29.0}},
                           "0.1": {"label_spreading": {"mean": 45.999}, "logreg": {"mean": 44.0}}}}
    pretrain = {"views_per_s": 1234.5678, "seed": 2}
    assert run_summary(evaluation, pretrain, "label_spreading") == {
        "knn200": 61.23, "linear": 70.46, "semi1": 30.11, "semi10": 46.0, "views_s": 1234.57, "seed": 2}
    assert run_summary(evaluation, pretrain, "logreg")["semi1"] == 29.0
    # a protocol not run (no k=200, no 1 % split) is None, not a crash
    assert run_summary({"knn": {"10": 1.0}, "linear": {"top1": 1.0}, "semi": {}}, {}, "logreg") == {
        "knn200": None, "linear": 1.0, "semi1": None, "semi10": None, "views_s": None, "seed": None}


def test_relative_loss_column_puts_every_run_on_one_axis():
    from pipeline.eval.summary import with_relative_loss

    text = "epoch,step,loss,knn_top1\n1,10,2000,30.5\n2,20,500,\n3,30,250,40\n"
    assert with_relative_loss(text) == ("epoch,step,loss,knn_top1,loss_rel\n1,10,2000,30.5,1\n2,20,500,,0.25\n"
                                        "3,30,250,40,0.125\n")
    # a negative loss (negative cosine) divides by its magnitude: the curve still goes down
    assert with_relative_loss("epoch,loss\n1,-0.5\n2,-0.9\n") == "epoch,loss,loss_rel\n1,-0.5,-1\n2,-0.9,-1.8\n"
    # an untrained run's empty curve gets the header only
    assert with_relative_loss("epoch,step,loss\n") == "epoch,step,loss,loss_rel\n"

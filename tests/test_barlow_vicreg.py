"""Barlow Twins and VICReg: losses against hand computations of their papers' equations, and DDP
gradients (gloo, 2 processes) equal to single-process gradients on the concatenated batch."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline.losses.redundancy import barlow_twins_loss, barlow_twins_terms, vicreg_loss, vicreg_terms
from pipeline.methods import registry
from pipeline.methods.barlow_twins import BarlowTwins
from pipeline.methods.vicreg import VICReg
from pipeline.params import Section
from tests.test_ddp import AUG, WORLD, TinyNet, _init, spawn_and_load

SCALES = torch.tensor([0.3, 2.0, 0.6, 1.5])  # some dims below, some above VICReg's std target 1


def embeddings(seed=0, n=6, d=4):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, d, generator=g) * SCALES[:d]
    zb = za + 0.5 * torch.randn(n, d, generator=g)  # correlated with za, as two views are
    return za.double(), zb.double()


# --- hand computations, straight from the equations (plain Python loops) ---------------------------

def _columns(z):
    rows = z.tolist()
    return [[r[j] for r in rows] for j in range(len(rows[0]))]


def hand_barlow_terms(za, zb, eps=1e-5):
    """Eq. 1-2: standardise each dimension over the batch (biased variance, as BatchNorm), then
    C_ij = sum_b za_bi zb_bj / N; return (sum_i (1 - C_ii)^2, sum_{i != j} C_ij^2)."""
    def standardise(z):
        out = []
        for col in _columns(z):
            m = sum(col) / len(col)
            s = math.sqrt(sum((x - m) ** 2 for x in col) / len(col) + eps)
            out.append([(x - m) / s for x in col])
        return out  # [dim][sample]

    a, b = standardise(za), standardise(zb)
    n, d = za.shape
    c = [[sum(a[i][k] * b[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on, off


def hand_vicreg_terms(za, zb, eps=1e-4, gamma=1.0):
    """Eq. 1-5: s = MSE; v = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps)); c = 1/d sum_{i != j} C_ij^2,
    C = 1/(n-1) sum (z - zbar)(z - zbar)^T; v and c summed over both branches."""
    n, d = za.shape
    inv = sum((x - y) ** 2 for ra, rb in zip(za.tolist(), zb.tolist()) for x, y in zip(ra, rb)) / (n * d)

    def v_and_c(z):
        cols = _columns(z)
        means = [sum(col) / n for col in cols]
        cov = [[sum((cols[i][k] - means[i]) * (cols[j][k] - means[j]) for k in range(n)) / (n - 1)
                for j in range(d)] for i in range(d)]
        v = sum(max(0.0, gamma - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    (va, ca), (vb, cb) = v_and_c(za), v_and_c(zb)
    return inv, va + vb, ca + cb


# --- Barlow Twins --------------------------------------------------------------------------------

@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_matches_hand_computation(lambd):
    za, zb = embeddings()
    on, off = hand_barlow_terms(za, zb)
    assert math.isclose(barlow_twins_loss(za, zb, lambd).item(), on + lambd * off, rel_tol=1e-9)


def test_barlow_twins_lambda_weights_only_the_off_diagonal():
    za, zb = embeddings(1)
    on, off = hand_barlow_terms(za, zb)
    assert math.isclose(barlow_twins_loss(za, zb, 0.0).item(), on, rel_tol=1e-9)
    slope = (barlow_twins_loss(za, zb, 2.0) - barlow_twins_loss(za, zb, 0.0)).item() / 2.0
    assert math.isclose(slope, off, rel_tol=1e-9) and off > 0.1
    t_on, t_off = barlow_twins_terms(za, zb)
    assert math.isclose(t_on.item(), on, rel_tol=1e-9) and math.isclose(t_off.item(), off, rel_tol=1e-9)
    # identical views: C_ii = var / (var + eps) = 1 at eps = 0, so only the redundancy term remains
    same_on, same_off = barlow_twins_terms(za, za, eps=0.0)
    assert same_on.item() < 1e-20 and same_off.item() > 0.1


def test_barlow_twins_is_scale_and_shift_invariant_per_dimension():
    za, zb = embeddings(2)
    scale, shift = torch.tensor([3.0, 0.2, 7.0, 1.0], dtype=za.dtype), torch.tensor([1.0, -4.0, 0.5, 9.0], dtype=za.dtype)
    moved = barlow_twins_loss(za * scale + shift, zb, eps=0.0)
    assert torch.allclose(moved, barlow_twins_loss(za, zb, eps=0.0), rtol=1e-12)


def test_barlow_twins_leading_dims_score_each_patch_against_one_embedding():
    """GSSSL's sum_i L_BT(z_i, W_bar): (n_patches, N, D) against (N, D), one call, one loss per patch."""
    g = torch.Generator().manual_seed(3)
    patches, mean = torch.randn(3, 6, 4, generator=g).double(), torch.randn(6, 4, generator=g).double()
    batched = barlow_twins_loss(patches, mean, 5e-3)
    assert batched.shape == (3,)
    for p in range(3):
        on, off = hand_barlow_terms(patches[p], mean)
        assert math.isclose(batched[p].item(), on + 5e-3 * off, rel_tol=1e-9)


# --- VICReg --------------------------------------------------------------------------------------

def test_vicreg_terms_match_hand_computation():
    za, zb = embeddings(4, n=7)
    stds = za.std(0)
    assert (stds < 1).any() and (stds > 1).any()  # both sides of the variance hinge are exercised
    inv, var, cov = vicreg_terms(za, zb)
    h_inv, h_var, h_cov = hand_vicreg_terms(za, zb)
    assert math.isclose(inv.item(), h_inv, rel_tol=1e-9)
    assert math.isclose(var.item(), h_var, rel_tol=1e-9) and h_var > 0
    assert math.isclose(cov.item(), h_cov, rel_tol=1e-9) and h_cov > 0


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 0.0, 3.0)])
def test_vicreg_loss_is_the_weighted_sum(weights):
    za, zb = embeddings(5, n=7)
    h_inv, h_var, h_cov = hand_vicreg_terms(za, zb)
    lam, mu, nu = weights
    assert math.isclose(vicreg_loss(za, zb, lam, mu, nu).item(), lam * h_inv + mu * h_var + nu * h_cov, rel_tol=1e-9)


def test_vicreg_variance_term_vanishes_above_the_target_std():
    za = torch.randn(64, 4, generator=torch.Generator().manual_seed(6)).double() * 5
    _, var, _ = vicreg_terms(za, za)
    assert var.item() == 0.0


def test_losses_compute_statistics_in_float32_under_autocast():
    za, zb = (z.float() for z in embeddings(7, n=16, d=4))
    ref_bt, ref_vi = barlow_twins_loss(za, zb), vicreg_loss(za, zb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bt, vi = barlow_twins_loss(za, zb), vicreg_loss(za, zb)
    assert bt.dtype == vi.dtype == torch.float32
    assert torch.allclose(bt, ref_bt, rtol=1e-6) and torch.allclose(vi, ref_vi, rtol=1e-6)


# --- methods ---------------------------------------------------------------------------------------

def make_bt():
    torch.manual_seed(0)
    return BarlowTwins(TinyNet(), {"lambd": 0.05, "proj_hidden": 8, "proj_dim": 5, "proj_layers": 1}, AUG, 4)


def make_vicreg():
    torch.manual_seed(0)
    return VICReg(TinyNet(), {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 1}, AUG, 4)


MAKERS = {"barlow_twins": make_bt, "vicreg": make_vicreg}


def full_batch(n=8):
    g = torch.Generator().manual_seed(42)
    return [torch.randn(n, 3, 4, 4, generator=g) for _ in range(2)]


@pytest.mark.parametrize("name", list(MAKERS))
def test_method_is_registered_and_reports_its_terms(name):
    cls = registry.get(name)
    Section(cls.PARAMS, optional=tuple(cls.PARAMS))(dict(cls.DEFAULTS), f"methods.{name}")
    method = MAKERS[name]()
    assert isinstance(method, cls)
    views = method.views()  # BYOL's asymmetric blur / solarisation, as both papers use
    assert [v.blur_p for v in views] == [1.0, 0.1] and [v.solarize_p for v in views] == [0.0, 0.2]
    out = method(SimpleNamespace(views=full_batch()))
    terms = {"barlow_twins": ("on_diag", "off_diag"), "vicreg": ("invariance", "variance", "covariance")}[name]
    assert set(out) == {"loss", *terms} and out["loss"].ndim == 0
    out["loss"].backward()
    assert all(p.grad is not None for p in method.parameters())
    assert "projector" in method.heads_to_export()


def test_default_projector_is_the_papers_three_layers_of_8192():
    method = BarlowTwins(TinyNet(), {"proj_hidden": 16, "proj_dim": 16}, AUG, 4)  # paper: 8192, scaled down here
    kinds = [type(m).__name__ for m in method.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert BarlowTwins.DEFAULTS["proj_hidden"] == BarlowTwins.DEFAULTS["proj_dim"] == VICReg.DEFAULTS["proj_dim"] == 8192


# --- DDP: gloo, 2 processes ----------------------------------------------------------------------

def plain_all_reduce(x):
    """The known bug: an in-place dist.all_reduce, which autograd does not see: the value is the global
    sum, the gradient reaches only the local part. Written as a straight-through sum (same gradients,
    without torch's warning about backpropagating through c10d::allreduce_)."""
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def _ddp_worker(rank, port, out):
    _init(rank, port)
    import pipeline.dist as pdist

    views = full_batch()
    b = views[0].shape[0] // WORLD
    local = SimpleNamespace(views=[v[rank * b:(rank + 1) * b] for v in views])
    autograd_reduce = pdist.all_reduce_sum_with_grad
    grads = {}
    for name, make in MAKERS.items():
        for mode, reduce in (("autograd", autograd_reduce), ("plain", plain_all_reduce)):
            pdist.all_reduce_sum_with_grad = reduce
            model = nn.parallel.DistributedDataParallel(make())
            model(local)["loss"].backward()
            grads[name, mode] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    pdist.all_reduce_sum_with_grad = autograd_reduce
    torch.save(grads, f"{out}/grads{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    return spawn_and_load(_ddp_worker, tmp_path_factory.mktemp("ddp"))


def single_process_grads(name):
    method = MAKERS[name]()
    method(SimpleNamespace(views=full_batch()))["loss"].backward()
    return {n: p.grad for n, p in method.named_parameters()}


@pytest.mark.parametrize("name", list(MAKERS))
def test_ddp_gradients_equal_single_process_gradients(ddp_grads, name):
    want = single_process_grads(name)
    for rank, grads in enumerate(ddp_grads):
        for n, g in want.items():
            got = grads[name, "autograd"][n]
            assert torch.allclose(got, g, rtol=1e-5, atol=1e-6), (rank, n, (got - g).abs().max())


@pytest.mark.parametrize("name", list(MAKERS))
def test_plain_all_reduce_gives_wrong_ddp_gradients(ddp_grads, name):
    """Negative control: the same DDP run with a non-autograd all_reduce must NOT match, so the test
    above can fail."""
    want = single_process_grads(name)
    got = ddp_grads[0][name, "plain"]
    diff = torch.cat([(got[n] - g).flatten() for n, g in want.items()])
    rel = (diff.norm() / torch.cat([g.flatten() for g in want.values()]).norm()).item()
    assert rel > 0.2, rel  # about 0.5 here: the gradients come out roughly halved (1 / world_size)


def test_barlow_twins_biases_and_norms_train_at_0_0048_under_lars():
    """Barlow Twins §4 / its code: LARS, weights at 0.2 and biases + BN parameters at 0.0048 (x batch/256), the
    latter without weight decay or LARS adaptation; `bias_lr_ratio` 1 gives one lr (the CPU profile's SGD)."""
    from pipeline.methods.barlow_twins import BarlowTwins
    from pipeline.train.optim import build_optimizer, peak_lr, set_lr

    torch.manual_seed(0)
    m = BarlowTwins(TinyNet(), {"proj_hidden": 8, "proj_dim": 8, "proj_layers": 3}, AUG, 4)
    train = {"optimizer": "lars", "lr": 0.2, "batch_size": 256, "weight_decay": 1.5e-6, "momentum": 0.9}
    opt = build_optimizer(m.param_groups(), train)
    set_lr(opt, peak_lr(train))
    weights, biases = opt.param_groups
    assert weights["lr"] == pytest.approx(0.2) and biases["lr"] == pytest.approx(0.0048)
    assert biases["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in biases["params"])
    assert all(p.ndim > 1 for p in weights["params"])
    one = BarlowTwins(TinyNet(), {"proj_hidden": 8, "proj_dim": 8, "proj_layers": 3, "bias_lr_ratio": 1.0}, AUG, 4)
    assert one.param_groups()[1]["lr_scale"] == 1.0

"""BYOL, SimSiam and NNCLR against hand computations of their papers' equations; NNCLR's support set under
DDP (gloo, 2 processes); checkpoint round trips of the BYOL target and the NNCLR support set."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipeline.losses.contrastive import info_nce_batch
from pipeline.losses.predictive import negative_cosine, normalized_mse
from pipeline.methods import registry
from pipeline.methods.base import cosine_momentum
from pipeline.methods.byol import BYOL
from pipeline.methods.nnclr import NNCLR, SupportSet, nearest_neighbour
from pipeline.methods.simsiam import SimSiam
from pipeline.params import Section
from tests.test_ddp import AUG, WORLD, TinyNet, _init, free_port
from tests.close import close, gap

HEADS = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2, "pred_hidden": 7}


def views(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(views=[torch.randn(n, 3, 4, 4, generator=g) for _ in range(2)])


def hand_cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def rows(t):
    return t.detach().tolist()


# --- registry and params ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["byol", "simsiam", "nnclr"])
def test_registered_and_defaults_validate(name):
    cls = registry.get(name)
    assert Section(cls.PARAMS, optional=tuple(cls.PARAMS))(dict(cls.DEFAULTS), f"methods.{name}") == cls.DEFAULTS


# --- BYOL -----------------------------------------------------------------------------------------

def test_byol_loss_is_two_minus_two_cosine():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    want = sum(2 - 2 * hand_cos(a, b) for a, b in zip(rows(p), rows(z))) / 3
    assert math.isclose(normalized_mse(p, z).item(), want, rel_tol=1e-6)
    # eq. 2 as written: the squared distance of the normalised vectors
    assert torch.allclose(normalized_mse(p, z), ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean())


def make_byol(seed=0, **over):
    torch.manual_seed(seed)
    return BYOL(TinyNet(), {**HEADS, "momentum": 0.996, **over}, AUG, 4)


def test_byol_forward_is_the_symmetric_loss():
    m = make_byol()
    b = views()
    loss = m(b)["loss"]
    x1, x2 = b.views
    p1, p2, t1, t2 = m.online(x1), m.online(x2), m.target(x1), m.target(x2)
    want = sum(2 - 2 * hand_cos(a, c) for a, c in zip(rows(p1), rows(t2))) / 4
    want += sum(2 - 2 * hand_cos(a, c) for a, c in zip(rows(p2), rows(t1))) / 4
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in m.target_backbone.parameters())
    trained = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not any(id(p) in trained for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])


def test_byol_target_momentum_schedule_and_ema():
    assert math.isclose(cosine_momentum(0.996, 0.0), 0.996)
    assert math.isclose(cosine_momentum(0.996, 0.5), 0.998)
    assert math.isclose(cosine_momentum(0.996, 1.0), 1.0)
    m = make_byol()
    assert m.target_momentum(0.0) == pytest.approx(0.996)
    with torch.no_grad():
        for p in [*m.backbone.parameters(), *m.projector.parameters()]:
            p.add_(torch.randn_like(p))
    pairs = list(zip([*m.target_backbone.parameters(), *m.target_projector.parameters()],
                     [*m.backbone.parameters(), *m.projector.parameters()]))
    before = [t.clone() for t, _ in pairs]
    gap = sum((t - o).detach().norm() ** 2 for t, o in pairs).sqrt()
    m.after_step(0.0)
    for (t, o), t0 in zip(pairs, before):
        assert torch.allclose(t, 0.996 * t0 + 0.004 * o, atol=1e-7)
    new_gap = sum((t - o).detach().norm() ** 2 for t, o in pairs).sqrt()
    assert new_gap < gap and math.isclose(new_gap / gap, 0.996, rel_tol=1e-4)  # moved towards the online weights
    frozen = [t.clone() for t, _ in pairs]
    m.after_step(1.0)  # tau = 1 at the end of training: the target stops moving
    assert all(torch.equal(t, f) for (t, _), f in zip(pairs, frozen))


def test_byol_asymmetric_views():
    v1, v2 = make_byol().views()
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)


# --- SimSiam --------------------------------------------------------------------------------------

def test_simsiam_negative_cosine_and_stop_gradient():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3, 4, generator=g, requires_grad=True)
    z = torch.randn(3, 4, generator=g, requires_grad=True)
    loss = negative_cosine(p, z)
    assert math.isclose(loss.item(), -sum(hand_cos(a, b) for a, b in zip(rows(p), rows(z))) / 3, rel_tol=1e-6)
    loss.backward()
    assert z.grad is None  # sg(z): no gradient reaches the target branch
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_simsiam_forward_is_the_symmetric_loss():
    torch.manual_seed(0)
    m = SimSiam(TinyNet(), dict(HEADS), AUG, 4)
    b = views()
    (z1, p1), (z2, p2) = (m.embed(v) for v in b.views)
    want = -sum(hand_cos(a, c) for a, c in zip(rows(p1), rows(z2))) / 8 - sum(hand_cos(a, c) for a, c in zip(rows(p2), rows(z1))) / 8
    assert math.isclose(m(b)["loss"].item(), want, rel_tol=1e-5)
    assert isinstance(m.projector[-1], nn.BatchNorm1d)  # BN on the projection output (paper §4)


def test_simsiam_target_branch_gets_no_gradient():
    """With the predictor's path cut, a loss of D(h(z1), sg(z2)) sends nothing into z2's computation."""
    torch.manual_seed(0)
    m = SimSiam(TinyNet(), dict(HEADS), AUG, 4)
    x1, x2 = views().views
    z1, p1 = m.embed(x1)
    x2 = x2.clone().requires_grad_(True)
    z2, _ = m.embed(x2)
    negative_cosine(p1, z2).backward()
    assert x2.grad is None or x2.grad.abs().sum() == 0


# --- NNCLR ----------------------------------------------------------------------------------------

def test_nearest_neighbour_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 4, generator=g)
    support = F.normalize(torch.randn(9, 4, generator=g), dim=1)
    got = nearest_neighbour(z, support)
    for i, zi in enumerate(rows(z)):
        sims = [hand_cos(zi, q) for q in rows(support)]
        assert torch.equal(got[i], support[max(range(9), key=sims.__getitem__)])
    assert torch.allclose(nearest_neighbour(z, support[:0]), F.normalize(z, dim=1))  # empty set: z itself


def test_support_set_searches_only_written_slots():
    s = SupportSet(7, 4)
    keys = F.normalize(torch.randn(10, 4), dim=1)
    assert s.active().shape[0] == 0
    s.push(keys[:3])
    assert int(s.filled) == 3 and torch.allclose(s.active(), keys[:3])
    s.push(keys[3:])
    assert int(s.filled) == 7 and int(s.ptr) == 3
    assert torch.allclose(s.active(), torch.cat([keys[7:], keys[3:7]]))


def test_support_set_fill_count_is_read_on_the_host_and_restored_from_a_checkpoint():
    """Issue 23, defect 6: `active()` reads the fill count from its host copy (no `int(buffer)`, which waits for the
    GPU); the buffer still checkpoints it, and loading a state_dict refreshes the host copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func.overloadpacket.__name__ == "_local_scalar_dense"
            return func(*args, **(kwargs or {}))

    s = SupportSet(7, 4)
    with Reads():
        s.push(F.normalize(torch.randn(5, 4), dim=1))
        n_active = s.active().shape[0]
    assert Reads.n == 0 and n_active == 5 and int(s.filled) == 5
    fresh = SupportSet(7, 4)
    fresh.load_state_dict(s.state_dict())
    assert fresh.counter("filled") == 5 and torch.equal(fresh.active(), s.active())


def hand_info_nce(queries, keys, t):
    q = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows(queries)]
    k = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows(keys)]
    total = 0.0
    for i, qi in enumerate(q):
        logits = [sum(a * b for a, b in zip(qi, kj)) / t for kj in k]
        total += -math.log(math.exp(logits[i]) / sum(math.exp(s) for s in logits))
    return total / len(q)


def test_info_nce_batch_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for t in (0.1, 0.5):
        got = info_nce_batch(q, k, torch.arange(4), t)
        assert math.isclose(got.item(), hand_info_nce(q, k, t), rel_tol=1e-5)


NNCLR_CFG = {**HEADS, "temperature": 0.1, "support_size": 20}


def make_nnclr(seed=0, bn_free=False):
    torch.manual_seed(seed)
    m = NNCLR(TinyNet(), dict(NNCLR_CFG), AUG, 4)
    if bn_free:  # per-rank BatchNorm would (correctly) differ from whole-batch BN in the DDP comparison
        m.projector, m.predictor = nn.Linear(TinyNet.feat_dim, 5), nn.Linear(5, 5)
    return m


def test_nnclr_forward_matches_hand_computation():
    m = make_nnclr()
    with torch.no_grad():
        m.support.push(torch.randn(12, 5))
    b = views()
    out = m(b)
    (z1, p1), (z2, p2) = (m.embed(v) for v in b.views)
    support = m.support.keys[:12]

    def brute_nn(z):
        return torch.stack([support[max(range(12), key=lambda j: hand_cos(zi, rows(support)[j]))] for zi in rows(z)])

    want = (hand_info_nce(brute_nn(z1), p2, 0.1) + hand_info_nce(brute_nn(z2), p1, 0.1)) / 2
    assert math.isclose(out["loss"].item(), want, rel_tol=1e-5)
    # the support set changes only after the step, with view 1's projections
    assert int(m.support.ptr) == 12
    m.after_step(0.1)
    assert int(m.support.ptr) == 16 and torch.allclose(m.support.keys[12:16], F.normalize(z1.detach(), dim=1), atol=1e-6)


def test_nnclr_neighbour_is_a_constant():
    """Gradient reaches view 1's projection only through its prediction: the NN is a support-set element."""
    m = make_nnclr(bn_free=True)
    with torch.no_grad():
        m.support.push(torch.randn(12, 5))
    m.predictor = nn.Linear(5, 5)
    m.predictor.weight.requires_grad_(False)
    with torch.no_grad():
        m.predictor.weight.zero_()  # p ignores z (the bias keeps a graph): only the NN path could carry a gradient
    m(views())["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.projector.parameters())


def _nnclr_worker(rank, port, out):
    _init(rank, port)
    model = nn.parallel.DistributedDataParallel(make_nnclr(bn_free=True), broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    saved = {}
    for step in range(2):
        full = views(8, seed=10 + step)
        local = SimpleNamespace(views=[v[rank * 4:(rank + 1) * 4] for v in full.views])
        opt.zero_grad()
        model(local)["loss"].backward()
        saved[f"grads{step}"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        saved[f"z1_{step}"] = model.module._pending.clone()
        opt.step()
        model.module.after_step(0.5)
        saved[f"support{step}"] = {k: v.clone() for k, v in model.module.support.state_dict().items()}
    torch.save(saved, f"{out}/nnclr{rank}.pt")
    dist.destroy_process_group()


def test_nnclr_support_set_ddp(tmp_path):
    mp.spawn(_nnclr_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"nnclr{r}.pt") for r in range(WORLD))
    for step in range(2):
        s0, s1 = r0[f"support{step}"], r1[f"support{step}"]
        assert all(torch.equal(s0[k], s1[k]) for k in s0)  # identical on every rank
        assert int(s0["ptr"]) == int(s0["filled"]) == 8 * (step + 1)
        gathered = F.normalize(torch.cat([r0[f"z1_{step}"], r1[f"z1_{step}"]]), dim=1)  # rank order
        assert torch.allclose(s0["keys"][8 * step:8 * (step + 1)], gathered, atol=1e-6)
    # the DDP gradient equals the single-process gradient on the concatenated batch (step 2 uses real neighbours)
    single = make_nnclr(bn_free=True)
    opt = torch.optim.SGD(single.parameters(), lr=0.5)
    for step in range(2):
        opt.zero_grad()
        single(views(8, seed=10 + step))["loss"].backward()
        for r in (r0, r1):
            for n, p in single.named_parameters():
                assert close(r[f"grads{step}"][n], p.grad), (step, n, gap(r[f"grads{step}"][n], p.grad))
        opt.step()
        single.after_step(0.5)
    assert torch.allclose(single.support.keys, r0["support1"]["keys"], atol=1e-6)


# --- checkpoint -> resume ---------------------------------------------------------------------------

def test_state_dict_round_trip_restores_support_set_and_target():
    m = make_nnclr()
    with torch.no_grad():
        m.support.push(torch.randn(13, 5))
    fresh = make_nnclr(seed=1)
    assert not torch.equal(fresh.support.keys, m.support.keys)
    fresh.load_state_dict(m.state_dict())
    for k in ("keys", "ptr", "filled"):
        assert torch.equal(getattr(fresh.support, k), getattr(m.support, k)), k
    assert int(fresh.support.ptr) == 13 and int(fresh.support.filled) == 13

    b = make_byol()
    with torch.no_grad():
        for p in b.backbone.parameters():
            p.add_(1.0)
    b(views())  # updates the target's BN statistics (TinyNet has none; the projector has)
    b.after_step(0.3)
    fresh = make_byol(seed=1)
    fresh.load_state_dict(b.state_dict())
    for prefix in ("target_backbone", "target_projector"):
        want = {k: v for k, v in b.state_dict().items() if k.startswith(prefix)}
        got = fresh.state_dict()
        assert want and all(torch.equal(got[k], v) for k, v in want.items())


# --- one trainer step on a real (tiny) ResNet ---------------------------------------------------------

@pytest.mark.parametrize("name", ["byol", "simsiam", "nnclr"])
def test_one_train_step_on_resnet(name):
    from pipeline.models.backbones import build_backbone
    from pipeline.train.trainer import train_step

    torch.manual_seed(0)
    cfg = {**HEADS, **({"support_size": 16} if name == "nnclr" else {})}
    m = registry.get(name)(build_backbone({"arch": "resnet18", "width": 4, "cifar_stem": True}, 8), cfg, AUG, 8)
    opt = torch.optim.SGD([g for g in m.param_groups()], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = SimpleNamespace(views=[torch.randn(4, 3, 8, 8) for _ in range(2)])
    before = [p.clone() for p in m.backbone.parameters()]
    for _ in range(2):
        out = train_step(m, m, opt, scaler, batch, None, 0.0, 0.5)
        assert torch.isfinite(out["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, m.backbone.parameters()))


@pytest.mark.parametrize("name", ["byol", "nnclr"])
def test_trainer_resume_restores_target_and_support_set(tmp_path, shard_dir, name):
    """Through the trainer: a run cut mid-epoch and resumed ends bit-identical to an uninterrupted one."""
    from tests.test_resume import final_state, project
    from tests.conftest import tiny_params
    from pipeline.train.trainer import train

    block = {**HEADS, **({"momentum": 0.99, "blur_p": [0.0, 0.0]} if name == "byol" else {"support_size": 12})}
    p = tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0, "train.checkpoint_every": 2,
                       "train.epochs": 2, f"methods.{name}": block, f"runs.{name}": {"method": name, "backbone": "resnet18_w8"}})
    full, cut = project(tmp_path, "full", shard_dir), project(tmp_path, "cut", shard_dir)
    train(p, name, root=full)
    assert train(p, name, root=cut, max_steps=4) == {"stopped_at_step": 4}
    train(p, name, root=cut)
    a, b = final_state(full, name)["method"], final_state(cut, name)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if name == "nnclr":  # 6 steps x 8 images into 12 slots
        assert int(a["support.ptr"]) == 48 % 12 and int(a["support.filled"]) == 12

"""LeOCLR and pNNCLR against hand computations of their papers' equations; their views, gradients, memories
(queue, support set, EMA target) under DDP (gloo, 2 processes) and through checkpoint -> resume."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.data.views import View
from pipeline.methods import registry
from pipeline.methods.leoclr import LeOCLR
from pipeline.methods.pnnclr import PNNCLR, pseudo_neighbour
from pipeline.params import Section
from tests.test_byol_simsiam_nnclr import hand_cos, hand_info_nce, rows
from tests.test_ddp import AUG, WORLD, TinyNet, _init, free_port
from tests.close import close, gap

HEADS = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2}
# Shuffle-BN off: the hand computations encode each key batch whole (Shuffle-BN: tests/test_shuffle_bn.py)
LEO_CFG = {**HEADS, "temperature": 0.2, "queue_size": 20, "momentum": 0.9, "variant": "momentum", "shuffle_bn": False}
PNN_CFG = {**HEADS, "temperature": 0.1, "support_size": 20, "momentum": 0.9, "alpha": 0.25, "beta": 0.1,
           "pseudo": True, "noise": True}


def batch(n=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(views=[torch.randn(n, 3, 4, 4, generator=g) for _ in range(k)])


def bn_free(m):
    """Linear heads: per-rank BatchNorm would (correctly) differ from whole-batch BN in DDP comparisons."""
    from pipeline.methods.base import momentum_copy

    m.projector = nn.Linear(TinyNet.feat_dim, 5)
    for name in ("key_projector", "target_projector"):
        if hasattr(m, name):
            setattr(m, name, momentum_copy(m.projector))
    return m


def make_leo(seed=0, linear=False, **over):
    torch.manual_seed(seed)
    m = LeOCLR(TinyNet(), {**LEO_CFG, **over}, AUG, 4)
    return bn_free(m) if linear else m


def make_pnn(seed=0, linear=False, **over):
    torch.manual_seed(seed)
    m = PNNCLR(TinyNet(), {**PNN_CFG, **over}, AUG, 4)
    return bn_free(m) if linear else m


def hand_info_nce_queue(u, v, queue, t):
    """LeOCLR eq. 2 (MoCo-v2's InfoNCE) on python lists: positive v_i, negatives the queue, mean over the batch."""
    total = 0.0
    for ui, vi in zip(rows(u), rows(v)):
        pos = hand_cos(ui, vi) / t
        negs = [hand_cos(ui, q) / t for q in rows(queue)]  # queue rows are unit vectors
        total += -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(s) for s in negs)))
    return total / len(rows(u))


@pytest.mark.parametrize("name", ["leoclr", "pnnclr"])
def test_registered_and_defaults_validate(name):
    cls = registry.get(name)
    assert Section(cls.PARAMS, optional=tuple(cls.PARAMS))(dict(cls.DEFAULTS), f"methods.{name}") == cls.DEFAULTS


def test_defaults_follow_the_papers():
    assert (PNNCLR.DEFAULTS["alpha"], PNNCLR.DEFAULTS["beta"]) == (0.25, 0.10)  # Table 5, not the prose
    assert PNNCLR.DEFAULTS["support_size"] == 10000 and PNNCLR.DEFAULTS["proj_dim"] == 2048
    assert LeOCLR.DEFAULTS["momentum"] == 0.999 and LeOCLR.DEFAULTS["variant"] == "momentum"


def test_bad_params_name_the_key():
    from pipeline.params import ParamError, _method_block

    with pytest.raises(ParamError, match=r"methods\.leoclr\.variant: expected one of"):
        _method_block("leoclr", {"variant": "sideways"}, "methods.leoclr")
    with pytest.raises(ParamError, match=r"methods\.pnnclr\.alpha: expected a number"):
        _method_block("pnnclr", {"alpha": 1.5}, "methods.pnnclr")
    with pytest.raises(ParamError, match=r"methods\.pnnclr\.noise: expected true or false"):
        _method_block("pnnclr", {"noise": "yes"}, "methods.pnnclr")


# --- LeOCLR: views ------------------------------------------------------------------------------------

def test_leoclr_views_original_is_never_cropped():
    specs = make_leo().views()
    assert len(specs) == 3 and specs[0].crop_scale is None
    assert specs[1].crop_scale == specs[2].crop_scale == tuple(AUG["crop_scale"])
    for s in specs:  # every view gets the same photometric augmentation and flip (paper §3: "all the views")
        assert (s.hflip, s.color_jitter, s.color_jitter_p, s.grayscale_p) == (
            AUG["hflip"], tuple(AUG["color_jitter"]), AUG["color_jitter_p"], AUG["grayscale_p"])
    img = Image.new("RGB", (40, 30), (120, 30, 200))
    original, crop = View(specs[0], [0.5] * 3, [0.25] * 3), View(specs[1], [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    flips, cropped = set(), 0
    for _ in range(300):
        x, g = original(img)
        assert x.shape == (3, 4, 4) and g[:4].tolist() == [0, 0, 30, 40]  # the whole image, every draw
        flips.add(int(g[4]))
        cropped += crop(img)[1][:4].tolist() != [0, 0, 30, 40]
    assert flips == {0, 1} and cropped > 250  # the original is flipped; the crops really crop


def test_leoclr_loader_geometry(shard_dir):
    """Through the real loader: view 0's box is the whole 32 x 32 image for every image of every batch."""
    from pipeline.data.loader import ShardStream

    m = LeOCLR(TinyNet(), dict(LEO_CFG), AUG, 16)
    stream = ShardStream(shard_dir, m.views(), [0.5] * 3, [0.25] * 3, local_batch=8, n_samples=24, global_batch=8, seed=0)
    n = 0
    for b in stream:
        assert len(b.views) == 3 and all(v.shape == (8, 3, 16, 16) for v in b.views)
        assert (b.geometry[0][:, :4] == torch.tensor([0, 0, 32, 32], dtype=torch.int32)).all()
        assert (b.geometry[1][:, :4] != torch.tensor([0, 0, 32, 32], dtype=torch.int32)).any(dim=1).any()
        n += 1
    assert n == 3


# --- LeOCLR: momentum variant -------------------------------------------------------------------------

class Recorder(nn.Module):
    def __init__(self, inner, log, tag):
        super().__init__()
        self.inner, self.log, self.tag = inner, log, tag

    def forward(self, x):
        self.log.append((self.tag, x))
        return self.inner(x)


def test_leoclr_query_sees_the_original_and_keys_the_crops():
    m = make_leo()
    log = []
    m.backbone, m.key_backbone = Recorder(m.backbone, log, "query"), Recorder(m.key_backbone, log, "key")
    b = batch()
    m(b)
    assert [t for t, _ in log] == ["query", "key", "key"]
    assert log[0][1] is b.views[0] and log[1][1] is b.views[1] and log[2][1] is b.views[2]


def test_leoclr_loss_is_both_terms_against_the_queue():
    m = make_leo()
    with torch.no_grad():
        m.queue.push(torch.randn(20, 5))
    queue = m.queue.keys.clone()
    b = batch()
    out = m(b)
    u, v1, v2 = m.project(b.views[0]), m.key(b.views[1]), m.key(b.views[2])
    l1, l2 = hand_info_nce_queue(u, v1, queue, 0.2), hand_info_nce_queue(u, v2, queue, 0.2)
    assert math.isclose(out["info_nce_crop1"].item(), l1, rel_tol=1e-5)
    assert math.isclose(out["info_nce_crop2"].item(), l2, rel_tol=1e-5)
    assert math.isclose(out["loss"].item(), l1 + l2, rel_tol=1e-5)
    assert abs(l1 - l2) > 1e-4  # two different terms, not one counted twice


def test_leoclr_queue_receives_both_crops_keys_and_key_encoder_moves():
    m = make_leo()
    b = batch()
    m(b)
    v1, v2 = m.key(b.views[1]), m.key(b.views[2])
    assert int(m.queue.ptr) == 0  # nothing enqueued before the step
    online = [p.detach().clone() + 0.5 for p in [*m.backbone.parameters(), *m.projector.parameters()]]
    with torch.no_grad():
        for p, o in zip([*m.backbone.parameters(), *m.projector.parameters()], online):
            p.copy_(o)
    keys_before = [p.clone() for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()]]
    m.after_step(0.5)
    assert int(m.queue.ptr) == 8
    assert torch.allclose(m.queue.keys[:4], F.normalize(v1, dim=1), atol=1e-6)
    assert torch.allclose(m.queue.keys[4:8], F.normalize(v2, dim=1), atol=1e-6)
    for k, k0, o in zip([*m.key_backbone.parameters(), *m.key_projector.parameters()], keys_before, online):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * o, atol=1e-6)  # eq. 1, m = 0.9 here


def test_leoclr_momentum_gradient_reaches_only_the_query():
    m = make_leo()
    b = batch()
    x0, x1, x2 = (v.clone().requires_grad_(True) for v in b.views)
    for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()]:
        p.requires_grad_(True)  # sg(v): even a trainable key encoder must get nothing
    m(SimpleNamespace(views=[x0, x1, x2]))["loss"].backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert x1.grad is None and x2.grad is None
    assert all(p.grad is None for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()])


# --- LeOCLR: end-to-end variant (Table 5) ----------------------------------------------------------------

def test_leoclr_end_to_end_trains_both_branches():
    m = make_leo(variant="end_to_end")
    assert not hasattr(m, "key_backbone") and not hasattr(m, "queue")
    assert not any(k.startswith(("key_", "queue")) for k in m.state_dict())
    b = batch()
    x0, x1, x2 = (v.clone().requires_grad_(True) for v in b.views)
    out = m(SimpleNamespace(views=[x0, x1, x2]))
    u, v1, v2 = (m.project(v) for v in b.views)
    l1, l2 = hand_info_nce(u, v1, 0.2), hand_info_nce(u, v2, 0.2)  # in-batch negatives: the other images' crops
    assert math.isclose(out["loss"].item(), l1 + l2, rel_tol=1e-5)
    out["loss"].backward()
    for x in (x0, x1, x2):
        assert x.grad is not None and x.grad.abs().sum() > 0
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.after_step(0.5)  # nothing to enqueue, no momentum encoder: a no-op
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


# --- pNNCLR: the pseudo neighbour -----------------------------------------------------------------------

def brute_nn(z, support):
    return torch.stack([support[max(range(len(support)), key=lambda j: hand_cos(zi, rows(support)[j]))] for zi in rows(z)])


def test_pseudo_neighbour_without_noise_is_the_interpolation():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 5, generator=g)
    support = F.normalize(torch.randn(11, 5, generator=g), dim=1)
    zn, nn_z = F.normalize(z, dim=1), brute_nn(z, support)
    for alpha in (0.25, 0.1, 0.6):
        got = pseudo_neighbour(z, support, alpha, 0.0)
        assert torch.allclose(got, alpha * zn + (1 - alpha) * nn_z, atol=1e-6)  # eq. 4
    assert torch.equal(pseudo_neighbour(z, support, 0.0, 0.0), nn_z)  # alpha 0 (pseudo off): NN(z) itself
    assert torch.allclose(pseudo_neighbour(z, support[:0], 0.25, 0.1), zn)  # empty support set: z itself


def test_pseudo_neighbour_noise_spread_matches_beta_times_distance():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 8, generator=g)
    support = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    alpha, beta, n = 0.25, 0.1, 20000
    mean = alpha * F.normalize(z, dim=1) + (1 - alpha) * brute_nn(z, support)  # z''
    sigma = beta * (mean - F.normalize(z, dim=1)).norm(dim=1)                # beta ||z'' - z||
    assert sigma.min() > 0.01 and (sigma.max() - sigma.min()) / sigma.max() > 0.05  # three different scales
    draws = pseudo_neighbour(z.repeat_interleave(n, 0), support, alpha, beta, torch.Generator().manual_seed(7))
    draws = draws.view(3, n, 8)
    for i in range(3):
        dev = draws[i] - mean[i]
        std = dev.std(dim=0)  # per dimension
        assert torch.allclose(std, torch.full_like(std, sigma[i].item()), rtol=0.04), (i, std, sigma[i])
        assert dev.mean(dim=0).abs().max() < 5 * sigma[i] / math.sqrt(n)  # centred on z''
        within = (dev.abs() < sigma[i]).float().mean().item()
        assert abs(within - 0.6827) < 0.01  # Gaussian: 68% within one standard deviation
        corr = torch.corrcoef(dev.t())
        assert (corr - torch.eye(8)).abs().max() < 0.05  # independent per dimension


def test_pseudo_neighbour_is_straight_through():
    """Value eq. 4-5, gradient the identity in z^ = z / ||z|| (else the swu-only ablation could not learn)."""
    g = torch.Generator().manual_seed(8)
    support = F.normalize(torch.randn(9, 5, generator=g), dim=1)
    z = torch.randn(4, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 5, generator=g)
    for alpha, beta in ((0.25, 0.1), (0.0, 0.0)):
        (gz,) = torch.autograd.grad((pseudo_neighbour(z, support, alpha, beta, torch.Generator().manual_seed(0)) * w).sum(), z)
        (want,) = torch.autograd.grad((F.normalize(z, dim=1) * w).sum(), z)
        assert torch.allclose(gz, want, atol=1e-6)


def test_ablation_switches():
    assert make_pnn().alpha_beta() == (0.25, 0.1)
    assert make_pnn(noise=False).alpha_beta() == (0.25, 0.0)
    assert make_pnn(pseudo=False, noise=False).alpha_beta() == (0.0, 0.0)  # Table 4's "swu" row: plain NN


# --- pNNCLR: the method -------------------------------------------------------------------------------------

def test_pnnclr_loss_matches_hand_computation():
    m = make_pnn(noise=False)
    with torch.no_grad():
        m.support.push(torch.randn(12, 5))
    b = batch(k=2)
    out = m(b)
    z1, z2 = (m.project(v) for v in b.views)
    t1, t2 = (m.target(v) for v in b.views)
    support = m.support.keys[:12]
    q1 = 0.25 * F.normalize(z1, dim=1) + 0.75 * brute_nn(z1, support)
    q2 = 0.25 * F.normalize(z2, dim=1) + 0.75 * brute_nn(z2, support)
    # eq. 7-9: pNN(z_i) vs the other view's target; the directions averaged (NNCLR's scale, see the module doc)
    want = (hand_info_nce(q1, t2, 0.1) + hand_info_nce(q2, t1, 0.1)) / 2
    assert math.isclose(out["loss"].item(), want, rel_tol=1e-5)
    assert int(m.support.ptr) == 12  # the support set changes only after the step, with view 1's projections
    m.after_step(0.5)
    assert int(m.support.ptr) == 16 and torch.allclose(m.support.keys[12:16], F.normalize(z1.detach(), dim=1), atol=1e-6)


def test_pnnclr_noise_is_drawn_and_reproducible_from_state():
    m = make_pnn()
    with torch.no_grad():
        m.support.push(torch.randn(12, 5))
    b = batch(k=2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(123)
    first = m(b)["loss"]
    torch.manual_seed(456)  # the global RNG plays no part
    second = m(b)["loss"]
    assert int(m.noise_step) == 2 and first.item() != second.item()  # a fresh draw every step
    quiet = make_pnn(noise=False)
    quiet.load_state_dict(state)
    assert quiet(b)["loss"].item() != first.item()  # the noise changes the loss
    fresh = make_pnn(seed=9)
    assert int(fresh.noise_seed) != int(m.noise_seed)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(b)["loss"], first) and torch.equal(fresh(b)["loss"], second)


def test_pnnclr_gradient_reaches_online_never_target():
    for over in ({}, {"pseudo": False, "noise": False}):  # the full method and Table 4's "swu" row
        m = make_pnn(**over)
        with torch.no_grad():
            m.support.push(torch.randn(12, 5))
        targets = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
        for p in targets:
            p.requires_grad_(True)  # stop-gradient must hold even for trainable target weights
        m(batch(k=2))["loss"].backward()
        assert all(p.grad is None for p in targets), over
        for p in [*m.backbone.parameters(), *m.projector.parameters()]:
            assert p.grad is not None and p.grad.abs().sum() > 0, over
    m = make_pnn()  # one live model: ids of a freed model's parameters can be reused by the next one
    trained = {id(p) for g in m.param_groups() for p in g["params"]}
    assert trained, "no parameter groups"
    assert not any(id(p) in trained for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])
    assert all(id(p) in trained for p in [*m.backbone.parameters(), *m.projector.parameters()])


def test_pnnclr_smooth_weight_update():
    m = make_pnn()
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    target = [*m.target_backbone.parameters(), *m.target_projector.parameters()]
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in target]
    m.after_step(0.1)
    m.after_step(0.9)  # lambda is a constant (eq. 6), not a schedule
    for t, t0, o in zip(target, before, online):
        assert torch.allclose(t, 0.81 * t0 + 0.19 * o, atol=1e-6)


# --- DDP (gloo, 2 processes) ---------------------------------------------------------------------------------

def _worker(rank, port, out):
    _init(rank, port)
    saved = {}
    makers = {"leo_mom": lambda: make_leo(linear=True), "leo_e2e": lambda: make_leo(linear=True, variant="end_to_end"),
              "pnn": lambda: make_pnn(linear=True, noise=False), "pnn_noise": lambda: make_pnn(linear=True)}
    for name, make in makers.items():
        k = 3 if name.startswith("leo") else 2
        model = nn.parallel.DistributedDataParallel(make(), broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(2):
            full = batch(8, k, seed=10 + step)
            local = SimpleNamespace(views=[v[rank * 4:(rank + 1) * 4] for v in full.views])
            opt.zero_grad()
            model(local)["loss"].backward()
            saved[f"{name}.grads{step}"] = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
            if name.startswith("pnn"):
                saved[f"{name}.z1_{step}"] = model.module._pending.clone()
            opt.step()
            model.module.after_step(0.5)
        saved[f"{name}.state"] = {k_: v.clone() for k_, v in model.module.state_dict().items()}
    torch.save(saved, f"{out}/r{rank}.pt")
    dist.destroy_process_group()


def test_ddp_matches_single_process_and_memories_are_identical(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD))
    for name in ("leo_mom", "pnn", "pnn_noise"):  # queue / support set / momentum encoders identical on every rank
        s0, s1 = r0[f"{name}.state"], r1[f"{name}.state"]
        assert all(torch.equal(s0[k], s1[k]) for k in s0), [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert int(r0["leo_mom.state"]["queue.ptr"]) == 2 * 2 * 8 % 20  # 2 steps x 2 crops x 8 gathered keys
    for name in ("pnn", "pnn_noise"):
        s = r0[f"{name}.state"]
        assert int(s["support.ptr"]) == int(s["support.filled"]) == 16
        gathered = F.normalize(torch.cat([r0[f"{name}.z1_1"], r1[f"{name}.z1_1"]]), dim=1)  # rank order
        assert torch.allclose(s["support.keys"][8:16], gathered, atol=1e-6)
    # the DDP gradient equals the single-process gradient on the concatenated batch (step 2 uses the queue /
    # real neighbours); with noise the ranks draw their own noise, so only the noise-free runs are compared
    for name, make, k in (("leo_mom", lambda: make_leo(linear=True), 3),
                          ("leo_e2e", lambda: make_leo(linear=True, variant="end_to_end"), 3),
                          ("pnn", lambda: make_pnn(linear=True, noise=False), 2)):
        single = make()
        opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.5)
        for step in range(2):
            opt.zero_grad()
            single(batch(8, k, seed=10 + step))["loss"].backward()
            for r in (r0, r1):
                grads = r[f"{name}.grads{step}"]
                for n, p in single.named_parameters():
                    if p.grad is not None:
                        assert close(grads[n], p.grad), (name, step, n, gap(grads[n], p.grad))
            opt.step()
            single.after_step(0.5)
        for key, v in single.state_dict().items():
            if key != "noise_step":
                assert close(v, r0[f"{name}.state"][key]), (name, key, gap(v, r0[f"{name}.state"][key]))


# --- through the trainer ------------------------------------------------------------------------------------

def _params(name, block, **over):
    from tests.conftest import tiny_params

    return tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0, "train.checkpoint_every": 2,
                          "train.epochs": 2, f"methods.{name}": block,
                          f"runs.{name}": {"method": name, "backbone": "resnet18_w8", **over}})


def test_pnnclr_trainer_resume_restores_support_set_target_and_noise(tmp_path, shard_dir):
    """A run cut mid-epoch and resumed ends bit-identical to an uninterrupted one (noise on)."""
    from pipeline.train.trainer import train
    from tests.test_resume import final_state, project

    p = _params("pnnclr", {**HEADS, "support_size": 12})
    full, cut = project(tmp_path, "full", shard_dir), project(tmp_path, "cut", shard_dir)
    train(p, "pnnclr", root=full)
    assert train(p, "pnnclr", root=cut, max_steps=4) == {"stopped_at_step": 4}
    mid = final_state(cut, "pnnclr")["method"]
    assert int(mid["noise_step"]) == 4 and int(mid["support.filled"]) == 12
    train(p, "pnnclr", root=cut)
    a, b = final_state(full, "pnnclr")["method"], final_state(cut, "pnnclr")["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert int(a["noise_step"]) == 6 and int(a["support.ptr"]) == 48 % 12
    assert any(k.startswith("target_backbone.") for k in a)


@pytest.mark.parametrize("variant", ["momentum", "end_to_end"])
def test_leoclr_smoke_through_trainer(tmp_path, shard_dir, variant):
    from pipeline.train.trainer import train
    from tests.test_resume import final_state, project

    p = _params("leoclr", {**HEADS, "queue_size": 32, "momentum": 0.99, "variant": variant})
    root = project(tmp_path, "r", shard_dir)
    assert train(p, "leoclr", root=root, max_steps=3) == {"stopped_at_step": 3}
    state = final_state(root, "leoclr")["method"]
    assert ("queue.keys" in state) == (variant == "momentum")
    if variant == "momentum":
        assert int(state["queue.ptr"]) == 3 * 2 * 8 % 32
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_profiles_have_the_runs():
    # LeOCLR and pNNCLR run in the CPU comparison (pNNCLR with Table 5's alpha / beta), the GPU preset and the
    # tiny end-to-end profile
    from pipeline.params import load, validate
    from pipeline.profile import resolve
    from tests.conftest import ROOT

    p = load(ROOT / "params.yaml")
    assert (p["methods"]["pnnclr"]["alpha"], p["methods"]["pnnclr"]["beta"]) == (0.25, 0.10)
    for runs, backbone in ((p["runs"], "resnet18_w16"), (validate(resolve("gpu-resnet18"))["runs"], "resnet18"),
                           (validate(resolve("tiny"))["runs"], "resnet18_w8")):
        for name in ("leoclr", "pnnclr"):
            assert runs[name] == {"method": name, "backbone": backbone}

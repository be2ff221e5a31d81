"""GSSSL and multi-patch grouping: losses against hand computations of the paper's equations (3.1-3.4),
patches (overlap, size, content), per-patch augmentation, group means, the grouped SimCLR / MoCo-v2
losses, DDP (gloo, 2 processes) vs one process on the concatenated batch, and trainer smoke / resume."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.data.patch_augment import patch_augment
from pipeline.data.patch_crops import min_overlapping_size, random_patches
from pipeline.losses.triplet import rank_k_triplet
from pipeline.methods import registry
from pipeline.methods.gsssl import GSSSL, gsssl_loss
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.patch_groups import PatchGroups, encode_patches
from pipeline.methods.simclr import SimCLR, nt_xent_global, nt_xent_grouped
from pipeline.params import ParamError, Section
from tests.test_barlow_vicreg import hand_barlow_terms
from tests.test_ddp import AUG, WORLD, TinyNet, _init, spawn_and_load

NO_AUG = {"jitter_p": 0.0, "grayscale_p": 0.0, "hflip_p": 0.0, "blur_p": [0.0, 0.0], "solarize_p": [0.0, 0.0]}


# --- hand computations (plain Python) ------------------------------------------------------------------

def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def hand_rank_k(q, keys, positive, k, margin):
    """Eq. 3.4: 1/d sum_i max(0, C + (k-th largest cosine among row i's negatives) - cosine to its positive)."""
    total = 0.0
    for i, row in enumerate(q.tolist()):
        sims = [_cos(row, key) for key in keys.tolist()]
        negs = sorted((s for j, s in enumerate(sims) if j != int(positive[i])), reverse=True)
        total += max(0.0, margin + negs[k - 1] - sims[int(positive[i])])
    return total / q.shape[0]


def hand_gsssl(z, w, lambd, k, margin, weight):
    """Eq. 3.3 + 3.4 (Alg. 1 lines 7-10): sum_i L_BT(z_i, Wbar) + sum_i L_BT(w_i, Zbar) + weight * rank-k."""
    zbar, wbar = z.mean(0), w.mean(0)
    bt = 0.0
    for patches, other in ((z, wbar), (w, zbar)):
        for i in range(patches.shape[0]):
            on, off = hand_barlow_terms(patches[i], other)
            bt += on + lambd * off
    return bt + weight * hand_rank_k(zbar, wbar, list(range(z.shape[1])), k, margin)


def hand_nt_xent(queries, keys, positive, self_index, t):
    total = 0.0
    for q, p, s in zip(queries.tolist(), positive, self_index):
        logits = {j: _cos(q, key) / t for j, key in enumerate(keys.tolist()) if j != s}
        total += -logits[p] + math.log(sum(math.exp(v) for v in logits.values()))
    return total / len(queries)


def patch_embeddings(seed=0, n=3, b=6, d=4):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g)
    z = F.normalize(base + 0.7 * torch.randn(n, b, d, generator=g), dim=-1)
    w = F.normalize(base + 0.7 * torch.randn(n, b, d, generator=g), dim=-1)
    return z.double(), w.double()


# --- rank-k triplet (eq. 3.4) ------------------------------------------------------------------------

def test_rank_k_triplet_explicit_numbers():
    """Keys = the standard basis, so each cosine is a query coordinate. Row 0: positive 0.6, negatives
    (0.8, 0, 0); row 1: positive 1, negatives (0, 0, 0)."""
    keys = torch.eye(4, dtype=torch.float64)
    q = torch.tensor([[0.6, 0.0, 0.8, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    pos = torch.tensor([0, 1])
    # k = 1 picks the hardest negative (0.8): row 0 = 0.5 + 0.8 - 0.6 = 0.7, row 1 = max(0, 0.5 - 1) = 0
    assert math.isclose(rank_k_triplet(q, keys, pos, 1, 0.5).item(), 0.7 / 2, rel_tol=1e-12)
    # k = 2 skips it (next negative 0): row 0 = max(0, 0.5 + 0 - 0.6) = 0
    assert rank_k_triplet(q, keys, pos, 2, 0.5).item() == 0.0
    # a larger margin activates both rows: (1.5 - 0.6 + 1.5 - 1) / 2 at k = 2
    assert math.isclose(rank_k_triplet(q, keys, pos, 2, 1.5).item(), (0.9 + 0.5) / 2, rel_tol=1e-12)


@pytest.mark.parametrize("k,margin", [(1, 0.2), (2, 0.5), (4, 1.5), (5, 1.5)])
def test_rank_k_triplet_matches_hand_computation(k, margin):
    z, w = patch_embeddings(1)
    zbar, wbar = z.mean(0), w.mean(0)
    got = rank_k_triplet(zbar, wbar, torch.arange(6), k, margin).item()
    want = hand_rank_k(zbar, wbar, list(range(6)), k, margin)
    assert want > 0 and math.isclose(got, want, rel_tol=1e-9)


def test_rank_k_triplet_selects_the_kth_negative_not_counting_the_positive():
    """The positive is the most similar key of every row here; the k-th largest of the *row* (positive
    included) would be the (k-1)-th negative, a different value."""
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    sims = F.normalize(keys, dim=1)[:, 0]          # cosines to q, sorted descending: 1, 0.99.., 0.70.., 0
    for k in (1, 2, 3):
        got = rank_k_triplet(q, keys, torch.tensor([0]), k, 1.0).item()
        assert math.isclose(got, 1.0 + sims[k].item() - 1.0, rel_tol=1e-12, abs_tol=1e-12)
    with pytest.raises(ValueError, match="k = 4"):
        rank_k_triplet(q, keys, torch.tensor([0]), 4, 1.0)


def test_rank_k_triplet_gradient_reaches_the_kth_negative_only():
    keys = torch.eye(4, dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.6, 0.3, 0.8, 0.1]], dtype=torch.float64)
    rank_k_triplet(q, keys, torch.tensor([0]), 2, 1.0).backward()
    touched = keys.grad.abs().sum(1) > 0
    assert touched.tolist() == [True, True, False, False]   # the positive (0) and the 2nd negative (1, cos .3)


# --- the GSSSL loss (eq. 3.1-3.4) ---------------------------------------------------------------------

@pytest.mark.parametrize("lambd,k,margin,weight", [(5e-3, 2, 0.5, 1.0), (0.3, 1, 1.2, 2.5)])
def test_gsssl_loss_matches_hand_computation(lambd, k, margin, weight):
    z, w = patch_embeddings(2)
    out = gsssl_loss(z, w, lambd, k, margin, weight)
    want = hand_gsssl(z, w, lambd, k, margin, weight)
    assert math.isclose(out["loss"].item(), want, rel_tol=1e-9)
    trip = hand_rank_k(z.mean(0), w.mean(0), list(range(6)), k, margin)
    assert trip > 0 and math.isclose(out["rank_k"].item(), trip, rel_tol=1e-9)
    assert math.isclose(out["barlow_twins"].item(), want - weight * trip, rel_tol=1e-9)


def test_gsssl_barlow_terms_are_sums_over_patches_of_both_directions():
    """Alg. 1 "total": sums over i (not means), and both L_BT1 (z_i vs Wbar) and L_BT2 (w_i vs Zbar)."""
    z, w = patch_embeddings(3)
    out = gsssl_loss(z, w, 0.0, 1, 0.0, 0.0)
    one = [hand_barlow_terms(z[i], w.mean(0))[0] for i in range(3)]
    two = [hand_barlow_terms(w[i], z.mean(0))[0] for i in range(3)]
    assert math.isclose(out["on_diag"].item(), sum(one) + sum(two), rel_tol=1e-9)
    assert abs(sum(one) - sum(two)) > 1e-3       # the two directions differ: both must be there


def test_gsssl_rank_k_larger_than_the_batch_is_a_param_error():
    z, w = patch_embeddings(4)
    with pytest.raises(ParamError, match="methods.gsssl.rank_k"):
        gsssl_loss(z, w, 5e-3, 6, 0.5, 1.0)


# --- patches: overlap, size, content --------------------------------------------------------------------

def test_patches_have_the_size_and_content_of_their_windows():
    x = torch.randn(5, 3, 12, 12)
    p, off = random_patches(x, 4, 7, torch.Generator().manual_seed(0))
    assert p.shape == (4, 5, 3, 7, 7) and off.shape == (4, 5, 2)
    assert off.min() >= 0 and off.max() <= 12 - 7
    for i in range(4):
        for b in range(5):
            t, l = off[i, b].tolist()
            assert torch.equal(p[i, b], x[b, :, t:t + 7, l:l + 7])
    assert len({tuple(o) for o in off.reshape(-1, 2).tolist()}) > 5    # positions are random


def _all_pairs_overlap(off, size):
    """(every pair of an image's windows shares pixels, number of pairs that do not); off (n, B, 2)."""
    gap = (off[:, None] - off[None, :]).abs()                          # (n, n, B, 2)
    return bool((gap < size).all()), int((gap >= size).any(-1).sum()) // 2


def test_patches_always_overlap_above_half_the_view_and_the_bound_is_tight():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(64, 3, 32, 32)
    size = min_overlapping_size(32)
    assert size == 17
    _, off = random_patches(x, 6, size, g)
    assert _all_pairs_overlap(off, size)[0]
    _, off = random_patches(x, 6, 16, g)                               # exactly half: some pairs only touch
    assert _all_pairs_overlap(off, 16)[1] > 0


def test_group_size_is_validated_against_the_view():
    for bad in (16, 33):
        with pytest.raises(ParamError, match=r"methods\.gsssl\.groups\.size: expected 17\.\.32"):
            PatchGroups.from_block({"n": 2, "size": bad}, 32, "methods.gsssl.groups")
    block = Section(GSSSL.PARAMS, optional=tuple(GSSSL.PARAMS))({"groups": {"n": 2, "size": 20}}, "methods.gsssl")
    assert PatchGroups.from_block(block["groups"], 32, "k").size == 20
    with pytest.raises(ParamError, match=r"methods\.gsssl\.groups\.n: missing"):
        Section(GSSSL.PARAMS, optional=tuple(GSSSL.PARAMS))({"groups": {"size": 20}}, "methods.gsssl")
    with pytest.raises(ParamError, match=r"groups\.pairing: unknown key"):   # GSSSL has no pairing choice
        Section(GSSSL.PARAMS, optional=tuple(GSSSL.PARAMS))({"groups": {"n": 2, "size": 20, "pairing": "x"}}, "m")


# --- per-patch augmentation ---------------------------------------------------------------------------

def test_patch_augment_grayscale_and_hflip():
    x = torch.rand(6, 3, 8, 8)
    off = {"jitter_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "noise_p": 0.0}
    grey = patch_augment(x, 1, grayscale_p=1.0, **off)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert all(torch.allclose(grey[:, c], luma, atol=1e-6) for c in range(3))
    flipped, masks = patch_augment(x, 2, hflip_p=0.5, return_masks=True, generator=torch.Generator().manual_seed(0), **off)
    m = masks["hflip"]
    assert m.any() and not m.all()
    cells = x.reshape(6, 3, 2, 4, 2, 4)
    want = torch.where(m[:, None, :, None, :, None], cells.flip(-1), cells).reshape_as(x)
    assert torch.equal(flipped, want)                                  # each grid cell mirrored in place


def test_group_cut_is_the_windows_augmented_per_patch_with_the_views_normalisation():
    view = torch.rand(4, 3, 10, 10)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normed = (view - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    plain = PatchGroups(n=3, size=6, **NO_AUG)
    cut = plain.cut(normed, 0, (mean, std), torch.Generator().manual_seed(5))
    windows, _ = random_patches(normed, 3, 6, torch.Generator().manual_seed(5))
    assert torch.equal(cut, windows)                                   # no op selected: the windows themselves
    grey = PatchGroups(n=3, size=6, jitter_p=0.0, grayscale_p=1.0, hflip_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))
    g = grey.cut(normed, 0, (mean, std), torch.Generator().manual_seed(5))
    pix = g * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert torch.allclose(pix[:, :, 0], pix[:, :, 1], atol=1e-5)      # greyscale in pixel space, re-normalised
    full = PatchGroups(n=3, size=6)                                    # VICReg's set: patches differ from windows
    assert not torch.equal(full.cut(normed, 1, (mean, std), torch.Generator().manual_seed(5)), windows)


# --- grouping means ----------------------------------------------------------------------------------

def test_encode_patches_normalises_each_patch_and_keeps_patch_major_order():
    patches = torch.randn(3, 4, 2, 3, 3)
    out = encode_patches(lambda x: x.flatten(1) * 5.0, patches)
    assert out.shape == (3, 4, 18)
    for i in range(3):
        for b in range(4):
            assert torch.allclose(out[i, b], F.normalize(patches[i, b].flatten(), dim=0))
    assert torch.allclose(out.mean(0)[2], sum(F.normalize(patches[i, 2].flatten(), dim=0) for i in range(3)) / 3)


def test_gsssl_forward_is_the_loss_of_its_patch_groups():
    m = make_gsssl(image_size=6)
    views = [torch.randn(6, 3, 6, 6) for _ in range(2)]
    out = m(SimpleNamespace(views=views))
    assert int(m.groups.draws) == 2
    m.groups.set_counter("draws", 0)   # replay the same patch draws
    z, w = (m.groups.embed(m.project, v, i) for i, v in enumerate(views))
    want = gsssl_loss(z, w, m.cfg["lambd"], m.cfg["rank_k"], m.cfg["margin"], m.cfg["triplet_weight"])
    assert torch.allclose(out["loss"], want["loss"]) and out["rank_k"] > 0
    out["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_gsssl_paper_defaults_and_bias_lr():
    assert registry.get("gsssl") is GSSSL
    d = GSSSL.DEFAULTS
    assert (d["lambd"], d["groups"]["n"], d["proj_layers"], d["proj_hidden"], d["proj_dim"]) == (5e-3, 10, 2, 4096, 512)
    m = make_gsssl(image_size=6)
    decay, no_decay = m.param_groups()
    assert no_decay["lr_scale"] == m.cfg["bias_lr_ratio"] and "lr_scale" not in decay
    assert math.isclose(GSSSL.DEFAULTS["bias_lr_ratio"] * 0.3, 0.0048)


# --- grouped SimCLR / MoCo-v2 (Table 5) ----------------------------------------------------------------

def test_grouped_nt_xent_matches_hand_computation():
    z, w = patch_embeddings(5, n=2, b=3)
    got = nt_xent_grouped(z, w, 0.3).item()
    keys = torch.cat([z.mean(0), w.mean(0)])
    queries = torch.cat([z.flatten(0, 1), w.flatten(0, 1)])
    img = [b for _ in range(2) for b in range(3)]                       # patch-major: image of each patch
    positive = [b + 3 for b in img] + img
    self_index = img + [b + 3 for b in img]
    assert math.isclose(got, hand_nt_xent(queries, keys, positive, self_index, 0.3), rel_tol=1e-9)


def test_grouped_nt_xent_with_one_patch_is_simclr():
    z, w = patch_embeddings(6, n=1, b=5)
    assert torch.allclose(nt_xent_grouped(z, w, 0.5), nt_xent_global(z[0], w[0], 0.5), rtol=1e-12)


def grouped(cls, pairing, image_size=6, **cfg):
    torch.manual_seed(0)
    heads = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 1}
    return cls(ConvNet(), {**heads, **cfg, "groups": {"n": 3, "size": 4, "pairing": pairing}}, AUG, image_size)


@pytest.mark.parametrize("pairing", ["patch_to_mean", "mean_to_mean"])
def test_grouped_simclr_loss(pairing):
    m = grouped(SimCLR, pairing)
    views = [torch.randn(5, 3, 6, 6) for _ in range(2)]
    out = m(SimpleNamespace(views=views))
    m.groups.set_counter("draws", 0)
    z, w = (m.groups.embed(m.project, v, i) for i, v in enumerate(views))
    want = nt_xent_grouped(z, w, 0.5) if pairing == "patch_to_mean" else nt_xent_global(z.mean(0), w.mean(0), 0.5)
    assert torch.allclose(out["loss"], want)


@pytest.mark.parametrize("pairing", ["patch_to_mean", "mean_to_mean"])
def test_grouped_moco_loss_and_queue(pairing):
    m = grouped(MoCoV2, pairing, queue_size=16, symmetric=False, temperature=0.2)
    views = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    queue = m.queue.keys.clone()
    out = m(SimpleNamespace(views=views))
    m.groups.set_counter("draws", 0)
    patches = [m.groups.cut(v, i) for i, v in enumerate(views)]
    with torch.no_grad():
        q = encode_patches(m.project, patches[0])
        kbar = encode_patches(m.key, patches[1]).mean(0)
    qs = q.flatten(0, 1) if pairing == "patch_to_mean" else q.mean(0)
    ks = kbar.repeat(3, 1) if pairing == "patch_to_mean" else kbar
    # InfoNCE by hand: -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.k-/t)), cosines
    want = 0.0
    for qi, ki in zip(qs.tolist(), ks.tolist()):
        pos = _cos(qi, ki) / 0.2
        negs = [_cos(qi, kn) / 0.2 for kn in queue.tolist()]
        want += -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))
    assert math.isclose(out["loss"].item(), want / len(qs), rel_tol=1e-5)
    m.after_step(0.5)
    assert torch.allclose(m.queue.keys[:4], F.normalize(kbar, dim=1), atol=1e-6) and int(m.queue.ptr) == 4


@pytest.mark.parametrize("cls,cfg", [(SimCLR, {}), (MoCoV2, {"queue_size": 16})])
def test_groups_off_by_default_leaves_the_method_unchanged(cls, cfg):
    """No `groups`: same parameters and buffers from the same seed (groups only add their RNG buffers), no RNG
    drawn in forward, plain loss."""
    heads = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 1, **cfg}
    torch.manual_seed(0)
    plain = cls(TinyNet(), heads, AUG, 4)
    torch.manual_seed(0)
    with_groups = cls(TinyNet(), {**heads, "groups": {"n": 2, "size": 3}}, AUG, 4)
    assert plain.groups is None and with_groups.groups is not None
    a, b = plain.state_dict(), with_groups.state_dict()
    assert set(b) - set(a) == {"groups.seed", "groups.draws"} and all(torch.equal(a[k], b[k]) for k in a)
    views = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    rng = torch.get_rng_state()
    out = plain(SimpleNamespace(views=views))
    assert torch.equal(rng, torch.get_rng_state())
    if cls is SimCLR:
        assert torch.equal(out["loss"], nt_xent_global(plain.project(views[0]), plain.project(views[1]), 0.5))


# --- DDP: gloo, 2 processes ------------------------------------------------------------------------------

class ConvNet(nn.Module):
    """BN-free backbone for any patch size (per-rank BN would rightly differ from whole-batch BN)."""

    feat_dim = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.feat_dim, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3))


def make_gsssl(image_size=6):
    torch.manual_seed(0)
    return GSSSL(ConvNet(), {"groups": {"n": 3, "size": 4}, "rank_k": 2, "margin": 0.8, "proj_hidden": 8,
                             "proj_dim": 5, "proj_layers": 1, "bias_lr_ratio": 0.1}, AUG, image_size)


class PatchProjector(nn.Module):
    """A shared linear map on fixed per-patch inputs (n, B, F) -> normalised (n, B, D): the patch cutting is
    bypassed, so each rank's patches are exactly its slice of the single-process batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(7, 5)

    def forward(self, xa, xb, loss):
        z, w = (F.normalize(self.fc(x), dim=-1) for x in (xa, xb))
        return loss(z, w)


def losses():
    return {"gsssl": lambda z, w: gsssl_loss(z, w, 0.05, 3, 0.9, 2.0)["loss"],
            "grouped_simclr": lambda z, w: nt_xent_grouped(z, w, 0.3)}


def patch_inputs(b=8):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1, b, 7, generator=g)
    return [base + 0.8 * torch.randn(3, b, 7, generator=g) for _ in range(2)]


def _ddp_worker(rank, port, out):
    _init(rank, port)
    import pipeline.dist as pdist

    xa, xb = patch_inputs()
    b = xa.shape[1] // WORLD
    local = [x[:, rank * b:(rank + 1) * b] for x in (xa, xb)]
    grads = {}
    gather, rank_of = pdist.gather_with_grad, pdist.rank
    for name, loss in losses().items():
        for mode in ("global", "local"):
            # "local": the triplet / NT-Xent candidates of this rank only (the negative control)
            pdist.gather_with_grad = gather if mode == "global" else (lambda x: x)
            pdist.rank = rank_of if mode == "global" else (lambda: 0)
            model = nn.parallel.DistributedDataParallel(PatchProjector())
            value = model(*local, loss)
            value.backward()
            grads[name, mode] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
            grads[name, mode, "value"] = value.detach()
    pdist.gather_with_grad, pdist.rank = gather, rank_of
    torch.save(grads, f"{out}/grads{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    return spawn_and_load(_ddp_worker, tmp_path_factory.mktemp("ddp"))


def single(name):
    model = PatchProjector()
    value = model(*patch_inputs(), losses()[name])
    value.backward()
    return value.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(losses()))
def test_ddp_gradients_equal_single_process_on_the_concatenated_batch(ddp_grads, name):
    value, want = single(name)
    for rank, grads in enumerate(ddp_grads):
        for n, g in want.items():
            got = grads[name, "global"][n]
            assert torch.allclose(got, g, rtol=1e-5, atol=1e-6), (rank, n, (got - g).abs().max())
    # the global terms are the same on every rank, the per-row means are this rank's rows: their mean is the loss
    per_rank = [grads[name, "global", "value"] for grads in ddp_grads]
    assert torch.allclose(sum(per_rank) / WORLD, value, rtol=1e-5)


@pytest.mark.parametrize("name", list(losses()))
def test_local_candidates_give_different_gradients(ddp_grads, name):
    """Negative control: ranking / contrasting against this rank's batch only must NOT match, so the test
    above can fail."""
    _, want = single(name)
    got = ddp_grads[0][name, "local"]
    diff = torch.cat([(got[n] - g).flatten() for n, g in want.items()]).norm()
    assert diff / torch.cat([g.flatten() for g in want.values()]).norm() > 0.05


# --- through the real trainer ----------------------------------------------------------------------------

SMOKE_GROUPS = {"n": 2, "size": 20, "blur_p": [0.0, 0.0], "solarize_p": [0.0, 0.2]}


def smoke_params(**over):
    from tests.conftest import tiny_params

    return tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0,
                          "train.checkpoint_every": 2, "train.epochs": 1,
                          "methods.gsssl": {"rank_k": 3, "groups": SMOKE_GROUPS, "proj_hidden": 32, "proj_dim": 32},
                          "methods.mocov2": {"queue_size": 32, "proj_hidden": 32, "proj_dim": 16},
                          "runs.gsssl": {"method": "gsssl", "backbone": "resnet18_w8"},
                          "runs.gsssl-simclr": {"method": "simclr", "backbone": "resnet18_w8",
                                                "overrides": {"groups": SMOKE_GROUPS}},
                          "runs.gsssl-mocov2": {"method": "mocov2", "backbone": "resnet18_w8",
                                                "overrides": {"groups": SMOKE_GROUPS}}, **over})


@pytest.mark.parametrize("run", ["gsssl", "gsssl-simclr", "gsssl-mocov2"])
def test_trainer_smoke(tmp_path, shard_dir, run):
    from pipeline.train.trainer import build_method, train
    from tests.test_resume import final_state, project

    p = smoke_params()
    method, _, _ = build_method(p, run)
    assert method.groups is not None and method.pixel_norm == tuple(map(tuple, (p["dataset"]["mean"], p["dataset"]["std"])))
    root = project(tmp_path, "r", shard_dir)
    assert train(p, run, root=root, max_steps=2) == {"stopped_at_step": 2}
    state = final_state(root, run)
    assert state["progress"]["step"] == 2 and all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


def test_trainer_resume_reproduces_the_patch_draws(tmp_path, shard_dir):
    """Patch positions and augmentations come from the checkpointed RNG: a run cut mid-epoch and resumed
    ends bit-identical to an uninterrupted one."""
    from pipeline.train.trainer import train
    from tests.test_resume import assert_same_state, final_state, project

    p = smoke_params()
    full, cut = project(tmp_path, "full", shard_dir), project(tmp_path, "cut", shard_dir)
    train(p, "gsssl", root=full)
    assert train(p, "gsssl", root=cut, max_steps=2) == {"stopped_at_step": 2}
    train(p, "gsssl", root=cut)
    assert_same_state(final_state(full, "gsssl"), final_state(cut, "gsssl"))


def test_patch_draws_are_resumable_and_differ_between_ranks(monkeypatch):
    import pipeline.dist as pdist

    torch.manual_seed(0)
    g = PatchGroups(n=2, size=5)
    view = torch.rand(3, 3, 8, 8)
    first = g.cut(view, 0)
    g.set_counter("draws", 0)
    assert torch.equal(g.cut(view, 0), first)                  # (seed, counter) alone fix the draws
    assert not torch.equal(g.cut(view, 0), first)              # the counter moves on
    g.set_counter("draws", 0)
    monkeypatch.setattr(pdist, "rank", lambda: 1)
    assert not torch.equal(g.cut(view, 0), first)              # another rank cuts elsewhere

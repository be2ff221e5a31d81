"""PW-Self: eqs. 8-10 by hand, matching from the batch geometry (flips mirror), no overlap -> CLS only,
PWLL with lambd = 1 is DINO exactly, patch-level augmentation in the views, DDP, trainer smoke + resume."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.data.patch_augment import PatchAugment
from pipeline.data.patch_matching import match_patches_reference
from pipeline.data.views import View
from pipeline.losses.distillation import patch_wise_weights
from pipeline.methods.dino import DINO
from pipeline.methods.pwself import PWSelf
from pipeline.params import ParamError, Section
from tests.test_ddp import AUG, WORLD, _init, free_port
from tests.test_resume import assert_same_state, final_state, project
from tests.close import close, gap

P = 4  # patch size of the fake ViT: 8 px global views -> 2x2 patches, 4 px locals -> 1 patch
SMALL = {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4, "head_layers": 2, "momentum": 0.9, "n_local": 1,
         "local_size": 4, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "patch_augment": False}


class PatchNet(nn.Module):
    """A BN-free stand-in for a ViT: patch token = tanh(linear(own pixels)), so a token depends on its own patch
    only; CLS = tanh(linear(mean of the patch tokens)). Exposes tokens() and patch_size like ViTBackbone."""

    feat_dim = 6
    patch_size = P

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 * P * P, self.feat_dim)
        self.cls = nn.Linear(self.feat_dim, self.feat_dim)

    def tokens(self, x):
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // P) * (w // P), -1)
        t = torch.tanh(self.embed(patches))
        return torch.cat([torch.tanh(self.cls(t.mean(1, keepdim=True))), t], dim=1)

    def forward(self, x):
        return self.tokens(x)[:, 0]


def make(cls=PWSelf, seed=0, **over):
    torch.manual_seed(seed)
    cfg = {**SMALL, **over}
    if cls is DINO:
        cfg = {k: v for k, v in cfg.items() if k in DINO.PARAMS}
    return cls(PatchNet(), cfg, AUG, 8)


def geo(rows):
    return torch.tensor(rows, dtype=torch.int32)


def fixed_batch(n_views=3, seed=1):
    """3 samples with hand-picked boxes on a 16 px image: sample 0 has identical globals, view 1 flipped;
    sample 1 has view 0 in view 1's top-left quarter; sample 2 has disjoint globals."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(3, 3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(3, 3, 4, 4, generator=g)
                                                                        for _ in range(n_views - 2)]
    geometry = [geo([[0, 0, 16, 16, 0], [0, 0, 8, 8, 0], [0, 0, 8, 8, 0]]),
                geo([[0, 0, 16, 16, 1], [0, 0, 16, 16, 0], [8, 8, 8, 8, 0]]),
                geo([[0, 0, 8, 8, 0], [8, 8, 8, 8, 0], [0, 0, 8, 8, 1]])][:n_views]
    return SimpleNamespace(views=views, geometry=geometry)


def test_defaults_validate_and_bad_params():
    assert Section(PWSelf.PARAMS, optional=tuple(PWSelf.PARAMS))(dict(PWSelf.DEFAULTS), "methods.pwself") == PWSelf.DEFAULTS
    with pytest.raises(ParamError, match=r"methods\.pwself\.loss: expected one of"):
        Section(PWSelf.PARAMS, optional=tuple(PWSelf.PARAMS))({"loss": "pwxl"}, "methods.pwself")
    with pytest.raises(ParamError, match="needs a ViT backbone"):
        from tests.test_ddp import TinyNet
        PWSelf(TinyNet(), SMALL, AUG, 8)
    with pytest.raises(ParamError, match=r"methods\.pwself\.local_size: 6 is not a multiple of the ViT patch size 4"):
        make(local_size=6)


# --- eqs. 8-10 by hand --------------------------------------------------------------------------------

def test_aggregation_weights_match_hand_computation():
    cls = torch.tensor([1.0, 2.0, 3.0])
    patch = torch.tensor([[0.5, 2.5, 9.0], [4.0, 8.0, 6.0], [7.0, 7.0, 7.0]])
    valid = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    # MP = 3, 2, 1 matched tokens (CLS included); padding gets no weight
    want = {"pwml": [(1 + 0.5 + 2.5) / 3, (2 + 4) / 2, 3.0],
            "pwsl": [1 + 0.5 + 2.5, 2 + 4, 3.0],
            "pwll": [0.25 * 1 + 0.75 * (0.5 + 2.5) / 2, 0.25 * 2 + 0.75 * 4, 0.25 * 3]}
    for mode, w in want.items():
        cls_w, patch_w = patch_wise_weights(valid, mode, lambd=0.25)
        assert not patch_w[~valid].any(), mode
        assert torch.allclose(cls_w * cls + (patch_w * patch).sum(1), torch.tensor(w)), mode
    cls_w, patch_w = patch_wise_weights(valid, "pwll", lambd=1.0)
    assert torch.equal(cls_w, torch.ones(3)) and not patch_w.any()


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def hand_loss(m, b, mode, lambd):
    """Eqs. 8-10 with Python loops: every (teacher global i, student view j != i), every sample, the pairs of the
    brute-force matcher, the cross-entropy of the head outputs on the full token sequences."""
    with torch.no_grad():
        t_out = [m.teacher_head(m.teacher_backbone.tokens(v)) for v in b.views[:2]]
        s_out = [m.head(m.backbone.tokens(v)) for v in b.views]
    tt, ts = m.teacher_temp(), m.cfg["student_temp"]
    # token position 0 (CLS) has DINO's centre, patch position a (token 1 + a) its own
    centers = [m.center.tolist()] + m.patch_center.tolist()
    grids = [v.shape[-1] // P for v in b.views]

    def H(t, s, token):
        pt = _softmax([(x - c) / tt for x, c in zip(t.tolist(), centers[token])])
        ps = _softmax([x / ts for x in s.tolist()])
        return -sum(a * math.log(q) for a, q in zip(pt, ps))

    total, patch_part, n_pairs, cls_terms, n_matched = 0.0, 0.0, 0, [], 0
    used = set()  # (teacher view, sample, patch position) of every teacher patch some pair uses
    for i in range(2):
        for j in range(len(b.views)):
            if i == j:
                continue
            matches = match_patches_reference(b.geometry[i], b.geometry[j], grids[i], grids[j])
            for n, pairs in enumerate(matches):
                h_cls = H(t_out[i][n, 0], s_out[j][n, 0], 0)
                h_p = [H(t_out[i][n, 1 + a], s_out[j][n, 1 + c], 1 + a) for a, c in pairs]
                used |= {(i, n, a) for a, _ in pairs}
                if mode == "pwml":
                    cls_part, p_part = h_cls / (1 + len(h_p)), sum(h_p) / (1 + len(h_p))
                elif mode == "pwsl":
                    cls_part, p_part = h_cls, sum(h_p)
                else:
                    cls_part, p_part = lambd * h_cls, (1 - lambd) * (sum(h_p) / len(h_p) if h_p else 0.0)
                total += cls_part + p_part
                patch_part += p_part
                cls_terms.append(h_cls)
                n_matched += len(h_p)
            n_pairs += 1
    norm = n_pairs * b.views[0].shape[0]
    diag = {"dino": sum(cls_terms) / len(cls_terms), "patch": patch_part / norm, "matched": n_matched / len(cls_terms)}
    return total / norm, t_out, diag, used


@pytest.mark.parametrize("mode", ["pwml", "pwsl", "pwll"])
def test_forward_equals_hand_computation(mode):
    m = make(loss=mode, lambd=0.3)
    c0, pc0 = torch.randn(16) * 0.1, torch.randn(4, 16) * 0.5
    m.center.copy_(c0)
    m.patch_center.copy_(pc0)
    m.set_progress(0.0, 0.0)
    b = fixed_batch()
    want, t_out, diag, used = hand_loss(m, b, mode, 0.3)
    out = m(b)
    assert math.isclose(out["loss"].item(), want, rel_tol=1e-5)
    for k, v in diag.items():
        assert math.isclose(out[k].item(), v, rel_tol=1e-5), k
    # the CLS centre moves with the teacher's CLS outputs only (§3.5 / DINO eq. 4)
    cls_mean = torch.cat([t[:, 0] for t in t_out]).mean(0)
    assert torch.allclose(m.center, 0.9 * c0 + 0.1 * cls_mean, atol=1e-6)
    # patch position a with the mean of the teacher's outputs at a over every (global view, sample), matched or
    # not (the authors' centre; issue 26 item 9): positions no pair uses move too
    assert len(used) < 2 * 3 * 4, "the batch must leave some (view, sample, position) unmatched"
    for a in range(4):
        outs = [t_out[i][n, 1 + a] for i in range(2) for n in range(3)]
        want_c = 0.9 * pc0[a] + 0.1 * sum(outs) / 6
        assert close(m.patch_center[a], want_c, rel=1e-5), (a, gap(m.patch_center[a], want_c))
    out["loss"].backward()
    assert m.backbone.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher_backbone.parameters())


def test_token_pairs_use_batch_geometry_and_mirror_flips():
    m = make()
    b = fixed_batch()
    pairs = m.token_pairs(b.geometry, [2, 2, 1])
    assert [(i, j) for i, j, *_ in pairs] == [(0, 1), (0, 2), (1, 0), (1, 2)]
    i, j, ti, si, valid = pairs[0]  # teacher global 0 vs student global 1
    # sample 0: the same full box, view 1 flipped -> patch (r, c) matches (r, 1 - c); tokens are 1 + r*2 + c
    assert valid[0].tolist() == [True] * 4
    assert ti[0].tolist() == [0, 1, 2, 3, 4] and si[0].tolist() == [0, 2, 1, 4, 3]
    # sample 1: view 0's box is the top-left quarter of view 1's (full image): 2x2 patches vs one patch (0, 0)
    assert valid[1].tolist() == [True, False, False, False]
    assert ti[1, :2].tolist() == [0, 1] and si[1, :2].tolist() == [0, 1]
    # sample 2: disjoint globals -> the CLS token only
    assert not valid[2].any() and ti[2].tolist() == [0] * 5 and si[2].tolist() == [0] * 5
    # the same boxes without the flip: no mirroring
    b.geometry[1][0, 4] = 0
    _, _, ti, si, _ = m.token_pairs(b.geometry, [2, 2, 1])[0]
    assert si[0].tolist() == ti[0].tolist()
    # local (1 patch) flipped inside global 0's top-left patch
    _, _, ti, si, valid = m.token_pairs(b.geometry, [2, 2, 1])[1]
    assert valid[2].tolist() == [True] and ti[2].tolist() == [0, 1] and si[2].tolist() == [0, 1]


def test_no_overlap_leaves_cls_only():
    b = fixed_batch()
    far = [geo([[0, 0, 4, 4, 0]] * 3), geo([[10, 10, 6, 6, 1]] * 3), geo([[0, 10, 5, 5, 0]] * 3)]
    b.geometry = far
    ref = make(DINO)
    ref.set_progress(0.0, 0.0)
    with torch.no_grad():
        dino = ref(b)["loss"]  # the CLS-token loss (eq. 7)
    for mode, scale in [("pwml", 1.0), ("pwsl", 1.0), ("pwll", 0.3)]:
        m = make(loss=mode, lambd=0.3)
        m.set_progress(0.0, 0.0)
        with torch.no_grad():
            out = m.patch_wise_forward(b)
        assert torch.allclose(out["loss"], scale * dino, atol=1e-6), mode
        assert out["matched"] == 0 and abs(out["patch"]) < 1e-6 and torch.allclose(out["dino"], dino, atol=1e-6)


# --- patch centring: the collapse mechanism of one shared centre ----------------------------------------

class OffsetPatchNet(PatchNet):
    """PatchNet whose patch tokens share an offset from the CLS token (as a ViT's CLS and patch tokens differ):
    the teacher's patch outputs sit away from the CLS outputs' mean."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", 3.0 * nn.functional.normalize(
            torch.randn(self.feat_dim, generator=torch.Generator().manual_seed(7)), dim=0))

    def tokens(self, x):
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // P) * (w // P), -1)
        t = torch.tanh(self.embed(patches) + self.shift)
        return torch.cat([torch.tanh(self.cls(t.mean(1, keepdim=True))), t], dim=1)


class SharedCentre(PWSelf):
    """The old centring: DINO's CLS centre subtracted from every patch token too, no patch centre."""

    def token_centers(self):
        return self.center.expand(self.patch_center.shape[0] + 1, -1)

    def update_patch_center(self, teacher_logits):
        pass


def _random_batch(g, n=16):
    views = [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(n, 3, 4, 4, generator=g)]

    def boxes(lo):
        top, left = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
        size = torch.randint(lo, 9, (n,), generator=g)
        return torch.stack([top, left, size, size, torch.randint(0, 2, (n,), generator=g)], 1).int()

    return SimpleNamespace(views=views, geometry=[boxes(5), boxes(5), boxes(2)])


def _patch_probe(cls, steps=24):
    """Teacher patch entropy (nats) and distinct patch prototypes at the first and the last of `steps` steps of
    centre updates on fresh random batches (the networks fixed: the centring alone)."""
    torch.manual_seed(0)
    cfg = {**SMALL, "out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8, "teacher_temp": 0.1}
    m = cls(OffsetPatchNet(), cfg, AUG, 8)
    m.set_progress(0.0, 5.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rows = [m(_random_batch(g)) for _ in range(steps)]
    return [(r["teacher_entropy_patch"].item(), r["prototypes_patch"].item()) for r in (rows[0], rows[-1])]


def test_shared_centre_sharpens_patch_targets_and_per_position_centres_do_not():
    """The bug in one probe: with the CLS centre subtracted from the patch outputs their common offset stays,
    and sharpening turns it into near one-hot targets (entropy falls, few prototypes); a centre per patch
    position removes the offset (entropy rises towards the CLS level, many prototypes)."""
    (h0, k0), (h_shared, k_shared) = _patch_probe(SharedCentre)
    (h0_fix, k0_fix), (h_fixed, k_fixed) = _patch_probe(PWSelf)
    assert (h0, k0) == (h0_fix, k0_fix)  # the same first step: both centres start at 0
    assert h_shared < 0.75 * h0 and h_fixed > 1.4 * h0 and h_fixed > h_shared + 1.5
    assert k_shared <= 6 and k_fixed >= 2 * k_shared


def test_plan_targets_equal_a_per_pair_fold_on_random_geometry():
    """The host index plan (issue 23, defects 6 and 10: gathers and a fixed-order sum instead of boolean masks, a
    sparse product and `index_add_`) gives every used student token the sum over its pairs of w * P_t(matched
    teacher token), w from eqs. 8-10 / (batch x pairs), on random boxes and flips; float64 reference by loops."""
    from pipeline.methods.pwself import pair_targets

    g = torch.Generator().manual_seed(3)
    for mode in ("pwml", "pwsl", "pwll"):
        m = make(loss=mode, lambd=0.3)
        b = _random_batch(g, n=8)
        grids = [v.shape[-1] // P for v in b.views]
        plan = m.plan(b.geometry, grids)
        n, t_tokens = 8, grids[0] ** 2 + 1
        p_t = torch.softmax(torch.randn(2 * n * t_tokens, 16, generator=g), dim=1)
        got = pair_targets(p_t, plan.target_rows, plan.target_weights)
        want: dict[tuple[int, int, int], torch.Tensor] = {}
        pairs = m.token_pairs(b.geometry, grids)
        for i, j, ti, si, valid in pairs:
            cls_w, patch_w = patch_wise_weights(valid, mode, 0.3)
            w = torch.cat([cls_w[:, None], patch_w], dim=1) / (len(pairs) * n)
            keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
            for s_ in range(n):
                for k in range(keep.shape[1]):
                    if keep[s_, k]:
                        key = (j, s_, int(si[s_, k]))
                        row = p_t[(i * n + s_) * t_tokens + int(ti[s_, k])].double() * float(w[s_, k])
                        want[key] = want.get(key, 0) + row
        offsets = [0]
        for gr in grids:
            offsets.append(offsets[-1] + n * (gr * gr + 1))
        flat_of = {offsets[j] + s_ * (grids[j] ** 2 + 1) + t: key for key in want for j, s_, t in [key]}
        assert sorted(plan.student_tokens.tolist()) == sorted(flat_of)
        for r, flat in enumerate(plan.student_tokens.tolist()):
            assert close(got[r], want[flat_of[flat]], rel=1e-6), (mode, flat_of[flat])


# --- PWLL with lambd = 1 is DINO ----------------------------------------------------------------------

def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_pwll_lambda_one_is_dino_exactly():
    b = fixed_batch()
    ref = make(DINO)
    m = make(loss="pwll", lambd=1.0)
    assert not m.patch_terms and m.views() == ref.views()
    for x in (ref, m):
        x.set_progress(0.0, 2.0)
    a, o = ref(b), m(b)
    assert torch.equal(a["loss"], o["loss"])
    a["loss"].backward()
    o["loss"].backward()
    ga, go = _grads(ref), _grads(m)
    assert ga.keys() == go.keys() and all(torch.equal(ga[k], go[k]) for k in ga)
    assert torch.equal(ref.center, m.center)

    # the patch-wise path itself (not the shortcut): the patch terms get weight 0 -> same loss and gradients
    m2 = make(loss="pwll", lambd=1.0)
    m2.set_progress(0.0, 2.0)
    out = m2.patch_wise_forward(b)
    assert out["matched"] > 0
    assert torch.allclose(out["loss"], a["loss"], atol=1e-6)
    out["loss"].backward()
    g2 = _grads(m2)
    for k in ga:  # float rounding only: the head sees CLS and patch rows in one batch
        assert (g2[k] - ga[k]).abs().max() <= 1e-5 * ga[k].abs().max(), k
    assert torch.allclose(m2.center, ref.center, atol=1e-7)
    # and the patch terms do change the loss when they have weight
    m3 = make(loss="pwll", lambd=0.5)
    m3.set_progress(0.0, 2.0)
    assert not torch.allclose(m3(b)["loss"], a["loss"], atol=1e-3)


# --- patch-level augmentation ---------------------------------------------------------------------------

def test_views_carry_patch_augmentation_on_the_vit_grid():
    on, off = make(patch_augment=True).views(), make(patch_augment=False).views()
    assert [v.patch_grid for v in on] == [2, 2, 1] and all(v.patch_augment == PatchAugment() for v in on)
    assert off == make(DINO).views() and all(v.patch_augment is None for v in off)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(View(off[0], mean, std).batch(x), x)
    view = View(on[0], mean, std)
    torch.manual_seed(3)
    y = view.batch(x)
    torch.manual_seed(3)
    want, masks = PatchAugment()(x, 2, mean=mean, std=std, return_masks=True)
    assert torch.equal(y, want) and not torch.equal(y, x)
    assert any(mk.any() for mk in masks.values())


# --- DDP (gloo, 2 CPU processes): per-sample terms, the centre all-reduced --------------------------------

def ddp_batch(n=8):
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(n, 3, 4, 4, generator=g)]

    def boxes(lo):
        top, left = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
        size = torch.randint(lo, 9, (n,), generator=g)
        return torch.stack([top, left, size, size, torch.randint(0, 2, (n,), generator=g)], 1).int()

    return views, [boxes(5), boxes(5), boxes(2)]


def _ddp_worker(rank, port, out):
    _init(rank, port)
    method = make(loss="pwml")
    model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
    views, geometry = ddp_batch()
    b = views[0].shape[0] // WORLD
    sl = slice(rank * b, (rank + 1) * b)
    method.set_progress(0.0, 5.0)
    model(SimpleNamespace(views=[v[sl] for v in views], geometry=[g[sl] for g in geometry]))["loss"].backward()
    torch.save({"center": method.center, "patch_center": method.patch_center, "grads": _grads(method)},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gradients_and_centre_equal_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert torch.equal(r0["center"], r1["center"])
    single = make(loss="pwml")
    single.set_progress(0.0, 5.0)
    views, geometry = ddp_batch()
    single(SimpleNamespace(views=views, geometry=geometry))["loss"].backward()
    assert close(single.center, r0["center"]), gap(single.center, r0["center"])
    assert torch.equal(r0["patch_center"], r1["patch_center"]) and r0["patch_center"].abs().sum() > 0
    assert close(single.patch_center, r0["patch_center"]), gap(single.patch_center, r0["patch_center"])
    for k, g in _grads(single).items():
        assert close(r0["grads"][k], g), (k, gap(r0["grads"][k], g))


# --- the real trainer: a few steps, and resume ------------------------------------------------------------

def test_trainer_smoke_and_resume_match_uninterrupted_run(tmp_path, shard_dir):
    from tests.conftest import tiny_params
    from pipeline.train.trainer import train

    p = tiny_params(**{"dataset.name": "tiny", "train.batch_size": 8, "train.num_workers": 0,
                       "train.checkpoint_every": 2, "runs.pwself.overrides.train.epochs": 2})
    assert p["methods"]["pwself"]["patch_augment"] and p["runs"]["pwself"]["backbone"] == "vit_tiny_p8"
    full, cut = project(tmp_path, "full", shard_dir), project(tmp_path, "cut", shard_dir)
    summary = train(p, "pwself", root=full)
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])
    hist = final_state(full, "pwself")["progress"]["history"]
    assert all(row["matched"] > 0 and math.isfinite(row["patch"]) for row in hist)
    assert train(p, "pwself", root=cut, max_steps=4) == {"stopped_at_step": 4}
    train(p, "pwself", root=cut)
    assert_same_state(final_state(full, "pwself"), final_state(cut, "pwself"))

"""DINO: loss against hand computation, schedules, centring (incl. 2-rank gloo), freezing, views, smoke, state."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.losses.distillation import dino_loss, ema_center
from pipeline.methods.dino import DINO, collapse_diagnostics
from pipeline.models.backbones import build_backbone
from pipeline.params import Section
from tests.test_ddp import AUG, WORLD, TinyNet, _init, free_port
from tests.close import close, gap

SMALL = {"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4, "head_layers": 3, "momentum": 0.9,
         "n_local": 2, "local_size": 16, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4]}


def make(backbone=None, image_size=32, seed=0, **over):
    torch.manual_seed(seed)
    return DINO(backbone or TinyNet(), {**SMALL, **over}, AUG, image_size)


def batch(views):
    return SimpleNamespace(views=views)


def test_defaults_validate():
    assert Section(DINO.PARAMS, optional=tuple(DINO.PARAMS))(dict(DINO.DEFAULTS), "methods.dino") == DINO.DEFAULTS


def test_dino_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, k, n_views = 3, 5, 4
    teacher = [torch.randn(b, k, generator=g) for _ in range(2)]
    student = [torch.randn(b, k, generator=g) for _ in range(n_views)]
    center = torch.randn(k, generator=g)
    tt, ts = 0.04, 0.1

    def softmax(xs):
        e = [math.exp(x - max(xs)) for x in xs]
        return [v / sum(e) for v in e]

    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(n_views):
            if i == j:  # the same view through both networks: skipped (eq. 3, x' != x)
                continue
            for n in range(b):
                pt = softmax([(teacher[i][n, d] - center[d]).item() / tt for d in range(k)])
                ps = softmax([student[j][n, d].item() / ts for d in range(k)])
                total += -sum(pt[d] * math.log(ps[d]) for d in range(k)) / b
            pairs += 1
    assert pairs == 2 * n_views - 2
    assert math.isclose(dino_loss(teacher, student, center, tt, ts).item(), total / pairs, rel_tol=1e-5)


def test_loss_gradient_reaches_student_only():
    t = torch.randn(4, 6, requires_grad=True)
    s = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    dino_loss([t, t], s, torch.zeros(6), 0.04, 0.1).backward()
    assert t.grad is None and all(x.grad is not None for x in s)


def test_teacher_temperature_warmup():
    m = make(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30)
    for epoch, want in [(0, 0.04), (15, 0.055), (29.5, 0.04 + 0.03 * 29.5 / 30), (30, 0.07), (100, 0.07)]:
        m.set_progress(0.0, epoch)
        assert math.isclose(m.teacher_temp(), want, rel_tol=1e-9), epoch
    m = make(teacher_temp=0.05, warmup_teacher_temp_epochs=0)
    m.set_progress(0.0, 0.0)
    assert m.teacher_temp() == 0.05


def test_center_update_formula():
    m = make(center_momentum=0.9)
    c0 = torch.randn(16)
    m.center.copy_(c0)
    t = torch.randn(6, 16)
    m.update_center(m.center, t)
    assert torch.allclose(m.center, 0.9 * c0 + 0.1 * t.mean(dim=0), atol=1e-6)
    assert torch.equal(ema_center(c0, t.mean(0), 0.9), c0 * 0.9 + t.mean(0) * (1 - 0.9))
    # token-shaped teacher outputs (B, N, K) are averaged over every row
    t3 = torch.randn(2, 3, 16)
    c1 = m.center.clone()
    m.update_center(m.center, t3)
    assert torch.allclose(m.center, 0.9 * c1 + 0.1 * t3.reshape(-1, 16).mean(0), atol=1e-6)


def test_forward_uses_previous_center_then_updates_it():
    m = make(n_local=1, local_size=4)
    views = [torch.randn(3, 3, 4, 4) for _ in range(3)]
    c0 = torch.randn(16)
    m.center.copy_(c0)
    with torch.no_grad():
        s = [m.head(m.backbone(v)) for v in views]
        t = [m.teacher_head(m.teacher_backbone(v)) for v in views[:2]]
        m.set_progress(0.0, 0.0)
        want = dino_loss(t, s, c0, m.teacher_temp(), 0.1)
        out = m(batch(views))
    assert torch.allclose(out["loss"], want, atol=1e-6)
    assert torch.allclose(m.center, 0.9 * c0 + 0.1 * torch.cat(t).mean(0), atol=1e-6)


def _step(m, views, epoch, opt):
    from pipeline.train.trainer import train_step

    m.set_progress(epoch / 10, epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_step(m, m, opt, scaler, batch(views), None, 0.0, (epoch + 0.1) / 10)


def test_last_layer_frozen_during_first_epoch():
    m = make(norm_last_layer=False, n_local=1, local_size=4, freeze_last_layer=1.0)
    last = list(m.head.last_layer.parameters())
    assert len(last) == 2 and all(p.requires_grad for p in last)
    opt = torch.optim.AdamW(m.param_groups(), lr=0.1, weight_decay=0.04)
    views = [torch.randn(4, 3, 4, 4) for _ in range(3)]
    before = [p.detach().clone() for p in last]
    mlp_before = m.head.mlp[0].weight.detach().clone()
    _step(m, views, 0.5, opt)
    assert all(p.grad is None or not p.grad.any() for p in last)
    assert all(torch.equal(p, b) for p, b in zip(last, before))  # not moved, not even by weight decay
    assert not torch.equal(m.head.mlp[0].weight, mlp_before)     # the rest of the student trains
    _step(m, views, 1.0, opt)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last)
    assert not torch.equal(last[0], before[0])


def test_norm_last_layer_keeps_unit_prototypes():
    m = make(norm_last_layer=True)
    assert not m.head.last_layer.weight_g.requires_grad
    assert all(p is not m.head.last_layer.weight_g for g in m.param_groups() for p in g["params"])
    assert not any(p.requires_grad for p in [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()])


def test_views_two_global_and_n_local():
    m = make(n_local=3, local_size=16, global_scale=[0.35, 1.0], local_scale=[0.05, 0.35],
             blur_p=[1.0, 0.1, 0.5], solarize_p=[0.0, 0.2, 0.0])
    v = m.views()
    assert len(v) == 5
    assert [s.size for s in v] == [32, 32, 16, 16, 16]
    assert [s.crop_scale for s in v] == [(0.35, 1.0)] * 2 + [(0.05, 0.35)] * 3
    assert [s.blur_p for s in v] == [1.0, 0.1, 0.5, 0.5, 0.5]
    assert [s.solarize_p for s in v] == [0.0, 0.2, 0.0, 0.0, 0.0]
    assert all(s.color_jitter == tuple(AUG["color_jitter"]) for s in v)
    assert len(make(n_local=0).views()) == 2


@pytest.mark.parametrize("bb", [{"arch": "resnet18", "width": 4, "cifar_stem": True},
                                {"arch": "vit_tiny", "patch_size": 8, "depth": 1}])
def test_forward_backward_multicrop_smoke(bb):
    m = make(build_backbone(bb, 32), n_local=2, local_size=16)
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    if bb["arch"].startswith("vit"):
        toks = m.student_tokens(views)
        assert [t.shape[1] for t in toks] == [1 + 16, 1 + 16, 1 + 4, 1 + 4]  # CLS + patch tokens per crop size
        patch_logits = m.project(m.head, [t[:, 1:] for t in toks[:1]])[0]
        assert patch_logits.shape == (2, 16, 16)
    else:
        assert [t.shape for t in m.student_tokens(views)] == [(2, 1, m.backbone.feat_dim)] * 4
    m.set_progress(0.0, 2.0)
    out = m(batch(views))
    assert set(out) == {"loss", "dino", "teacher_entropy_cls", "prototypes_cls"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    assert all(p.grad is None for p in m.teacher_backbone.parameters())
    teacher_before = [p.clone() for p in m.teacher_head.parameters()]
    with torch.no_grad():
        for p in m.head.parameters():
            p.add_(0.1)
    m.after_step(0.0)  # m = base = 0.9: teacher <- 0.9 teacher + 0.1 student
    for t, t0, s in zip(m.teacher_head.parameters(), teacher_before, m.head.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_state_dict_round_trip_restores_center_and_teacher():
    m = make(n_local=1, local_size=4)
    opt = torch.optim.SGD(m.param_groups(), lr=0.5)
    for _ in range(2):
        _step(m, [torch.randn(4, 3, 4, 4) for _ in range(3)], 2.0, opt)
    assert m.center.abs().sum() > 0
    fresh = make(n_local=1, local_size=4, seed=123)
    assert not torch.equal(fresh.teacher_head.mlp[0].weight, m.teacher_head.mlp[0].weight)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.center, m.center)
    ref = dict(m.named_parameters()) | dict(m.named_buffers())
    for name, t in [*fresh.named_parameters(), *fresh.named_buffers()]:
        if name.startswith("teacher_") or name == "center":
            assert torch.equal(t, ref[name]), name


# --- DDP (gloo, 2 CPU processes) ------------------------------------------------------------------

def ddp_views(n=8):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, 3, 4, 4, generator=g) for _ in range(3)]


def _center_worker(rank, port, out):
    _init(rank, port)
    method = make(n_local=1, local_size=4)
    model = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
    views = ddp_views()
    b = views[0].shape[0] // WORLD
    method.set_progress(0.0, 5.0)
    model(batch([v[rank * b:(rank + 1) * b] for v in views]))["loss"].backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    torch.save({"center": method.center, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_center_all_reduced_identical_on_ranks_and_equal_to_single_process(tmp_path):
    mp.spawn(_center_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert torch.equal(r0["center"], r1["center"])
    single = make(n_local=1, local_size=4)
    views = ddp_views()
    with torch.no_grad():
        t = torch.cat([single.teacher_head(single.teacher_backbone(v)) for v in views[:2]])
    want = 0.1 * t.mean(dim=0)  # from C = 0 with m = 0.9
    assert close(r0["center"], want), gap(r0["center"], want)
    single.set_progress(0.0, 5.0)
    single(batch(views))["loss"].backward()
    assert close(single.center, r0["center"]), gap(single.center, r0["center"])
    # per-rank mean losses averaged by DDP = the loss on the whole batch: same gradients
    for n, p in single.named_parameters():
        if p.grad is not None:
            assert close(r0["grads"][n], p.grad), (n, gap(r0["grads"][n], p.grad))


def test_head_batchnorm_standardises_nearly_parallel_features():
    # head_bn (the paper code's use_bn_in_head): each hidden layer is batch-standardised before GELU, so
    # images whose backbone features are nearly parallel still spread apart in the bottleneck
    from pipeline.methods.dino import DINOHead

    torch.manual_seed(0)
    base = torch.randn(1, 16)
    x = base + 1e-3 * torch.randn(64, 16)  # almost identical features
    heads = {bn: DINOHead(16, 32, hidden=24, bottleneck=8, layers=3, bn=bn) for bn in (False, True)}
    kinds = [type(m) for m in heads[True].mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in heads[False].mlp)
    hidden = heads[True].mlp[:2](x)
    assert torch.allclose(hidden.mean(0), torch.zeros(24), atol=1e-4)
    spread = {bn: nn.functional.normalize(h.mlp(x), dim=-1).std(0).mean().item() for bn, h in heads.items()}
    assert spread[True] > 10 * spread[False]


def test_collapse_diagnostics_by_hand():
    """Entropy in nats and distinct argmax prototypes of the selected rows; unselected rows count for nothing."""
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25],   # uniform: log 4, argmax 0
                      [1.0, 0.0, 0.0, 0.0],       # one-hot: 0 nats, argmax 0
                      [0.0, 0.5, 0.5, 0.0],       # log 2, argmax 1
                      [0.0, 0.0, 0.0, 1.0]])      # argmax 3
    d = collapse_diagnostics(p, "cls")
    assert math.isclose(d["teacher_entropy_cls"].item(), (math.log(4) + math.log(2)) / 4, rel_tol=1e-6)
    assert d["prototypes_cls"].item() == 3
    d = collapse_diagnostics(p, "patch", torch.tensor([False, True, False, True]))
    assert d["teacher_entropy_patch"].item() == 0.0 and d["prototypes_patch"].item() == 2
    d = collapse_diagnostics(p, "patch", torch.zeros(4, dtype=torch.bool))  # no rows: 0, not NaN
    assert d["teacher_entropy_patch"].item() == 0.0 and d["prototypes_patch"].item() == 0


def test_forward_returns_detached_diagnostics_of_the_targets_it_used():
    m = make(n_local=0)
    m.center.copy_(torch.randn(16))
    c0 = m.center.clone()
    views = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    m.set_progress(0.0, 2.0)
    out = m(batch(views))
    with torch.no_grad():
        t = torch.cat(m.project(m.teacher_head, [m.teacher_backbone(v) for v in views]))
    p = torch.softmax((t - c0) / m.teacher_temp(), dim=-1)  # the previous centre, as the loss
    want_h = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    assert torch.allclose(out["teacher_entropy_cls"], want_h, atol=1e-5)
    assert out["prototypes_cls"].item() == p.argmax(-1).unique().numel()
    assert not out["teacher_entropy_cls"].requires_grad and not out["prototypes_cls"].requires_grad


def _drop_probs(vit_net) -> list[float]:
    out = []
    for block in vit_net.blocks:
        for mod in (block.drop_path1, block.drop_path2):
            out.append(float(getattr(mod, "drop_prob", 0.0)))
    return out


def test_student_has_dinos_drop_path_and_the_teacher_none():
    """DINO's code: student = vit(drop_path_rate=0.1), teacher = vit() (main_dino.py); timm's rule: block i of n
    drops with 0.1 * i / (n - 1), on both residual branches. The EMA still pairs parameters one to one."""
    from timm.models.vision_transformer import VisionTransformer

    bb = build_backbone({"arch": "vit_tiny", "patch_size": 8, "depth": 3}, 32)
    m = make(bb)
    assert m.cfg["drop_path"] == 0.1
    want = [0.0, 0.0, 0.05, 0.05, 0.1, 0.1]
    assert _drop_probs(m.backbone.net) == pytest.approx(want)
    timm_ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=3, num_heads=3, num_classes=0,
                                 drop_path_rate=0.1)
    assert _drop_probs(timm_ref) == pytest.approx(want)
    assert _drop_probs(m.teacher_backbone.net) == [0.0] * 6
    student = dict(m.backbone.named_parameters())
    teacher = dict(m.teacher_backbone.named_parameters())
    assert student.keys() == teacher.keys() and all(student[k].shape == teacher[k].shape for k in student)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.items()}
    mom = m.target_momentum(0.0)
    m.update_targets(0.0)
    for k in student:
        assert close(teacher[k], mom * before[k] + (1 - mom) * student[k]), k


def test_drop_path_acts_on_the_student_in_training_only():
    bb = build_backbone({"arch": "vit_tiny", "patch_size": 8, "depth": 2}, 32)
    m = make(bb, drop_path=0.5)
    x = torch.randn(4, 3, 32, 32)
    m.train()
    torch.manual_seed(1)
    a = m.backbone(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m.backbone(x))                       # stochastic depth draws differ
    assert torch.equal(m.teacher_backbone(x), m.teacher_backbone(x))  # the teacher has none
    m.eval()
    assert torch.equal(m.backbone(x), m.backbone(x))


def test_a_resnet_student_has_no_drop_path():
    m = make(build_backbone({"arch": "resnet18", "width": 8, "cifar_stem": True}, 32))
    assert not any("DropPath" in type(mod).__name__ for mod in m.modules())

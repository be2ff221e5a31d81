"""Mixed precision (issue 23, defects 1-3): the parts of a step that must stay in float32 do so inside an
autocast region. CPU autocast (bf16) casts the same ops CUDA's does (conv, matmul, addmm), so each test fails
on the CPU before its fix: the patch augmentation's blur and hue matmul (GSSSL, grouped SimCLR / MoCo-v2,
PW-Self), PW-Self's target construction, the NNCLR / pNNCLR nearest-neighbour search. Where only a GPU shows
a fault (CUDA autocast does not promote `index_copy`, so the bf16 blur raised there), the GPU check
(benchmarks/gpu_check.py: every method's step under bf16 and fp16) guards it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.data.patch_augment import _blur_selected, patch_augment
from pipeline.methods.memory import nearest_neighbour
from pipeline.methods.patch_groups import PatchGroups
from pipeline.methods import pwself as pw
from tests.close import close, gap

LOW = (torch.bfloat16, torch.float16)


class LowPrecisionOps(TorchDispatchMode):
    """Records every op that returns a bf16 / fp16 tensor (below autocast in the dispatcher: it sees the casts)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype in LOW for t in tree_leaves(out)):
            self.ops.append(str(func))
        return out


def _views(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _augment(x, **kw):
    return patch_augment(x, 4, blur_p=0.5, jitter_p=1.0, generator=torch.Generator().manual_seed(3),
                         mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), **kw)


def test_patch_augment_runs_in_float32_under_autocast():
    """Defect 1: with blur (and hue) on, the augmentation inside a bf16 autocast region is the float32 one bit
    for bit, and no op in it produces a half-precision tensor (before: the blur conv and the hue matmul)."""
    x = _views()
    want = _augment(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), LowPrecisionOps() as rec:
        got = _augment(x)
    assert rec.ops == [], rec.ops
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_group_cut_is_float32_under_autocast():
    """Defect 1 where it crashed on CUDA: GSSSL / grouped SimCLR / MoCo-v2 cut and augment patches inside the
    forward (VICReg's blur 1.0 on view 1)."""
    torch.manual_seed(0)
    groups = PatchGroups(n=3, size=12)
    x = _views()
    want = groups.cut(x, 0, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16), LowPrecisionOps() as rec:
        got = groups.cut(x, 0, generator=torch.Generator().manual_seed(5))
    assert rec.ops == [] and got.dtype == torch.float32 and torch.equal(got, want)


def test_fixed_shape_blur_equals_the_selected_patches_blur():
    """Defect 6: on CUDA the blur runs on every patch and keeps the selected ones (no `nonzero`); same result as
    blurring only the selected patches (the CPU path)."""
    g = torch.Generator().manual_seed(1)
    flat = torch.rand(40, 3, 8, 8, generator=g)
    sel = torch.rand(40, generator=g) < 0.3
    sigma = 0.1 + 1.9 * torch.rand(40, generator=g)
    fixed, chosen = (_blur_selected(flat, sel, sigma, 7, fixed_shape=f) for f in (True, False))
    assert close(fixed, chosen, rel=1e-6), gap(fixed, chosen)
    assert torch.equal(fixed[~sel], flat[~sel]) and not torch.equal(fixed[sel], flat[sel])


def _fold_by_hand(p_t, rows, weights):
    out = torch.zeros(rows.shape[0], p_t.shape[1], dtype=torch.float64)
    for b in range(rows.shape[0]):
        for k in range(rows.shape[1]):
            out[b] += float(weights[b, k]) * p_t[rows[b, k]].double()
    return out


def test_pwself_targets_are_float32_under_autocast():
    """Defect 2: the targets, a weighted sum of teacher rows, come out in float32 inside a bf16 autocast region
    and equal the float64 hand sum (before: a sparse product, cast by autocast to bf16, 1.3 % off per entry)."""
    g = torch.Generator().manual_seed(0)
    p_t = F.softmax(torch.randn(12, 64, generator=g) * 3, dim=1)
    rows = torch.randint(0, 12, (7, 2), generator=g)
    weights = torch.rand(7, 2, generator=g) / 37
    weights[3, 1] = 0.0
    want = _fold_by_hand(p_t, rows, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pw.pair_targets(p_t, rows, weights)
    assert got.dtype == torch.float32 and close(got, want, rel=1e-6), gap(got, want)


def test_pwself_step_builds_float32_targets_under_autocast(monkeypatch):
    """Defect 2 at the method: inside autocast the step's targets (the first argument of the cross-entropy) are
    float32 and each row sums to its pairs' weight (before: bf16 from the sparse product)."""
    from tests.test_pwself import fixed_batch, make

    seen = []
    real = pw.soft_cross_entropy

    def record(p_teacher, student_logits, tau):
        seen.append(p_teacher)
        return real(p_teacher, student_logits, tau)

    monkeypatch.setattr(pw, "soft_cross_entropy", record)
    m = make(loss="pwml")
    m.set_progress(0.0, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        m(fixed_batch())
    target = seen[0]
    assert target.dtype == torch.float32
    # PWML: per (sample, view pair) the weights sum to 1, / (batch x pairs): the whole target sums to 1
    assert abs(float(target.double().sum()) - 1.0) < 1e-6


def test_nearest_neighbour_is_float32_under_autocast():
    """Defect 3: on clustered data (neighbours closer than bf16 resolves) the neighbours chosen inside a bf16
    autocast region are the float32 ones (before: `.float()` was undone by autocast on the matmul)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    support = F.normalize(centres.repeat_interleave(16, 0) + 2e-3 * torch.randn(128, 32, generator=g), dim=1)
    z = support[torch.randperm(128, generator=g)[:64]] + 3e-4 * torch.randn(64, 32, generator=g)
    want = nearest_neighbour(z, support)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_neighbour(z, support)
    assert got.dtype == torch.float32 and torch.equal(got, want)

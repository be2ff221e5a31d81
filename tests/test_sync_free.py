"""No host sync inside a training step (issue 23, defect 6), as far as a CPU can tell.

On CUDA, an op whose output shape depends on the data (`nonzero`, boolean-mask indexing, `masked_select`,
`unique`) or that reads a device value on the host (`int(t)`, `t.item()`, `bool(t)`) makes the host wait for
every queued kernel. A CPU run cannot see the wait, but it can see the op: these tests run whole steps
(forward, backward, after_step) of the methods whose sync sites were rewritten and assert that none of them
is dispatched. Host-to-device copies (pinned, non-blocking: `pipeline.data.transfer.to_device`) are invisible
on a CPU; the GPU check (benchmarks/gpu_check.py: every method's step under
`torch.cuda.set_sync_debug_mode("error")`) guards those, and every site here on a GPU.

Sites and their guards: Shuffle-BN's permutation (host draw, pinned non-blocking copy: GPU check, MoCo-v2 /
LeOCLR), the support set's fill count and the patch groups' / pNNCLR's generator seeds (host copies of the
counters: here and the GPU check), the patch augmentation's blur selection (fixed shapes on a GPU: here, with the
fixed-shape path forced), PW-Self's index plan (on the host from the geometry: here for the device part, and the
GPU check), the loader's and the device augmentation's copies (GPU check only).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pipeline.data.patch_augment as patch_augment
from pipeline.methods.gsssl import GSSSL
from pipeline.methods.leoclr import LeOCLR
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.nnclr import NNCLR
from pipeline.methods.pnnclr import PNNCLR
from pipeline.methods.simclr import SimCLR
from tests.test_ddp import AUG, TinyNet

SYNCING = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
           "unique_consecutive", "is_nonzero", "equal", "repeat_interleave", "masked_scatter", "nonzero_static"}


class SyncOps(TorchDispatchMode):
    """Records every dispatched op that would make the host wait on CUDA (module doc)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(list(args[1:2])))
        if name in SYNCING or bool_index:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_syncing_ops():
    x = torch.randn(6)
    with SyncOps() as rec:
        x.nonzero(), int(x.sum()), x[x > 0]
    assert len(rec.ops) >= 3


HEADS = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2}
GROUPS = {"n": 2, "size": 4, "blur_p": [0.5, 0.5], "solarize_p": [0.0, 0.2]}


def _methods():
    from tests.test_gsssl import ConvNet

    yield "mocov2", lambda: MoCoV2(ConvNet(), {**HEADS, "temperature": 0.2, "queue_size": 16, "momentum": 0.9,
                                                "shuffle_bn_groups": 2}, AUG, 6)
    yield "mocov2_grouped", lambda: MoCoV2(ConvNet(), {**HEADS, "temperature": 0.2, "queue_size": 16,
                                                        "momentum": 0.9, "groups": GROUPS}, AUG, 6)
    yield "simclr_grouped", lambda: SimCLR(ConvNet(), {**HEADS, "temperature": 0.5, "groups": GROUPS}, AUG, 6)
    yield "gsssl", lambda: GSSSL(ConvNet(), {**HEADS, "groups": {"n": 2, "size": 4}, "rank_k": 2}, AUG, 6)
    # TinyNet takes 4 px views
    yield "leoclr", lambda: LeOCLR(TinyNet(), {**HEADS, "temperature": 0.2, "queue_size": 16, "momentum": 0.9,
                                                "shuffle_bn_groups": 2}, AUG, 4)
    yield "nnclr", lambda: NNCLR(TinyNet(), {**HEADS, "support_size": 12, "pred_hidden": 8}, AUG, 4)
    yield "pnnclr", lambda: PNNCLR(TinyNet(), {**HEADS, "support_size": 12}, AUG, 4)


@pytest.mark.parametrize("name, build", list(_methods()), ids=[n for n, _ in _methods()])
def test_steps_dispatch_no_syncing_op(monkeypatch, name, build):
    """Two steps (the second with a filled support set / queue) of each method, forward + backward + after_step,
    with the patch blur on its fixed-shape (GPU) path."""
    monkeypatch.setattr(patch_augment, "SELECT_ON_HOST", frozenset())
    torch.manual_seed(0)
    m = build()
    g = torch.Generator().manual_seed(1)
    size = m.image_size
    batches = [SimpleNamespace(views=[torch.randn(4, 3, size, size, generator=g) for _ in range(len(m.views()))])
               for _ in range(2)]
    with SyncOps() as rec:
        for step, batch in enumerate(batches):
            m.set_progress(step / 2, step / 2)
            m(batch)["loss"].backward()
            m.after_step(step / 2)
    assert rec.ops == [], f"{name}: {rec.ops}"


def test_pwself_device_part_dispatches_no_syncing_op():
    """PW-Self: the index plan is computed on the host from the geometry (there `nonzero` costs nothing); the
    rest of the step, everything that runs on the device, dispatches no syncing op (before: boolean-mask
    indexing of the tokens and of the pairs, a sparse product that coalesces, `index_add_`)."""
    from tests.test_pwself import fixed_batch, make

    m = make(loss="pwml")
    m.set_progress(0.0, 0.0)
    b = fixed_batch()
    plan = m.plan(b.geometry, [v.shape[-1] // m.patch_size for v in b.views])
    m.plan = lambda geometry, grids: plan
    with SyncOps() as rec:
        m(b)["loss"].backward()
        m.after_step(0.0)
    assert rec.ops == [], rec.ops

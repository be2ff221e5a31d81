"""Shuffle-BN (MoCo §3.3): the key encoder's BN sees other groups than the query encoder's, keys come back in the
original order, off is the plain key encoder, permutations are reproducible, and under gloo DDP (2 processes) the
batch is shuffled across ranks and unshuffled exactly (equal to one process with the ranks' groups)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.methods.leoclr import LeOCLR
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.shuffle_bn import bn_groups, encode_in_groups, grouped_batchnorm, permutation, shuffled_encode
from tests.test_ddp import AUG, WORLD, TinyNet, _init, free_port

CFG = {"proj_hidden": 8, "proj_dim": 5, "proj_layers": 2, "temperature": 0.2, "queue_size": 32, "momentum": 0.9}


def make(cls=MoCoV2, **over):
    torch.manual_seed(0)
    return cls(TinyNet(), {**CFG, **over}, AUG, 4)


def record_inputs(module: nn.Module) -> list[torch.Tensor]:
    """Every batch `module` is called on, in call order."""
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    return seen


def rows_of(batch: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Which rows of x each row of `batch` is (exact copies)."""
    return [next(i for i in range(len(x)) if torch.equal(r, x[i])) for r in batch]


def test_key_bn_groups_differ_from_the_queries():
    m = make(shuffle_bn_groups=4, proj_bn=True)   # a BN in the head to observe (MoCo-v2's own head has none)
    x = torch.randn(16, 3, 4, 4)
    query_bn = next(mod for mod in m.projector.modules() if isinstance(mod, nn.BatchNorm1d))
    q_calls = record_inputs(query_bn)
    m.set_progress(0.25, 1.0)
    m(SimpleNamespace(views=[x, x.flip(0)]))
    assert [len(c) for c in q_calls] == [16]          # the queries: one BN batch of the whole batch
    keys = m.key(x)                                   # the next call's permutation: four groups of 4 rows
    perm = permutation(16, round(0.25 * 2 ** 30) * 16 + 1, "cpu")
    assert perm.tolist() != list(range(16))           # shuffled, not the batch's own order
    want = torch.empty_like(keys)
    for idx in perm.tensor_split(4):
        want[idx] = m.key_projector(m.key_backbone(x[idx]))
    assert torch.allclose(keys, want, atol=1e-5)
    whole = m.key_projector(m.key_backbone(x))        # one BN batch, as the queries: other statistics
    assert not torch.allclose(keys, whole, atol=1e-3)


def test_grouped_batchnorm_is_each_group_on_its_own():
    """One pass over interleaved rows == each group through BatchNorm alone (2-d, 4-d inputs, running stats)."""
    for bn, shape in ((nn.BatchNorm2d(3), (12, 3, 5, 5)), (nn.BatchNorm1d(3), (12, 3))):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        ref = type(bn)(3)
        ref.load_state_dict(bn.state_dict())
        x = torch.randn(*shape) * 3 + 1
        with grouped_batchnorm([bn], 3):
            got = bn(x)
        want = torch.cat([ref(x[g::3]) for g in range(3)])            # group g: rows g, g + 3, ...
        order = torch.cat([torch.arange(g, 12, 3) for g in range(3)])
        assert torch.allclose(got[order], want, atol=1e-5)
        assert torch.allclose(bn.running_mean, x.transpose(0, 1).reshape(3, -1).mean(1) * 0.1, atol=1e-5)
        assert "forward" not in bn.__dict__  # the plain BatchNorm again outside the context


def test_encode_in_groups_equals_separate_passes_of_a_conv_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 6),
                        nn.BatchNorm1d(6))
    x = torch.randn(16, 3, 6, 6)
    got = encode_in_groups(net, x, 4, [net])
    want = torch.cat([net(part) for part in x.tensor_split(4)])   # consecutive groups, each its own BN batch
    assert torch.allclose(got, want, atol=1e-5)


def test_keys_come_back_in_order_and_equal_grouped_encoding():
    m = make(shuffle_bn_groups=4)
    x = torch.randn(12, 3, 4, 4)
    m.set_progress(0.5, 1.0)
    got = m.key(x)
    perm = permutation(12, round(0.5 * 2 ** 30) * 16, "cpu")
    want = torch.empty_like(got)
    for idx in perm.tensor_split(4):  # each group through the key encoder on its own, put back in place
        want[idx] = m.key_projector(m.key_backbone(x[idx]))
    assert torch.allclose(got, want, atol=1e-6)
    # a BN-free encoder: the shuffle is invisible
    assert torch.equal(shuffled_encode(lambda y: y * 2, x, 4, seed=3), x * 2)


def test_off_is_the_plain_key_encoder():
    m = make(shuffle_bn=False)
    x = torch.randn(8, 3, 4, 4)
    calls = record_inputs(m.key_backbone)
    assert torch.equal(m.key(x), m.key_projector(m.key_backbone(x)))
    assert [len(c) for c in calls] == [8, 8]


def test_each_call_its_own_permutation_and_a_replayed_step_the_same():
    m = make(symmetric=True, shuffle_bn_groups=2)
    x = torch.randn(8, 3, 4, 4)
    calls = record_inputs(m.key_backbone)
    for _ in range(2):
        m.set_progress(0.125, 0.5)
        m.key(x), m.key(x)
    first, second, replay1, replay2 = (tuple(rows_of(b, x)) for b in calls)  # one pass per key() call
    assert first != second and (first, second) == (replay1, replay2)


def test_groups_are_equal_and_keep_two_rows_for_batchnorm():
    assert [bn_groups(n, 8) for n in (256, 16, 12, 6, 5, 3)] == [8, 8, 6, 3, 1, 1]
    assert bn_groups(256, 1) == 1


def test_leoclr_and_mocov2_default_on():
    assert make().cfg["shuffle_bn"] and make(LeOCLR, variant="momentum").cfg["shuffle_bn"]
    assert make().cfg["shuffle_bn_groups"] == 8


# --- DDP (gloo, 2 processes) -----------------------------------------------------------------------------

class RecordingBN(nn.Module):
    """BatchNorm1d (train mode: batch statistics) that records the rows it normalises."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.seen: list[torch.Tensor] = []

    def forward(self, y):
        self.seen.append(y.detach().clone())
        return self.bn(y)


def _global_batch():
    return torch.randn(16, 3, generator=torch.Generator().manual_seed(4))


def _ddp_worker(rank, port, out):
    _init(rank, port)
    x = _global_batch()[rank * 8:(rank + 1) * 8]
    enc = RecordingBN()
    keys = shuffled_encode(enc, x, 4, seed=11, modules=[enc])        # 4 groups of the global batch: 2 per rank
    plain = shuffled_encode(lambda y: y + 1, x, 4, seed=11)
    # MoCo's setting at a smaller scale: 8 global groups over 2 ranks of 16 keys -> 4 groups of 4 per rank
    wide = torch.randn(32, 3, generator=torch.Generator().manual_seed(5))[rank * 16:(rank + 1) * 16]
    enc8 = RecordingBN()
    keys8 = shuffled_encode(enc8, wide, 8, seed=12, modules=[enc8])
    # which methods the trainer would SyncBN-convert under torchrun on CUDA (the conversion itself runs on CPU)
    from pipeline.methods.simclr import SimCLR
    from pipeline.methods.shuffle_bn import sync_bn_applies

    cuda, cfg = torch.device("cuda", 0), {"sync_bn": True}
    applies = {cls.__name__: sync_bn_applies(make(cls, **extra), cfg, cuda) for cls, extra in
               ((MoCoV2, {}), (LeOCLR, {"variant": "momentum"}), (SimCLR, {"temperature": 0.5}))}
    applies["off"] = sync_bn_applies(make(SimCLR, temperature=0.5), {"sync_bn": False}, cuda)
    applies["cpu"] = sync_bn_applies(make(SimCLR, temperature=0.5), cfg, torch.device("cpu"))
    torch.save({"keys": keys, "seen": enc.seen, "plain": plain, "keys8": keys8, "seen8": enc8.seen,
                "applies": applies}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("shuffle_bn_ddp")
    mp.spawn(_ddp_worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_shuffles_across_ranks_and_unshuffles_in_order(ddp_ranks):
    ranks = ddp_ranks
    x = _global_batch()
    for r, got in enumerate(ranks):  # BN-free: every rank gets its own rows back, in order
        assert torch.equal(got["plain"], x[r * 8:(r + 1) * 8] + 1)
    # rank 0's BN groups hold rows of rank 1's batch: the shuffle crossed ranks
    seen0 = sum((rows_of(b, x) for b in ranks[0]["seen"]), [])
    assert len(seen0) == 8 and any(i >= 8 for i in seen0)
    # `groups` is global (issue 23, defect 7): one process with the same 4 groups on the gathered batch gives the
    # same keys (each rank normalised 4 / 2 = 2 groups)
    enc = RecordingBN()
    single = shuffled_encode(enc, x, 4, seed=11, modules=[enc])
    assert torch.allclose(torch.cat([r["keys"] for r in ranks]), single, atol=1e-6)


def test_ddp_groups_are_global_and_the_moco_family_keeps_per_gpu_bn(ddp_ranks):
    """Issue 23, defect 7. `shuffle_bn_groups: 8` over 2 ranks of 16 keys: each rank normalises 4 groups of 4 (the
    8 groups of one process on the 32 keys), not 8 groups of 2. And `train.sync_bn` SyncBN-converts SimCLR under
    torchrun on CUDA but never the MoCo family (MoCo §3.3: BN per GPU)."""
    ranks = ddp_ranks
    wide = torch.randn(32, 3, generator=torch.Generator().manual_seed(5))
    got = torch.cat([r["keys8"] for r in ranks])
    enc = RecordingBN()
    want = shuffled_encode(enc, wide, 8, seed=12, modules=[enc])          # 8 groups of 4 in one process
    per_rank_eight = RecordingBN()
    old = shuffled_encode(per_rank_eight, wide, 16, seed=12, modules=[per_rank_eight])  # 2 ranks x 8 groups of 2
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, old, atol=1e-3)
    for r in ranks:
        assert [b.shape[0] for b in r["seen8"]] == [16]   # one pass over the rank's 16 keys, in its 4 groups
        assert r["applies"] == {"MoCoV2": False, "LeOCLR": False, "SimCLR": True, "off": False, "cpu": False}

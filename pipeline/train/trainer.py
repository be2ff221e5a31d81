"""The one training loop every method runs through.

Owns: device choice, DDP (torchrun), AMP and channels_last on CUDA, the optimizer and its schedule,
checkpoints with the full state (method incl. momentum encoders and queues, optimizer, scaler, RNG,
position in the epoch, metric history) every N steps, automatic resume, the NaN/Inf guard, per-epoch
metrics for `dvc plots` (with an optional kNN monitor), and tqdm progress. Methods only say what their loss is.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.loader import ShardStream, make_loader
from pipeline.data.shards import read_meta, read_pair_meta
from pipeline.methods import registry
from pipeline.models.backbones import build_backbone
from pipeline.params import ParamError, PipelineError, method_config, run_spec
from pipeline.train import dist
from pipeline.train.monitor import monitor_from_config
from pipeline.train.optim import build_optimizer, cosine_ramp, lr_at, peak_lr, set_lr, set_weight_decay
from pipeline.utils import atomic_torch_save, atomic_write_json, atomic_write_text, pick_device

# train keys that change how fast a run goes, not what it computes: they may differ on resume
_RUNTIME_KEYS = ("num_workers", "checkpoint_every", "knn_monitor")


class TrainingError(PipelineError):
    """Training cannot go on (non-finite loss, ...); the message says where."""


@dataclass
class RunPaths:
    encoder: Path            # final artifact: backbone (+ heads) for evaluation and mining
    checkpoint: Path         # full training state, for resume (a DVC persist output)
    metrics: Path            # summary JSON (dvc metrics)
    curve: Path              # per-epoch CSV (dvc plots)

    @classmethod
    def for_run(cls, root: Path, run: str) -> "RunPaths":
        return cls(root / "data/models" / run / "encoder.pt", root / "data/checkpoints" / run / "last.pt",
                   root / "reports/metrics/pretrain" / f"{run}.json", root / "reports/plots/pretrain" / f"{run}.csv")


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    views: int = 0
    history: list = field(default_factory=list)       # one dict per finished epoch
    sums: dict = field(default_factory=dict)          # running sums of loss terms in this epoch
    epoch_views: int = 0
    epoch_time_s: float = 0.0
    knn_init: float | None = None                     # the kNN monitor before the first step


def fingerprint(*parts) -> str:
    """What a checkpoint must match to be resumed: the run's semantic settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_method(p: dict, run: str) -> tuple[nn.Module, dict, dict]:
    method_name, block, train, backbone_cfg = method_config(p, run)
    image_size = p["dataset"]["image_size"]
    backbone = build_backbone(backbone_cfg, image_size)
    method = registry.get(method_name)(backbone, block, p["augment"], image_size)
    method.pixel_norm = (tuple(p["dataset"]["mean"]), tuple(p["dataset"]["std"]))
    return method, train, backbone_cfg


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _check_finite(out: dict, progress: Progress, run: str) -> None:
    vals = torch.stack([v.detach().float() for v in out.values()])
    ok = torch.isfinite(vals).all().to(torch.float32)
    if dist.is_dist():  # every rank stops together, or the others hang in the next collective
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if ok.item() < 1:
        bad = {k: float(v) for k, v in out.items() if not math.isfinite(float(v))} or {"(another rank)": float("nan")}
        raise TrainingError(f"{run}: non-finite loss at epoch {progress.epoch + 1}, step {progress.step} "
                            f"(step {progress.step_in_epoch} of the epoch): " + ", ".join(f"{k}={v}" for k, v in bad.items()))


def train_step(model: nn.Module, method: nn.Module, opt, scaler, batch, amp_dtype, grad_clip: float, progress: float,
               check=None) -> dict:
    """One optimisation step: forward (under autocast on CUDA), guard, backward, clip, step, EMA updates."""
    device_type = batch.views[0].device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(batch)
    if check is not None:
        check(out)
    opt.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(method.parameters(), grad_clip)
    method.before_optimizer_step()
    scaler.step(opt)
    scaler.update()
    method.after_step(progress)
    return out


def _write_curve(history: list, path: Path) -> None:
    if not history:
        return
    cols = list(history[0])
    for row in history:
        cols += [c for c in row if c not in cols]
    lines = [",".join(cols)] + [",".join(_fmt(row.get(c, "")) for c in cols) for row in history]
    atomic_write_text("\n".join(lines) + "\n", path)


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def train(p: dict, run: str, root: Path = Path("."), max_steps: int | None = None) -> dict:
    """Pretrain one run of params `p`; resumes from its checkpoint when one matches. Returns the summary.

    `max_steps` stops early (after a checkpoint) without writing the final artifacts: tests use it.
    """
    dist.init_from_env()
    device = pick_device()
    paths = RunPaths.for_run(root, run)
    paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)  # a DVC output even for runs that never checkpoint
    seed_everything(p["seed"])
    method, train_cfg, backbone_cfg = build_method(p, run)
    world, rank = dist.world_size(), dist.rank()
    image_size = p["dataset"]["image_size"]
    shard_dir = root / "data/shards" / p["dataset"]["name"]
    meta = read_meta(shard_dir) if (shard_dir / "meta.json").exists() else None
    if meta is None:
        raise PipelineError(f"{shard_dir}: no shards (run the shard stage first: dvc repro shard)")
    trains = getattr(method, "TRAINS", True) and train_cfg["epochs"] > 0
    spec = run_spec(p, run)
    summary = {"run": run, "method": spec["method"], "backbone": spec["backbone"],
               "device": device.type, "world_size": world, "epochs": train_cfg["epochs"] if trains else 0}
    pairs_dir = pairs_meta = None
    if spec.get("pairs"):  # SePP-ID: the originals plus a pair set of the mine stage
        pairs_dir = root / "data/pairs" / p["dataset"]["name"] / spec["pairs"]
        pairs_meta = read_pair_meta(pairs_dir)
        summary["pairs"] = spec["pairs"]
    if not trains:
        return _finish(method, backbone_cfg, image_size, paths, Progress(), summary, device, trained=False)

    if train_cfg["batch_size"] % world:
        raise ParamError(f"train.batch_size: {train_cfg['batch_size']} is not divisible by the {world} ranks")
    local_batch = train_cfg["batch_size"] // world
    stream = ShardStream(shard_dir, method.views(), p["dataset"]["mean"], p["dataset"]["std"], local_batch,
                         meta["counts"]["train"], train_cfg["batch_size"], p["seed"], rank, world,
                         subset=train_cfg["train_subset"], shuffle_buffer=train_cfg["shuffle_buffer"], pairs_dir=pairs_dir)
    steps_per_epoch = stream.steps
    total_steps = steps_per_epoch * train_cfg["epochs"]
    warmup = int(round(train_cfg["warmup_epochs"] * steps_per_epoch))
    peak = peak_lr(train_cfg)
    views_per_step = train_cfg["batch_size"] * len(method.views())

    cuda = device.type == "cuda"
    channels_last = cuda and train_cfg["channels_last"]
    method.to(device, memory_format=torch.channels_last) if channels_last else method.to(device)
    model: nn.Module = method
    if dist.is_dist():
        if train_cfg["sync_bn"] and cuda:  # SyncBatchNorm has no CPU kernel: gloo runs keep per-rank BN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # buffers (queues, BN statistics of momentum encoders) are kept identical by the methods themselves
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                    broadcast_buffers=False)
    method = model.module if dist.is_dist() else model
    opt = build_optimizer(method.param_groups(), train_cfg)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg["amp"]) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # the method's merged settings (its block + the run's overrides): a changed override must not resume
    fp_parts = [summary["method"], method.cfg, {k: v for k, v in train_cfg.items() if k not in _RUNTIME_KEYS},
                backbone_cfg, p["augment"], p["dataset"], p["seed"], world]
    if pairs_meta is not None:  # other pairs (mine params changed): other training data, no resume
        fp_parts.append({"pairs": spec["pairs"], "digest": pairs_meta["digest"]})
    fp = fingerprint(*fp_parts)
    progress = Progress()
    if paths.checkpoint.exists():
        ck = torch.load(paths.checkpoint, map_location=device, weights_only=False)
        if ck.get("fingerprint") == fp:
            method.load_state_dict(ck["method"])
            opt.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            progress = Progress(**ck["progress"])
            _set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
            if dist.is_main():
                print(f"{run}: resuming from {paths.checkpoint} at epoch {progress.epoch + 1}, step {progress.step}", flush=True)
        elif dist.is_main():
            print(f"{run}: {paths.checkpoint} is from other settings; starting from scratch", flush=True)

    def save_checkpoint() -> None:
        rng = [None] * world
        if dist.is_dist():
            torch.distributed.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        if dist.is_main():
            atomic_torch_save({"fingerprint": fp, "method": method.state_dict(), "optimizer": opt.state_dict(),
                               "scaler": scaler.state_dict(), "progress": progress.__dict__, "rng": rng}, paths.checkpoint)

    monitor = monitor_from_config(train_cfg, shard_dir, image_size, p["dataset"]["mean"], p["dataset"]["std"], device)

    def monitor_knn(epochs_done: int) -> float | None:
        top1 = None
        if dist.is_main():
            top1 = monitor(method.encoder_to_export())
            print(f"{run}: kNN-200 monitor after epoch {epochs_done}: {top1:.2f}", flush=True)
        dist.barrier()
        return top1

    if monitor is not None and progress.step == 0 and progress.knn_init is None:
        progress.knn_init = monitor_knn(0)
    method.train()
    while progress.epoch < train_cfg["epochs"]:
        stream.set_epoch(progress.epoch, skip_batches=progress.step_in_epoch)
        loader = make_loader(stream, train_cfg["num_workers"], pin_memory=cuda)
        bar = tqdm(total=steps_per_epoch, initial=progress.step_in_epoch, disable=not dist.is_main(), dynamic_ncols=True,
                   desc=f"{run} epoch {progress.epoch + 1}/{train_cfg['epochs']}", unit="step")
        t_last = time.perf_counter()
        for batch in loader:
            set_lr(opt, lr_at(progress.step, total_steps, warmup, peak, train_cfg["min_lr_ratio"]))
            if "weight_decay_end" in train_cfg:
                set_weight_decay(opt, cosine_ramp(train_cfg["weight_decay"], train_cfg["weight_decay_end"], progress.step / total_steps))
            method.set_progress(progress.step / total_steps, progress.epoch + progress.step_in_epoch / steps_per_epoch)
            batch = batch.to(device, channels_last=channels_last)
            out = train_step(model, method, opt, scaler, batch, amp_dtype, train_cfg["grad_clip"],
                             (progress.step + 1) / total_steps, check=lambda o: _check_finite(o, progress, run))

            now = time.perf_counter()
            progress.epoch_time_s += now - t_last
            t_last = now
            progress.step += 1
            progress.step_in_epoch += 1
            progress.epoch_views += views_per_step
            for k, v in out.items():
                progress.sums[k] = progress.sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}", lr=f"{opt.param_groups[0]['lr']:.3g}",
                            views_s=f"{progress.epoch_views / max(progress.epoch_time_s, 1e-9):.0f}")
            if progress.step % train_cfg["checkpoint_every"] == 0:
                save_checkpoint()
            if max_steps is not None and progress.step >= max_steps:
                bar.close()
                save_checkpoint()
                return {"stopped_at_step": progress.step}
        bar.close()
        n = max(progress.step_in_epoch, 1)
        row = {"epoch": progress.epoch + 1, "step": progress.step, **{k: v / n for k, v in progress.sums.items()},
               "lr": opt.param_groups[0]["lr"], "views_per_s": progress.epoch_views / max(progress.epoch_time_s, 1e-9),
               "epoch_time_s": progress.epoch_time_s}
        if monitor is not None:
            row["knn_top1"] = monitor_knn(progress.epoch + 1)
        progress.history.append(row)
        progress.elapsed_s += progress.epoch_time_s
        progress.views += progress.epoch_views
        progress.epoch, progress.step_in_epoch, progress.sums, progress.epoch_views, progress.epoch_time_s = progress.epoch + 1, 0, {}, 0, 0.0
        if dist.is_main():
            _write_curve(progress.history, paths.curve)
        save_checkpoint()
    summary.update(steps=progress.step, wall_time_s=progress.elapsed_s, views_per_s=progress.views / max(progress.elapsed_s, 1e-9),
                   final_loss=progress.history[-1]["loss"] if progress.history else None,
                   steps_per_epoch=steps_per_epoch, batch_size=train_cfg["batch_size"], train_images=stream.n_samples)
    if pairs_dir is not None:
        summary["train_pairs"] = stream.n_pairs
    if monitor is not None:  # kNN-200 top-1 before training and after each epoch (None where not monitored)
        summary["knn_monitor"] = [progress.knn_init] + [row.get("knn_top1") for row in progress.history]
        summary["knn_monitor_images"] = [monitor.train_images, monitor.test_images]
    return _finish(method, backbone_cfg, image_size, paths, progress, summary, device, trained=True)


def _finish(method, backbone_cfg, image_size, paths: RunPaths, progress: Progress, summary: dict, device, trained: bool) -> dict:
    summary.setdefault("steps", 0)
    summary.setdefault("wall_time_s", 0.0)
    summary.setdefault("views_per_s", 0.0)
    summary.setdefault("final_loss", None)
    summary["peak_mem_mib"] = peak_memory_mib(device)
    if dist.is_main():
        from pipeline.models.encoder_io import save_encoder

        save_encoder(paths.encoder, method.encoder_to_export(), backbone_cfg, image_size, meta=summary, heads=method.heads_to_export())
        if not trained:
            atomic_write_text("epoch,step,loss\n", paths.curve)  # untrained: an empty curve
        atomic_write_json(summary, paths.metrics)
    dist.barrier()
    return summary

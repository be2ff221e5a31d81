"""The one training loop every method runs through.

Owns: device choice, DDP (torchrun), AMP and channels_last on CUDA, the optimizer and its schedule, the
NaN/Inf guard, per-epoch metrics for `dvc plots` (with an optional kNN monitor every N epochs) and tqdm
progress. Checkpoints and resume live in `checkpoint.py`. Methods only say what their loss is.

The loop never waits for the device between steps: loss sums stay on the device, the finite check records
per-step values there, and the host reads them once every `train.sync_every` steps (and at every epoch
end and checkpoint), so a GPU is never drained by `.item()` calls.
"""
from __future__ import annotations

import importlib
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.loader import ShardStream, make_loader
from pipeline.data.shards import pretrain_split, read_meta, read_pair_meta
from pipeline.methods import registry
from pipeline.models.backbones import build_backbone
from pipeline.errors import ParamError, PipelineError
from pipeline.params import RUNTIME_TRAIN_KEYS, base_run, method_config, run_spec, training_seed
from pipeline import dist, faults
from pipeline import paths as layout
from pipeline.train.live import LiveLog
from pipeline.train.checkpoint import Checkpointer, Progress, RunPaths, fingerprint, numerics, seed_everything
from pipeline.train.optim import build_optimizer, clip_gradients, cosine_ramp, lr_at, peak_lr, set_lr, set_weight_decay
from pipeline.device import claim_device, device_model, set_deterministic
from pipeline.utils import atomic_write_json, atomic_write_text

# train keys that change how fast a run goes (or what it reports), not what it computes: they may differ on resume
_RUNTIME_KEYS = (*RUNTIME_TRAIN_KEYS, "knn_monitor", "knn_monitor_every")   # the monitor changes no weight either
SYNC_EVERY = 50  # default host syncs: one every this many steps


class TrainingError(PipelineError):
    """Training cannot go on (non-finite loss, ...); the message says where."""


def build_method(p: dict, run: str) -> tuple[nn.Module, dict, dict]:
    method_name, block, train, backbone_cfg = method_config(p, run)
    image_size = p["dataset"]["image_size"]
    backbone = build_backbone(backbone_cfg, image_size)
    method = registry.get(method_name)(backbone, block, p["augment"], image_size)
    method.pixel_norm = (tuple(p["dataset"]["mean"]), tuple(p["dataset"]["std"]))
    return method, train, backbone_cfg


def build_stream(p: dict, train_cfg: dict, method, paths: RunPaths, meta: dict, seed: int) -> ShardStream:
    """This rank's training stream: the data order and augmentation of training seed `seed`."""
    world, rank = dist.world_size(), dist.rank()
    split = pretrain_split(meta)   # dataset.pretrain: the unlabelled images, else the train split
    return ShardStream(paths.shards, method.views(), p["dataset"]["mean"], p["dataset"]["std"],
                       train_cfg["batch_size"] // world, meta["counts"][split], train_cfg["batch_size"], seed,
                       rank, world, subset=train_cfg["train_subset"], split=split, pairs_dir=paths.pairs)


def open_batches(stream, progress: Progress, epochs: int, num_workers: int, pin_memory: bool):
    """Every batch from the resume point to the end of training, through ONE loader (workers live all run)."""
    stream.start_at(progress.epoch, progress.step_in_epoch, epochs)
    return make_loader(stream, num_workers, pin_memory)


def apply_determinism(train_cfg: dict, device: torch.device) -> None:
    """`train.deterministic` (default on): deterministic cuDNN/cuBLAS/torch kernels on CUDA (pipeline.device)."""
    set_deterministic(train_cfg.get("deterministic", True), device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class FiniteGuard:
    """Stops training at a NaN/Inf loss term without a host sync per step.

    Each step's terms are stacked on the device; `check()` (every K steps, before any checkpoint, at epoch
    ends) reads them once, agrees across ranks on the first bad step (so every rank stops together, or the
    others hang in the next collective) and names its epoch, step and terms. Steps after the bad one in the
    same window have run, but no checkpoint ever holds them: `check()` comes first."""

    def __init__(self, run: str):
        self.run = run
        self.window: list[tuple[tuple[int, int, int], list[str], torch.Tensor]] = []

    def record(self, out: dict, progress: Progress) -> None:
        where = (progress.epoch, progress.step, progress.step_in_epoch)
        self.window.append((where, list(out), torch.stack([v.detach().float() for v in out.values()])))

    def check(self) -> None:
        if not self.window:
            return
        n = len(self.window)
        bad = torch.stack([~torch.isfinite(vals).all() for _, _, vals in self.window])
        first = torch.where(bad.any(), bad.to(torch.int64).argmax(), torch.tensor(n, device=bad.device)).to(torch.int64)
        if dist.is_dist():
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        i = int(first)  # the one host sync of the window
        window, self.window = self.window, []
        if i == n:
            return
        (epoch, step, step_in_epoch), names, vals = window[i]
        vals = vals.cpu().tolist()
        terms = {k: v for k, v in zip(names, vals) if not math.isfinite(v)}
        said = ", ".join(f"{k}={v}" for k, v in terms.items()) or "(another rank)=nan"
        raise TrainingError(f"{self.run}: non-finite loss at epoch {epoch + 1}, step {step} "
                            f"(step {step_in_epoch} of the epoch): {said}")


def train_step(model: nn.Module, method: nn.Module, opt, scaler, batch, amp_dtype, grad_clip: float, progress: float,
               check=None, grad_clip_mode: str = "global") -> dict:
    """One optimisation step: forward (under autocast on CUDA), guard, backward, clip, step, EMA updates."""
    device_type = batch.views[0].device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        faults.point("forward")
        out = model(batch)
    if check is not None:
        check(out)
    opt.zero_grad(set_to_none=True)
    faults.point("backward")
    scaler.scale(out["loss"] * getattr(method, "loss_scale", 1.0)).backward()   # base.Method.loss_scale
    if grad_clip > 0:
        scaler.unscale_(opt)
        clip_gradients(list(method.parameters()), grad_clip, grad_clip_mode)
    method.before_optimizer_step()
    faults.point("optimizer")
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


def _wrap_for_device(method: nn.Module, train_cfg: dict, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(model to call, method to read): on the device, channels_last on CUDA, DDP (+ SyncBN on CUDA) under torchrun."""
    cuda = device.type == "cuda"
    method.to(device, memory_format=torch.channels_last) if cuda and train_cfg["channels_last"] else method.to(device)
    if not dist.is_dist():
        return method, method
    model = method
    from pipeline.methods.shuffle_bn import sync_bn_applies

    if sync_bn_applies(method, train_cfg, device):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # buffers (queues, BN statistics of momentum encoders) are kept identical by the methods themselves
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                broadcast_buffers=False)
    return model, model.module


def _monitor(train_cfg: dict, paths: RunPaths, image_size: int, dataset: dict, device):
    """The kNN monitor when the run asks for one. Loaded by name (like a method), so the evaluation code it
    runs is a dependency of monitored runs only (`pipeline.dag.MONITOR`)."""
    if not (train_cfg.get("knn_monitor") and train_cfg["knn_monitor"][0] > 0):
        return None
    monitor = importlib.import_module("pipeline.train.monitor")
    return monitor.monitor_from_config(train_cfg, paths.shards, image_size, dataset["mean"], dataset["std"], device)


def _epoch_row(progress: Progress, opt) -> dict:
    """The curve's row of the epoch just finished: every term of the method's output averaged over its steps."""
    n = max(progress.step_in_epoch, 1)
    return {"epoch": progress.epoch + 1, "step": progress.step, **{k: float(v) / n for k, v in progress.sums.items()},
            "lr": opt.param_groups[0]["lr"], "views_per_s": progress.epoch_views / max(progress.epoch_time_s, 1e-9),
            "epoch_time_s": progress.epoch_time_s}


def _next_epoch(progress: Progress, row: dict) -> None:
    progress.history.append(row)
    progress.elapsed_s += progress.epoch_time_s
    progress.views += progress.epoch_views
    progress.epoch, progress.step_in_epoch, progress.sums, progress.epoch_views, progress.epoch_time_s = \
        progress.epoch + 1, 0, {}, 0, 0.0


def train(p: dict, run: str, root: Path = Path("."), max_steps: int | None = None, paths: RunPaths | None = None) -> dict:
    """Pretrain one run of params `p`; resumes from its checkpoint when one matches. Returns the summary.

    `paths` come from the stage (default: the project layout under `root`). `max_steps` stops early (after a
    checkpoint) without writing the final artifacts: tests use it. A loader worker's death or a lost rank ends
    the run with a one-line PipelineError, wherever PyTorch reports it (its SIGCHLD handler raises in whatever
    the main thread is doing: the forward, the backward, a checkpoint's `finally`).
    """
    loaders: list = []
    try:
        return _train(p, run, root, max_steps, paths, loaders)
    except (RuntimeError, ConnectionError, EOFError) as e:
        fault = (loaders[0].death(e) if loaders else None) or faults.collective_failure(e, run)
        if fault is None:
            raise
        raise fault from None


def _train(p: dict, run: str, root: Path, max_steps: int | None, paths: RunPaths | None, loaders: list) -> dict:
    dist.init_from_env()
    device = claim_device()   # under `dvc queue start -j N`: a GPU no other job holds
    spec = run_spec(p, run)
    paths = paths or RunPaths.for_run(root, p["dataset"]["name"], run, spec.get("pairs"))
    seed = training_seed(p, run)   # a run instance's own seed (`simclr-s1`: 1)
    seed_everything(seed)
    method, train_cfg, backbone_cfg = build_method(p, run)
    apply_determinism(train_cfg, device)
    world = dist.world_size()
    image_size = p["dataset"]["image_size"]
    if not (paths.shards / "meta.json").exists():
        raise PipelineError(f"{paths.shards}: no shards (run the shard stage first: dvc repro shard)")
    meta = read_meta(paths.shards)
    trains = getattr(method, "TRAINS", True) and train_cfg["epochs"] > 0
    summary = {"run": run, "base_run": base_run(p, run), "seed": seed, "method": spec["method"], "backbone": spec["backbone"],
               "device": device.type, "world_size": world, "epochs": train_cfg["epochs"] if trains else 0}
    pairs_meta = None
    if paths.pairs is not None:  # SePP-ID: the originals plus a pair set of the mine stage
        pairs_meta = read_pair_meta(paths.pairs)
        summary["pairs"] = spec["pairs"]
    if not trains:
        return _finish(method, backbone_cfg, image_size, paths, summary, device, trained=False, preprocess=_preprocess(p))
    if train_cfg["batch_size"] % world:
        raise ParamError(f"train.batch_size: {train_cfg['batch_size']} is not divisible by the {world} ranks")
    if train_cfg.get("gpus", world) != world and dist.is_main():   # the preset's per-GPU batch (and BN) is not this run's
        print(f"warning: {run}: train.gpus is {train_cfg['gpus']}, the run has {world} rank(s)", file=sys.stderr, flush=True)

    stream = build_stream(p, train_cfg, method, paths, meta, seed)
    steps_per_epoch, epochs = stream.steps, train_cfg["epochs"]
    total_steps = steps_per_epoch * epochs
    warmup = int(round(train_cfg["warmup_epochs"] * steps_per_epoch))
    peak = peak_lr(train_cfg)
    views_per_step = train_cfg["batch_size"] * len(method.views())
    sync_every = train_cfg.get("sync_every", SYNC_EVERY)
    cuda = device.type == "cuda"
    model, method = _wrap_for_device(method, train_cfg, device)
    opt = build_optimizer(method.param_groups(), train_cfg)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg["amp"]) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # the method's merged settings (its block + the run's overrides): a changed override must not resume
    fp_parts = [summary["method"], method.cfg, {k: v for k, v in train_cfg.items() if k not in _RUNTIME_KEYS},
                backbone_cfg, p["augment"], p["dataset"], seed, world]
    if pairs_meta is not None:  # other pairs (mine params changed): other training data, no resume
        fp_parts.append({"pairs": spec["pairs"], "digest": pairs_meta["digest"]})
    checkpoints = Checkpointer(paths.checkpoint, fingerprint(*fp_parts), run, numerics(device, amp_dtype))
    progress = checkpoints.restore(method, opt, scaler)
    guard = FiniteGuard(run)

    monitor = _monitor(train_cfg, paths, image_size, p["dataset"], device)
    monitor_every = train_cfg.get("knn_monitor_every", 1)

    def monitor_knn(epochs_done: int) -> float | None:
        top1 = None
        if dist.is_main():
            top1 = monitor(method.encoder_to_export())
            print(f"{run}: kNN-200 monitor after epoch {epochs_done}: {top1:.2f}", flush=True)
        dist.barrier()
        return top1

    def save() -> None:
        guard.check()  # a checkpoint never holds a step after a non-finite loss
        checkpoints.save(method, opt, scaler, progress)
        faults.point("checkpoint")

    hardware = device_model(device)
    if hardware not in progress.timed_on:   # a resume on other hardware: its wall time mixes the two
        progress.timed_on.append(hardware)
    live = LiveLog(root / layout.live(run), progress.step, enabled=dist.is_main())   # DVCLive's layout, as it trains
    if monitor is not None and progress.step == 0 and progress.knn_init is None:
        progress.knn_init = monitor_knn(0)
    method.train()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not dist.is_main(), dynamic_ncols=True,
               desc=f"{run} epoch {progress.epoch + 1}/{epochs}", unit="step")
    t_last = time.perf_counter()

    def clock() -> None:  # training time so far; after a sync it includes the device's queued work
        nonlocal t_last
        now = time.perf_counter()
        progress.epoch_time_s, t_last = progress.epoch_time_s + now - t_last, now
    batches = open_batches(stream, progress, epochs, train_cfg["num_workers"], pin_memory=cuda)
    loaders.append(batches)
    preemption = faults.Preemption().__enter__()   # SIGTERM: checkpoint at the next step boundary, then stop
    try:
        for batch in batches:
            if (batch.epoch, batch.step_in_epoch) != (progress.epoch, progress.step_in_epoch):
                raise PipelineError(f"{run}: the loader yielded epoch {batch.epoch + 1} step {batch.step_in_epoch}, "
                                    f"the trainer is at epoch {progress.epoch + 1} step {progress.step_in_epoch}")
            set_lr(opt, lr_at(progress.step, total_steps, warmup, peak, train_cfg["min_lr_ratio"]))
            if "weight_decay_end" in train_cfg:
                set_weight_decay(opt, cosine_ramp(train_cfg["weight_decay"], train_cfg["weight_decay_end"], progress.step / total_steps))
            method.set_progress(progress.step / total_steps, progress.epoch + progress.step_in_epoch / steps_per_epoch)
            out = train_step(model, method, opt, scaler, batch.to(device, channels_last=cuda and train_cfg["channels_last"]),
                             amp_dtype, train_cfg["grad_clip"], (progress.step + 1) / total_steps,
                             grad_clip_mode=train_cfg.get("grad_clip_mode", "global"))
            guard.record(out, progress)
            for k, v in out.items():  # float64 sums on the device: exact, and no host sync
                progress.sums[k] = progress.sums.get(k, 0.0) + v.detach().double()
            clock()
            progress.step, progress.step_in_epoch = progress.step + 1, progress.step_in_epoch + 1
            progress.epoch_views += views_per_step
            bar.update(1)

            if progress.step % sync_every == 0:
                guard.check()
                clock()
                bar.set_postfix(loss=f"{float(out['loss'].detach()):.4f}", lr=f"{opt.param_groups[0]['lr']:.3g}",
                                views_s=f"{progress.epoch_views / max(progress.epoch_time_s, 1e-9):.0f}")
                live.log(progress.step, "train", {"loss": float(out["loss"].detach()), "lr": opt.param_groups[0]["lr"]})
            epoch_done = progress.step_in_epoch == steps_per_epoch
            if epoch_done:
                guard.check()
                clock()
                row = _epoch_row(progress, opt)
                last = progress.epoch + 1 == epochs
                if monitor is not None and ((progress.epoch + 1) % monitor_every == 0 or last):
                    row["knn_top1"] = monitor_knn(progress.epoch + 1)
                _next_epoch(progress, row)
                live.log(progress.step, "epoch", row)
                bar.set_description(f"{run} epoch {min(progress.epoch + 1, epochs)}/{epochs}")
                if dist.is_main():
                    _write_curve(progress.history, paths.curve)
            stop = max_steps is not None and progress.step >= max_steps
            preempted = preemption.agreed(may_sync=epoch_done or progress.step % sync_every == 0)
            if epoch_done or stop or preempted or progress.step % train_cfg["checkpoint_every"] == 0:
                save()
            if preempted:
                checkpoints.wait()
                raise faults.Preempted(f"{run}: stopped by SIGTERM; checkpoint written at step {progress.step} "
                                       f"({paths.checkpoint}); exit status {faults.REQUEUE_EXIT}: requeue or rerun "
                                       f"the stage to resume")
            if stop:
                return {"stopped_at_step": progress.step}
            t_last = time.perf_counter()  # monitor, curve and checkpoint are not training time
        guard.check()
    finally:
        preemption.__exit__()
        bar.close()
        checkpoints.wait()  # the last checkpoint is on disk before the run returns (or raises)

    summary.update(timed_on=progress.timed_on, steps=progress.step, wall_time_s=progress.elapsed_s, views_per_s=progress.views / max(progress.elapsed_s, 1e-9),
                   final_loss=progress.history[-1]["loss"] if progress.history else None,
                   steps_per_epoch=steps_per_epoch, batch_size=train_cfg["batch_size"], train_images=stream.n_samples)
    if paths.pairs is not None:
        summary["train_pairs"] = stream.n_pairs
    if monitor is not None:  # kNN-200 top-1 before training and after each epoch (None where not monitored)
        summary["knn_monitor"] = [progress.knn_init] + [row.get("knn_top1") for row in progress.history]
        summary["knn_monitor_images"] = [monitor.train_images, monitor.test_images]
    return _finish(method, backbone_cfg, image_size, paths, summary, device, trained=True, preprocess=_preprocess(p))


def _preprocess(p: dict) -> dict:
    """What the encoder's config records about its input (dataset.mean / std: params of the pretrain stage)."""
    return {"mean": p["dataset"]["mean"], "std": p["dataset"]["std"]}


def _finish(method, backbone_cfg, image_size, paths: RunPaths, summary: dict, device, trained: bool,
            preprocess: dict | None = None) -> dict:
    """Write the encoder (weights and settings only: byte-identical for a bit-identical run) and the metrics."""
    summary.setdefault("steps", 0)
    summary.setdefault("wall_time_s", 0.0)
    summary.setdefault("views_per_s", 0.0)
    summary.setdefault("final_loss", None)
    summary["peak_mem_mib"] = peak_memory_mib(device)
    if dist.is_main():
        from pipeline.models.encoder_io import save_encoder

        save_encoder(paths.encoder, method.encoder_to_export(), backbone_cfg, image_size,
                     meta={k: summary[k] for k in ("run", "method", "seed", "backbone", "epochs", "steps", "pairs") if k in summary},
                     heads=method.heads_to_export(), preprocess=preprocess)
        if not trained:
            atomic_write_text("epoch,step,loss\n", paths.curve)  # untrained: an empty curve
        atomic_write_json(summary, paths.metrics)
    dist.barrier()
    return summary

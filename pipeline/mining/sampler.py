"""The mine stage's work: SePP-ID's semantic sampler end to end (§3.1, Fig. 4, Algorithm 1).

K training images (a seeded random choice, K = k_frac of the training pool) are encoded un-augmented by
the encoder of another pretrain stage (backbone, or backbone + projector: the paper keeps the projection
head), L2-normalised, and every ordered pair with cosine in [min_sim, max_sim] becomes a semantic positive
pair (blockwise, `mining.pairs.mine_pairs`). The control of the paper's Table 9 gets as many pairs. Both
sets are written as parquet (dataset indices) and as pair shards that training streams, into a temporary
directory renamed into place at the end, so an interrupted stage leaves nothing that looks complete.

    out = data/pairs/<dataset>/
        pairs.parquet   random.parquet            anchor, positive (dataset indices), similarity
        semantic/shard-*.tar  random/shard-*.tar  one sample per pair: anchor image, positive image, pair.json
        meta.json
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from torch import nn

from pipeline import paths
from pipeline.data.eval_view import DEFAULT_CROP_RATIO
from pipeline.data.shards import index_of_key, read_manifest, write_pair_shards
from pipeline.eval.features import extract_features
from pipeline.mining.io import write_pairs
from pipeline.mining.pairs import mine_pairs, pair_metrics, random_pairs
from pipeline.models.encoder_io import load_encoder, load_head
from pipeline.errors import DataError, ParamError
from pipeline import dist
from pipeline.device import claim_device

HIST_BINS = 20
PARQUET = {"semantic": "pairs.parquet", "random": "random.parquet"}


def pool_size(n_train: int, train_subset: int) -> int:
    """The training pool the pairs come from: the images training reads (train.train_subset when set)."""
    return min(n_train, train_subset) if train_subset else n_train


def choose_images(n_pool: int, k_frac: float, seed: int) -> np.ndarray:
    """Positions (in train-shard order, sorted) of the K = round(k_frac * pool) images to mine (§3.1: "K images
    are randomly chosen from the training dataset")."""
    K = int(round(k_frac * n_pool))
    if K < 2:
        raise ParamError(f"mine.k_frac: {k_frac} of {n_pool} training images is {K} image(s); mining needs at least 2")
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=K, replace=False))


def mining_encoder(path: Path, layer: str) -> tuple[nn.Module, dict]:
    """The frozen encoder of another run: its backbone, followed by its exported projector for layer=projector."""
    backbone, state = load_encoder(path)
    if layer == "backbone":
        return backbone, state
    if "projector" not in state.get("heads", {}):
        have = ", ".join(state.get("heads", {})) or "none"
        raise ParamError(f"mine.layer: 'projector', but {path} exports no projector (its heads: {have}); "
                         "use layer: backbone or another mine.encoder_run")
    return nn.Sequential(backbone, load_head(state, "projector", path)).eval(), state


def control_pairs(n: int, kind: str, K_idx: np.ndarray, pool_idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """As many control pairs as semantic ones, as dataset indices (SePP-ID Table 9).

    same_image (the paper): n random training images, each paired with itself (two augmented copies), so only
        the dataset grows; drawn from the whole pool, repeating the pool when n exceeds it.
    other_image: n random ordered pairs of two different mined images (random, non-semantic positives)."""
    if kind == "other_image":
        a, p = random_pairs(n, len(K_idx), seed)
        return K_idx[a], K_idx[p]
    full, rest = divmod(n, len(pool_idx))
    a, _ = random_pairs(rest, len(pool_idx), seed, same_image=True)
    a = np.sort(np.concatenate([np.tile(np.arange(len(pool_idx)), full), a]))
    return pool_idx[a], pool_idx[a]


def embed_chosen(p: dict, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, "object"]:
    """Algorithm 1, lines 3-8: the K chosen images encoded un-augmented (float32 throughout).
    Returns (embeddings (K, D), labels (K,), dataset indices (K,), the training pool's manifest rows)."""
    m, ds = p["mine"], p["dataset"]
    shard_dir = root / paths.shards(ds["name"])
    manifest = read_manifest(shard_dir, "train")
    pool = manifest.iloc[:pool_size(len(manifest), p["train"]["train_subset"])]
    positions = choose_images(len(pool), m["k_frac"], m["seed"])
    enc_path = root / paths.encoder(m["encoder_run"])
    encoder, state = mining_encoder(enc_path, m["layer"])
    if state["image_size"] != ds["image_size"]:
        raise DataError(f"{enc_path}: trained at image_size {state['image_size']}, params say dataset.image_size "
                        f"{ds['image_size']}; rerun its pretrain stage (dvc repro)")
    ev = p["evaluate"]  # the eval view and its loader workers, as the features stage uses them
    feats, labels, keys = extract_features(encoder, shard_dir, "train", ds["image_size"], ds["mean"], ds["std"],
                                           m["batch_size"], claim_device(), limit=len(pool), positions=positions, bf16=False,
                                           num_workers=ev.get("num_workers", 0),
                                           crop_ratio=ev.get("crop_ratio", DEFAULT_CROP_RATIO),
                                           distributed=dist.is_dist())   # under the launcher: every rank encodes a share
    if len(keys) != len(positions):
        raise DataError(f"{shard_dir}/train: {len(keys)} of the {len(positions)} chosen images read; rerun: dvc repro -f shard")
    return feats, labels, np.asarray([index_of_key(k) for k in keys], np.int64), pool


def random_control(m: dict, n: int, feats: np.ndarray, K_idx: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The control pair set (dataset indices), its similarities and its metrics (pair accuracy from the pool's labels)."""
    pool_idx = pool["index"].to_numpy(np.int64)
    label_of = dict(zip(pool_idx.tolist(), pool["label"].tolist()))
    ra, rp = control_pairs(n, m["random_control"], K_idx, pool_idx, m["seed"])
    if m["random_control"] == "other_image":
        unit = feats / np.maximum(np.linalg.norm(feats.astype(np.float64), axis=1, keepdims=True), 1e-12)
        row = {int(i): k for k, i in enumerate(K_idx)}
        rsim = np.einsum("ij,ij->i", unit[[row[int(i)] for i in ra]], unit[[row[int(i)] for i in rp]]).astype(np.float32)
    else:
        rsim = np.ones(len(ra), np.float32)  # an image with itself
    metrics = pair_metrics(ra, rp, None, K=len(pool))
    same = [label_of[int(i)] == label_of[int(j)] for i, j in zip(ra, rp)]
    metrics.update(kind=m["random_control"], pair_accuracy=float(np.mean(same)) if same else None)
    return ra, rp, rsim, metrics


def mine(p: dict, root: str | Path = ".") -> dict | None:
    """Run the mine stage for params `p` under `root`; returns the metrics (the stage script writes them).
    Under torchrun every rank encodes a share of the K images; rank 0 mines and writes (the others return None)."""
    root = Path(root)
    m, ds = p["mine"], p["dataset"]
    shard_dir = root / paths.shards(ds["name"])
    t0 = time.perf_counter()
    feats, labels, K_idx, pool = embed_chosen(p, root)
    t_encode = time.perf_counter() - t0
    if not dist.is_main():
        return None   # under the launcher the ranks shared the encoding; rank 0 mines and writes alone

    t0 = time.perf_counter()  # Algorithm 1, lines 10-21, blockwise
    a, q, sim = mine_pairs(feats, m["min_sim"], m["max_sim"], block=m["block"], max_per_anchor=m["max_per_anchor"],
                           progress=True, device=claim_device())
    t_mine = time.perf_counter() - t0
    edges = np.linspace(m["min_sim"], m["max_sim"], HIST_BINS + 1) if m["max_sim"] > m["min_sim"] else 1
    semantic = pair_metrics(a, q, labels, K=len(K_idx), sims=sim, bins=edges)
    ra, rp, rsim, control = random_control(m, len(a), feats, K_idx, pool)

    out = root / paths.pairs(ds["name"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"encoder_run": m["encoder_run"], "layer": m["layer"], "K": int(len(K_idx)), "pool": int(len(pool)),
            "min_sim": m["min_sim"], "max_sim": m["max_sim"], "max_per_anchor": m["max_per_anchor"], "seed": m["seed"],
            "index": "dataset index (the number in the train shards' sample keys)"}
    write_pairs(tmp / PARQUET["semantic"], K_idx[a], K_idx[q], sim, meta={**meta, "set": "semantic"})
    write_pairs(tmp / PARQUET["random"], ra, rp, rsim, meta={**meta, "set": "random", "kind": m["random_control"]})
    t0 = time.perf_counter()  # Algorithm 1, lines 22-23: the pairs become training samples (augmented by the loader)
    label_of = dict(zip(pool["index"].tolist(), pool["label"].tolist()))
    sps = p["shard"]["samples_per_shard"]
    shards = {"semantic": write_pair_shards(shard_dir, tmp / "semantic", K_idx[a], K_idx[q], label_of, sps, m["seed"],
                                            desc="semantic pair shards"),
              "random": write_pair_shards(shard_dir, tmp / "random", ra, rp, label_of, sps, m["seed"] + 1,
                                          desc="random pair shards")}
    t_shards = time.perf_counter() - t0
    (tmp / "meta.json").write_text(json.dumps({**meta, "sets": shards}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {**{k: v for k, v in meta.items() if k != "index"}, "dataset": ds["name"], "feat_dim": int(feats.shape[1]),
            "semantic": semantic, "random": control, "seconds": {"encode": t_encode, "mine": t_mine, "shards": t_shards}}

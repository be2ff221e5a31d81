"""The kNN monitor's current code against its committed results: proof for `dvc commit` of the monitored runs.

    python scripts/monitor_identity.py      # exit 0: every monitored instance identical

For every instance with train.knn_monitor, the monitor run now on its committed final encoder must give the
committed last monitor point (reports/metrics/pretrain/<run>.json) exactly; for two encoders, the streamed
path (`extract_features`, batch 512, shards read again) and the monitor's decoded-once path must give the
same bank features to the bit and the same kNN-200, and one pass of each is timed (meaningful on an idle
machine only).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import params as P, paths
from pipeline.data.shards import read_manifest
from pipeline.eval.features import extract_features
from pipeline.eval.knn import knn_accuracy
from pipeline.models.encoder_io import load_encoder
from pipeline.train.monitor import K, TEMPERATURE, KnnMonitor, spread

p = P.load()
ds = p["dataset"]
sd = paths.shards(ds["name"])
mons, images = {}, {}
ok = True
for name in P.instances(p):
    s = json.loads(Path(f"reports/metrics/pretrain/{name}.json").read_text())
    if not s.get("knn_monitor"):
        continue
    n_tr, n_te = s["knn_monitor_images"]
    m = mons.setdefault((n_tr, n_te), KnnMonitor(sd, n_tr, n_te, ds["image_size"], ds["mean"], ds["std"], "cpu"))
    images[name] = (n_tr, n_te)
    enc, _ = load_encoder(paths.encoder(name))
    t = time.perf_counter(); got = m(enc); dt = time.perf_counter() - t
    want = s["knn_monitor"][-1]
    ok &= got == want
    print(f"{name:18s} committed {want!r:8} new {got!r:8} {'identical' if got == want else 'DIFFERENT'}  ({dt:.1f} s)", flush=True)
# the old path (streamed, batch 512, decoded every time), timed beside the new on one ViT and one ResNet encoder
for name in ["dino-vit", "gsssl"]:
    enc, _ = load_encoder(paths.encoder(name))
    n_tr, n_te = images[name]
    m = mons[(n_tr, n_te)]
    t = time.perf_counter(); new = m(enc); t_new = time.perf_counter() - t
    t = time.perf_counter()
    b, bl, _ = extract_features(enc, sd, "train", ds["image_size"], ds["mean"], ds["std"], 512, "cpu", limit=n_tr)
    q, ql, _ = extract_features(enc, sd, "test", ds["image_size"], ds["mean"], ds["std"], 512, "cpu",
                                positions=spread(len(read_manifest(sd, "test")), n_te))
    old = knn_accuracy(b, bl, q, ql, [K], TEMPERATURE)[K]; t_old = time.perf_counter() - t
    same_bank = np.array_equal(b, m._views["train"].encode(enc, "cpu"))
    print(f"bank features of {name}: streamed == decoded once: {same_bank}")
    ok &= same_bank
    print(f"one monitor pass, {name}: old {t_old:.1f} s, new {t_new:.1f} s (x{t_old / t_new:.2f}); {old} == {new}: {old == new}")
    ok &= old == new
print("ALL IDENTICAL" if ok else "MISMATCH")
sys.exit(0 if ok else 1)

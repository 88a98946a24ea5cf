"""Accuracy and speed of the built-in nucleus segmenter on the real annotated tiles (../shared/data/nuclei).

    .venv/bin/python benchmarks/cells.py [--data ../shared/data]

Prints per tile: true/predicted counts, precision, recall, F1 at IoU ≥ 0.5 (one-to-one), AJI (Kumar 2017),
median matched area ratio; then ms per 256² patch. One SegmentConfig for every tile; only µm/px differs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hwsi.cells import FEATURE_NAMES, SegmentConfig, segment_nuclei
from hwsi.cells.morphology import raw_features
from hwsi.cells.metrics import match_instances, score_segmentation

TILES = [("image01", 0.5), ("image08", 0.25)]  # ≈20x and ≈40x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = ap.parse_args()
    cfg = SegmentConfig()
    print(f"{'tile':8s} {'mpp':>5s} {'n_true':>6s} {'n_pred':>6s} {'P':>6s} {'R':>6s} {'F1':>6s} {'AJI':>6s} "
          f"{'area':>5s} {'ms':>6s}")
    for name, mpp in TILES:
        img = np.asarray(Image.open(args.data / "nuclei" / f"{name}.png").convert("RGB"))
        true = np.asarray(Image.open(args.data / "nuclei" / f"{name}_instance_mask.png")).astype(np.int32)
        segment_nuclei(img, mpp, cfg)
        t = time.perf_counter()
        nuc = segment_nuclei(img, mpp, cfg)
        ms = (time.perf_counter() - t) * 1000
        s = score_segmentation(true, nuc.labels)
        m = match_instances(true, nuc.labels)
        ratio = np.median(np.bincount(nuc.labels.ravel())[m.pairs[:, 1]] / np.bincount(true.ravel())[m.pairs[:, 0]])
        print(f"{name:8s} {mpp:5.2f} {s.n_true:6d} {s.n_pred:6d} {s.precision:6.3f} {s.recall:6.3f} {s.f1:6.3f} "
              f"{s.aji:6.3f} {ratio:5.2f} {ms:6.0f}")
    raws = []
    for name, mpp in TILES:
        img = np.asarray(Image.open(args.data / "nuclei" / f"{name}.png").convert("RGB"))
        raws.append(raw_features(segment_nuclei(img, mpp, cfg).table))
    raw = np.concatenate(raws)
    print(f"feature reference over {len(raw)} nuclei (FEATURE_CENTER / FEATURE_SCALE in hwsi.cells.morphology):")
    for i, fname in enumerate(FEATURE_NAMES[:-4]):
        print(f"  {fname:20s} mean {raw[:, i].mean():8.3g}  std {raw[:, i].std():8.3g}")
    for name, mpp in TILES:
        img = np.asarray(Image.open(args.data / "nuclei" / f"{name}.png").convert("RGB"))
        patches = [img[y:y + 256, x:x + 256] for y in range(0, img.shape[0] - 255, 128)
                   for x in range(0, img.shape[1] - 255, 128)]
        segment_nuclei(patches[0], mpp, cfg)
        t, c = time.perf_counter(), time.process_time()
        n = sum(len(segment_nuclei(p, mpp, cfg)) for p in patches)
        dt = (time.perf_counter() - t) / len(patches) * 1000
        dc = (time.process_time() - c) / len(patches) * 1000
        print(f"{name}: {dt:.1f} ms wall, {dc:.1f} ms CPU per 256² patch over {len(patches)} patches "
              f"({n / len(patches):.0f} nuclei each)")


if __name__ == "__main__":
    main()

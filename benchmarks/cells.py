"""Accuracy of the built-in nucleus segmenter on tiles it was tuned on and on tiles nobody tuned on; speed.

    .venv/bin/python benchmarks/cells.py [--data ../shared/data] [--extra DIR] [--per-tile] [--select] [--synth]

Rows, all from one run: the pipeline default ``SegmentConfig()`` (tuned on ../shared/data/nuclei), the
leave-one-out choice ``held_out_config()`` and the ``plain_watershed`` baseline. Columns per tile set: mean
centroid-hit F1, IoU ≥ 0.5 F1, AJI, predicted / true count, the worst tile's centroid and IoU F1, and how many tiles
meet the bar of docs/cells.md (centroid F1 ≥ 0.8, IoU-F1 ≥ 0.65, count ratio 0.85–1.15).

``--extra DIR`` adds annotated tiles that are never committed (DIR/SOURCES.md says where each came from):
DIR/cpm15/imageNN.png (+ _instance_mask.png; MICCAI CPM-15, 01–07 at 0.5 µm/px, 08–15 at 0.25; image01 and
image08 are the shared tiles) and DIR/gbm40/gbmNN.png (GBM40, 0.25 µm/px). ``--select`` reruns the parameter
choice: a grid around ``HELD_OUT_PARAMS`` scored on the selection tiles (all CPM-15, every 8th GBM40 tile),
leave-one-tile-out and leave-one-dataset-out (~20 min on 2 busy cores). GBM40 tiles outside the selection
were used for no choice at all. ``--synth`` counts nuclei on SynthPath windows under both parameter sets (what
switching the pipeline default would change there).
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from hwsi.cells import FEATURE_NAMES, SegmentConfig, segment_nuclei
from hwsi.cells.morphology import raw_features
from hwsi.cells.segmentation_metrics import SegmentationScores, score_segmentation
from hwsi.cells.segment import HELD_OUT_PARAMS, held_out_config, plain_watershed, segment_labels

TUNED_ON = [("image01", 0.5), ("image08", 0.25)]  # ≈20x and ≈40x, ../shared/data/nuclei
GRID = {"smooth_um": [0.5, 0.75], "otsu_weight": [0.8, 0.9, 1.0], "h_um": [0.2, 0.3, 0.5]}
Segmenter = Callable[[np.ndarray, float], np.ndarray]


@dataclass
class Tile:
    dataset: str  # "cpm15" or "gbm40"
    shared: bool  # one of the ../shared/data/nuclei tiles (the ones SegmentConfig() was tuned on)
    name: str
    mpp: float
    image: np.ndarray
    truth: np.ndarray
    in_selection: bool  # used to choose held_out_config's parameters


def _load(dataset: str, shared: bool, folder: Path, name: str, mpp: float, in_selection: bool) -> Tile:
    img = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"))
    truth = np.asarray(Image.open(folder / f"{name}_instance_mask.png")).astype(np.int32)
    return Tile(dataset, shared, name, mpp, img, truth, in_selection)


def load_tiles(data: Path, extra: Path | None) -> list[Tile]:
    tiles = [_load("cpm15", True, data / "nuclei", n, mpp, True) for n, mpp in TUNED_ON]
    if extra is None:
        return tiles
    for i in range(1, 16):
        name = f"image{i:02d}"
        if name not in dict(TUNED_ON) and (extra / "cpm15" / f"{name}.png").exists():
            tiles.append(_load("cpm15", False, extra / "cpm15", name, 0.5 if i <= 7 else 0.25, True))
    for i in range(1, 41):
        if (extra / "gbm40" / f"gbm{i:02d}.png").exists():
            tiles.append(_load("gbm40", False, extra / "gbm40", f"gbm{i:02d}", 0.25, i % 8 == 1))
    return tiles


def meets_bar(s: SegmentationScores) -> bool:
    return s.centroid_f1 >= 0.8 and s.f1 >= 0.65 and 0.85 <= s.count_ratio <= 1.15


def score_all(seg: Segmenter, tiles: list[Tile]) -> list[SegmentationScores]:
    return [score_segmentation(t.truth, seg(t.image, t.mpp)) for t in tiles]


def summary_line(label: str, scores: list[SegmentationScores]) -> str:
    c = np.array([s.centroid_f1 for s in scores])
    f = np.array([s.f1 for s in scores])
    a = np.array([s.aji for s in scores])
    r = np.array([s.count_ratio for s in scores])
    ok = sum(meets_bar(s) for s in scores)
    return (f"{label:44s} {len(scores):3d} {c.mean():6.3f} {f.mean():6.3f} {a.mean():6.3f} {r.mean():5.2f} "
            f"{c.min():6.3f} {f.min():6.3f} {ok:3d}/{len(scores)}")


HEADER = (f"{'method / tile set':44s} {'n':>3s} {'cF1':>6s} {'IoU-F1':>6s} {'AJI':>6s} {'ratio':>5s} "
          f"{'min cF1':>7s}{'min IoU':>7s} {'bar':>5s}")


def tile_sets(tiles: list[Tile]) -> list[tuple[str, list[int]]]:
    sets = [("tuned-on: shared image01 + image08", [i for i, t in enumerate(tiles) if t.shared])]
    for ds, what in (("cpm15", "CPM-15, other 13"), ("gbm40", "GBM40")):
        for sel, tag in ((True, "in selection"), (False, "never used")):
            idx = [i for i, t in enumerate(tiles) if t.dataset == ds and not t.shared and t.in_selection == sel]
            if idx:
                sets.append((f"{what} ({tag})", idx))
    return sets


def accuracy_table(tiles: list[Tile], per_tile: bool) -> None:
    methods: list[tuple[str, Segmenter]] = [
        ("default SegmentConfig()", lambda im, mpp: segment_labels(im, mpp, SegmentConfig())[0]),
        ("held_out_config()", lambda im, mpp: segment_labels(im, mpp, held_out_config())[0]),
        ("plain watershed (baseline)", plain_watershed),
    ]
    results = {name: score_all(seg, tiles) for name, seg in methods}
    if per_tile:
        for name, scores in results.items():
            for t, s in zip(tiles, scores):
                print(f"  {name:28s} {t.dataset:6s} {t.name:8s} {t.mpp:4.2f} n_true {s.n_true:4d} ratio "
                      f"{s.count_ratio:5.2f} cF1 {s.centroid_f1:.3f} IoU-F1 {s.f1:.3f} AJI {s.aji:.3f}")
    print(HEADER)
    for set_name, idx in tile_sets(tiles):
        print(f"-- {set_name}")
        for name, scores in results.items():
            print(summary_line(f"   {name}", [scores[i] for i in idx]))


def select(tiles: list[Tile], per_tile: bool) -> None:
    """Leave-one-tile-out and leave-one-dataset-out choice over GRID; prints the held-out figures."""
    sel = [t for t in tiles if t.in_selection]
    configs = [dict(HELD_OUT_PARAMS, **dict(zip(GRID, v))) for v in itertools.product(*GRID.values())]
    t0 = time.perf_counter()
    grid_scores = [score_all(lambda im, mpp, p=p: segment_labels(im, mpp, SegmentConfig(**p))[0], sel)
                   for p in configs]
    print(f"grid: {len(configs)} configs x {len(sel)} selection tiles in {time.perf_counter() - t0:.0f} s")
    obj = np.array([[s.centroid_f1 + s.f1 - abs(np.log(s.count_ratio)) for s in row] for row in grid_scores])

    def best(mask: np.ndarray) -> int:
        return int(np.argmax(obj[:, mask].mean(axis=1)))

    chosen_all = best(np.ones(len(sel), bool))
    print("chosen on all selection tiles:", {k: configs[chosen_all][k] for k in GRID})
    print(HEADER)
    picks = [best(np.arange(len(sel)) != i) for i in range(len(sel))]
    loto = [grid_scores[pick][i] for i, pick in enumerate(picks)]
    print(summary_line("leave-one-tile-out (selection tiles)", loto))
    print(f"  folds that chose the overall choice: {sum(p == chosen_all for p in picks)}/{len(sel)}")
    if per_tile:
        for t, s, pick in zip(sel, loto, picks):
            other = "" if pick == chosen_all else f"  (fold chose {({k: configs[pick][k] for k in GRID})})"
            print(f"  LOTO {t.dataset:6s} {t.name:8s} ratio {s.count_ratio:5.2f} cF1 {s.centroid_f1:.3f} "
                  f"IoU-F1 {s.f1:.3f} AJI {s.aji:.3f}{other}")
    others = [t for t in tiles if not t.in_selection]
    for held in sorted({t.dataset for t in sel}):
        train = np.array([t.dataset != held for t in sel])
        if not train.any():
            continue
        p = configs[best(train)]
        test = [t for t in sel + others if t.dataset == held]
        s = score_all(lambda im, mpp: segment_labels(im, mpp, SegmentConfig(**p))[0], test)
        print(summary_line(f"leave-one-dataset-out: {held} held out", s), {k: p[k] for k in GRID})


def synth_counts() -> None:
    """Nuclei found vs drawn on 8 SynthPath 256² windows (0.5 µm/px, 2 seeds) under both parameter sets."""
    from hwsi.synth.render import render_window
    from hwsi.synth.scene import Scene, SceneConfig

    totals = {"default": [0, 0, 0], "held_out": [0, 0, 0]}
    for seed in (0, 1):
        scene = Scene(SceneConfig(width=2048, height=2048, region_size=1024, patch_size=256, seed=seed))
        nuclei = scene.nuclei()
        for x0, y0 in ((512, 512), (1024, 768), (256, 1280), (1280, 1280)):
            img = render_window(scene, x0, y0, 256, 256)
            inside = (nuclei["x"] >= x0) & (nuclei["x"] < x0 + 256) & (nuclei["y"] >= y0) & (nuclei["y"] < y0 + 256)
            tx, ty = nuclei["x"][inside] - x0, nuclei["y"][inside] - y0
            for name, cfg in (("default", SegmentConfig()), ("held_out", held_out_config())):
                labels = segment_labels(img, 0.5, cfg)[0]
                hit = np.unique(labels[ty, tx])
                t = totals[name]
                t[0] += len(tx)
                t[1] += len(np.unique(labels)) - 1
                t[2] += int((hit > 0).sum())
    for name, (n_true, n_pred, n_hit) in totals.items():
        print(f"SynthPath {name:8s}: drawn {n_true}, found {n_pred} (ratio {n_pred / n_true:.2f}), "
              f"{n_hit} found nuclei contain a drawn centre")


def features_and_speed(data: Path) -> None:
    cfg = SegmentConfig()
    raws = []
    for name, mpp in TUNED_ON:
        img = np.asarray(Image.open(data / "nuclei" / f"{name}.png").convert("RGB"))
        raws.append(raw_features(segment_nuclei(img, mpp, cfg).table))
    raw = np.concatenate(raws)
    print(f"feature reference over {len(raw)} nuclei (FEATURE_CENTER / FEATURE_SCALE in hwsi.cells.morphology):")
    for i, fname in enumerate(FEATURE_NAMES[:-4]):
        print(f"  {fname:20s} mean {raw[:, i].mean():8.3g}  std {raw[:, i].std():8.3g}")
    for label, c in (("default", cfg), ("held_out", held_out_config())):
        for name, mpp in TUNED_ON:
            img = np.asarray(Image.open(data / "nuclei" / f"{name}.png").convert("RGB"))
            patches = [img[y:y + 256, x:x + 256] for y in range(0, img.shape[0] - 255, 128)
                       for x in range(0, img.shape[1] - 255, 128)]
            segment_nuclei(patches[0], mpp, c)
            t, cpu = time.perf_counter(), time.process_time()
            n = sum(len(segment_nuclei(p, mpp, c)) for p in patches)
            dt = (time.perf_counter() - t) / len(patches) * 1000
            dc = (time.process_time() - cpu) / len(patches) * 1000
            print(f"{label:8s} {name}: {dt:.1f} ms wall, {dc:.1f} ms CPU per 256² patch over {len(patches)} "
                  f"patches ({n / len(patches):.0f} nuclei each)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--extra", type=Path, default=None, help="folder with cpm15/ and gbm40/ annotated tiles")
    ap.add_argument("--per-tile", action="store_true", help="print every tile's scores")
    ap.add_argument("--select", action="store_true", help="rerun the leave-one-out parameter choice")
    ap.add_argument("--synth", action="store_true", help="nucleus counts on SynthPath windows, both parameter sets")
    args = ap.parse_args()
    tiles = load_tiles(args.data, args.extra)
    accuracy_table(tiles, args.per_tile)
    if args.select:
        select(tiles, args.per_tile)
    if args.synth:
        synth_counts()
    features_and_speed(args.data)


if __name__ == "__main__":
    main()

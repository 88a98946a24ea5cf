"""QuPath-compatible GeoJSON of nuclei and evidence (level-0 pixel coordinates, y down, as QuPath expects).

A ``FeatureCollection`` whose features carry ``properties.objectType`` ("detection" for nuclei, "annotation" for
evidence regions/patches), ``properties.classification = {"name": ..., "color": [r, g, b]}`` (QuPath's key is the
American spelling) and ``properties.measurements``; QuPath imports it via File › Import objects, or by dragging
the file onto the viewer (docs/formats-cells.md "Export to QuPath" has the field table; tests/test_export_qupath.py
checks it against a real QuPath export).

* Nuclei: "detection" objects whose Polygon is the nucleus outline the store keeps (``cells/contour_n`` /
  ``contour_xy``: CellViT's contour, QuPath's nucleusGeometry, the built-in segmenter's traced outline); only in a
  store written without outlines (before they were kept), a 16-gon of the nucleus's equivalent radius. Types with a
  QuPath default class are exported under it, in its colour (:data:`QUPATH_CLASSES`); the others keep hwsi's name
  and colour. Measurements use QuPath's ``"Nucleus: <name> <unit>"`` keys (:data:`NUCLEUS_MEASUREMENTS`).
* Regions (``regions=True``): "annotation" objects of QuPath's ``Region*`` class with the region's tissue and SPF
  numbers; tissue patches (``patches=True``): "tile" objects with their Eq. 2 relevance (``SPF relevance``).
* SPF-selected patches and answer evidence: "annotation" objects ("SPF patch", "Evidence region/patch").
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from hwsi.serve.assistant import Evidence
from hwsi.serve.overlays import StoreOverlays, type_colour
from hwsi.store import SlideStore

# QuPath's default classes (qupath.lib.objects.classes.PathClass.StandardPathClasses: name, RGB) for the hwsi
# nucleus types that mean the same thing; the reader (hwsi.cells.nucleus_types) maps these names back to the types
QUPATH_CLASSES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "neoplastic": ("Tumor", (200, 0, 0)),
    "connective": ("Stroma", (150, 200, 150)),
    "inflammatory": ("Immune cells", (160, 90, 160)),
    "dead": ("Necrosis", (50, 50, 50)),
    "unknown": ("Other", (255, 200, 0)),
}
QUPATH_REGION = ("Region*", (0, 0, 180))
# store column -> QuPath measurement key (QuPath writes "Nucleus: Area µm^2" etc. for calibrated images)
NUCLEUS_MEASUREMENTS: dict[str, str] = {
    "area_um2": "Nucleus: Area µm^2",
    "perimeter_um": "Nucleus: Perimeter µm",
    "eccentricity": "Nucleus: Eccentricity",
    "solidity": "Nucleus: Solidity",
    "major_axis_um": "Nucleus: Major axis µm",
    "minor_axis_um": "Nucleus: Minor axis µm",
    "type_prob": "Classification probability",
}

EVIDENCE_COLOURS = {
    "region": (255, 140, 0),
    "patch": (255, 215, 0),
    "spf": (0, 160, 255),
}


def _ring(cx: float, cy: float, r: float, n: int = 16) -> list[list[float]]:
    pts = [
        [round(cx + r * math.cos(2 * math.pi * i / n), 2), round(cy + r * math.sin(2 * math.pi * i / n), 2)]
        for i in range(n)
    ]
    return pts + [pts[0]]


def _rect(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]


def feature(
    ring: list[list[float]],
    object_type: str,
    class_name: str,
    colour: Sequence[int],
    measurements: dict[str, float] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """One QuPath feature: a polygon with objectType, classification and measurements."""
    props: dict[str, Any] = {
        "objectType": object_type,
        "classification": {"name": class_name, "color": [int(c) for c in colour]},
    }
    if name:
        props["name"] = name
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
    }


def qupath_class(type_name: str, index: int) -> tuple[str, tuple[int, int, int]]:
    """(class name, RGB) a nucleus type is exported under: QuPath's default class where one means the same."""
    return QUPATH_CLASSES.get(type_name, (type_name, type_colour(type_name, index)))


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = np.round(np.asarray(ring, np.float64), 2).tolist()
    return pts + [pts[0]]


def nuclei_features(ov: StoreOverlays) -> list[dict[str, Any]]:
    """Every nucleus of the store as a QuPath detection: its stored outline (a 16-gon of its equivalent radius in
    stores without outlines), classified by type, with its measurements."""
    if ov.offsets is None:
        return []
    cells = ov.all_nuclei()
    with SlideStore(ov.path) as s:
        contours = s.cell_contours()
        meas_cols = {key: s.cell_column(col).astype(np.float64) for col, key in NUCLEUS_MEASUREMENTS.items()
                     if s.has_cell_column(col)}
    order = {k: i for i, k in enumerate(sorted(ov.type_names))}
    feats = []
    for i, (x, y, t, r) in enumerate(zip(cells["x"], cells["y"], cells["type"], cells["radius"])):
        t = int(t)
        name, colour = qupath_class(ov.type_names.get(t, f"type {t}"), order.get(t, t))
        c = contours[i] if contours is not None else None
        ring = _closed(c) if c is not None and len(c) >= 3 else _ring(float(x), float(y), float(r))
        meas = {k: round(float(v[i]), 4) for k, v in meas_cols.items() if np.isfinite(v[i])}
        if c is None or len(c) < 3:
            meas["hwsi: equivalent radius px"] = round(float(r), 2)
        feats.append(feature(ring, "detection", name, colour, meas))
    return feats


def region_features(ov: StoreOverlays) -> list[dict[str, Any]]:
    """Every kept region as a QuPath ``Region*`` annotation with its tissue patches, SPF-selected patches and
    largest Eq. 2 relevance as measurements."""
    feats = []
    size = ov.region_size_level0
    sel = ov.selected
    for r, (x, y) in enumerate(ov.region_coords):
        meas: dict[str, float] = {"hwsi: region": r, "Tissue patches": int(ov.patch_tissue[r].sum())}
        if sel is not None:
            meas["SPF selected patches"] = int((sel[r] >= 0).sum())
        if ov.relevance is not None and np.isfinite(ov.relevance[r]).any():
            meas["SPF relevance max"] = round(float(np.nanmax(ov.relevance[r])), 4)
        feats.append(feature(_rect(float(x), float(y), size, size), "annotation", QUPATH_REGION[0],
                             QUPATH_REGION[1], meas, f"region {r}"))
    return feats


def patch_features(ov: StoreOverlays) -> list[dict[str, Any]]:
    """Every tissue patch as a QuPath "tile" object with its Eq. 2 relevance (``SPF relevance``, absent where the
    patch was no SPF candidate) and whether SPF selected it."""
    feats = []
    p = ov.patch_size_level0
    chosen = np.zeros(ov.patch_tissue.shape, bool)
    if ov.selected is not None:
        rr, kk = np.nonzero(ov.selected >= 0)
        chosen[rr, ov.selected[rr, kk]] = True
    for r, g in zip(*np.nonzero(ov.patch_tissue)):
        x, y = ov.patch_coords[r, g]
        meas: dict[str, float] = {"hwsi: region": int(r), "hwsi: patch": int(g), "SPF selected": int(chosen[r, g])}
        if ov.relevance is not None and np.isfinite(ov.relevance[r, g]):
            meas["SPF relevance"] = round(float(ov.relevance[r, g]), 4)
        feats.append(feature(_rect(float(x), float(y), p, p), "tile", "SPF selected" if chosen[r, g] else "Tissue patch",
                             EVIDENCE_COLOURS["spf"] if chosen[r, g] else (120, 120, 120), meas, f"r{r} p{g}"))
    return feats


def evidence_features(items: Iterable[Evidence], label: str = "") -> list[dict[str, Any]]:
    """Evidence regions and patches as QuPath annotations ("Evidence region" / "Evidence patch")."""
    feats = []
    for e in items:
        cls = f"Evidence {e.kind}"
        name = f"{label + ' ' if label else ''}{e.kind} r{e.region}" + (f" p{e.patch}" if e.patch >= 0 else "")
        feats.append(
            feature(
                _rect(e.x, e.y, e.w, e.h),
                "annotation",
                cls,
                EVIDENCE_COLOURS.get(e.kind, (255, 0, 255)),
                {"score": round(float(e.score), 4)},
                name,
            )
        )
    return feats


def spf_features(ov: StoreOverlays) -> list[dict[str, Any]]:
    """The SPF-selected patches (question-independent evidence) as annotations classified "SPF patch"."""
    feats = []
    p = ov.patch_size_level0
    for s in ov.spf()["patches"]:
        meas = {"relevance": s["relevance"], "SPF relevance": s["relevance"]} if s["relevance"] is not None else None
        feats.append(
            feature(
                _rect(s["x"], s["y"], p, p),
                "annotation",
                "SPF patch",
                EVIDENCE_COLOURS["spf"],
                meas,
                f"SPF r{s['region']} p{s['patch']}",
            )
        )
    return feats


ROI_COLOUR = (255, 200, 0)


def roi_features(turns: Iterable[Any]) -> list[dict[str, Any]]:
    """The region each ROI question was asked about (a chat turn's ``roi`` record, docs/roi.md) as one QuPath
    annotation classified "Question ROI": its polygons (holes kept) minus its exclusions as a MultiPolygon, named
    ``Q<turn>: <question>``, the question, answer and what the answer covered under ``properties.hwsi``. Whole-slide turns and
    turns that ended in an error give none."""
    feats = []
    for n, t in enumerate(turns, start=1):
        rec = getattr(t, "roi", None)
        if not rec or getattr(t, "error", None):
            continue
        geom = rec["geometry"]
        props: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": "Question ROI", "color": list(ROI_COLOUR)},
            "name": f"Q{n}: {t.question.splitlines()[0][:80]}",
            "measurements": {"patch tokens": float(rec.get("patches", 0)),
                             "region tokens": float(len(rec.get("regions", [])))},
            # hwsi's own member (QuPath keeps the keys above and ignores others): the turn in full
            "hwsi": {"question": t.question, "answer": t.answer, "summary": rec.get("summary", ""), "turn": n},
        }
        feats.append({"type": "Feature", "id": str(uuid.uuid4()),
                      "geometry": {"type": "MultiPolygon", "coordinates": geom["coordinates"]}, "properties": props})
        if geom.get("exclude"):  # QuPath's own convention for an area left out: an "Ignore*" annotation
            feats.append({"type": "Feature", "id": str(uuid.uuid4()),
                          "geometry": {"type": "MultiPolygon", "coordinates": geom["exclude"]},
                          "properties": {"objectType": "annotation",
                                         "classification": {"name": "Ignore*", "color": [180, 180, 180]},
                                         "name": f"Q{n}: excluded"}})
    return feats


def collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def export_geojson(
    ov: StoreOverlays,
    evidence: Iterable[Evidence] = (),
    nuclei: bool = True,
    spf: bool = True,
    regions: bool = False,
    patches: bool = False,
    turns: Iterable[Any] = (),
) -> dict[str, Any]:
    """Nuclei + SPF patches + answer evidence + the ROIs questions were asked about (``turns`` of a chat,
    :func:`roi_features`) (+ regions, + every tissue patch as a tile) of one slide as one FeatureCollection."""
    feats: list[dict[str, Any]] = []
    if regions:
        feats += region_features(ov)
    if patches:
        feats += patch_features(ov)
    if nuclei:
        feats += nuclei_features(ov)
    if spf:
        feats += spf_features(ov)
    feats += evidence_features(evidence)
    feats += roi_features(turns)
    return collection(feats)


def heatmap_to_list(heatmap: np.ndarray, decimals: int = 3) -> list[list[float | None]]:
    """(R, G) float array as nested lists with NaN → None (JSON has no NaN)."""
    h = np.round(np.asarray(heatmap, dtype=np.float64), decimals)
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in h]

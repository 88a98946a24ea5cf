"""QuPath-compatible GeoJSON of nuclei and evidence (level-0 pixel coordinates, y down, as QuPath expects).

A ``FeatureCollection`` whose features carry ``properties.objectType`` ("detection" for nuclei, "annotation" for
evidence regions/patches), ``properties.classification = {"name": ..., "color": [r, g, b]}`` (QuPath's key is the
American spelling) and ``properties.measurements``. Nuclei are written as 16-gon polygons of their equivalent
radius around the centroid (the store keeps centroids and areas, not contours); QuPath imports them as detections
via File › Import objects, or by dragging the file onto the viewer.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from hwsi.serve.assistant import Evidence
from hwsi.serve.overlays import StoreOverlays, type_colour

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


def nuclei_features(ov: StoreOverlays) -> list[dict[str, Any]]:
    """Every nucleus of the store as a QuPath detection classified by nucleus type."""
    cells = ov.all_nuclei()
    order = {k: i for i, k in enumerate(sorted(ov.type_names))}
    feats = []
    for x, y, t, r in zip(cells["x"], cells["y"], cells["type"], cells["radius"]):
        t = int(t)
        name = ov.type_names.get(t, f"type {t}")
        feats.append(
            feature(
                _ring(float(x), float(y), float(r)),
                "detection",
                name,
                type_colour(name, order.get(t, t)),
                {"radius_px": round(float(r), 2)},
            )
        )
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
        meas = {"relevance": s["relevance"]} if s["relevance"] is not None else None
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


def collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def export_geojson(
    ov: StoreOverlays,
    evidence: Iterable[Evidence] = (),
    nuclei: bool = True,
    spf: bool = True,
) -> dict[str, Any]:
    """Nuclei + SPF patches + answer evidence of one slide as one FeatureCollection."""
    feats: list[dict[str, Any]] = []
    if nuclei:
        feats += nuclei_features(ov)
    if spf:
        feats += spf_features(ov)
    feats += evidence_features(evidence)
    return collection(feats)


def heatmap_to_list(heatmap: np.ndarray, decimals: int = 3) -> list[list[float | None]]:
    """(R, G) float array as nested lists with NaN → None (JSON has no NaN)."""
    h = np.round(np.asarray(heatmap, dtype=np.float64), decimals)
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in h]

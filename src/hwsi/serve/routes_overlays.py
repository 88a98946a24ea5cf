"""Routes of the overlays drawn on a slide (tissue mask, region/patch grid, SPF selection, nuclei) and the QuPath
GeoJSON export (with a chat's evidence when ``?session=`` names one about the same slide)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from hwsi.serve.assistant import Evidence
from hwsi.serve.dzi import encode
from hwsi.serve.geojson import export_geojson
from hwsi.serve.replies import AsciiJSONResponse, attachment
from hwsi.serve.state import ServerState


def overlays_router(state: ServerState) -> APIRouter:
    """``/api/slides/{id}/overlays/*`` and ``/api/slides/{id}/export.geojson``."""
    router = APIRouter(default_response_class=AsciiJSONResponse)

    @router.get("/api/slides/{slide_id}/overlays/tissue.png")
    def tissue(slide_id: str) -> Response:
        ov = state.overlays(slide_id)
        key = (slide_id, "tissue")
        data = state.cache.get(key)
        if data is None:
            data = encode(ov.tissue_mask_rgba(), "png")
            state.cache.put(key, data)
        _, source = ov.tissue_mask()
        return Response(data, media_type="image/png", headers={"X-Mask-Source": source, "Cache-Control": "no-cache"})

    @router.get("/api/slides/{slide_id}/overlays/grid")
    def grid(slide_id: str) -> dict[str, Any]:
        return state.overlays(slide_id).grid()

    @router.get("/api/slides/{slide_id}/overlays/spf")
    def spf(slide_id: str) -> dict[str, Any]:
        return state.overlays(slide_id).spf()

    @router.get("/api/slides/{slide_id}/overlays/nuclei")
    def nuclei(
        slide_id: str,
        x0: float = Query(...),
        y0: float = Query(...),
        x1: float = Query(...),
        y1: float = Query(...),
        limit: int = Query(5000, ge=1, le=20000),
    ) -> dict[str, Any]:
        ov = state.overlays(slide_id)
        if not all(np.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
            raise HTTPException(422, "box must be finite with x1 > x0 and y1 > y0")
        out = ov.nuclei_in_box(x0, y0, x1, y1, limit=limit)
        out["types"] = ov.types()
        return out

    @router.get("/api/slides/{slide_id}/export.geojson")
    def export(
        slide_id: str, session: str | None = None, nuclei: bool = True, spf: bool = True,
        regions: bool = False, patches: bool = False,
    ) -> Response:
        ov = state.overlays(slide_id)
        evidence: list[Evidence] = []
        turns: list = []
        if session:
            st = state.chat(session)
            if st.slide_id != slide_id:
                raise HTTPException(404, "this chat is about another slide")
            turns = list(st.turns)
            for t in turns:
                evidence += t.evidence
        body = json.dumps(export_geojson(ov, evidence, nuclei=nuclei, spf=spf, regions=regions, patches=patches,
                                         turns=turns))
        return Response(
            body,
            media_type="application/geo+json",
            headers={"Content-Disposition": attachment(f"{slide_id}.geojson")},
        )

    return router

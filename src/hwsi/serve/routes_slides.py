"""Routes of the slides: list, geometry and overlay availability, thumbnail, DZI descriptor and tiles.

Tile levels/columns/rows are validated (404 when out of range, never a path, never a 500); a failed read (a corrupt
tile or thumbnail) is a 502, never a silent white image. Tiles and thumbnails are LRU-cached with an ETag.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from hwsi.serve.dzi import TILE_FORMATS, TileNotFound, encode, etag_for
from hwsi.serve.registry import SlideEntry
from hwsi.serve.replies import AsciiJSONResponse, url_id
from hwsi.serve.state import ServerState

log = logging.getLogger("hwsi.serve")

TILE_MAX_AGE = 3600


def _slide_info(state: ServerState, e: SlideEntry) -> dict[str, Any]:
    return {
        "id": e.slide_id,
        "width": e.width,
        "height": e.height,
        "mpp": e.mpp,
        "stages": list(e.stages),
        "thumbnail": f"/api/slides/{url_id(e.slide_id)}/thumbnail.jpg",
        "dzi": f"/api/slides/{url_id(e.slide_id)}/image.dzi",
    }


def slides_router(state: ServerState) -> APIRouter:
    """``/api/slides``, ``/api/slides/{id}`` and its thumbnail, DZI descriptor and tiles."""
    router = APIRouter(default_response_class=AsciiJSONResponse)

    @router.get("/api/slides")
    def slides() -> dict[str, Any]:
        state.registry.refresh()
        out = [_slide_info(state, state.entry(s)) for s in state.registry.ids()]
        return {"slides": out, "model": getattr(state.assistant, "name", None)}

    @router.get("/api/slides/{slide_id}")
    def slide(slide_id: str) -> dict[str, Any]:
        e = state.entry(slide_id)
        src = state.source(slide_id)
        ov = state.overlays(slide_id)
        g = src.geometry
        info = _slide_info(state, e)
        info.update(
            {
                "dzi_info": {"tile_size": g.tile_size, "overlap": g.overlap, "max_level": g.max_level, "format": "jpeg"},
                "tiles": f"/api/slides/{url_id(e.slide_id)}/image_files/",
                "region_size_level0": ov.region_size_level0,
                "patch_size_level0": ov.patch_size_level0,
                "n_regions": int(ov.region_coords.shape[0]),
                "overlays": {
                    "tissue": True,
                    "grid": True,
                    "spf": ov.selected is not None,
                    "nuclei": ov.has_cells,
                    "heatmap": state.assistant is not None,
                },
                "nucleus_types": ov.types(),
            }
        )
        return info

    @router.get("/api/slides/{slide_id}/thumbnail.jpg")
    def thumbnail(slide_id: str, request: Request) -> Response:
        src = state.source(slide_id)
        key = (slide_id, "thumb")
        etag = etag_for(slide_id, state.entry(slide_id).store.stat().st_mtime_ns, "thumb")
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        data = state.cache.get(key)
        if data is None:
            try:
                pixels = src.thumbnail(256)
            except Exception as exc:  # a corrupt read: reported, never a silent white image
                log.warning("thumbnail read failed %r: %s", slide_id, exc)
                raise HTTPException(502, f"thumbnail read failed: {type(exc).__name__}") from exc
            data = encode(pixels, "jpeg")
            state.cache.put(key, data)
        return Response(data, media_type="image/jpeg", headers=_cache_headers(etag))

    @router.get("/api/slides/{slide_id}/image.dzi")
    def dzi(slide_id: str) -> Response:
        src = state.source(slide_id)
        return Response(src.geometry.xml("jpeg"), media_type="application/xml")

    @router.get("/api/slides/{slide_id}/image_files/{level}/{name}")
    def tile(slide_id: str, level: str, name: str, request: Request) -> Response:
        col, row, fmt = _parse_tile(level, name)
        lvl = int(level)
        src = state.source(slide_id)
        try:
            src.geometry.tile_box(lvl, col, row)
        except TileNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        mtime = state.entry(slide_id).store.stat().st_mtime_ns
        etag = etag_for(slide_id, mtime, lvl, col, row, fmt)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        key = (slide_id, lvl, col, row, fmt)
        data = state.cache.get(key)
        hit = data is not None
        if data is None:
            try:
                pixels = src.tile(lvl, col, row)
            except TileNotFound as exc:
                raise HTTPException(404, str(exc)) from exc
            except Exception as exc:  # a corrupt read is an error to report, never a silent white tile
                log.warning("tile read failed %r %s/%s_%s: %s", slide_id, lvl, col, row, exc)
                raise HTTPException(502, f"tile read failed: {type(exc).__name__}") from exc
            data = encode(pixels, fmt)
            state.cache.put(key, data)
        headers = _cache_headers(etag)
        headers["X-Tile-Cache"] = "hit" if hit else "miss"
        return Response(data, media_type=TILE_FORMATS[fmt], headers=headers)

    return router


def _parse_tile(level: str, name: str) -> tuple[int, int, str]:
    """``level`` and ``"{col}_{row}.{fmt}"`` as ints and a known format, else 404 (never a path, never a 500)."""
    stem, dot, fmt = name.rpartition(".")
    parts = stem.split("_")
    ok = (
        dot == "."
        and fmt in TILE_FORMATS
        and len(parts) == 2
        and all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts)
        and level.isascii()
        and level.isdigit()
        and len(level) <= 3
    )
    if not ok:
        raise HTTPException(404, "no such tile")
    return int(parts[0]), int(parts[1]), fmt


def _cache_headers(etag: str) -> dict[str, str]:
    return {"Cache-Control": f"public, max-age={TILE_MAX_AGE}", "ETag": etag}

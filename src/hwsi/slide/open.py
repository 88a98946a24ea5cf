"""Open a whole-slide image and find its level-0 resolution in µm per pixel.

Backends: OpenSlide first (SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF, ...); tiffslide for TIFFs OpenSlide rejects
(e.g. flat, strip-organised TIFFs).

Level-0 µm/px, first match wins (``Slide.mpp_source`` says which):

1. ``mpp`` passed by the user (``--mpp`` or a CSV ``slide,mpp``): ``"user"``;
2. ``openslide.mpp-x``/``mpp-y`` (OpenSlide's reading of vendor metadata and of TIFF resolution tags): ``"openslide"``;
3. vendor keys OpenSlide did not turn into mpp: ``aperio.MPP``, ``philips.DICOM_PIXEL_SPACING`` (mm),
   ``mirax...MICROMETER_PER_PIXEL_X``, ``hamamatsu``/``leica`` ``mpp`` keys: ``"vendor:<key>"``;
4. TIFF ``XResolution``/``YResolution`` with ``ResolutionUnit`` centimetre or inch: ``"tiff-resolution"``.

A value derived from TIFF resolution tags (2 or 4) is only accepted within [0.05, 50] µm/px: outside it the tags are
a writer's default (72 dpi = 352.8 µm/px, as in OpenSlide's ``boxes.tiff``), not a microscope's resolution, and the
slide is treated as having no µm/px. Objective power ("20x/40x") is never used to guess µm/px.

No µm/px → :class:`~hwsi.errors.SlideError` telling how to pass it. Non-RGB images (not 3 samples, or not
RGB/YCbCr photometric) are rejected here; dark-background (fluorescence/dark-field) slides are rejected by the
tissue step, which looks at the pixels (:mod:`hwsi.slide.tissue`).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwsi.errors import SlideError
from hwsi.slide.levels import read_downsampled

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm", ".qptiff")
MPP_HINT = "pass it with `--mpp X` (µm per pixel at level 0), or a CSV input with columns slide,mpp"
TAG_MPP_RANGE = (0.05, 50.0)


def _float(v: Any) -> float | None:
    try:
        f = float(str(v).split()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def mpp_from_properties(props: dict[str, Any]) -> tuple[float | None, str]:
    """Level-0 µm/px from a slide's property dict (OpenSlide or tiffslide keys); ``(None, reason)`` if absent."""
    for kx, ky, src in (
        ("openslide.mpp-x", "openslide.mpp-y", "openslide"),
        ("tiffslide.mpp-x", "tiffslide.mpp-y", "tiffslide"),
    ):
        x, y = _float(props.get(kx)), _float(props.get(ky))
        if x or y:
            m = (x + y) / 2 if (x and y) else (x or y)
            assert m is not None
            # OpenSlide/tiffslide fill mpp from TIFF resolution tags for generic TIFFs: apply the sanity range there
            from_tags = props.get("openslide.vendor") in ("generic-tiff", None) and "aperio.MPP" not in props
            if from_tags and not TAG_MPP_RANGE[0] <= m <= TAG_MPP_RANGE[1]:
                return None, (
                    f"its TIFF resolution tags give {m:.4g} µm/px, outside [{TAG_MPP_RANGE[0]}, {TAG_MPP_RANGE[1]}]: "
                    "a writer's default (e.g. 72 dpi), not a scan resolution"
                )
            return m, src
    vendor_keys = (
        ("aperio.MPP", 1.0),
        ("philips.DICOM_PIXEL_SPACING", 1000.0),
        ("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X", 1.0),
        ("hamamatsu.mpp", 1.0),
        ("leica.mpp", 1.0),
        ("ventana.ScanRes", 1.0),
    )
    for key, scale in vendor_keys:
        v = _float(props.get(key))
        if v:
            return v * scale, f"vendor:{key}"
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    xr, yr = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if unit in ("centimeter", "inch", "3", "2") and (xr or yr):
        per_unit = 1e4 if unit in ("centimeter", "3") else 25400.0
        res = (xr + yr) / 2 if (xr and yr) else (xr or yr)
        assert res is not None
        m = per_unit / res
        if TAG_MPP_RANGE[0] <= m <= TAG_MPP_RANGE[1]:
            return m, "tiff-resolution"
        return None, f"its TIFF resolution tags give {m:.4g} µm/px, outside the plausible range"
    return None, "it has no µm/px metadata (no openslide.mpp-x, vendor key or TIFF resolution tags)"


def slide_id_for(path: str | Path) -> str:
    """Default slide id: the file name without its extension."""
    name = Path(path).name
    for suf in SLIDE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


@dataclass
class TiffLevel:
    """A pyramid level stored as a tiled TIFF page, decodable tile by tile (the fast read path)."""

    page_index: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    jpegtables: bytes | None
    compression: int
    decode: Any  # tifffile TiffPage.decode
    jpeg_colorspace: tuple[Any, Any] | None = None  # (colorspace, outcolorspace) for imagecodecs.jpeg8_decode

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)


@dataclass
class Slide:
    """An open slide: µm/px, pyramid geometry and RGB reads (level-0 coordinates, like OpenSlide)."""

    path: Path
    slide_id: str
    backend: str  # "openslide" | "tiffslide"
    vendor: str
    mpp: float
    mpp_source: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    properties: dict[str, str] = field(default_factory=dict)
    tiff_levels: list[TiffLevel] | None = None  # set when every level is a tiled TIFF page (fast path)
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd: int | None = field(default=None, repr=False)

    # ---- geometry ------------------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample is <= ``downsample`` (never upsample from a coarser level)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    # ---- backend handles (one per thread: OpenSlide handles go bad after a corrupt tile) ---------------------------
    def _open_backend(self) -> Any:
        if self.backend == "openslide":
            import openslide

            return openslide.OpenSlide(str(self.path))
        import tiffslide

        return tiffslide.TiffSlide(str(self.path))

    def handle(self) -> Any:
        """This thread's backend handle (opened on first use)."""
        h = getattr(self._local, "handle", None)
        if h is None:
            h = self._open_backend()
            self._local.handle = h
            with self._lock:
                self._handles.append(h)
        return h

    def reopen_handle(self) -> None:
        """Drop this thread's handle (after a read error OpenSlide fails every later read on it)."""
        h = getattr(self._local, "handle", None)
        if h is not None:
            self._local.handle = None
            with self._lock:
                if h in self._handles:
                    self._handles.remove(h)
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing a broken handle may fail; it is dropped anyway
                pass

    def raw_fd(self) -> int:
        """A read-only OS file descriptor of the slide file (for thread-safe ``os.pread`` of TIFF tiles)."""
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``w`` × ``h`` pixels of ``level`` starting at level-0 (x0, y0).

        Uses the backend's read_region (areas outside the slide are white). Raises the backend's error on a
        corrupt read (the caller decides; see :mod:`hwsi.slide.reader`) after dropping this thread's handle: an
        OpenSlide handle that met a corrupt tile fails every later read, so the next read opens a fresh one.
        """
        hnd = self.handle()
        try:
            return self._read_region(hnd, x0, y0, level, w, h)
        except Exception:
            self.reopen_handle()
            raise

    def _read_region(self, hnd: Any, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        if self.backend == "openslide":
            img = hnd.read_region((int(x0), int(y0)), int(level), (int(w), int(h)))
            a = np.asarray(img)
            rgb = a[..., :3]
            alpha = a[..., 3:4]
            if alpha.min() < 255:  # transparent = outside the slide: white, premultiplied by OpenSlide
                rgb = (rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))).clip(0, 255).astype(np.uint8)
            return np.ascontiguousarray(rgb)
        a = np.asarray(hnd.read_region((int(x0), int(y0)), int(level), (int(w), int(h)), as_array=True))
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        return np.ascontiguousarray(a[..., :3])

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """RGB thumbnail whose longer side is ``max_side`` (read in bounded-memory chunks; JPEG tiles decoded at 1/2
        or 1/4 in the DCT domain where the level is needed that far down: hwsi.slide.levels.iter_downsampled)."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / max_side)
        return read_downsampled(self, ds, dct=True)

    def close(self) -> None:
        with self._lock:
            for h in self._handles:
                try:
                    h.close()
                except Exception:  # noqa: BLE001
                    pass
            self._handles.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._local = threading.local()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tiff_levels(path: Path, level_dimensions: list[tuple[int, int]]) -> list[TiffLevel] | None:
    """Map every slide level to a tiled TIFF page of the same size, or None (then reads use the backend)."""
    import tifffile

    try:
        tf = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not a TIFF (MRXS, DICOM, ...) -> no fast path
        return None
    try:
        return _match_levels(tf, level_dimensions)
    except Exception:  # noqa: BLE001 - unreadable page structure -> no fast path (the backend reads it)
        return None
    finally:
        tf.close()


def _match_levels(tf: Any, level_dimensions: list[tuple[int, int]]) -> list[TiffLevel] | None:
    import tifffile

    pages = [p for p in tf.pages if isinstance(p, tifffile.TiffPage)]
    out: list[TiffLevel] = []
    for w, h in level_dimensions:
        match = None
        for i, p in enumerate(pages):
            if (
                p.is_tiled
                and p.imagewidth == w
                and p.imagelength == h
                and p.samplesperpixel in (3, 4)
                and p.planarconfig == 1
                and p.imagedepth == 1
                and p.bitspersample == 8
            ):
                match = i
                break
        if match is None:
            return None
        p = pages[match]
        out.append(
            TiffLevel(
                page_index=match,
                width=w,
                height=h,
                tile_width=int(p.tilewidth),
                tile_height=int(p.tilelength),
                offsets=np.asarray(p.dataoffsets, np.int64),
                bytecounts=np.asarray(p.databytecounts, np.int64),
                jpegtables=p.jpegtables,
                compression=int(p.compression),
                decode=p.decode,
                jpeg_colorspace=(
                    tuple(tifffile.tifffile.jpeg_decode_colorspace(p.photometric, p.planarconfig, p.extrasamples, p.is_jfif))
                    if int(p.compression) == 7 and p.bitspersample == 8
                    else None
                ),
            )
        )
    return out


def _check_rgb_tiff(path: Path) -> None:
    """Reject TIFFs whose first page is not 3/4-sample RGB/YCbCr 8-bit (grey, multi-channel, 16-bit fluorescence)."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            p = tf.pages[0]
            samples, photometric, bits = int(p.samplesperpixel), int(p.photometric), int(p.bitspersample)
            n_pages = len(tf.pages)
    except Exception:  # noqa: BLE001
        return
    if samples not in (3, 4) or photometric not in (2, 6) or bits != 8:
        raise SlideError(
            path,
            f"not an RGB brightfield image ({samples} sample(s)/pixel, photometric {photometric}, {bits}-bit"
            + (f", {n_pages} pages" if n_pages > 1 else "")
            + ")",
            "hwsi reads 8-bit RGB brightfield slides (H&E, IHC); fluorescence/multiplex images are not supported",
        )


def open_slide(path: str | Path, mpp: float | None = None, slide_id: str | None = None) -> Slide:
    """Open ``path`` with OpenSlide (tiffslide for TIFFs OpenSlide rejects) and determine its level-0 µm/px.

    Args:
        path: the slide file.
        mpp: level-0 µm/px given by the user; overrides the metadata.
        slide_id: id to use (default: file name without extension).

    Raises:
        SlideError: missing/empty/unsupported/corrupt file, non-RGB image, or no µm/px (with how to pass it).
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideError(path, "is a directory, not a slide file")
    if not path.is_dir() and not path.is_file():
        raise SlideError(path, "not a regular file (a FIFO, socket or device); refusing to open it")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise SlideError(path, f"invalid µm/px {mpp!r}", "--mpp must be a positive number of µm per pixel")

    import openslide

    backend = "openslide"
    os_err: str = ""
    props: dict[str, str]
    try:
        h = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
        os_err = str(exc) or type(exc).__name__
        h = None
    if h is not None:
        props = dict(h.properties)
        dims = [tuple(int(v) for v in d) for d in h.level_dimensions]
        downs = [float(d) for d in h.level_downsamples]
        vendor = props.get("openslide.vendor", "")
        h.close()
    else:
        import tiffslide

        try:
            t = tiffslide.TiffSlide(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot read it"
            raise SlideError(
                path,
                f"unsupported or corrupt slide file (OpenSlide: {os_err}; tiffslide: {exc})",
                "convert it to a pyramidal tiled TIFF or a format OpenSlide reads",
            ) from exc
        try:
            props = {k: ("" if v is None else str(v)) for k, v in t.properties.items()}
            dims = [tuple(int(v) for v in d) for d in t.level_dimensions]
            downs = [float(d) for d in t.level_downsamples]
        except Exception as exc:  # noqa: BLE001 - e.g. a TIFF header without pages
            raise SlideError(path, f"unsupported or corrupt slide file (OpenSlide: {os_err}; tiffslide: {exc})",
                             "convert it to a pyramidal tiled TIFF or a format OpenSlide reads") from exc
        finally:
            t.close()
        _check_rgb_tiff(path)
        backend = "tiffslide"
        vendor = props.get("tiffslide.vendor", "") or "tiff"
        props.setdefault("openslide.vendor", vendor if vendor != "tiff" else "generic-tiff")
    if not dims or dims[0][0] <= 0 or dims[0][1] <= 0:
        raise SlideError(path, "slide has no image data (level 0 is empty)")
    if backend == "openslide" and vendor == "generic-tiff":
        _check_rgb_tiff(path)

    if mpp is not None:
        m, src = float(mpp), "user"
    else:
        m, why = mpp_from_properties(props)
        if m is None:
            raise SlideError(path, f"unknown µm per pixel: {why}", MPP_HINT)
        src = why
    tiff_levels = _tiff_levels(path, dims) if path.is_file() else None  # type: ignore[arg-type]
    return Slide(
        path=path,
        slide_id=slide_id or slide_id_for(path),
        backend=backend,
        vendor=vendor,
        mpp=m,
        mpp_source=src,
        level_dimensions=dims,  # type: ignore[arg-type]
        level_downsamples=downs,
        properties=props,
        tiff_levels=tiff_levels,
    )

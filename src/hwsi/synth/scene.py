"""SynthPath scene: regions, patch patterns and nuclei of one slide, derived from (seed, slide classes).

Scene grid (documented in ``docs/synthpath.md``): the slide's level-0 pixels (at ``mpp`` µm/px) are cut from the
origin into regions of ``region_size`` px, each a ``G × G`` grid (``G = region_size // patch_size``) of patches of
``patch_size`` px, row-major — the hwsi region/patch grid when ``target_mpp == mpp``. Regions on the right/bottom
edge may extend past the slide; their outside part is background.

Every patch carries a pattern (``classes.PATTERNS``) and every region an architecture (``classes.ARCHITECTURES``);
nuclei are generated per patch from ``rng([seed, row, col])`` so any level-0 window can be rendered alone
(:mod:`hwsi.synth.render`) and the ground truth is the same whichever way it is enumerated.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from hwsi.synth.classes import (
    ARCH_BACKGROUND,
    ARCH_CROWDED,
    ARCH_REGULAR,
    ARCH_SOLID,
    BACKGROUND,
    CELL_ATYPICAL,
    CELL_EPITHELIAL,
    CELL_LYMPHOCYTE,
    CELL_STROMAL,
    GLAND,
    SOLID,
    STROMA,
    SlideClasses,
    SynthError,
)


@dataclass
class SceneConfig:
    """What defines one SynthPath slide. Sizes are level-0 pixels at ``mpp`` µm/px."""

    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    region_size: int = 1024
    patch_size: int = 64
    seed: int = 0
    classes: SlideClasses = field(default_factory=SlideClasses)
    gland_fraction: float = 0.5  # fraction of gland (or solid) patches in every tissue region
    tissue_region_min: float = 0.25  # a region with at least this tissue fraction counts as tissue for extent
    lesion_region_min: float = 0.6  # lesions are placed only in regions at least this full of tissue
    min_tissue_regions: int = 3

    def validate(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise SynthError(f"slide size must be positive, got {self.width}x{self.height}")
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise SynthError(f"mpp must be a positive number, got {self.mpp}")
        if self.patch_size < 16:
            raise SynthError(f"patch_size must be >= 16 px, got {self.patch_size}")
        if self.region_size % self.patch_size or self.region_size < 2 * self.patch_size:
            raise SynthError(
                f"region_size ({self.region_size}) must be a multiple (>= 2) of patch_size ({self.patch_size})"
            )
        if (self.region_size // self.patch_size) % 2:
            raise SynthError("region_size / patch_size must be even (regions hold half gland, half stroma patches)")
        if not 0.0 < self.gland_fraction < 1.0:
            raise SynthError(f"gland_fraction must be in (0, 1), got {self.gland_fraction}")

    @property
    def grid_side(self) -> int:
        return self.region_size // self.patch_size


# nuclear sizes in µm (semi-axes); the render module turns them into pixels with mpp
NUCLEUS_UM = {
    CELL_STROMAL: (4.5, 1.2),
    CELL_LYMPHOCYTE: (2.4, 2.2),
    CELL_EPITHELIAL: (3.3, 2.5),
    CELL_ATYPICAL: (3.3, 2.5),
}
STROMA_UM2_PER_NUCLEUS = 650.0
LYMPHOCYTE_SHARE = 0.18


@dataclass
class Gland:
    """Lumen ellipse of one gland (level-0 px) and the outer edge of its epithelium."""

    cx: float
    cy: float
    ra: float
    rb: float
    angle: float
    wall: float  # epithelium thickness, px


@dataclass
class PatchContent:
    """What one scene patch holds: nuclei (level-0 centres, type, sprite variant, angle bin) and structures."""

    x: np.ndarray  # int64
    y: np.ndarray  # int64
    type: np.ndarray  # int8
    variant: np.ndarray  # int32 index into the sprite bank of its type
    angle_bin: np.ndarray  # int32
    gland: Gland | None = None
    sheet: tuple[int, int, int, int] | None = None  # solid sheet rectangle x0, y0, x1, y1 (level-0)


N_ANGLES = 16
N_VARIANTS = 48


def _tissue_params(seed: int, width: int, height: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 7001])
    k = 10
    scale = max(width, height)
    wavelengths = rng.uniform(0.35, 1.2, k) * scale
    theta = rng.uniform(0, 2 * np.pi, k)
    return {
        "cx": width * rng.uniform(0.46, 0.54),
        "cy": height * rng.uniform(0.46, 0.54),
        "ax": width * rng.uniform(0.46, 0.52),
        "ay": height * rng.uniform(0.46, 0.52),
        "kx": (2 * np.pi / wavelengths) * np.cos(theta),
        "ky": (2 * np.pi / wavelengths) * np.sin(theta),
        "phase": rng.uniform(0, 2 * np.pi, k),
        "amp": rng.uniform(0.03, 0.09, k),
    }


class Scene:
    """The full description of one slide; cheap to build (per-patch arrays only, no pixels, no nuclei)."""

    def __init__(self, cfg: SceneConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.G = cfg.grid_side
        self.n_rx = math.ceil(cfg.width / cfg.region_size)
        self.n_ry = math.ceil(cfg.height / cfg.region_size)
        self._tp = _tissue_params(cfg.seed, cfg.width, cfg.height)
        self._cache: dict[tuple[int, int], PatchContent] = {}
        self._lock = threading.Lock()
        self._build()

    # ----- tissue -------------------------------------------------------------------------------------------
    def tissue_field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed tissue field at level-0 points: > 0 inside the (irregular) tissue outline."""
        p = self._tp
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        r = np.sqrt(((x - p["cx"]) / p["ax"]) ** 2 + ((y - p["cy"]) / p["ay"]) ** 2)
        f = 1.0 - r
        for kx, ky, ph, a in zip(p["kx"], p["ky"], p["phase"], p["amp"], strict=True):
            f = f + a * np.sin(kx * x + ky * y + ph)
        # fade at the slide border so the tissue never touches it
        b = 0.02 * max(self.cfg.width, self.cfg.height)
        edge = np.minimum(np.minimum(x, self.cfg.width - x), np.minimum(y, self.cfg.height - y)) / b
        return np.minimum(f, 0.1 * (edge - 1.0))

    def tissue_alpha(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Soft tissue mask in [0, 1] (about 4 px of edge)."""
        s = 0.25 * min(self._tp["ax"], self._tp["ay"])
        return np.clip(0.5 + self.tissue_field(x, y) * s, 0.0, 1.0)

    # ----- scene construction -------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, G = self.cfg, self.G
        ps = cfg.patch_size
        ny, nx = self.n_ry * G, self.n_rx * G
        sub = (np.arange(4) + 0.5) / 4 * ps
        gy = (np.arange(ny)[:, None] * ps + sub[None, :]).ravel()
        gx = (np.arange(nx)[:, None] * ps + sub[None, :]).ravel()
        inside = self.tissue_field(gx[None, :], gy[:, None]) > 0
        self.patch_tissue = inside.reshape(ny, 4, nx, 4).mean(axis=(1, 3)).astype(np.float32)
        self.region_tissue = self.patch_tissue.reshape(self.n_ry, G, self.n_rx, G).mean(axis=(1, 3))

        R = self.n_ry * self.n_rx
        tissue_regions = self.region_tissue.ravel() >= cfg.tissue_region_min
        n_tissue = int(tissue_regions.sum())
        if n_tissue < cfg.min_tissue_regions:
            raise SynthError(
                f"slide {cfg.width}x{cfg.height} with region_size {cfg.region_size} has {n_tissue} tissue "
                f"region(s); at least {cfg.min_tissue_regions} are needed (make the slide larger or regions smaller)"
            )
        rng = np.random.default_rng([cfg.seed, 7002])
        cls = cfg.classes
        lesion = np.zeros(R, dtype=bool)
        if cls.extent != "none":
            cand = np.flatnonzero(self.region_tissue.ravel() >= cfg.lesion_region_min)
            if cand.size == 0:
                cand = np.flatnonzero(tissue_regions)
            if cls.extent == "focal":
                k = 1
            else:
                need = math.ceil(n_tissue / 2)
                k = int(rng.integers(need, max(need, int(round(0.8 * n_tissue))) + 1))
                k = min(k, n_tissue)
                if k > cand.size:  # not enough well-filled regions: fill from the other tissue regions
                    extra = np.setdiff1d(np.flatnonzero(tissue_regions), cand)
                    cand = np.concatenate([cand, rng.permutation(extra)[: k - cand.size]])
            lesion[rng.choice(cand, size=k, replace=False)] = True
        self.region_lesion = lesion.reshape(self.n_ry, self.n_rx)
        self.n_tissue_regions = n_tissue

        arch = np.full(R, ARCH_BACKGROUND, dtype=np.int8)
        atypia = np.zeros(R, dtype=bool)
        patterns = np.full((ny, nx), BACKGROUND, dtype=np.int8)
        n_lesion_arch = cls.lesion_architecture
        for r in range(R):
            ry, rx = divmod(r, self.n_rx)
            if self.region_tissue[ry, rx] <= 0:
                continue
            a = n_lesion_arch if lesion[r] else ARCH_REGULAR
            arch[r] = a if tissue_regions[r] else ARCH_BACKGROUND
            atypia[r] = bool(lesion[r] and cls.atypia)
            layout = region_layout(a, G, cfg.gland_fraction, np.random.default_rng([cfg.seed, 7003, r]))
            patterns[ry * G : (ry + 1) * G, rx * G : (rx + 1) * G] = layout
        self.region_arch = arch.reshape(self.n_ry, self.n_rx)
        self.region_atypia = atypia.reshape(self.n_ry, self.n_rx)
        # the layout pattern drives rendering everywhere; the truth pattern is background where tissue is scarce
        self.layout = patterns
        self.patterns = np.where(self.patch_tissue >= 0.5, patterns, BACKGROUND).astype(np.int8)

    def set_region_atypia(self, atypia: np.ndarray | bool) -> None:
        """Override which regions have atypical epithelium (experiments, probes); drops cached patch content."""
        self.region_atypia = np.broadcast_to(np.asarray(atypia, dtype=bool), (self.n_ry, self.n_rx)).copy()
        with self._lock:
            self._cache.clear()

    # ----- per-patch content --------------------------------------------------------------------------------
    def patch_content(self, row: int, col: int) -> PatchContent:
        """Nuclei and structures of the scene patch at global patch-grid (row, col); cached, thread-safe."""
        key = (row, col)
        got = self._cache.get(key)
        if got is not None:
            return got
        content = self._make_patch(row, col)
        with self._lock:
            if len(self._cache) > 50000:
                self._cache.clear()
            self._cache[key] = content
        return content

    def _make_patch(self, row: int, col: int) -> PatchContent:
        cfg = self.cfg
        ps = cfg.patch_size
        pat = int(self.layout[row, col])
        empty = np.zeros(0, dtype=np.int64)
        if self.patch_tissue[row, col] <= 0:
            return PatchContent(empty, empty, empty.astype(np.int8), empty.astype(np.int32), empty.astype(np.int32))
        rng = np.random.default_rng([cfg.seed, 11, row, col])
        x0, y0 = col * ps, row * ps
        atyp = bool(self.region_atypia[row // self.G, col // self.G])
        epi_type = CELL_ATYPICAL if atyp else CELL_EPITHELIAL
        um = cfg.mpp
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        ts: list[np.ndarray] = []
        ang: list[np.ndarray] = []
        gland = None
        sheet = None
        keep_out = None  # callable mask of stroma nuclei positions to drop
        if pat == GLAND:
            ra = ps * rng.uniform(0.15, 0.19)
            rb = ra * rng.uniform(0.75, 0.95)
            angle = rng.uniform(0, np.pi)
            a_px, b_px = NUCLEUS_UM[CELL_EPITHELIAL][0] / um, NUCLEUS_UM[CELL_EPITHELIAL][1] / um
            wall = 2 * a_px + 1.5
            jit = 0.04 * ps
            cx = x0 + ps / 2 + rng.uniform(-jit, jit)
            cy = y0 + ps / 2 + rng.uniform(-jit, jit)
            gland = Gland(cx, cy, ra, rb, angle, wall)
            # nuclei on the ellipse half-way through the wall, long axis radial
            ma, mb = ra + wall / 2, rb + wall / 2
            perim = np.pi * (3 * (ma + mb) - np.sqrt((3 * ma + mb) * (ma + 3 * mb)))
            n = max(5, int(perim / (2 * b_px * 1.45)))
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            t = t + rng.normal(0, 0.25 / n * 2 * np.pi, n) * 0.3
            ex, ey = ma * np.cos(t), mb * np.sin(t)
            ca, sa = np.cos(angle), np.sin(angle)
            px_ = cx + ex * ca - ey * sa + rng.normal(0, 0.4, n)
            py_ = cy + ex * sa + ey * ca + rng.normal(0, 0.4, n)
            radial = np.arctan2(py_ - cy, px_ - cx)
            xs.append(px_)
            ys.append(py_)
            ts.append(np.full(n, epi_type))
            ang.append(radial)

            def keep_out(qx: np.ndarray, qy: np.ndarray, g: Gland = gland) -> np.ndarray:
                dx, dy = qx - g.cx, qy - g.cy
                u = dx * np.cos(g.angle) + dy * np.sin(g.angle)
                v = -dx * np.sin(g.angle) + dy * np.cos(g.angle)
                pad = g.wall + 4.0
                return (u / (g.ra + pad)) ** 2 + (v / (g.rb + pad)) ** 2 < 1.0

        elif pat == SOLID:
            G = self.G
            m = int(round(0.12 * ps))
            left = m if col == 0 or self.layout[row, col - 1] != SOLID else 0
            right = m if col + 1 >= self.layout.shape[1] or self.layout[row, col + 1] != SOLID else 0
            top = m if row == 0 or self.layout[row - 1, col] != SOLID else 0
            bottom = m if row + 1 >= self.layout.shape[0] or self.layout[row + 1, col] != SOLID else 0
            del G
            sheet = (x0 + left, y0 + top, x0 + ps - right, y0 + ps - bottom)
            a_px = NUCLEUS_UM[CELL_EPITHELIAL][0] / um
            sp = 2.0 * a_px + 1.0
            gx = np.arange(x0 + sp / 2, x0 + ps, sp)
            gy = np.arange(y0 + sp / 2, y0 + ps, sp * 0.87)
            X, Y = np.meshgrid(gx, gy)
            X = X + (np.arange(len(gy))[:, None] % 2) * sp / 2
            X = X.ravel() + rng.normal(0, 0.12 * sp, X.size)
            Y = Y.ravel() + rng.normal(0, 0.12 * sp, Y.size)
            inset = 0.6 * a_px
            ok = (
                (X >= sheet[0] + inset) & (X < sheet[2] - inset) & (Y >= sheet[1] + inset) & (Y < sheet[3] - inset)
            )
            X, Y = X[ok], Y[ok]
            xs.append(X)
            ys.append(Y)
            ts.append(np.full(X.size, epi_type))
            ang.append(rng.uniform(0, np.pi, X.size))

            def keep_out(qx: np.ndarray, qy: np.ndarray, s: tuple[int, int, int, int] = sheet) -> np.ndarray:
                return (qx >= s[0] - 3) & (qx < s[2] + 3) & (qy >= s[1] - 3) & (qy < s[3] + 3)

        # stroma nuclei everywhere in the patch (outside glands/sheets)
        area_um2 = (ps * um) ** 2
        n_str = rng.poisson(area_um2 / STROMA_UM2_PER_NUCLEUS)
        sx = x0 + rng.uniform(0, ps, n_str)
        sy = y0 + rng.uniform(0, ps, n_str)
        if keep_out is not None:
            ok = ~keep_out(sx, sy)
            sx, sy = sx[ok], sy[ok]
        lym = rng.random(sx.size) < LYMPHOCYTE_SHARE
        fibre = self.fibre_angle + rng.normal(0, 0.25, sx.size)
        xs.append(sx)
        ys.append(sy)
        ts.append(np.where(lym, CELL_LYMPHOCYTE, CELL_STROMAL))
        ang.append(fibre)

        x = np.concatenate(xs)
        y = np.concatenate(ys)
        typ = np.concatenate(ts).astype(np.int8)
        angles = np.concatenate(ang)
        # drop nuclei outside the tissue outline (only patches near the edge need the check)
        r0, c0 = max(0, row - 1), max(0, col - 1)
        if self.patch_tissue[r0 : row + 2, c0 : col + 2].min() >= 1.0:
            ok = np.ones(x.size, dtype=bool)
        else:
            ok = self.tissue_field(x, y) > 0.002
        xi = np.round(x[ok]).astype(np.int64)
        yi = np.round(y[ok]).astype(np.int64)
        typ = typ[ok]
        abin = (np.round((angles[ok] % np.pi) / np.pi * N_ANGLES).astype(np.int32)) % N_ANGLES
        variant = rng.integers(0, N_VARIANTS, xi.size).astype(np.int32)
        return PatchContent(xi, yi, typ, variant, abin, gland, sheet)

    @functools.cached_property
    def fibre_angle(self) -> float:
        """Main direction of stroma fibres (radians)."""
        return float(np.random.default_rng([self.cfg.seed, 7004]).uniform(0, np.pi))

    # ----- whole-scene views --------------------------------------------------------------------------------
    def region_coords(self) -> np.ndarray:
        """(R, 2) level-0 (x, y) of each region, row-major."""
        rs = self.cfg.region_size
        yy, xx = np.meshgrid(np.arange(self.n_ry), np.arange(self.n_rx), indexing="ij")
        return np.stack([xx.ravel() * rs, yy.ravel() * rs], axis=1).astype(np.int64)

    def patch_coords(self) -> np.ndarray:
        """(R, G, 2) level-0 (x, y) of each patch, row-major inside its region."""
        ps, G = self.cfg.patch_size, self.G
        rc = self.region_coords()
        gy, gx = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
        off = np.stack([gx.ravel() * ps, gy.ravel() * ps], axis=1)
        return (rc[:, None, :] + off[None, :, :]).astype(np.int64)

    def per_region(self, grid: np.ndarray) -> np.ndarray:
        """Reshape a global (ny, nx) patch-grid array to (R, G*G) row-major per region."""
        G = self.G
        a = grid.reshape(self.n_ry, G, self.n_rx, G).transpose(0, 2, 1, 3)
        return a.reshape(self.n_ry * self.n_rx, G * G)

    def nuclei(self) -> dict[str, np.ndarray]:
        """Every nucleus of the slide (inside the slide bounds), sorted by (region, patch): columns
        x, y (level-0 int64), type (int8), region, patch (int32, patch row-major inside the region)."""
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("x", "y", "type", "variant", "region", "patch")}
        G = self.G
        for r in range(self.n_ry * self.n_rx):
            ry, rx = divmod(r, self.n_rx)
            for g in range(G * G):
                gy, gx = divmod(g, G)
                c = self.patch_content(ry * G + gy, rx * G + gx)
                if c.x.size == 0:
                    continue
                ok = (c.x >= 0) & (c.y >= 0) & (c.x < self.cfg.width) & (c.y < self.cfg.height)
                cols["x"].append(c.x[ok])
                cols["y"].append(c.y[ok])
                cols["type"].append(c.type[ok])
                cols["variant"].append(c.variant[ok])
                cols["region"].append(np.full(int(ok.sum()), r, dtype=np.int32))
                cols["patch"].append(np.full(int(ok.sum()), g, dtype=np.int32))
        dtypes = {"x": np.int64, "y": np.int64, "type": np.int8, "variant": np.int32, "region": np.int32,
                  "patch": np.int32}
        return {
            k: (np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtype=dtypes[k])) for k, v in cols.items()
        }


def region_layout(arch: int, G: int, gland_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(G, G) patch patterns of one region: the same number of gland (or solid) patches for every architecture,
    arranged regularly (``ARCH_REGULAR``: a jittered checkerboard-like lattice) or in clusters (crowded/solid)."""
    n_pos = int(round(gland_fraction * G * G))
    out = np.full((G, G), STROMA, dtype=np.int8)
    if arch == ARCH_REGULAR:
        yy, xx = np.mgrid[0:G, 0:G]
        score = ((yy + xx + int(rng.integers(2))) % 2).astype(np.float64) + rng.uniform(0, 0.6, (G, G))
        # swap ~12% of positions across the lattice to avoid a perfect checkerboard
        flat = score.ravel()
        n_swap = max(1, int(0.06 * G * G))
        hi = rng.choice(np.flatnonzero(flat >= 1), n_swap, replace=False)
        lo = rng.choice(np.flatnonzero(flat < 1), n_swap, replace=False)
        flat[hi] -= 1.0
        flat[lo] += 1.0
        order = np.argsort(-flat, kind="stable")
        out.ravel()[order[:n_pos]] = GLAND
    elif arch in (ARCH_CROWDED, ARCH_SOLID):
        noise = ndimage.gaussian_filter(rng.normal(size=(G, G)), sigma=max(1.0, G / 7), mode="wrap")
        order = np.argsort(-noise.ravel(), kind="stable")
        out.ravel()[order[:n_pos]] = GLAND if arch == ARCH_CROWDED else SOLID
    else:
        raise SynthError(f"no layout for architecture code {arch}")
    return out


def same_neighbour_fraction(grid: np.ndarray, positive: int) -> float:
    """Spatial-arrangement statistic of a (G, G) pattern grid: of the 4-neighbour pairs touching a ``positive``
    patch, the fraction whose both ends are ``positive`` (~0.1 regular lattice, ~0.7 clustered)."""
    pos = grid == positive
    pairs = 0
    same = 0
    for a, b in ((pos[:, :-1], pos[:, 1:]), (pos[:-1, :], pos[1:, :])):
        any_ = a | b
        pairs += int(any_.sum())
        same += int((a & b).sum())
    return same / pairs if pairs else 0.0

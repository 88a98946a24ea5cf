"""SynthPath renderer: any level-0 window of a :class:`~hwsi.synth.scene.Scene` as H&E-like RGB.

Pixels are made in stain space and converted once: haematoxylin (H) and eosin (E) optical densities are painted
(stroma texture, epithelial cytoplasm, pale lumens, nuclei), then RGB = 255·exp(−(H·h + E·e + bg)) with the
Ruifrok–Johnston stain vectors that ``skimage.color.rgb2hed`` uses, so colour deconvolution recovers the H channel.

Nuclei are stamped from a cached bank of sprites per type (N_ANGLES orientations × N_VARIANTS shapes) with
``H = max(H, sprite)`` (order-independent). Every operation is local and evaluated in global level-0 coordinates,
so a window renders identically alone or as part of a larger one (the ``tile_fn`` contract of
:func:`hwsi.synth.pyramid.write_pyramid_tiff`); a 100k × 100k slide streams tile by tile.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hwsi.synth.classes import (
    CELL_ATYPICAL,
    CELL_EPITHELIAL,
    CELL_LYMPHOCYTE,
    CELL_STROMAL,
    CELL_TYPES,
)
from hwsi.synth.scene import N_ANGLES, N_VARIANTS, NUCLEUS_UM, Scene

# Ruifrok & Johnston H, E stain OD vectors (rows of skimage.color.rgb_from_hed, normalised)
_H_VEC = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_VEC = np.array([0.07, 0.99, 0.11], dtype=np.float32)
_H_VEC /= np.linalg.norm(_H_VEC)
_E_VEC /= np.linalg.norm(_E_VEC)
_BG_OD = np.array([0.035, 0.04, 0.03], dtype=np.float32)  # glass/background tint
_MAX_OD = 3.0
_TEX = 512  # period of the stroma texture (px)


@dataclass(frozen=True)
class NucleusStyle:
    """Appearance of one nucleus type. Areas in µm²; ``od`` is the mean haematoxylin optical density."""

    mean_area_um2: float
    area_cv: float  # log-normal sigma of the area
    aspect: tuple[float, float]  # range of long/short axis ratio
    od: float
    irregular: float  # amplitude of contour harmonics (fraction of radius)
    chroma_amp: float  # chromatin texture amplitude (fraction of od)
    chroma_sigma_um: float  # chromatin clump scale
    nucleoli: int
    rim: float  # extra density at the membrane


def _styles() -> dict[int, NucleusStyle]:
    ea, eb = NUCLEUS_UM[CELL_EPITHELIAL]
    sa, sb = NUCLEUS_UM[CELL_STROMAL]
    la, lb = NUCLEUS_UM[CELL_LYMPHOCYTE]
    epi_area = math.pi * ea * eb
    return {
        CELL_STROMAL: NucleusStyle(math.pi * sa * sb, 0.15, (3.0, 4.5), 0.95, 0.02, 0.10, 0.6, 0, 0.15),
        CELL_LYMPHOCYTE: NucleusStyle(math.pi * la * lb, 0.10, (1.0, 1.15), 1.35, 0.02, 0.08, 0.6, 0, 0.10),
        # normal epithelium: uniform ovals, fine even chromatin, thin rim
        CELL_EPITHELIAL: NucleusStyle(epi_area, 0.10, (1.15, 1.45), 0.85, 0.02, 0.10, 0.7, 0, 0.25),
        # atypia: SAME mean area and mean density (same count per patch: same coverage and mean colour), but
        # pleomorphic sizes, irregular contours, coarse clumped chromatin, nucleoli, a heavier membrane
        CELL_ATYPICAL: NucleusStyle(epi_area, 0.12, (1.15, 1.45), 0.85, 0.11, 0.45, 0.35, 2, 0.25),
    }


STYLES: dict[int, NucleusStyle] = _styles()


@dataclass
class SpriteBank:
    """Sprites of one nucleus type: ``sprites[angle_bin][variant]`` float32 H density, odd square side."""

    sprites: list[list[np.ndarray]]
    area_um2: np.ndarray  # (N_VARIANTS,) area of each variant (same for every angle)
    max_radius: int


def _sprite(a: float, b: float, theta: float, st: NucleusStyle, mpp: float, rng: np.random.Generator,
            harmonics: np.ndarray, noise_seed: int) -> np.ndarray:
    R = int(math.ceil(a * (1 + 3 * st.irregular))) + 2
    yy, xx = np.mgrid[-R : R + 1, -R : R + 1].astype(np.float32)
    c, s = math.cos(theta), math.sin(theta)
    u = xx * c + yy * s
    v = -xx * s + yy * c
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    phi = np.arctan2(v / b, u / a)
    bound = np.ones_like(rho)
    for k, (amp, ph) in enumerate(harmonics, start=4):  # fine lobes (k = 4..7): invisible once downsampled
        bound += st.irregular * amp * np.cos(k * phi + ph)
    dist = (bound - rho) * b  # ~ px inside the boundary
    alpha = np.clip(dist + 0.5, 0.0, 1.0)
    dens = 1.0 + st.rim * np.exp(-((dist - 0.8) ** 2) / 1.2)
    # chromatin: band-pass noise (fine minus coarse blur) so that it averages out over a 4x4 px block
    nrng = np.random.default_rng(noise_seed)
    sig = max(0.4, st.chroma_sigma_um / mpp)
    wn = nrng.normal(size=rho.shape)
    tex = ndimage.gaussian_filter(wn, sig) - ndimage.gaussian_filter(wn, 3.0 * sig)
    tex /= tex.std() + 1e-6
    dens = dens * np.clip(1.0 + st.chroma_amp * tex, 0.25, None)
    for _ in range(st.nucleoli):
        # nucleolus with a pale perinucleolar halo: zero net density, so it too vanishes when averaged
        r0 = rng.uniform(0, 0.45)
        t0 = rng.uniform(0, 2 * np.pi)
        nu, nv = r0 * a * math.cos(t0), r0 * b * math.sin(t0)
        ru = 0.45 / mpp
        d2 = (u - nu) ** 2 + (v - nv) ** 2
        dens = dens + 0.9 * (np.exp(-d2 / (2 * ru * ru)) - 0.25 * np.exp(-d2 / (8 * ru * ru)))
    out = np.maximum(alpha * dens, 0.0)
    # same absorbed light for every style (what survives downsampling): scale the sprite so that
    # sum(1 - exp(-k*out)) equals that of a flat nucleus of density st.od (k: green-channel H absorbance)
    k = float(_H_VEC[1])
    target = float((1.0 - np.exp(-k * st.od * alpha)).sum())
    lo, hi = 0.2, 5.0
    for _ in range(30):
        c = 0.5 * (lo + hi)
        if float((1.0 - np.exp(-k * np.minimum(c * out, _MAX_OD))).sum()) < target:
            lo = c
        else:
            hi = c
    return np.minimum(0.5 * (lo + hi) * out, _MAX_OD).astype(np.float32)


@functools.lru_cache(maxsize=16)
def sprite_bank(cell_type: int, mpp: float) -> SpriteBank:
    """The cached sprite bank of ``cell_type`` at ``mpp`` µm/px (fixed seed: identical in every process)."""
    st = STYLES[cell_type]
    rng = np.random.default_rng([424242, cell_type])
    areas = st.mean_area_um2 * np.exp(st.area_cv * rng.normal(size=N_VARIANTS) - st.area_cv**2 / 2)
    aspects = rng.uniform(*st.aspect, N_VARIANTS)
    harmonics = np.stack([rng.normal(0, 1, (4,)) * np.array([1.0, 0.8, 0.6, 0.5]) for _ in range(N_VARIANTS)])
    phases = rng.uniform(0, 2 * np.pi, (N_VARIANTS, 4))
    import cv2

    sprites: list[list[np.ndarray]] = [[] for _ in range(N_ANGLES)]
    true_area = np.zeros(N_VARIANTS)
    max_r = 0
    for v in range(N_VARIANTS):
        a_um = math.sqrt(areas[v] * aspects[v] / math.pi)
        b_um = a_um / aspects[v]
        h = np.stack([harmonics[v], phases[v]], axis=1)
        vr = np.random.default_rng([424243, cell_type, v])
        base = _sprite(a_um / mpp, b_um / mpp, 0.0, st, mpp, vr, h, noise_seed=v * 1000)
        R = base.shape[0] // 2
        base = np.pad(base, 1)
        true_area[v] = float((base > 0.5 * st.od).sum()) * mpp * mpp
        for ab in range(N_ANGLES):
            # rotate the angle-0 sprite (cv2 angles are counter-clockwise in image coordinates)
            m = cv2.getRotationMatrix2D((R + 1.0, R + 1.0), -ab * 180.0 / N_ANGLES, 1.0)
            spr = cv2.warpAffine(base, m, base.shape[::-1], flags=cv2.INTER_LINEAR, borderValue=0.0)
            sprites[ab].append(np.ascontiguousarray(spr, dtype=np.float32))
        max_r = max(max_r, R + 1)
    return SpriteBank(sprites, true_area.astype(np.float32), max_r)


@functools.lru_cache(maxsize=8)
def _stroma_textures(tex_id: int, mpp: float, fibre_angle_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """Periodic (_TEX × _TEX) eosin and haematoxylin OD textures of stroma (wavy collagen fibres)."""
    rng = np.random.default_rng([9090, tex_id])
    n = _TEX
    f = np.fft.fftfreq(n)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    ang = fibre_angle_bin * math.pi / 8
    fu = fx * math.cos(ang) + fy * math.sin(ang)
    fv = -fx * math.sin(ang) + fy * math.cos(ang)
    s = mpp / 0.5
    # fibres: long along the fibre direction (low freq along u), thin across (higher freq along v)
    filt = np.exp(-((fu / (0.006 / s)) ** 2) - ((fv / (0.07 / s)) ** 2))
    fib = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * filt))
    fib /= fib.std()
    blob_f = np.exp(-(fx**2 + fy**2) / (0.012 / s) ** 2)
    blob = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, n))) * blob_f))
    blob /= blob.std()
    fine = rng.normal(size=(n, n))
    fine = ndimage.gaussian_filter(fine, 0.7, mode="wrap")
    fine /= fine.std()
    e = 0.40 + 0.10 * fib + 0.05 * blob + 0.03 * fine
    e = np.where(fib < -1.3, e * 0.55, e)  # loose gaps between fibre bundles
    h = 0.05 + 0.012 * blob + 0.01 * fine
    return np.clip(e, 0.04, None).astype(np.float32), np.clip(h, 0.0, None).astype(np.float32)


def _ellipse_dist(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ra: float, rb: float,
                  ang: float) -> np.ndarray:
    """Approximate signed distance (px, positive inside) to an ellipse."""
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(ang), math.sin(ang)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rho = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
    return (1.0 - rho) * min(ra, rb)


def render_window(scene: Scene, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Level-0 pixels of the window at (x0, y0) of size w × h: uint8 (h, w, 3). Identical whichever way the
    slide is cut into windows (every operation is local and in global coordinates)."""
    cfg = scene.cfg
    mpp = cfg.mpp
    ps = cfg.patch_size
    tex_e, tex_h = _stroma_textures(cfg.seed % 6, round(mpp, 4), int(scene.fibre_angle / math.pi * 8) % 8)
    rows = np.arange(y0, y0 + h) % _TEX
    cols = np.arange(x0 + 37 * cfg.seed, x0 + 37 * cfg.seed + w) % _TEX
    E = tex_e.take(rows, axis=0).take(cols, axis=1)
    H = tex_h.take(rows, axis=0).take(cols, axis=1)

    banks = {t: sprite_bank(t, round(mpp, 4)) for t in range(len(CELL_TYPES))}
    margin = max(b.max_radius for b in banks.values()) + 2
    ny, nx = scene.layout.shape
    r0 = max(0, (y0 - margin) // ps)
    r1 = min(ny - 1, (y0 + h + margin) // ps)
    c0 = max(0, (x0 - margin) // ps)
    c1 = min(nx - 1, (x0 + w + margin) // ps)
    contents = [scene.patch_content(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    # epithelial cytoplasm (additive), then lumens (multiplicative): each pass commutes within itself
    lumens = []
    for pc in contents:
        g = pc.gland
        if g is not None:
            R = int(math.ceil(max(g.ra, g.rb) + g.wall + 3))
            bx0, by0 = int(g.cx) - R, int(g.cy) - R
            sx0, sy0 = max(bx0, x0), max(by0, y0)
            sx1, sy1 = min(bx0 + 2 * R + 1, x0 + w), min(by0 + 2 * R + 1, y0 + h)
            if sx0 >= sx1 or sy0 >= sy1:
                continue
            yy, xx = np.mgrid[sy0:sy1, sx0:sx1].astype(np.float32)
            d = _ellipse_dist(xx, yy, g.cx, g.cy, g.ra + g.wall, g.rb + g.wall, g.angle)
            ring = np.clip(d + 0.5, 0, 1)
            E[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] += 0.16 * ring
            H[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] += 0.05 * ring
            din = _ellipse_dist(xx, yy, g.cx, g.cy, g.ra, g.rb, g.angle)
            lumens.append((sy0, sy1, sx0, sx1, np.clip(din + 0.5, 0, 1)))
        elif pc.sheet is not None:
            sx0_, sy0_, sx1_, sy1_ = pc.sheet
            sx0, sy0 = max(sx0_, x0), max(sy0_, y0)
            sx1, sy1 = min(sx1_, x0 + w), min(sy1_, y0 + h)
            if sx0 < sx1 and sy0 < sy1:
                E[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] += 0.14
                H[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] += 0.05
    for sy0, sy1, sx0, sx1, lum in lumens:
        f = 1.0 - 0.93 * lum
        E[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] *= f
        H[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] *= f

    # nuclei: H = max(H, sprite); cull in bulk, then stamp the survivors
    with_nuc = [pc for pc in contents if pc.x.size]
    if with_nuc:
        nx_ = np.concatenate([pc.x for pc in with_nuc]) - x0
        ny_ = np.concatenate([pc.y for pc in with_nuc]) - y0
        nt = np.concatenate([pc.type for pc in with_nuc])
        na = np.concatenate([pc.angle_bin for pc in with_nuc])
        nv = np.concatenate([pc.variant for pc in with_nuc])
        rad = np.array([banks[t].max_radius for t in range(len(CELL_TYPES))])[nt]
        vis = (nx_ + rad >= 0) & (ny_ + rad >= 0) & (nx_ - rad < w) & (ny_ - rad < h)
        for cx, cy, t, ab, v in zip(nx_[vis].tolist(), ny_[vis].tolist(), nt[vis].tolist(), na[vis].tolist(),
                                    nv[vis].tolist(), strict=True):
            spr = banks[t].sprites[ab][v]
            R = spr.shape[0] >> 1
            ax0, ay0 = cx - R, cy - R
            ax1, ay1 = cx + R + 1, cy + R + 1
            if ax0 >= 0 and ay0 >= 0 and ax1 <= w and ay1 <= h:
                dst = H[ay0:ay1, ax0:ax1]
                np.maximum(dst, spr, out=dst)
                continue
            if ax1 <= 0 or ay1 <= 0 or ax0 >= w or ay0 >= h:
                continue
            ox0, oy0 = max(0, -ax0), max(0, -ay0)
            dst = H[max(ay0, 0) : min(ay1, h), max(ax0, 0) : min(ax1, w)]
            if dst.size:
                np.maximum(dst, spr[oy0 : oy0 + dst.shape[0], ox0 : ox0 + dst.shape[1]], out=dst)

    # tissue outline: evaluated on a global 8 px lattice and upsampled (alignment independent of the window)
    alpha = _tissue_alpha_window(scene, x0, y0, w, h)
    H *= alpha
    E *= alpha
    return stains_to_rgb(H, E)


_H_LEVELS = 255.0 / _MAX_OD  # quantisation: 0.012 OD of haematoxylin, 0.006 of eosin (below JPEG noise)
_E_MAX = 1.5
_E_LEVELS = 255.0 / _E_MAX


@functools.lru_cache(maxsize=1)
def _stain_lut() -> np.ndarray:
    hq = np.arange(256, dtype=np.float32) / _H_LEVELS
    eq = np.arange(256, dtype=np.float32) / _E_LEVELS
    od = hq[:, None, None] * _H_VEC + eq[None, :, None] * _E_VEC + _BG_OD
    rgb = np.clip(255.0 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)
    rgba = np.zeros((rgb.shape[0], 4), dtype=np.uint8)
    rgba[:, :3] = rgb
    return rgba.view(np.uint32).ravel()


def stains_to_rgb(H: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Beer–Lambert: RGB = 255·exp(−(H·h + E·e + bg)), through a 256×256 lookup table (uint8 (h, w, 3))."""
    import cv2

    hq = cv2.convertScaleAbs(H, alpha=_H_LEVELS)  # rounds and saturates at 255
    eq = cv2.convertScaleAbs(E, alpha=_E_LEVELS)
    idx = (hq.astype(np.uint16) << 8) | eq
    packed = _stain_lut()[idx]
    return cv2.cvtColor(packed.view(np.uint8).reshape(*H.shape, 4), cv2.COLOR_RGBA2RGB)


def _tissue_alpha_window(scene: Scene, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    import cv2

    step = 8
    gx0 = (x0 // step) * step - step
    gy0 = (y0 // step) * step - step
    nx = (x0 + w - gx0) // step + 3
    ny = (y0 + h - gy0) // step + 3
    gx = gx0 + step * np.arange(nx)
    gy = gy0 + step * np.arange(ny)
    a = scene.tissue_alpha(gx[None, :], gy[:, None]).astype(np.float32)
    if a.min() >= 1.0:
        return np.ones((h, w), dtype=np.float32)
    if a.max() <= 0.0:
        return np.zeros((h, w), dtype=np.float32)
    # bilinear with lattice point k at pixel gx0 + k*step exactly
    xs = ((np.arange(x0, x0 + w) - gx0) / step).astype(np.float32)
    ys = ((np.arange(y0, y0 + h) - gy0) / step).astype(np.float32)
    mx = np.broadcast_to(xs[None, :], (h, w)).copy()
    my = np.broadcast_to(ys[:, None], (h, w)).copy()
    return cv2.remap(a, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def make_tile_fn(scene: Scene):  # noqa: ANN201 - returns the TileFn of hwsi.synth.pyramid
    """``tile_fn(x0, y0, w, h)`` for :func:`hwsi.synth.pyramid.write_pyramid_tiff`."""

    def tile_fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return render_window(scene, int(x0), int(y0), int(w), int(h))

    return tile_fn

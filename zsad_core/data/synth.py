"""Synthetic anomaly datasets: the embedded data of the smoke profile (CPU, offline, seconds).

Three domains in the MVTec layout, each with its own manifest, exact masks and disjoint categories,
so the zero-shot protocol is real: train on one domain's test split, evaluate on another domain.

synth_industrial_a (auxiliary training set: train on its test split, categories pooled)
    brick   real photo texture (skimage.data.brick, CC0), tinted      crack, stain, foreign_texture
    wood    procedural wood grain (rings warped by Perlin noise)      scratch, hole, stain
    screw   procedural screw on a light background                    scratch, missing_part, hole
synth_industrial_b (zero-shot target)
    gravel  real photo texture (skimage.data.gravel, CC0), tinted     hole, stain, foreign_texture
    fabric  procedural plain-weave fabric                            hole, cut_paste, stain
    nut     procedural hex nut on a light background                  scratch, missing_part, crack
synth_medical (zero-shot target, medical-like)
    retina  fundus photo (skimage.data.retina, CC0), rotated/zoomed   hemorrhage, exudate
    tissue  IHC-stained colon tissue (skimage.data.immunohistochemistry) dense_nuclei, necrosis

Defect types (one small function each; every one returns the changed image and its mask, and
changes no pixel outside the mask, so the masks are exact):
    scratch          thin gently curved line, darker or brighter than the surface
    crack            thin dark random walk with one or two branches
    hole             dark ellipse with a shadowed rim
    stain            Perlin-noise blob tinted with the palette colour most unlike the surface
    cut_paste        a flipped, recoloured patch of the same image pasted elsewhere (CutPaste)
    foreign_texture  Perlin-noise blob filled with another photo (grass, coffee, Hubble; DRAEM-like)
    missing_part     part of the object replaced by the background (objects only)
    hemorrhage       dark red irregular blob (retina)
    exudate          cluster of small bright yellow spots (retina)
    dense_nuclei     cluster of dark hematoxylin-coloured nuclei (tissue)
    necrosis         pale irregular region (tissue)

Sizes (per category): smoke = 4 train/good, 5 test/good, 6 anomalous at 256 px; small = 20/20/24 at
256 px; full = 100/50/60 at 512 px; or "TRAIN,GOOD,ANOMALOUS[,PX]". Anomalous images cycle through
the category's defect types. Every image has its own random stream keyed by (seed, domain,
category, split, index), so the same seed gives byte-identical files, and a smaller size at the same
resolution is a prefix of a larger one.

`ensure_synthetic(root)` generates once and reuses a complete copy (checked against a stamp with
the hash of every file); notebooks and `zsad evaluate` call it. `zsad data synth` is the CLI.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .layout import DataError, sha256_file, tree_sha256, write_bytes_atomic, write_png
from .manifest import SCHEMA_VERSION, check_manifest

SYNTH_VERSION = 1  # bump when the generated pixels change; stamps of older copies then mismatch
STAMP_NAME = "zsad_synth_stamp.json"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_ROOT = REPO_ROOT / "data" / "synthetic"  # git-ignored


@dataclass(frozen=True)
class SizeSpec:
    train_good: int
    test_good: int
    test_anomalous: int
    image_px: int


SIZES = {"smoke": SizeSpec(4, 5, 6, 256), "small": SizeSpec(20, 20, 24, 256), "full": SizeSpec(100, 50, 60, 512)}


def parse_size(size: str | SizeSpec) -> tuple[str, SizeSpec]:
    """'smoke' | 'small' | 'full' | 'TRAIN,GOOD,ANOMALOUS[,PX]' -> (name, spec)."""
    if isinstance(size, SizeSpec):
        return f"{size.train_good},{size.test_good},{size.test_anomalous},{size.image_px}", size
    if size in SIZES:
        return size, SIZES[size]
    try:
        numbers = [int(x) for x in str(size).split(",")]
        if len(numbers) == 3:
            numbers.append(256)
        spec = SizeSpec(*numbers)
    except (ValueError, TypeError):
        raise DataError(f"size {size!r}: use smoke, small, full or TRAIN,GOOD,ANOMALOUS[,PX] (e.g. 8,6,6,256)") from None
    if min(numbers[:3]) < 0 or spec.test_good + spec.test_anomalous == 0 or not 64 <= spec.image_px <= 2048:
        raise DataError(f"size {size!r}: counts must be >= 0 with at least one test image, and 64 <= PX <= 2048")
    return f"{spec.train_good},{spec.test_good},{spec.test_anomalous},{spec.image_px}", spec


# ============================================================================ noise and drawing helpers
def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def coords(px: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in pixels, float32 [px, px] each."""
    y, x = np.mgrid[0:px, 0:px].astype(np.float32)
    return y + 0.5, x + 0.5


def perlin(px: int, periods: int, rng: np.random.Generator, periods_x: int | None = None) -> np.ndarray:
    """Gradient (Perlin) noise with `periods` lattice cells down the image (`periods_x` across,
    default the same); values about [-0.7, 0.7]."""
    periods_x = periods_x or periods
    angles = rng.uniform(0, 2 * np.pi, (periods + 1, periods_x + 1))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    ty = (np.arange(px, dtype=np.float32) + 0.5) / px * periods
    tx = (np.arange(px, dtype=np.float32) + 0.5) / px * periods_x
    iy, ix = np.floor(ty).astype(int), np.floor(tx).astype(int)
    fy, fx = (ty - iy)[:, None], (tx - ix)[None, :]

    def corner(dy, dx):  # dot(gradient at lattice corner, offset from that corner)
        return gx[iy + dy][:, ix + dx] * (fx - dx) + gy[iy + dy][:, ix + dx] * (fy - dy)

    fade = lambda v: v * v * v * (v * (v * 6 - 15) + 10)  # noqa: E731 - Perlin's quintic smoothstep
    u, v = fade(fx), fade(fy)
    top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    return top + v * (bottom - top)


def fractal_noise(px: int, rng: np.random.Generator, periods: int = 4, octaves: int = 4) -> np.ndarray:
    """Sum of Perlin octaves (each twice as fine, half as strong), scaled to [0, 1]."""
    total = np.zeros((px, px), np.float32)
    for octave in range(octaves):
        total += perlin(px, periods * 2 ** octave, rng) * 0.5 ** octave
    return (total - total.min()) / max(float(total.max() - total.min()), 1e-6)


def tint(gray: np.ndarray, dark, light) -> np.ndarray:
    """Map a [0,1] gray image onto the colour ramp dark -> light: [H, W, 3]."""
    dark, light = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return dark + gray[..., None] * (light - dark)


def resize(array: np.ndarray, px: int) -> np.ndarray:
    """uint8 image -> float32 [0,1] at px x px (PIL bicubic: deterministic integer arithmetic)."""
    return np.asarray(Image.fromarray(array).resize((px, px), Image.BICUBIC), np.float32) / 255.0


@lru_cache(maxsize=None)
def skimage_photo(name: str) -> np.ndarray:
    """A sample photo that scikit-image ships inside its package (no download)."""
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)())


def random_crop(photo: np.ndarray, rng, fraction=(0.55, 0.8), rotate=True) -> np.ndarray:
    """A random square crop (side = fraction of the shorter side), randomly flipped (and rotated)."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(*fraction))
    y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = photo[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rotate:
        crop = np.rot90(crop, int(rng.integers(4)))
    return np.ascontiguousarray(crop)


def random_point(region: np.ndarray, rng, margin: float) -> tuple[float, float]:
    """A random pixel (y, x) of the region at least `margin` px from its border (or anywhere in it)."""
    from scipy.ndimage import distance_transform_edt

    inside = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1] >= margin
    candidates = np.flatnonzero(inside if inside.any() else region)
    y, x = np.unravel_index(candidates[rng.integers(len(candidates))], region.shape)
    return float(y) + 0.5, float(x) + 0.5


def stroke(points: np.ndarray, width: float, px: int) -> np.ndarray:
    """Mask of a polyline (points [N, 2] as y, x) drawn `width` px wide."""
    y, x = coords(px)
    mask = np.zeros((px, px), bool)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((y - y0) * dy + (x - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        mask |= (y - y0 - t * dy) ** 2 + (x - x0 - t * dx) ** 2 <= (width / 2) ** 2
    return mask


def walk(start, angle, steps: int, step: float, wiggle: float, rng) -> np.ndarray:
    """A random-walk polyline: `steps` segments, direction changing by N(0, wiggle) each step."""
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        y, x = points[-1]
        points.append((y + step * np.sin(angle), x + step * np.cos(angle)))
    return np.array(points, np.float32)


def ellipse(center, radii, angle: float, px: int) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside) around center (y, x) with semi-axes radii (a, b)."""
    y, x = coords(px)
    dy, dx = y - center[0], x - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2)


def blob(center, radius: float, rng, px: int, roughness: float = 0.5) -> np.ndarray:
    """An irregular blob: an ellipse whose border is pushed around by Perlin noise."""
    d = ellipse(center, (radius, radius * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), px)
    return (1 - d ** 2) + roughness * (fractal_noise(px, rng, periods=max(2, px // 40), octaves=3) - 0.5) > 0.25


def blend(image: np.ndarray, mask: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image with `target` inside the mask and unchanged outside (this is what makes masks exact)."""
    return np.where(mask[..., None], target, image), mask


# ============================================================================ normal images
@dataclass
class Normal:
    image: np.ndarray  # float32 [px, px, 3] in [0, 1]
    region: np.ndarray  # bool [px, px]: where defects may go (the object, or everything)
    background: np.ndarray | None = None  # what is behind the object (for missing_part)


def photo_texture(name: str, dark, light, rotate: bool):
    def make(rng, px):
        gray = resize(random_crop(skimage_photo(name), rng, rotate=rotate), px)
        gray = np.clip((gray - gray.mean()) * rng.uniform(0.9, 1.1) + gray.mean() + rng.uniform(-0.04, 0.04), 0, 1)
        return Normal(tint(gray, dark, light), np.ones((px, px), bool))
    return make


def wood(rng, px):
    y, x = coords(px)
    angle = rng.uniform(-0.15, 0.15)  # grain runs roughly horizontally
    u = (x * np.cos(angle) + y * np.sin(angle)) / px
    v = (-x * np.sin(angle) + y * np.cos(angle)) / px
    centre = rng.uniform(-1.6, -0.9)  # the trunk's axis lies beyond the board, so rings are long arcs
    r = np.sqrt((v - centre) ** 2 + (0.05 * (u - rng.uniform(0, 1))) ** 2)
    rings = (r * rng.uniform(16, 24) + 0.6 * fractal_noise(px, rng, 3, 3)) % 1.0
    latewood = rings ** 5  # thin dark band at the end of each ring
    streaks = perlin(px, max(8, px // 5), rng, periods_x=2)  # fine fibres along the grain
    image = tint(np.clip(latewood * 0.8 + 0.35 * streaks + 0.1, 0, 1), (0.84, 0.64, 0.42), (0.42, 0.25, 0.12))
    return Normal(image * rng.uniform(0.93, 1.05), np.ones((px, px), bool))


def fabric(rng, px):
    y, x = coords(px)
    period = px / rng.uniform(18, 24)  # thread width in px
    angle = rng.uniform(-0.06, 0.06)
    u = (x * np.cos(angle) + y * np.sin(angle)) / period
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period
    warp_jitter, weft_jitter = rng.normal(0, 0.05, 64), rng.normal(0, 0.05, 64)
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    warp_on_top = (iu + iv) % 2 == 0  # plain weave: warp and weft alternate over/under
    profile = np.where(warp_on_top, np.sin(np.pi * (u - iu)), np.sin(np.pi * (v - iv))) ** 0.7
    shade = profile * 0.75 + np.where(warp_on_top, warp_jitter[iu % 64], weft_jitter[iv % 64])
    shade += 0.08 * (fractal_noise(px, rng, max(8, px // 16), 2) - 0.5)
    return Normal(tint(np.clip(shade, 0, 1), (0.10, 0.14, 0.26), (0.50, 0.60, 0.80)), np.ones((px, px), bool))


def backdrop(rng, px) -> np.ndarray:
    """A light, slightly vignetted and noisy inspection-table background."""
    y, x = coords(px)
    r2 = ((y / px - 0.5) ** 2 + (x / px - 0.5) ** 2) * 2
    gray = 0.80 + rng.uniform(-0.03, 0.03) - 0.08 * r2 + 0.03 * (fractal_noise(px, rng, 4, 3) - 0.5)
    return tint(np.clip(gray, 0, 1), (0.0, 0.0, 0.0), (0.98, 0.98, 1.0))


def screw(rng, px):
    background = backdrop(rng, px)
    y, x = coords(px)
    theta = rng.uniform(0, 2 * np.pi)
    length, head_r, half_w = px * rng.uniform(0.50, 0.58), px * 0.085, px * 0.036
    cy, cx = px / 2 + rng.uniform(-0.05, 0.05) * px, px / 2 + rng.uniform(-0.05, 0.05) * px
    hy, hx = cy - np.sin(theta) * (length / 2 - head_r), cx - np.cos(theta) * (length / 2 - head_r)
    t = (x - hx) * np.cos(theta) + (y - hy) * np.sin(theta)  # along the axis, 0 at the head centre
    s = -(x - hx) * np.sin(theta) + (y - hy) * np.cos(theta)  # across the axis
    shaft_len = length - head_r
    pitch = px * 0.028
    saw = (t / pitch) % 1.0
    threaded = (t > head_r * 1.4) & (t < shaft_len - half_w)
    width = half_w * np.clip((shaft_len - t) / (2.5 * half_w), 0, 1)  # pointed tip
    width = width * np.where(threaded, 1.0 + 0.22 * np.abs(2 * saw - 1), 1.0)  # thread crests
    shaft = (t >= 0) & (t <= shaft_len) & (np.abs(s) <= width)
    rho = np.sqrt(t ** 2 + s ** 2)
    head = rho <= head_r
    slot_angle = rng.uniform(0, np.pi)
    slot = head & (np.abs(t * np.sin(slot_angle) - s * np.cos(slot_angle)) < head_r * 0.13) & (rho < head_r * 0.8)
    cyl = np.cos(np.clip(np.abs(s) / (half_w * 1.25), 0, 1) * np.pi / 2) ** 0.8  # round shaft shading
    shade = np.where(head, 0.35 + 0.55 * np.cos(np.clip(rho / head_r, 0, 1) * np.pi / 2),
                     0.30 + 0.55 * cyl - np.where(threaded, 0.18 * (saw < 0.3), 0.0))
    shade = np.where(slot, 0.12, shade)
    metal = tint(np.clip(shade, 0, 1), (0.05, 0.05, 0.06), (0.85, 0.86, 0.88))
    obj = head | shaft
    return Normal(np.where(obj[..., None], metal, background), obj, background)


def nut(rng, px):
    background = backdrop(rng, px)
    y, x = coords(px)
    cy, cx = px / 2 + rng.uniform(-0.05, 0.05) * px, px / 2 + rng.uniform(-0.05, 0.05) * px
    radius = px * rng.uniform(0.27, 0.31)
    phi = rng.uniform(0, np.pi / 3)
    dy, dx = y - cy, x - cx
    rho, ang = np.sqrt(dy ** 2 + dx ** 2), np.arctan2(dy, dx)
    apothem = radius * np.cos(np.pi / 6)
    hexagon = np.ones((px, px), bool)
    for k in range(6):  # inside all six half-planes
        a = phi + k * np.pi / 3
        hexagon &= dx * np.cos(a) + dy * np.sin(a) <= apothem
    hole_r = radius * 0.45
    obj = hexagon & (rho > hole_r)
    facet = np.round((ang - phi) / (np.pi / 3)) * (np.pi / 3) + phi  # the normal of each flat side
    shade = 0.55 + 0.22 * np.cos(facet - (-2.3))  # light from the top left
    shade = np.where(rho > apothem * 0.9, shade + 0.15, shade)  # chamfer
    shade = np.where(rho < hole_r * 1.35, 0.35 + 0.12 * np.sin(rho / (px * 0.006)), shade)  # inner thread
    metal = tint(np.clip(shade, 0, 1), (0.08, 0.07, 0.05), (0.78, 0.75, 0.68))
    return Normal(np.where(obj[..., None], metal, background), obj, background)


@lru_cache(maxsize=8)
def _retina_small(px: int) -> np.ndarray:
    size = int(px * 1.25)
    return np.asarray(Image.fromarray(skimage_photo("retina")).resize((size, size), Image.LANCZOS))


def retina(rng, px):
    from scipy.ndimage import binary_erosion

    photo = Image.fromarray(_retina_small(px))
    if rng.random() < 0.5:
        photo = photo.transpose(Image.FLIP_LEFT_RIGHT)  # left or right eye
    photo = photo.rotate(rng.uniform(0, 360), resample=Image.BICUBIC, fillcolor=(0, 0, 0))
    size = photo.size[0]
    side = int(size * rng.uniform(0.86, 0.95))
    y0 = int((size - side) / 2 + rng.uniform(-0.02, 0.02) * size)
    x0 = int((size - side) / 2 + rng.uniform(-0.02, 0.02) * size)
    crop = np.asarray(photo)[y0:y0 + side, x0:x0 + side]
    image = np.clip(resize(np.ascontiguousarray(crop), px) * rng.uniform(0.92, 1.08), 0, 1)
    fundus = binary_erosion(image.mean(axis=2) > 0.12, iterations=max(2, px // 32))  # not the black border
    return Normal(image, fundus)


def tissue(rng, px):
    image = resize(random_crop(skimage_photo("immunohistochemistry"), rng, fraction=(0.4, 0.6)), px)
    return Normal(np.clip(image * rng.uniform(0.95, 1.05, 3).astype(np.float32), 0, 1), np.ones((px, px), bool))


# ============================================================================ defects
# Each takes (image float [px,px,3], normal: Normal, rng) and returns (image, mask) with the image
# unchanged outside the mask. Sizes are fractions of the image side, so they scale with PX.
def scratch(image, normal, rng):
    px = image.shape[0]
    start = random_point(normal.region, rng, px * 0.1)
    line = walk(start, rng.uniform(0, 2 * np.pi), 12, px * rng.uniform(0.015, 0.028), 0.08, rng)
    mask = stroke(line, max(1.5, px / 256 * rng.uniform(1.6, 2.8)), px) & normal.region
    bright = image[mask].mean() < 0.45 if mask.any() else True
    return blend(image, mask, image * 0.35 + 0.6 if bright else image * 0.35)


def crack(image, normal, rng):
    px = image.shape[0]
    start = random_point(normal.region, rng, px * 0.12)
    trunk = walk(start, rng.uniform(0, 2 * np.pi), int(rng.integers(18, 28)), px * 0.011, 0.35, rng)
    width = max(1.5, px / 256 * 1.8)
    mask = stroke(trunk, width, px)
    for _ in range(int(rng.integers(1, 3))):
        fork = trunk[int(rng.integers(3, len(trunk) - 2))]
        mask |= stroke(walk(tuple(fork), rng.uniform(0, 2 * np.pi), int(rng.integers(6, 12)), px * 0.01, 0.4, rng),
                       width * 0.8, px)
    mask &= normal.region
    return blend(image, mask, image * 0.18)


def hole(image, normal, rng):
    px = image.shape[0]
    radius = px * rng.uniform(0.035, 0.06)
    centre = random_point(normal.region, rng, radius * 1.3)
    d = ellipse(centre, (radius, radius * rng.uniform(0.7, 1.0)), rng.uniform(0, np.pi), px)
    mask = (d < 1) & normal.region
    inside = tint(np.clip(d, 0, 1) ** 2, (0.03, 0.03, 0.03), (0.15, 0.13, 0.12))
    target = np.where((d > 0.78)[..., None], image * 0.45, inside)  # the shadowed rim
    return blend(image, mask, target)


STAIN_COLOURS = np.array([(0.12, 0.10, 0.07), (0.55, 0.26, 0.08), (0.80, 0.72, 0.22), (0.25, 0.35, 0.15)], np.float32)


def stain(image, normal, rng):
    px = image.shape[0]
    centre = random_point(normal.region, rng, px * 0.08)
    mask = blob(centre, px * rng.uniform(0.06, 0.10), rng, px) & normal.region
    local = image[mask].mean(axis=0) if mask.any() else image.mean(axis=(0, 1))
    colour = STAIN_COLOURS[np.argmax(((STAIN_COLOURS - local) ** 2).sum(axis=1))]  # the most visible colour
    alpha = rng.uniform(0.55, 0.75)
    return blend(image, mask, (1 - alpha) * image + alpha * colour)


def cut_paste(image, normal, rng):
    px = image.shape[0]
    h, w = (int(px * rng.uniform(0.12, 0.2)) for _ in range(2))
    sy, sx = rng.integers(0, px - h + 1), rng.integers(0, px - w + 1)
    patch = image[sy:sy + h, sx:sx + w][::-1, ::-1] if rng.random() < 0.5 else image[sy:sy + h, sx:sx + w][::-1]
    patch = np.clip(patch * rng.uniform(0.8, 1.2) + rng.normal(0, 0.12, 3).astype(np.float32), 0, 1)
    cy, cx = random_point(normal.region, rng, max(h, w) / 2)
    ty = int(np.clip(cy - h / 2, 0, px - h))
    tx = int(np.clip(cx - w / 2, 0, px - w))
    target = image.copy()
    target[ty:ty + h, tx:tx + w] = patch
    mask = np.zeros((px, px), bool)
    mask[ty:ty + h, tx:tx + w] = True
    return blend(image, mask & normal.region, target)


FOREIGN_PHOTOS = ("grass", "coffee", "hubble_deep_field")


def foreign_texture(image, normal, rng):
    px = image.shape[0]
    centre = random_point(normal.region, rng, px * 0.1)
    d = ellipse(centre, (px * rng.uniform(0.09, 0.14),) * 2, 0.0, px)
    noise = fractal_noise(px, rng, periods=max(2, px // 48), octaves=3)
    mask = (noise * 0.7 + (1 - d ** 2) > 0.75) & (d < 1) & normal.region
    photo = skimage_photo(FOREIGN_PHOTOS[int(rng.integers(len(FOREIGN_PHOTOS)))])
    other = resize(random_crop(photo, rng, fraction=(0.3, 0.5)), px)
    other = tint(other, (0.1, 0.25, 0.05), (0.6, 0.85, 0.4)) if other.ndim == 2 else other[..., :3]
    beta = rng.uniform(0.6, 0.85)
    return blend(image, mask, (1 - beta) * image + beta * other)


def missing_part(image, normal, rng):
    """Cut a disc off the far end of the object in a random direction; the background shows through."""
    px = image.shape[0]
    ys, xs = np.nonzero(normal.region)
    direction = rng.uniform(0, 2 * np.pi)
    far = np.argmax(ys * np.sin(direction) + xs * np.cos(direction))
    radius = px * rng.uniform(0.07, 0.11)
    centre = (ys[far] + 0.5 - 0.4 * radius * np.sin(direction), xs[far] + 0.5 - 0.4 * radius * np.cos(direction))
    mask = (ellipse(centre, (radius, radius), 0.0, px) < 1) & normal.region
    return blend(image, mask, normal.background)


def lesion(colour, alpha, radius_range):
    def draw(image, normal, rng):
        px = image.shape[0]
        centre = random_point(normal.region, rng, px * 0.08)
        mask = blob(centre, px * rng.uniform(*radius_range), rng, px, roughness=0.6) & normal.region
        return blend(image, mask, (1 - alpha) * image + alpha * np.asarray(colour, np.float32))
    return draw


def spots(colour, count_range, radius_range, spread, alpha):
    """A cluster of small ellipses around one centre (exudates, nuclei)."""
    def draw(image, normal, rng):
        px = image.shape[0]
        cy, cx = random_point(normal.region, rng, px * (spread + 0.03))
        mask = np.zeros((px, px), bool)
        for _ in range(int(rng.integers(*count_range))):
            r = px * rng.uniform(*radius_range)
            centre = (cy + rng.normal(0, px * spread / 2), cx + rng.normal(0, px * spread / 2))
            mask |= ellipse(centre, (r, r * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), px) < 1
        mask &= normal.region
        return blend(image, mask, (1 - alpha) * image + alpha * np.asarray(colour, np.float32))
    return draw


DEFECTS: dict[str, Callable] = {
    "scratch": scratch, "crack": crack, "hole": hole, "stain": stain, "cut_paste": cut_paste,
    "foreign_texture": foreign_texture, "missing_part": missing_part,
    "hemorrhage": lesion((0.32, 0.04, 0.03), 0.8, (0.03, 0.055)),
    "exudate": spots((0.98, 0.88, 0.42), (5, 11), (0.008, 0.016), 0.05, 0.85),
    "dense_nuclei": spots((0.16, 0.10, 0.36), (18, 31), (0.012, 0.02), 0.08, 0.85),
    "necrosis": lesion((0.93, 0.80, 0.84), 0.75, (0.07, 0.11)),
}


# ============================================================================ domains
@dataclass(frozen=True)
class Category:
    name: str
    make_normal: Callable
    defects: tuple[str, ...]
    source: str  # where the normal images come from (goes into the manifest)
    object_word: str = ""

    @property
    def word(self) -> str:
        return self.object_word or self.name


@dataclass(frozen=True)
class Domain:
    kind: str  # manifest domain: industrial | medical
    role: str
    categories: tuple[Category, ...]
    photos: tuple[str, ...]  # scikit-image photos used (normal images and foreign textures)


PHOTO_LICENSES = {
    "brick": "CC0 (CC0Textures Bricks25)", "gravel": "CC0 (CC0Textures Gravel04)", "grass": "CC0 (DeviantArt linolafett)",
    "coffee": "CC0 (Rachel Michetti)", "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 1.0 (Wikimedia, M. Haggstrom)", "immunohistochemistry": "no known copyright restrictions (CMMI)",
}
DOMAINS: dict[str, Domain] = {
    "synth_industrial_a": Domain("industrial", "Auxiliary TRAINING set of the smoke profile: train on its test split "
                                 "with all categories pooled (the ZSAD protocol), evaluate on synth_industrial_b.", (
        Category("brick", photo_texture("brick", (0.30, 0.12, 0.08), (0.88, 0.58, 0.46), rotate=False),
                 ("crack", "stain", "foreign_texture"), "skimage.data.brick() crops, tinted"),
        Category("wood", wood, ("scratch", "hole", "stain"), "procedural"),
        Category("screw", screw, ("scratch", "missing_part", "hole"), "procedural"),
    ), ("brick", "grass", "coffee", "hubble_deep_field")),
    "synth_industrial_b": Domain("industrial", "Zero-shot TEST target of the smoke profile (categories disjoint from "
                                 "synth_industrial_a).", (
        Category("gravel", photo_texture("gravel", (0.16, 0.15, 0.13), (0.88, 0.84, 0.76), rotate=True),
                 ("hole", "stain", "foreign_texture"), "skimage.data.gravel() crops, tinted"),
        Category("fabric", fabric, ("hole", "cut_paste", "stain"), "procedural"),
        Category("nut", nut, ("scratch", "missing_part", "crack"), "procedural"),
    ), ("gravel", "grass", "coffee", "hubble_deep_field")),
    "synth_medical": Domain("medical", "Medical-like zero-shot TEST target of the smoke profile.", (
        Category("retina", retina, ("hemorrhage", "exudate"), "skimage.data.retina(), rotated/flipped/zoomed"),
        Category("tissue", tissue, ("dense_nuclei", "necrosis"), "skimage.data.immunohistochemistry() crops"),
    ), ("retina", "immunohistochemistry")),
}
SPLIT_CODES = {"train_good": 0, "test_good": 1, "test_anomalous": 2}


def image_rng(seed: int, domain: str, category: str, split: str, index: int) -> np.random.Generator:
    """The random stream of one image; crc32 (not hash()) keeps it stable across Python runs."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), zlib.crc32(category.encode()),
                                  SPLIT_CODES[split], index])


def make_normal(category: Category, rng, px: int) -> Normal:
    normal = category.make_normal(rng, px)
    normal.image = to_uint8(normal.image).astype(np.float32) / 255.0  # what gets saved, so defects start from it
    return normal


def make_anomalous(category: Category, defect: str, rng, px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal uint8, anomalous uint8, mask bool) for one defect; redraws if a defect came out empty."""
    normal = make_normal(category, rng, px)
    for _ in range(10):
        image, mask = DEFECTS[defect](normal.image, normal, rng)
        if mask.sum() >= max(8, px * px // 4000):
            before = to_uint8(normal.image)
            return before, np.where(mask[..., None], to_uint8(image), before), mask
    raise RuntimeError(f"defect {defect} on {category.name}: empty mask 10 times (generator bug)")


def defect_counts(category: Category, n_anomalous: int) -> dict[str, int]:
    counts = {d: 0 for d in category.defects}
    for i in range(n_anomalous):
        counts[category.defects[i % len(category.defects)]] += 1
    return dict(sorted(counts.items()))


def domain_manifest(domain: str, size: str | SizeSpec = "smoke", seed: int = 0) -> dict:
    """The manifest of one generated domain (committed in data_manifests/ for smoke, seed 0)."""
    size_name, spec = parse_size(size)
    d = DOMAINS[domain]
    categories = {c.name: {"object_word": c.word, "object_word_source": "synthetic category name",
                           "train_good": spec.train_good, "test_good": spec.test_good,
                           "test_anomalous": spec.test_anomalous,
                           "defect_types": {k: v for k, v in defect_counts(c, spec.test_anomalous).items() if v}}
                  for c in sorted(d.categories, key=lambda c: c.name)}
    return check_manifest({
        "schema_version": SCHEMA_VERSION, "id": domain, "name": f"zsad synthetic {domain.removeprefix('synth_')}",
        "domain": d.kind, "homepage": None, "downloads": [],
        "license": {"id": "CC0-1.0 + no known restrictions (IHC)" if "immunohistochemistry" in d.photos
                          else "CC0-1.0 + public domain (NASA)",
                    "source": "scikit-image data docstrings: " + "; ".join(f"{p}: {PHOTO_LICENSES[p]}" for p in d.photos)
                              + ". Procedural images and all defects are generated by zsad_core.data.synth.",
                    "conflict": None},
        "zsad_role": d.role, "used_by": ["zsad smoke profile"],
        "layout": {"source": "generated by `zsad data synth` / zsad_core.data.synth.ensure_synthetic",
                   "splits": ["train", "test"], "normal_dir": "good", "image_extensions": [".png"],
                   "mask_dir": "ground_truth", "mask_names": ["{stem}_mask.png"], "pixel_masks": True,
                   "prepare": None, "raw_layout": None},
        "categories": categories,
        "counts_source": f"generator size '{size_name}' (anomalous images cycle through the defect types)",
        "mask_convention": "PNG 'L', 0 = normal, 255 = anomalous, same size as the image; exact: the generator "
                           "changes no pixel outside the mask",
        "image_size": {"value": spec.image_px, "confidence": "exact (generated)"},
        "notes": [f"{c.name}: {c.source}; defects {', '.join(c.defects)}" for c in d.categories],
        "sources": ["zsad_core/data/synth.py", "scikit-image " + _skimage_version()],
        "facts_file": None,
        "synthetic": {"generator": "zsad_core.data.synth", "version": SYNTH_VERSION, "size": size_name, "seed": seed,
                      "image_px": spec.image_px, "sources": {c.name: c.source for c in d.categories}},
    }, f"synthetic manifest {domain}")


def _skimage_version() -> str:
    from importlib.metadata import version

    return version("scikit-image")


def _tasks(domain: str, spec: SizeSpec):
    """Every file of one domain as (category, split, index, defect or None, relative path)."""
    for category in DOMAINS[domain].categories:
        for i in range(spec.train_good):
            yield category, "train_good", i, None, f"{category.name}/train/good/{i:03d}.png"
        for i in range(spec.test_good):
            yield category, "test_good", i, None, f"{category.name}/test/good/{i:03d}.png"
        seen: dict[str, int] = {}
        for i in range(spec.test_anomalous):
            defect = category.defects[i % len(category.defects)]
            k = seen[defect] = seen.get(defect, -1) + 1  # MVTec numbering restarts in every defect folder
            yield category, "test_anomalous", i, defect, f"{category.name}/test/{defect}/{k:03d}.png"


def generate_domain(folder: Path, domain: str, size: str | SizeSpec = "smoke", seed: int = 0,
                    progress: bool = False) -> None:
    """Write one domain (images, masks, manifest.json) into `folder`."""
    from tqdm.auto import tqdm

    _, spec = parse_size(size)
    px = spec.image_px
    tasks = list(_tasks(domain, spec))
    for category, split, index, defect, rel in tqdm(tasks, desc=domain, unit="img", disable=not progress, leave=False):
        rng = image_rng(seed, domain, category.name, split, index)
        if defect is None:
            write_png(folder / rel, to_uint8(make_normal(category, rng, px).image))
        else:
            _, image, mask = make_anomalous(category, defect, rng, px)
            write_png(folder / rel, image)
            mask_rel = rel.replace("/test/", "/ground_truth/", 1).removesuffix(".png") + "_mask.png"
            write_png(folder / mask_rel, mask.astype(np.uint8) * 255)
    manifest = domain_manifest(domain, size, seed)
    write_bytes_atomic(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def _stamp_key(size: str | SizeSpec, seed: int) -> dict:
    size_name, spec = parse_size(size)
    return {"generator_version": SYNTH_VERSION, "size": size_name, "spec": asdict(spec), "seed": seed}


def _is_ours(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("synthetic") is not None
    except (OSError, ValueError):
        return False


def generate(root: str | Path, size: str | SizeSpec = "smoke", seed: int = 0, domains=None,
             progress: bool = False, log=None) -> dict[str, Path]:
    """(Re)generate the domains under root (each written to a hidden folder, then renamed into place)
    and write the stamp. Refuses to replace a folder that is not a zsad synthetic dataset."""
    root = Path(root)
    domains = list(domains or DOMAINS)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise DataError(f"unknown synthetic domains {unknown}; known: {', '.join(DOMAINS)}")
    root.mkdir(parents=True, exist_ok=True)
    stamp = {**_stamp_key(size, seed), "domains": {}}
    for domain in domains:
        final = root / domain
        if final.exists() and not _is_ours(final):
            raise DataError(f"{final}: exists and is not a zsad synthetic dataset; choose another --out or move it")
        start = time.time()
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{domain}.", suffix=".partial"))  # unique per run
        try:
            generate_domain(partial, domain, size, seed, progress)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # only left if generation failed
        tree, files = tree_sha256(final)
        stamp["domains"][domain] = {"files": files, "tree_sha256": tree}
        if log:
            log(f"{domain}: {files} files in {time.time() - start:.1f} s -> {final}")
    write_bytes_atomic(root / STAMP_NAME, (json.dumps(stamp, indent=2) + "\n").encode())
    return {d: root / d for d in domains}


def stamp_matches(root: str | Path, size: str | SizeSpec = "smoke", seed: int = 0, domains=None) -> bool:
    """Whether root holds a complete, unmodified copy made with these settings (every file re-hashed)."""
    root = Path(root)
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if {k: stamp.get(k) for k in _stamp_key(size, seed)} != _stamp_key(size, seed):
        return False
    for domain in domains or DOMAINS:
        recorded = stamp.get("domains", {}).get(domain)
        if not recorded or not (root / domain).is_dir():
            return False
        tree, files = tree_sha256(root / domain)
        if (tree, files) != (recorded["tree_sha256"], recorded["files"]):
            return False
    return True


def ensure_synthetic(root: str | Path | None = None, size: str | SizeSpec = "smoke", seed: int = 0, domains=None,
                     progress: bool = False, log=None) -> dict[str, Path]:
    """Paths of the synthetic domains under root (default data/synthetic/ in the repository),
    generating them only if no complete copy with the same size, seed and generator version is there.
    Returns {domain: folder}; each folder holds its categories and manifest.json."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    if stamp_matches(root, size, seed, domains):
        return {d: root / d for d in (domains or DOMAINS)}
    if log:
        log(f"generating synthetic data ({parse_size(size)[0]}, seed {seed}) under {root}")
    return generate(root, size, seed, domains, progress, log)


def file_hashes(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under a folder (for determinism checks)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def plot_examples(domain_root: str | Path, per_category: int = 3):
    """A figure: one row per category, a normal image then `per_category` anomalous images with their
    mask outlined in red (for notebooks and the README)."""
    import matplotlib.pyplot as plt

    from .layout import Layout, discover_categories, scan_category

    domain_root = Path(domain_root)
    categories = discover_categories(domain_root)
    fig, axes = plt.subplots(len(categories), per_category + 1, figsize=(2.2 * (per_category + 1), 2.3 * len(categories)),
                             squeeze=False)
    for row, category in zip(axes, categories):
        scan = scan_category(domain_root, category, Layout(), ["test"])
        normal = [s for s in scan.samples if s.label == 0][:1]
        anomalous = [s for s in scan.samples if s.label == 1]
        by_defect = sorted(anomalous, key=lambda s: (s.path.stem, s.defect_type))[:per_category]  # one of each type first
        for ax, sample in zip(row, normal + by_defect):
            ax.imshow(Image.open(sample.path))
            if sample.mask_path is not None:
                ax.contour(np.asarray(Image.open(sample.mask_path)) > 0, levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{category}: {sample.defect_type}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig

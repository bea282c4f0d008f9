"""Deterministic scoring of shape images: attributes of one image, and a distance between two sets.

analyse() reads back what mini/shapes.py drew, and is meant to score generated
images, so it tolerates noise, blur, tinted backgrounds and stray specks:

* background: the median of the 2-pixel border (the shape covers less than
  half of it), named by the nearest background colour;
* foreground mask: pixels far from that median colour (threshold adapts to the
  image's contrast), reduced to its largest 4-connected component;
* colour: the palette entry nearest the median of the mask's confident core;
* shape: from where the mask sits in its bounding box: a triangle (apex up)
  has ~25% of its area in the top half of the box, a circle or square 50%;
  a square fills its box (~100%), a circle ~79%.

mmd2() is a kernel two-sample distance (unbiased squared MMD, Gaussian kernel)
on fixed hand-made features, so it needs no pretrained network and is
deterministic (no subsampling, no randomness).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mini.shapes import BACKGROUNDS, PALETTE

TRIANGLE_TOP_MAX = 0.38  # triangle if less of the mask than this is in the top half of its box
SQUARE_FILL_MIN = 0.88  # square if the mask fills more of its box than this
MIN_AREA = 16  # pixels; smaller foregrounds are read as "no object"
BORDER = 2

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), np.float64)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array(list(BACKGROUNDS.values()), np.float64)


@dataclass(frozen=True)
class Analysis:
    colour: str  # palette name, or "none"
    shape: str  # "circle" / "square" / "triangle", or "none"
    background: str  # nearest background name
    fill: float  # mask area / bounding-box area
    top_fraction: float  # share of the mask in the top half of its bounding box
    area: int  # mask pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
    foreground_rgb: tuple[float, float, float]  # median of the mask core
    background_rgb: tuple[float, float, float]  # median of the border


def _nearest(rgb: np.ndarray, table: np.ndarray, names: tuple[str, ...]) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _spread_along_rows(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each horizontal run of the mask takes the largest label found in it."""
    m = np.pad(mask, ((0, 0), (0, 1))).ravel()  # a False column keeps rows apart
    lab = np.pad(labels, ((0, 0), (0, 1))).ravel()
    run = np.cumsum(m & ~np.roll(m, 1)) * m  # run id per pixel, 0 off the mask
    best = np.zeros(run.max() + 1, labels.dtype)
    np.maximum.at(best, run, lab)
    return best[run].reshape(mask.shape[0], -1)[:, :-1] * mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component (numpy only, no scipy).

    Labels spread along whole row runs, then column runs, until stable: two
    sweeps for a convex shape, a few more for odd blobs.
    """
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        new = _spread_along_rows(_spread_along_rows(labels, mask).T, mask.T).T
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def analyse(image: np.ndarray) -> Analysis:
    img = np.asarray(image, np.float64)
    if img.shape[-1] != 3 or img.ndim != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    border = np.concatenate([img[:BORDER].reshape(-1, 3), img[-BORDER:].reshape(-1, 3),
                             img[:, :BORDER].reshape(-1, 3), img[:, -BORDER:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, _BG_RGB, _BG_NAMES)

    dist = np.sqrt(((img - bg) ** 2).sum(axis=-1))
    # Half-way between the background and the shape's colour (its 99th
    # percentile distance), but never below what noise reaches.
    contrast = np.percentile(dist, 99)
    mask = dist > max(0.5 * contrast, 40.0)
    if mask.sum() >= MIN_AREA:
        mask = _largest_component(mask)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Analysis("none", "none", background, 0.0, 0.0, area, (0, 0, 0, 0),
                        (float("nan"),) * 3, tuple(float(c) for c in bg))

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = area / ((y1 - y0) * (x1 - x0))
    # Pixels whose centre is in the top half; the middle row of an odd-height
    # box is split evenly.
    centre, mid = ys + 0.5, (y0 + y1) / 2
    top = float(((centre < mid) + 0.5 * (centre == mid)).sum()) / area
    if top < TRIANGLE_TOP_MAX:
        shape = "triangle"
    elif fill > SQUARE_FILL_MIN:
        shape = "square"
    else:
        shape = "circle"

    # Colour from the core (edges are blended with the background).
    core = mask & (dist >= 0.75 * contrast)
    fg = np.median(img[core if core.any() else mask], axis=0)
    colour = _nearest(fg, _PALETTE_RGB, _PALETTE_NAMES)
    return Analysis(colour, shape, background, float(fill), float(top), area,
                    (int(x0), int(y0), int(x1), int(y1)), tuple(float(c) for c in fg), tuple(float(c) for c in bg))


def _get(attrs: Any, name: str):
    return attrs[name] if isinstance(attrs, Mapping) else getattr(attrs, name)


def names_background(prompt: str) -> str | None:
    """The background a prompt asks for ("... on a white background"), or None if it names none."""
    words = prompt.lower().split()
    for i, w in enumerate(words[:-1]):
        if words[i + 1].startswith("background") and w in _BG_NAMES:
            return w
    return None


def attribute_hits(images: Iterable[np.ndarray], attrs: Iterable[Any],
                   prompts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per image: does the analysed colour / shape / both / background match? Boolean arrays.

    attrs: ShapeAttrs or mappings with 'colour' and 'shape' (e.g. a candidate
    set's assignments). 'background' is an array over the images whose prompt
    names a background (a prompt that names none leaves the model free to
    draw either); without prompts, over every image whose attrs carry one
    (reading back real renders). It is absent when no image qualifies.
    """
    found = [analyse(im) for im in images]
    attrs = list(attrs)
    if len(found) != len(attrs):
        raise ValueError(f"{len(found)} images but {len(attrs)} attribute sets")
    if not attrs:
        raise ValueError("no images to score")
    if prompts is not None and len(prompts) != len(attrs):
        raise ValueError(f"{len(prompts)} prompts but {len(attrs)} attribute sets")
    colour = np.array([f.colour == _get(a, "colour") for f, a in zip(found, attrs)])
    shape = np.array([f.shape == _get(a, "shape") for f, a in zip(found, attrs)])
    out = {"colour": colour, "shape": shape, "both": colour & shape}
    if prompts is not None:
        asked = [names_background(p) for p in prompts]
        bg = [f.background == b for f, b in zip(found, asked) if b is not None]
    else:
        try:
            bg = [f.background == _get(a, "background") for f, a in zip(found, attrs)]
        except (KeyError, AttributeError):
            bg = []
    if bg:
        out["background"] = np.array(bg)
    return out


def attribute_accuracy(images: Iterable[np.ndarray], attrs: Iterable[Any],
                       prompts: Sequence[str] | None = None) -> dict[str, float]:
    """Share of images whose analysed colour / shape / both (/ background) match; see attribute_hits.

    With prompts, 'background' is the share among the prompts that name one,
    and 'background_n' says how many those are.
    """
    hits = attribute_hits(images, attrs, prompts)
    out = {k: float(v.mean()) for k, v in hits.items()}
    if prompts is not None:
        out["background_n"] = float(len(hits.get("background", ())))
    return out


# --------------------------------------------------------------------------
# Distribution distance
# --------------------------------------------------------------------------

POOL = 8  # 64x64 -> 8x8 average pooling
POOL_WEIGHT = 2.0  # makes layout (position, size) count about as much as colour and edges
HIST_BINS = 8  # per channel: an 8x8x8 joint colour histogram
ORIENT_BINS = 8  # edge orientations over [0, pi)
BANDWIDTH = 0.5  # Gaussian kernel width, in feature units


def _histograms(bins: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-image histograms [n, k] of bin indices [n, ...], in one bincount."""
    n = len(bins)
    flat = (bins.reshape(n, -1) + k * np.arange(n)[:, None]).ravel()
    w = None if weights is None else weights.reshape(n, -1).ravel()
    return np.bincount(flat, weights=w, minlength=n * k).reshape(n, k).astype(np.float64)


def features(images: np.ndarray) -> np.ndarray:
    """Fixed features, float64 [n, 192 + 512 + 8]; chosen so that layout, colour
    and shape shifts all register (checked on renders), no learning involved.

    * layout: 8x8 average-pooled RGB in [0, 1], scaled so that the block's
      squared distance is POOL_WEIGHT^2 x the mean squared pooled difference;
    * colour: square root of the joint RGB histogram (Hellinger embedding,
      unit norm);
    * shape: square root of the histogram of edge orientations weighted by
      gradient magnitude (unit norm; all zeros for a flat image). A square
      has only 0 and 90 degree edges, a triangle 0 and +-63, a circle all.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % POOL or x.shape[2] % POOL:
        raise ValueError(f"expected uint8 images [n, H, W, 3] with H, W multiples of {POOL}, got {x.shape}")
    n, h, w, _ = x.shape
    pooled = x.reshape(n, POOL, h // POOL, POOL, w // POOL, 3).astype(np.float64).mean(axis=(2, 4)) / 255.0
    pooled = pooled.reshape(n, -1) * (POOL_WEIGHT / np.sqrt(POOL * POOL * 3))

    q = (x.astype(np.int64) * HIST_BINS) // 256  # bin per channel
    idx = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    hist = _histograms(idx, HIST_BINS ** 3) / (h * w)

    grey = x.astype(np.float64).mean(axis=-1)
    gx = grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]
    gy = grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]
    angle = np.mod(np.arctan2(gy, gx), np.pi)  # an edge and its reverse are one orientation
    obin = np.minimum((angle * (ORIENT_BINS / np.pi)).astype(np.int64), ORIENT_BINS - 1)
    orient = _histograms(obin, ORIENT_BINS, weights=np.hypot(gx, gy))
    orient /= np.maximum(orient.sum(axis=1, keepdims=True), 1e-12)
    return np.concatenate([pooled, np.sqrt(hist), np.sqrt(orient)], axis=1)


def _kernel_sum(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> float:
    """Sum of exp(-|a_i - b_j|^2 / (2 s^2)) over all pairs, in blocks to bound memory."""
    total = 0.0
    bb = (b * b).sum(axis=1)
    for i in range(0, len(a), chunk):
        ai = a[i:i + chunk]
        d2 = np.maximum((ai * ai).sum(axis=1)[:, None] + bb[None, :] - 2.0 * ai @ b.T, 0.0)
        total += float(np.exp(-d2 / (2 * BANDWIDTH ** 2)).sum())
    return total


def mmd2(images_a: np.ndarray, images_b: np.ndarray) -> float:
    """Unbiased squared MMD between two image sets, Gaussian kernel on features().

    Its expectation is 0 exactly when the two sets come from the same
    distribution (so a same-distribution estimate can be slightly negative),
    and it grows with any difference in layout, colour or edge statistics; at
    most 2. Deterministic: every pair is used, no subsampling. Sampling noise
    with 500 images per set is about +-0.0015. Needs at least 2 images per set.
    """
    fa, fb = features(images_a), features(images_b)
    m, n = len(fa), len(fb)
    if m < 2 or n < 2:
        raise ValueError("mmd2 needs at least 2 images in each set")
    # The diagonal of k(a, a) is exp(0) = 1: drop it for the unbiased estimate.
    kaa = (_kernel_sum(fa, fa) - m) / (m * (m - 1))
    kbb = (_kernel_sum(fb, fb) - n) / (n * (n - 1))
    kab = _kernel_sum(fa, fb) / (m * n)
    return kaa + kbb - 2 * kab

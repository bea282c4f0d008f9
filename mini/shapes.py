"""Synthetic text-image data for the mini demo: one filled shape per 64x64 image.

Every image is a pure function of its attributes (shape, colour, size,
position, background), and the attributes are drawn from a seed, so a dataset
is reproducible byte for byte. Colour and shape are the protected attributes of
the demo (device/schemas/shapes.json varies them); captions therefore write
them as plain words the schema can substitute.

Pure numpy: edges are anti-aliased by 4x4 supersampling, nothing else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
# Saturated and far apart in RGB (nearest pair, red/orange, is ~120 apart), and
# far from both backgrounds, so the analyser can tell them apart reliably.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 140, 0),
}
COLOURS = tuple(PALETTE)
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Side of the shape's bounding box in pixels: 30-70% of the image.
MIN_SIZE, MAX_SIZE = round(0.3 * IMAGE_SIZE), round(0.7 * IMAGE_SIZE)  # 19, 45
# Size words by bounding-box side: three equal bands of 9 pixels each.
SIZE_WORDS = ((27, "small"), (36, "medium"), (MAX_SIZE, "large"))

# Phrasings; {a} is the article agreeing with the word after it ("an orange").
TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "{a} {colour} {shape}",
    "a picture of a {size} {colour} {shape}",
    "{a} {colour} {shape} on a {background} background",
)

SPLITS = ("train", "heldout")
# A fixed 1/10 of the attribute space is reserved for the held-out split
# (decided by a hash of the attributes), so the splits never share an image
# whatever their sizes or seeds.
HELDOUT_BUCKETS = 10

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeAttrs:
    shape: str
    colour: str
    size: int  # side of the bounding box, pixels
    x: int  # left edge of the bounding box, pixels
    y: int  # top edge
    background: str

    @property
    def size_word(self) -> str:
        return next(word for top, word in SIZE_WORDS if self.size <= top)

    def key(self) -> str:
        return f"{self.shape},{self.colour},{self.size},{self.x},{self.y},{self.background}"

    @property
    def split(self) -> str:
        # blake2b, not hash(): Python salts str hashes per process.
        h = int.from_bytes(hashlib.blake2b(self.key().encode(), digest_size=8).digest(), "little")
        return "heldout" if h % HELDOUT_BUCKETS == 0 else "train"


def sample_attributes(rng: np.random.Generator) -> ShapeAttrs:
    """One sample, uniform over shape, colour, background, size and position (fully inside)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    x = int(rng.integers(0, IMAGE_SIZE - size + 1))
    y = int(rng.integers(0, IMAGE_SIZE - size + 1))
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return ShapeAttrs(shape, colour, size, x, y, background)


def coverage(attrs: ShapeAttrs) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float [64, 64]."""
    s, n = _SUPERSAMPLE, IMAGE_SIZE
    c = (np.arange(n * s) + 0.5) / s  # sub-pixel centres, in pixel units
    u, v = c[None, :], c[:, None]  # u: column (x), v: row (y)
    x, y, size = attrs.x, attrs.y, attrs.size
    if attrs.shape == "circle":
        r = size / 2
        inside = (u - x - r) ** 2 + (v - y - r) ** 2 <= r * r
    elif attrs.shape == "square":
        inside = (u >= x) & (u <= x + size) & (v >= y) & (v <= y + size)
    elif attrs.shape == "triangle":
        # Apex at the top centre, base along the bottom edge: half-width grows
        # by 1/2 pixel per row, so the triangle spans the whole box.
        inside = (v >= y) & (v <= y + size) & (np.abs(u - x - size / 2) <= (v - y) / 2)
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}")
    return inside.reshape(n, s, n, s).mean(axis=(1, 3))


def render(attrs: ShapeAttrs) -> np.ndarray:
    """The image of one sample: uint8 [64, 64, 3]."""
    cov = coverage(attrs)[..., None]
    fg = np.array(PALETTE[attrs.colour], np.float64)
    bg = np.array(BACKGROUNDS[attrs.background], np.float64)
    return np.rint(bg + (fg - bg) * cov).astype(np.uint8)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption(attrs: ShapeAttrs, template: int = 0) -> str:
    return TEMPLATES[template].format(
        a=article(attrs.colour), size=attrs.size_word, colour=attrs.colour,
        shape=attrs.shape, background=attrs.background,
    )


def captions(attrs: ShapeAttrs) -> list[str]:
    """Every phrasing of one sample."""
    return [caption(attrs, t) for t in range(len(TEMPLATES))]


def make_dataset(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, list[str], list[ShapeAttrs]]:
    """n samples of one split: (images uint8 [n,64,64,3], captions, attributes).

    Deterministic in (n, seed, split); the first k samples of make_dataset(n)
    are make_dataset(k). Each sample gets one phrasing, drawn with it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    caps, attrs = [], []
    while len(attrs) < n:
        a = sample_attributes(rng)
        template = int(rng.integers(len(TEMPLATES)))
        if a.split != split:  # rejection keeps the splits disjoint
            continue
        images[len(attrs)] = render(a)
        caps.append(caption(a, template))
        attrs.append(a)
    return images, caps, attrs

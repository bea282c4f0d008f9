"""Tests for the mini shapes dataset (mini/shapes.py), its analyser (mini/analyser.py)
and the shapes attribute schema (device/schemas/shapes.json)."""

import itertools
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mini.analyser import analyse, attribute_accuracy, features, mmd2
from mini.shapes import (
    BACKGROUNDS,
    COLOURS,
    MAX_SIZE,
    MIN_SIZE,
    PALETTE,
    SHAPES,
    TEMPLATES,
    ShapeAttrs,
    caption,
    captions,
    make_dataset,
    render,
    sample_attributes,
)
from obclip.device.oblivious import ObliviousTransform, TransformConfig

SCHEMA = Path(__file__).resolve().parents[1] / "device" / "schemas" / "shapes.json"
N = 300


@pytest.fixture(scope="module")
def train():
    return make_dataset(N, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return make_dataset(N, seed=0, split="heldout")


def _noisy(images, sigma=10.0, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(images + rng.normal(0, sigma, images.shape)), 0, 255).astype(np.uint8)


def _blur3(images):
    p = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    return np.rint(sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9).astype(np.uint8)


def words(text):
    return re.findall(r"[a-z]+", text.lower())


# ---------------------------------------------------------------- dataset


def test_same_seed_same_bytes(train):
    images, caps, attrs = make_dataset(N, seed=0)
    assert images.dtype == np.uint8 and images.shape == (N, 64, 64, 3)
    assert images.tobytes() == train[0].tobytes()
    assert caps == train[1] and attrs == train[2]
    # A prefix of a larger dataset is the smaller one.
    assert make_dataset(10, seed=0)[0].tobytes() == train[0][:10].tobytes()
    assert make_dataset(10, seed=1)[0].tobytes() != train[0][:10].tobytes()


def test_heldout_disjoint_from_train(train, heldout):
    assert {a.split for a in train[2]} == {"train"}
    assert {a.split for a in heldout[2]} == {"heldout"}
    assert not set(train[2]) & set(heldout[2])
    # Different seeds of the training split never reach the held-out split either.
    assert not set(make_dataset(200, seed=7)[2]) & set(heldout[2])
    train_bytes = {im.tobytes() for im in train[0]}
    assert not any(im.tobytes() in train_bytes for im in heldout[0])


def test_attributes_cover_the_space(train):
    attrs = train[2]
    assert {a.shape for a in attrs} == set(SHAPES)
    assert {a.colour for a in attrs} == set(COLOURS)
    assert {a.background for a in attrs} == set(BACKGROUNDS)
    for a in attrs:
        assert MIN_SIZE <= a.size <= MAX_SIZE
        assert 0 <= a.x <= 64 - a.size and 0 <= a.y <= 64 - a.size  # fully inside


def test_render_is_shape_on_background():
    a = ShapeAttrs("square", "blue", 20, 3, 5, "white")
    img = render(a)
    assert (img[5:25, 3:23] == PALETTE["blue"]).all()
    outside = np.ones((64, 64), bool)
    outside[5:25, 3:23] = False
    assert (img[outside] == BACKGROUNDS["white"]).all()


def test_captions_name_the_attributes(train):
    for cap, a in zip(*train[1:]):
        w = words(cap)
        assert a.colour in w and a.shape in w
    a = ShapeAttrs("circle", "red", 40, 0, 0, "white")
    assert caption(a, 0) == "a large red circle on a white background"
    assert len(captions(a)) == len(TEMPLATES) >= 3
    # Articles agree with the colour word that follows them.
    assert caption(replace(a, colour="orange"), 1) == "an orange circle"
    # Every phrasing is used.
    assert len({re.sub(r"\b(" + "|".join(COLOURS + SHAPES) + r")\b", "", c) for c in train[1]}) > len(TEMPLATES)


# ---------------------------------------------------------------- analyser


@pytest.mark.parametrize("corrupt", ["clean", "noise", "blur", "blur+noise"])
def test_analyser_reads_renders_exactly(heldout, corrupt):
    images = heldout[0]
    if "blur" in corrupt:
        images = _blur3(images)
    if "noise" in corrupt:
        images = _noisy(images)
    acc = attribute_accuracy(images, heldout[2])
    assert acc == {"colour": 1.0, "shape": 1.0, "both": 1.0, "background": 1.0}


def test_analyser_ignores_a_stray_speck():
    a = ShapeAttrs("triangle", "purple", 24, 30, 30, "black")
    img = render(a)
    img[2:4, 2:4] = PALETTE["yellow"]  # would stretch the bounding box if kept
    found = analyse(img)
    assert (found.shape, found.colour, found.background) == ("triangle", "purple", "black")
    assert found.bbox == analyse(render(a)).bbox


def test_analyser_on_blank_image():
    found = analyse(np.full((64, 64, 3), 255, np.uint8))
    assert (found.shape, found.colour, found.background) == ("none", "none", "white")


def test_accuracy_takes_mappings():
    img = render(ShapeAttrs("circle", "green", 30, 10, 10, "black"))
    acc = attribute_accuracy([img, img], [{"colour": "green", "shape": "circle"}, {"colour": "red", "shape": "circle"}])
    assert acc == {"colour": 0.5, "shape": 1.0, "both": 0.5}


# ---------------------------------------------------------------- distance


def test_distance_near_zero_for_same_distribution(train, heldout):
    other_seed = make_dataset(N, seed=1)[0]
    for images in (other_seed, heldout[0]):
        assert abs(mmd2(train[0], images)) < 0.005
    assert mmd2(train[0], heldout[0]) == mmd2(train[0], heldout[0])  # deterministic
    assert features(train[0][:4]).shape == (4, 192 + 512 + 8)


def test_distance_grows_under_shift(train, heldout):
    images, _, attrs = heldout
    shifted = {
        "all circles": np.stack([render(replace(a, shape="circle")) for a in attrs]),
        "all red": np.stack([render(replace(a, colour="red")) for a in attrs]),
        "noise": _noisy(images),
        "blur": _blur3(images),
        "washed out": np.rint(0.6 * images + 0.4 * images.mean(axis=-1, keepdims=True)).astype(np.uint8),
    }
    for name, x in shifted.items():
        assert mmd2(train[0], x) > 0.01, name
    assert mmd2(train[0], np.zeros_like(images)) > 0.5


# ---------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def transform():
    return ObliviousTransform(TransformConfig(schema_path=str(SCHEMA)))


def test_schema_values_are_the_dataset_space(transform):
    assert transform.schema.values("colour") == COLOURS
    assert transform.schema.values("shape") == SHAPES


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
def test_caption_expands_to_every_colour_shape_pair(transform, template):
    rng = np.random.default_rng(template)
    for _ in range(5):
        a = sample_attributes(rng)
        result = transform(caption(a, template))
        assert result.n == len(COLOURS) * len(SHAPES) == 18
        pairs = [(s["colour"], s["shape"]) for s in result.assignments]
        assert pairs == list(itertools.product(COLOURS, SHAPES))  # each exactly once, fixed order
        # Each candidate is the caption of the same image with that colour and shape.
        assert list(result.candidates) == [caption(replace(a, colour=c, shape=s), template) for c, s in pairs]
        assert pairs[result.real_index] == (a.colour, a.shape)
        for i, cand in enumerate(result.candidates[:3]):
            again = transform(cand)
            assert again.candidates == result.candidates and again.real_index == i


def test_colour_only_and_shape_only(transform):
    colour = transform("a picture of something orange on a white background")
    assert colour.n == 6 and list(colour.slots) == ["colour"]
    assert colour.candidates[0] == "a picture of something red on a white background"
    shape = transform("a large triangle on a black background")
    assert shape.n == 3 and list(shape.slots) == ["shape"]
    assert shape.candidates == tuple(f"a large {s} on a black background" for s in SHAPES)
    assert transform("a picture of a white background").n == 1  # backgrounds are not protected

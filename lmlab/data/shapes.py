"""A seeded generator of captioned pictures: two coloured shapes and the spatial relation between them,
"a red circle above a blue square", for training and testing image-to-text offline.

Every picture has a larger shape (the subject, named first) and a smaller one (the object), so a
picture has exactly one right caption. Sizes, positions, the gap between the shapes, the
off-axis offset and the colours are jittered; the background has a little noise. Colour-shape pairs
listed in `held_out` (the test's) and `val_held_out` (the validation split's) never appear in the
training split, so val and test can ask for combinations the model has never seen (compositional
generalisation, as in CLEVR's CoGenT split, Johnson et al. 2017); the two lists are disjoint, so a
recipe chosen on validation was not chosen on the test's pairs.

`unnamed` > 0 draws that share of the training shapes in a colour without a name (a random grey or
hue, written `*` in the caption: the decoder reads `<mask>` there and is not asked for the word), so
the shape has to be read from its outline whatever its colour. Such a hue keeps `unnamed_margin`
degrees from every colour held out with that shape, farther than the nearest named colour seen with
it (orange circles are 27 degrees from red ones): no unnamed shape is a held-out pair in disguise.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np

# eight hues about 30-60 degrees apart (red 0, orange 27, yellow 57, green 124, cyan 183, blue 229,
# purple 266, magenta 300)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (240, 130, 20), "yellow": (235, 225, 30), "green": (30, 190, 40),
    "cyan": (30, 215, 225), "blue": (40, 80, 250), "purple": (140, 50, 230), "magenta": (225, 40, 225)}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("above", "below", "to the left of", "to the right of")
SLOTS = ("colour", "shape", "relation", "colour2", "shape2")
# of the 32 colour-shape pairs, four (one per shape) are kept out of training for the test and four
# others for validation; every colour loses one shape, every shape two colours
HELD_OUT = (("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "cross"))
VAL_HELD_OUT = (("purple", "circle"), ("orange", "square"), ("magenta", "triangle"), ("cyan", "cross"))
UNNAMED = "*"  # the colour word of a shape drawn in an unnamed colour (training only)


@dataclass(kw_only=True)
class ShapesConfig:
    image_size: int = 32                      # the sizes below are for 32 pixels and scale with it
    big: tuple[float, float] = (5.0, 7.0)     # half-size range of the subject, in pixels
    small: tuple[float, float] = (3.0, 4.0)   # half-size range of the object
    gap: tuple[float, float] = (2.0, 8.0)     # free pixels between the two along the relation's axis
    offset: float = 4.0                       # the shapes' offset across that axis, up to this
    colour_jitter: int = 20                   # per channel, up to this
    noise: int = 12                           # background noise level (0-255)
    held_out: tuple[tuple[str, str], ...] = field(default_factory=lambda: HELD_OUT)
    val_held_out: tuple[tuple[str, str], ...] = field(default_factory=lambda: VAL_HELD_OUT)
    unnamed_margin: float = 45.0              # degrees of hue an unnamed colour keeps from a held-out one


def caption(colour: str, shape: str, relation: str, colour2: str, shape2: str) -> str:
    return f"a {colour} {shape} {relation} a {colour2} {shape2}"


def parse_caption(text: str) -> dict[str, str] | None:
    """The five slots of a caption (None if it does not have the generator's form)."""
    words = text.split()
    if len(words) < 7 or words[0] != "a":
        return None
    try:
        k = words.index("a", 1)
    except ValueError:
        return None
    rel, second = " ".join(words[3:k]), words[k + 1:]
    if len(second) != 2:
        return None
    return dict(zip(SLOTS, (words[1], words[2], rel, *second)))


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)   # same area as the circle, about
    if shape == "triangle":  # pointing up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        t = r / 3
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape '{shape}'")


def seen_pairs(cfg: ShapesConfig) -> list[tuple[str, str]]:
    """The colour-shape pairs of the training split."""
    out = set(cfg.held_out) | set(cfg.val_held_out)
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in out]


def _hue(rgb: tuple[int, int, int]) -> float:
    return 360 * colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0]


def _unnamed_colour(shape: str, rng: np.random.Generator, cfg: ShapesConfig) -> np.ndarray:
    """A grey (a quarter of the time) or a random hue, away from every colour held out with `shape`."""
    if rng.random() < 0.25:
        return np.full(3, rng.integers(70, 256))
    avoid = [_hue(COLOURS[c]) for c, s in (*cfg.held_out, *cfg.val_held_out) if s == shape]
    while True:
        h = rng.uniform(0, 360)
        if all(min(abs(h - a), 360 - abs(h - a)) > cfg.unnamed_margin for a in avoid):
            break
    rgb = colorsys.hsv_to_rgb(h / 360, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    return np.rint(np.array(rgb) * 255).astype(np.int64)


def generate(n: int, seed: int, *, unseen: tuple[tuple[str, str], ...] = (), unnamed: float = 0.0,
             cfg: ShapesConfig | None = None) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """`n` pictures (uint8 [n, S, S, 3]), their captions and slots, from the training pairs
    (`seen_pairs`); given `unseen` pairs, at least one of the two shapes is one of those. `unnamed`: the
    chance that a shape is drawn in an unnamed colour (its colour slot `UNNAMED`)."""
    cfg = cfg or ShapesConfig()
    rng = np.random.default_rng(seed)
    S = cfg.image_size
    k = S / 32  # sizes and distances are given for 32-pixel pictures
    big, small, gap, offset = (tuple(k * x for x in r) for r in (cfg.big, cfg.small, cfg.gap, (cfg.offset,)))
    if 2 * (big[0] + small[0] + gap[0]) + 4 > S:
        raise ValueError(f"pictures of {S} pixels are too small for two shapes")
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    seen = seen_pairs(cfg)
    images = np.empty((n, S, S, 3), dtype=np.uint8)
    captions, slots = [], []
    for i in range(n):
        first, second = seen[rng.integers(len(seen))], seen[rng.integers(len(seen))]
        if unseen:  # an unseen pair as the subject, the object or both
            which = rng.integers(3)
            if which in (0, 2):
                first = unseen[rng.integers(len(unseen))]
            if which in (1, 2):
                second = unseen[rng.integers(len(unseen))]
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        r1, r2 = rng.uniform(*big), rng.uniform(*small)
        while True:  # a placement that fits (the first one almost always does)
            d = r1 + r2 + rng.uniform(*gap)
            o = rng.uniform(-offset[0], offset[0])
            v = {"above": (d, o), "below": (-d, o), "to the left of": (o, d), "to the right of": (o, -d)}[rel]
            lo = [max(r1 + 1, r2 + 1 - v[a]) for a in (0, 1)]
            hi = [min(S - 1 - r1, S - 1 - r2 - v[a]) for a in (0, 1)]
            if lo[0] < hi[0] and lo[1] < hi[1]:
                break
        cy, cx = rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])
        img = rng.integers(0, cfg.noise + 1, size=(S, S, 3)).astype(np.int16)
        names = []
        for (colour, shape), (y, x, r) in ((first, (cy, cx, r1)), (second, (cy + v[0], cx + v[1], r2))):
            if unnamed > 0 and rng.random() < unnamed:
                colour, rgb = UNNAMED, _unnamed_colour(shape, rng, cfg)
            else:
                rgb = np.array(COLOURS[colour])
            rgb = rgb + rng.integers(-cfg.colour_jitter, cfg.colour_jitter + 1, size=3)
            img[_mask(shape, yy, xx, y, x, r)] = rgb
            names.append(colour)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        s = dict(zip(SLOTS, (names[0], first[1], rel, names[1], second[1])))
        slots.append(s)
        captions.append(caption(*s.values()))
    return images, captions, slots

"""Procedurally drawn scenes: a few coloured shapes on a plain, slightly noisy background.

They stand in for real photos in the bundled tiny dataset, so every question asked
about an image has a known answer: each `Scene` carries its object list.

Scenes are drawn with PIL at `supersample` times the target size and box-filtered
down, which anti-aliases the edges, then per-pixel noise is added.  Scene `i` of a
split depends only on (seed, split, i): any subset can be regenerated on its own,
and train and test scenes come from different random streams.

Shapes and colours are drawn with unequal frequencies on purpose: POPE's "popular"
negatives ask about the categories most frequent in the data, which only means
something when some categories are more frequent than others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_WEIGHTS: Tuple[float, ...] = (0.45, 0.33, 0.22)

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 225),
    "yellow": (240, 210, 35),
}
COLOUR_WEIGHTS: Tuple[float, ...] = (0.35, 0.27, 0.23, 0.15)

POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom")

SPLIT_CODES = {"train": 0, "test": 1}

# Placement limits, as fractions of the image side.
_MIN_RADIUS, _MAX_RADIUS = 0.11, 0.16
_GAP = 0.04  # free space between two shapes
_MIN_OFFSET = 0.14  # a shape's centre is at least this far from the image centre ...
_MIN_AXIS_MARGIN = 0.06  # ... and clearly more along one axis, so its position is unambiguous
_MAX_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float  # centre, fraction of the width: 0 = left edge, 1 = right edge
    y: float  # centre, fraction of the height: 0 = top edge, 1 = bottom edge
    radius: float  # fraction of the image side; the shape fits in this circle

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def category(self) -> Tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def position(self) -> str:
        """'left'/'right'/'top'/'bottom': the side the centre leans to most."""
        dx, dy = self.x - 0.5, self.y - 0.5
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


@dataclass
class Scene:
    image: Image.Image  # RGB, image_size x image_size
    objects: Tuple[SceneObject, ...]

    @property
    def categories(self) -> set:
        return {o.category for o in self.objects}


def all_categories() -> Tuple[Tuple[str, str], ...]:
    """Every (colour, shape) pair, in a fixed order."""
    return tuple((c, s) for s in SHAPES for c in COLOURS)


def _place_objects(rng: np.random.Generator, num_objects: int) -> list:
    """Rejection-sample non-overlapping (x, y, r) with unambiguous positions."""
    placed = []
    for _ in range(_MAX_TRIES):
        if len(placed) == num_objects:
            break
        r = rng.uniform(_MIN_RADIUS, _MAX_RADIUS)
        x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        dx, dy = abs(x - 0.5), abs(y - 0.5)
        if max(dx, dy) < _MIN_OFFSET or abs(dx - dy) < _MIN_AXIS_MARGIN:
            continue
        if all(np.hypot(x - px, y - py) >= r + pr + _GAP for px, py, pr in placed):
            placed.append((float(x), float(y), float(r)))
    return placed


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, fill) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        h = r * 0.8  # half side; a square of half-side r would look much bigger than the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "triangle":
        # Equilateral, pointing up, centred; a little larger than the inscribed one
        # (still inside the gap) since a triangle covers less area than a circle.
        t = r * 1.1
        pts = [(cx + t * np.sin(a), cy - t * np.cos(a)) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def draw_scene(
    rng: np.random.Generator,
    image_size: int = 32,
    max_objects: int = 3,
    supersample: int = 4,
    noise_std: float = 4.0,
) -> Scene:
    """Draw one scene with 1..max_objects shapes, all random choices taken from `rng`."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1..3, got {max_objects}")
    num_objects = int(rng.integers(1, max_objects + 1))
    placements = _place_objects(rng, num_objects)
    assert placements, "the first shape always fits"

    colour_names = list(COLOURS)
    objects, seen = [], set()
    for x, y, r in placements:
        # Distinct (colour, shape) pairs, so "the red circle" always names one object.
        for _ in range(50):
            shape = SHAPES[rng.choice(len(SHAPES), p=SHAPE_WEIGHTS)]
            colour = colour_names[rng.choice(len(colour_names), p=COLOUR_WEIGHTS)]
            if (colour, shape) not in seen:
                break
        if (colour, shape) in seen:
            continue
        seen.add((colour, shape))
        objects.append(SceneObject(shape, colour, x, y, r))

    # Plain background: a random grey, slightly tinted, never close to a shape colour.
    grey = rng.uniform(80, 185)
    bg = tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
    side = image_size * supersample
    canvas = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        jitter = rng.integers(-12, 13, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[obj.colour], jitter))
        _draw_shape(draw, obj, side, fill)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)

    pixels = np.asarray(small, dtype=np.float32)  # [H, W, 3]
    pixels = pixels + rng.normal(0.0, noise_std, size=pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return Scene(image=image, objects=tuple(objects))


class SceneGenerator:
    """Scene `i` of a split is a pure function of (seed, split, i)."""

    def __init__(self, seed: int = 0, image_size: int = 32, split: str = "train", max_objects: int = 3):
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.split = split
        self.max_objects = int(max_objects)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_CODES[self.split], int(index)])

    def __call__(self, index: int) -> Scene:
        return draw_scene(self.rng(index), self.image_size, self.max_objects)

    def scenes(self, indices: Sequence[int]):
        for i in indices:
            yield self(i)

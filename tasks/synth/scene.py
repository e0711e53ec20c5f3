"""Scenes of coloured shapes: sampling, reference expressions and rendering.

Pure numpy + Pillow (no torch, datasets or lm-eval), so the training script can run it anywhere.
Every random choice comes from the ``numpy.random.Generator`` passed in, so a scene is a pure
function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64  # image side in pixels (the bundled model's input size)
SS = 4  # supersampling factor for anti-aliased drawing

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 60, 175),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "big")
RADIUS = {"small": (4.5, 5.5), "big": (8.5, 10.0)}  # half-extent in pixels at SIZE
MAX_OBJECTS = 5


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels at SIZE
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]

    def count(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> int:
        return sum(1 for o in self.objects if (color is None or o.color == color)
                   and (shape is None or o.shape == shape) and (size is None or o.size == size))


def sample_scene(rng: np.random.Generator, n_min: int = 1, n_max: int = MAX_OBJECTS,
                 force: list[dict] | None = None) -> Scene:
    """Up to ``n_max`` non-overlapping objects; ``force`` lists attribute dicts for the first ones."""
    n = int(rng.integers(n_min, n_max + 1))
    force = list(force or [])
    n = max(n, len(force))
    objs: list[Obj] = []
    for i in range(n):
        want = force[i] if i < len(force) else {}
        for _attempt in range(60):
            size = want.get("size") or SIZES[int(rng.integers(len(SIZES)))]
            lo, hi = RADIUS[size]
            r = float(rng.uniform(lo, hi))
            x = float(rng.uniform(r + 2, SIZE - r - 2))
            y = float(rng.uniform(r + 2, SIZE - r - 2))
            if all((x - o.x) ** 2 + (y - o.y) ** 2 >= (r + o.r + 3) ** 2 for o in objs):
                objs.append(Obj(
                    shape=want.get("shape") or SHAPES[int(rng.integers(len(SHAPES)))],
                    color=want.get("color") or list(COLORS)[int(rng.integers(len(COLORS)))],
                    size=size, x=x, y=y, r=r))
                break
        # objects that found no room are dropped; scenes stay valid with fewer objects
    if not objs:  # unreachable in practice (the first object always fits)
        objs.append(Obj("circle", "red", "big", SIZE / 2, SIZE / 2, 9.0))
    bg = tuple(int(v) for v in np.clip(np.array([236, 234, 226]) + rng.integers(-14, 15, 3), 0, 255))
    return Scene(objects=tuple(objs), background=bg)  # type: ignore[arg-type]


# ---------------------------------------------------------------- reference expressions
_DESC_ORDER = (("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"),
               ("size", "color"), ("size", "color", "shape"))


def _matches(o: Obj, attrs: dict[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in attrs.items())


def describe(scene: Scene, target: Obj, exclude: tuple[str, ...] = (), rng=None) -> str | None:
    """Shortest unique noun phrase for ``target`` not using the attributes in ``exclude``.

    Returns e.g. "circle", "red shape", "big blue square", or None when no unique description exists.
    Among equally short descriptions one is picked at random (when ``rng`` is given).
    """
    options = []
    for keys in _DESC_ORDER:
        if any(k in exclude for k in keys):
            continue
        attrs = {k: getattr(target, k) for k in keys}
        if sum(_matches(o, attrs) for o in scene.objects) == 1:
            options.append(keys)
    if not options:
        return None
    shortest = min(len(k) for k in options)
    options = [k for k in options if len(k) == shortest]
    keys = options[int(rng.integers(len(options)))] if rng is not None else options[0]
    words = [getattr(target, k) for k in ("size", "color", "shape") if k in keys]
    if "shape" not in keys:
        words.append("shape")
    return " ".join(words)


# ---------------------------------------------------------------- rendering
def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill: tuple[int, int, int]) -> None:
    x, y, r = o.x * SS, o.y * SS, o.r * SS
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif o.shape == "square":
        s = r * 0.9
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x - r * 1.05, y + r * 0.85), (x + r * 1.05, y + r * 0.85)], fill=fill)
    elif o.shape == "cross":
        w = r * 0.38
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:  # pragma: no cover
        raise ValueError(o.shape)


POSITION_BINS = 8  # object centres are labelled in 8 columns and 8 rows of the image


def patch_labels(scene: Scene, grid: int, min_cover: float = 0.2) -> np.ndarray:
    """Per-patch class ids of the covering object on a ``grid`` x ``grid`` patch grid (0 = background).

    Rows: shape, colour, size, and the column and row (of ``POSITION_BINS``) of the object's centre,
    so that every patch of an object says where the whole object is (what the spatial questions
    compare). The object covering most of a patch (at least ``min_cover`` of it) labels the patch. A
    dense training signal for the vision tower (see scripts/train_tiny_llava.py); not part of any task.
    """
    idx = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    draw = ImageDraw.Draw(idx)
    for k, o in enumerate(scene.objects):
        _draw_obj(draw, o, k + 1)  # type: ignore[arg-type]
    a = np.asarray(idx)
    p = a.shape[0] // grid
    blocks = a.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
    out = np.zeros((5, grid * grid), dtype=np.uint8)
    for j, blk in enumerate(blocks):
        counts = np.bincount(blk, minlength=len(scene.objects) + 1)
        counts[0] = 0
        k = int(counts.argmax())
        if k and counts[k] >= min_cover * p * p:
            o = scene.objects[k - 1]
            col, row = (min(POSITION_BINS - 1, int(v * POSITION_BINS / SIZE)) + 1 for v in (o.x, o.y))
            out[:, j] = [SHAPES.index(o.shape) + 1, list(COLORS).index(o.color) + 1, SIZES.index(o.size) + 1,
                         col, row]
    return out


def render_hires(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene at SS x resolution (for crops), with per-object colour jitter."""
    img = Image.new("RGB", (SIZE * SS, SIZE * SS), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        base = np.array(COLORS[o.color])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
        _draw_obj(draw, o, fill)
    return img


def finish(img: Image.Image, rng: np.random.Generator, noise: float = 3.0) -> Image.Image:
    """Downsample to SIZE x SIZE and add a little sensor noise."""
    small = img.resize((SIZE, SIZE), Image.BOX)
    arr = np.asarray(small, dtype=np.float32)
    if noise > 0:
        arr = arr + rng.normal(0.0, noise, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    return finish(render_hires(scene, rng), rng)


# ---------------------------------------------------------------- photo-like degradations (VizWiz)
def mild_photo(img_hi: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An answerable "photo": slight blur, lighting change and noise."""
    img = img_hi
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 3.0))))
    small = img.resize((SIZE, SIZE), Image.BOX)
    arr = np.asarray(small, dtype=np.float32) * float(rng.uniform(0.75, 1.1))
    arr = arr + rng.normal(0.0, float(rng.uniform(2, 7)), arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def blurred(img_hi: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Heavily blurred: the shapes melt into blobs."""
    img = img_hi.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(6.0, 9.0)) * SS))
    return finish(img, rng, noise=4.0)


def dark(img_hi: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Nearly black: underexposed."""
    small = img_hi.resize((SIZE, SIZE), Image.BOX)
    arr = np.asarray(small, dtype=np.float32) * float(rng.uniform(0.04, 0.10))
    arr = arr + rng.normal(0.0, 2.5, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def crop_without(img_hi: Image.Image, scene: Scene, target: Obj, rng: np.random.Generator) -> Image.Image | None:
    """A zoomed-in crop that leaves ``target`` out of the frame, or None if no such crop is found."""
    for _ in range(40):
        side = float(rng.uniform(0.45, 0.7)) * SIZE
        x0 = float(rng.uniform(0, SIZE - side))
        y0 = float(rng.uniform(0, SIZE - side))
        # target's bounding box must be entirely outside the crop
        if (target.x + target.r < x0 or target.x - target.r > x0 + side
                or target.y + target.r < y0 or target.y - target.r > y0 + side):
            box = tuple(int(round(v * SS)) for v in (x0, y0, x0 + side, y0 + side))
            return finish(img_hi.crop(box), rng, noise=4.0)
    return None

"""Write a small, quickly learnable synthetic dataset in the official Cityscapes file layout."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torchvision.datasets import Cityscapes

CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster"),
          "test": ("berlin", "bielefeld")}
CLASSES = [c for c in Cityscapes.classes if c.id >= 0]  # "license plate" has id -1 and never appears in labelIds
BY_NAME = {c.name: c for c in CLASSES}
EVAL_CLASSES = [c for c in CLASSES if not c.ignore_in_eval]
OFFICIAL_COLOR = np.zeros((256, 3), np.uint8)
for _c in CLASSES:
    OFFICIAL_COLOR[_c.id] = _c.color

# (shape, height range as a fraction of image height, width/height range, placement).
# "ground" objects stand between the horizon and the ego vehicle, "air" objects float in the upper half.
OBJECTS = {
    "car": ("rect", (0.10, 0.20), (1.5, 2.5), "ground"), "truck": ("rect", (0.18, 0.30), (1.5, 2.2), "ground"),
    "bus": ("rect", (0.20, 0.32), (2.0, 3.0), "ground"), "train": ("rect", (0.20, 0.30), (3.0, 4.5), "ground"),
    "motorcycle": ("ellipse", (0.12, 0.20), (1.0, 1.6), "ground"),
    "bicycle": ("ellipse", (0.12, 0.20), (1.2, 1.8), "ground"),
    "person": ("ellipse", (0.18, 0.30), (0.35, 0.50), "ground"),
    "rider": ("ellipse", (0.18, 0.28), (0.45, 0.65), "ground"),
    "pole": ("rect", (0.35, 0.60), (0.06, 0.10), "ground"), "wall": ("rect", (0.10, 0.20), (1.5, 3.0), "ground"),
    "fence": ("rect", (0.06, 0.12), (2.0, 4.0), "ground"), "terrain": ("rect", (0.04, 0.10), (1.5, 4.0), "ground"),
    "vegetation": ("ellipse", (0.15, 0.35), (1.0, 2.5), "air"),
    "traffic light": ("rect", (0.10, 0.16), (0.40, 0.55), "air"),
    "traffic sign": ("ellipse", (0.09, 0.14), (0.9, 1.1), "air"),
    "static": ("ellipse", (0.05, 0.10), (0.8, 1.5), "ground"), "unlabeled": ("ellipse", (0.03, 0.08), (0.8, 1.5), "air"),
}
BAND_NAMES = ("sky", "building", "sidewalk", "road")
# Every evaluation class not covered by a band is drawn as an object, cycling over images so all show up quickly.
GUARANTEED = [c.name for c in EVAL_CLASSES if c.name not in BAND_NAMES]
GUARANTEED_PER_IMAGE = 8


def _render_palette(min_distance: float = 60.0) -> np.ndarray:
    """Official colours, except evaluation classes too close to another (e.g. bus/train) get a far one."""
    palette = OFFICIAL_COLOR.astype(np.float32)
    kept, clashing = [], []
    for c in EVAL_CLASSES:
        close = any(np.linalg.norm(palette[c.id] - palette[k]) < min_distance for k in kept)
        (clashing if close else kept).append(c.id)
    grid = np.stack(np.meshgrid(*[np.array([0, 64, 128, 192, 255])] * 3, indexing="ij"), -1).reshape(-1, 3)
    for class_id in clashing:
        distances = np.linalg.norm(grid[:, None, :] - palette[kept][None], axis=-1).min(axis=1)
        palette[class_id] = grid[distances.argmax()]
        kept.append(class_id)
    return palette


RENDER_COLOR = _render_palette()


def _ellipse_points(cx: float, cy: float, rx: float, ry: float, n: int = 16) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], -1)


def _draw(label, instance, polygons, name, polygon, mask, instance_counts):
    cls = BY_NAME[name]
    label[mask] = cls.id
    if cls.has_instances:  # official encoding: id * 1000 + running index of that class in the image
        instance[mask] = cls.id * 1000 + instance_counts.get(name, 0)
        instance_counts[name] = instance_counts.get(name, 0) + 1
    else:
        instance[mask] = cls.id
    h, w = label.shape
    clipped = np.clip(np.round(polygon), 0, [w - 1, h - 1]).astype(int)
    polygons.append({"label": name, "polygon": clipped.tolist()})


def _make_label_map(rng: np.random.Generator, h: int, w: int, image_index: int):
    """Street-like label map: sky / building skyline / sidewalk / road bands, ego vehicle, then objects."""
    label = np.zeros((h, w), np.uint8)
    instance = np.zeros((h, w), np.uint16)
    polygons, counts = [], {}
    yy, xx = np.mgrid[0:h, 0:w]
    xs = np.arange(w)

    # Skyline: piecewise-constant building heights; sidewalk edges are gently sloped lines (perspective).
    edges = np.sort(rng.integers(1, w, size=rng.integers(3, 8)))
    heights = rng.uniform(0.12, 0.35, size=len(edges) + 1) * h
    sky_bottom = heights[np.searchsorted(edges, xs, side="right")]
    building_bottom = rng.uniform(0.42, 0.52) * h + rng.uniform(-0.05, 0.05) * h * (xs / w - 0.5)
    sidewalk_bottom = building_bottom + rng.uniform(0.06, 0.12) * h
    boundaries = [np.zeros(w), sky_bottom, building_bottom, sidewalk_bottom, np.full(w, h)]
    sample_x = np.linspace(0, w - 1, 33)
    for name, top, bottom in zip(BAND_NAMES, boundaries[:-1], boundaries[1:]):
        upper = np.stack([sample_x, np.interp(sample_x, xs, top)], -1)
        lower = np.stack([sample_x, np.interp(sample_x, xs, bottom)], -1)[::-1]
        _draw(label, instance, polygons, name, np.concatenate([upper, lower]), (yy >= top) & (yy < bottom), counts)

    # Void pixels: ego-vehicle hood at the bottom, "out of roi" corners.
    hood_top = h * rng.uniform(0.88, 0.93)
    rx, ry = w * rng.uniform(0.5, 0.7), h - hood_top
    hood = ((xx - w / 2) / rx) ** 2 + ((yy - h) / ry) ** 2 <= 1
    _draw(label, instance, polygons, "ego vehicle", _ellipse_points(w / 2, h, rx, ry), hood, counts)
    corner = max(2, int(0.04 * h))
    for x0 in (0, w - corner):
        box = np.array([[x0, h - corner], [x0 + corner, h - corner], [x0 + corner, h], [x0, h]])
        roi_mask = np.zeros((h, w), bool)
        roi_mask[h - corner:, x0:x0 + corner] = True
        _draw(label, instance, polygons, "out of roi", box, roi_mask, counts)

    _draw_objects(rng, (label, instance, polygons, counts), (xx, yy), building_bottom.mean(), hood_top,
                  image_index)
    return label, instance, polygons


def _draw_objects(rng: np.random.Generator, canvas: tuple, grid: tuple, ground_top: float, hood_top: float,
                  image_index: int) -> None:
    """Objects on the street: random extras, then this image's guaranteed classes (canvas: label, instance,
    polygons, counts)."""
    label, instance, polygons, counts = canvas
    xx, yy = grid
    h, w = xx.shape
    # Random extras first, then the guaranteed classes largest-first so small objects are never fully hidden.
    extras = list(rng.choice(list(OBJECTS), size=rng.integers(3, 8)))
    start = image_index * GUARANTEED_PER_IMAGE
    guaranteed = [GUARANTEED[(start + k) % len(GUARANTEED)] for k in range(GUARANTEED_PER_IMAGE)]
    sampled = []
    for name in extras + guaranteed:
        shape, height_range, aspect_range, placement = OBJECTS[name]
        oh = max(2.0, rng.uniform(*height_range) * h)
        ow = max(2.0, oh * rng.uniform(*aspect_range))
        cx = rng.uniform(0, w)
        if placement == "ground":
            cy = rng.uniform(ground_top, hood_top) - oh / 2
        else:
            cy = rng.uniform(0.1, 0.45) * h
        sampled.append((name, shape, cx, cy, ow, oh))
    n_extra = len(extras)
    ordered = sampled[:n_extra] + sorted(sampled[n_extra:], key=lambda s: -s[4] * s[5])
    for name, shape, cx, cy, ow, oh in ordered:
        if shape == "ellipse":
            mask = ((xx - cx) / (ow / 2)) ** 2 + ((yy - cy) / (oh / 2)) ** 2 <= 1
            polygon = _ellipse_points(cx, cy, ow / 2, oh / 2)
        else:
            x0, x1 = int(round(cx - ow / 2)), int(round(cx + ow / 2))
            y0, y1 = int(round(cy - oh / 2)), int(round(cy + oh / 2))
            mask = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
            polygon = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)
        _draw(label, instance, polygons, name, polygon, mask, counts)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Noise with structures about `cell` pixels wide (bilinear upsampling of a coarse grid), unit std."""
    coarse = rng.normal(0.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(coarse, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + h,
                                                                                         cell:cell + w]


def _render_image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """A street photo's statistics on the label map: flat class colours with per-image brightness, smooth shading
    (sun, vignetting), class textures at a few scales (asphalt grain, foliage, facades), soft edges and mild
    sensor noise. A 2048x1024 frame compresses to about 2 MB of PNG, like a real Cityscapes frame; the colours
    keep the classes apart, so a small network still learns them."""
    h, w = label.shape
    scale = max(h, w) / 2048  # textures and blur follow the image size
    image = RENDER_COLOR[label] * rng.uniform(0.85, 1.15)
    shading = 1.0 + 0.12 * _smooth_noise(rng, h, w, max(4, int(256 * scale)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1.0 - 0.25 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    image *= (shading * vignette)[..., None]
    texture = sum(amp * _smooth_noise(rng, h, w, max(1, int(cell * scale)))
                  for amp, cell in ((7.0, 24), (5.0, 6), (2.0, 2)))
    strength = TEXTURE_STRENGTH[label]  # vegetation and road grain show, sky stays smooth
    image += (texture * strength)[..., None]
    blur = max(1, int(round(2 * scale))) * 2 + 1
    image = cv2.GaussianBlur(image, (blur, blur), 0)  # lens softness: edges are not one-pixel steps
    image += rng.normal(0.0, SENSOR_NOISE, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _texture_strengths() -> np.ndarray:
    strengths = np.ones(256, np.float32)
    for name, value in (("sky", 0.2), ("road", 1.2), ("vegetation", 2.0), ("terrain", 1.6), ("building", 1.3)):
        strengths[BY_NAME[name].id] = value
    return strengths


TEXTURE_STRENGTH = _texture_strengths()
SENSOR_NOISE = 1.1  # grey levels: mild; noise is what makes PNGs of photos large


def _write_one(job) -> None:
    out, split, split_index, i, height, width, seed = job
    # One generator per (seed, split, image): splits differ and images do not depend on split sizes.
    rng = np.random.default_rng([seed, split_index, i])
    cities = CITIES[split]
    city, sequence = cities[i % len(cities)], i // len(cities)
    stem = f"{city}_{sequence:06d}_000019"  # frame 19 is the annotated frame in the official data
    image_dir = out / "leftImg8bit" / split / city
    label_dir = out / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)

    label, instance, polygons = _make_label_map(rng, height, width, i)
    cv2.imwrite(str(image_dir / f"{stem}_leftImg8bit.png"), _render_image(rng, label)[..., ::-1])
    Image.fromarray(label, "L").save(label_dir / f"{stem}_gtFine_labelIds.png")
    color = np.concatenate([OFFICIAL_COLOR[label], np.full((height, width, 1), 255, np.uint8)], -1)
    Image.fromarray(color, "RGBA").save(label_dir / f"{stem}_gtFine_color.png")
    Image.fromarray(instance).save(label_dir / f"{stem}_gtFine_instanceIds.png")
    annotation = {"imgHeight": height, "imgWidth": width, "objects": polygons}
    (label_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(annotation))


def write_synthetic(out: str | Path, n_train: int = 24, n_val: int = 7, height: int = 256, width: int = 512,
                    seed: int = 0, n_test: int = 0, workers: int = 1) -> dict[str, int]:
    """returns {split: number_of_images}; `workers` processes write images in parallel (same files for any)."""
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    jobs = [(out, split, split_index, i, height, width, seed)
            for split_index, (split, n_images) in enumerate(counts.items()) for i in range(n_images)]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            pool.map(_write_one, jobs, chunksize=1)
    else:
        for job in jobs:
            _write_one(job)
    return counts

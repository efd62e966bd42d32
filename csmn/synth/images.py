"""Small JPEGs drawn with PIL: a category's visual signature, jittered per post."""

from __future__ import annotations

import colorsys
import io
import math
import random
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

from csmn.data import storage
from csmn.synth.vocabulary import CATEGORIES


@dataclass(frozen=True)
class ImageJob:
    """One file to write: where, what to draw (category and the post's own seed) and whether
    to break it."""

    uri: str
    seed: int
    category: int
    size: int
    quality: int
    broken: str | None


def _rgb(hue: float, lightness: float, saturation: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb((hue % 360) / 360.0, min(max(lightness, 0), 1),
                                  min(max(saturation, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def _shift(colour: tuple[int, int, int], delta: Sequence[int]) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + d)) for c, d in zip(colour, delta, strict=True))
    return r, g, b


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    r, g, bl = (int(x + (y - x) * t) for x, y in zip(a, b, strict=True))
    return r, g, bl


def _polygon(cx: float, cy: float, radii: Sequence[float], angle: float) -> list[tuple]:
    n = len(radii)
    points = []
    for i, r in enumerate(radii):
        theta = angle + 2 * math.pi * i / n
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


@lru_cache(maxsize=4096)
def _texture_mask(kind: str, size: int, period: int, offset: int, variant: int) -> Image.Image:
    """A texture as an 'L' mask, cached: a few hundred distinct ones cover every image, and
    pasting a colour through a mask is far cheaper than drawing dozens of primitives."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = max(1, period // 3)
    if kind == "stripes_h":
        for y in range(-offset, size, period):
            draw.rectangle([0, y, size, y + width], fill=255)
    elif kind == "stripes_v":
        for x in range(-offset, size, period):
            draw.rectangle([x, 0, x + width, size], fill=255)
    elif kind == "diagonal":
        for k in range(-size - offset, size, period):
            draw.line([(k, size), (k + size, 0)], fill=255, width=width)
    elif kind == "dots":
        radius = max(1, period // 4)
        for y in range(offset, size, period):
            for x in range(offset, size, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    elif kind == "checker":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period + offset) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=255)
    elif kind == "grid":
        for k in range(offset, size, period):
            draw.line([(k, 0), (k, size)], fill=255, width=1)
            draw.line([(0, k), (size, k)], fill=255, width=1)
    elif kind == "waves":
        phase = 2 * math.pi * variant / 16
        amplitude = period / 3
        for y0 in range(offset, size, period):
            points = [
                (x, y0 + amplitude * math.sin(phase + 4 * math.pi * x / size))
                for x in range(0, size + 4, 4)
            ]
            draw.line(points, fill=255, width=width)
    elif kind == "rings":
        cx, cy = (variant % 4 + 0.5) * size / 4, (variant // 4 + 0.5) * size / 4
        for r in range(period, 2 * size, period):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
    return mask


def _paste_texture(image: Image.Image, kind: str, colour, rng: random.Random) -> None:
    if kind == "plain":
        return
    size = image.width
    period = max(4, size // rng.choice((6, 8, 10)))
    offset = rng.randrange(period)
    variant = rng.randrange(16) if kind in ("rings", "waves") else 0
    mask = _texture_mask(kind, size, period, offset, variant)
    image.paste(colour, box=(0, 0, size, size), mask=mask)


@lru_cache(maxsize=16)
def _gradient_mask(size: int) -> Image.Image:
    return Image.linear_gradient("L").resize((size, size))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, size: int, fg, bg, rng) -> None:
    r = rng.uniform(0.15, 0.32) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "ellipse":
        draw.ellipse([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=fg)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 4, angle * 0.2 + math.pi / 4), fill=fg)
    elif kind == "diamond":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.7] * 2, math.pi / 2), fill=fg)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, -math.pi / 2 + angle * 0.1), fill=fg)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.5] * 5, angle), fill=fg)
    elif kind == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=fg)
    elif kind == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif kind == "bars":
        w = r / 2
        for i in range(3):
            height = rng.uniform(0.5, 1.8) * r
            x0 = cx - 1.5 * w + i * w
            draw.rectangle([x0, cy + r - height, x0 + w * 0.8, cy + r], fill=fg)
    elif kind == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        dx = 0.45 * r
        draw.ellipse([cx - r + dx, cy - r - dx / 2, cx + r + dx, cy + r - dx / 2], fill=bg)
    elif kind == "heart":
        points = []
        for i in range(24):
            t = 2 * math.pi * i / 24
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x * r / 16, cy - y * r / 16))
        draw.polygon(points, fill=fg)
    elif kind == "zigzag":
        base = cy + r
        points = [(0, base)]
        for i in range(4):
            points.append(((i + 0.5) * size / 4, base - rng.uniform(0.8, 2.0) * r))
            points.append(((i + 1) * size / 4, base))
        points.append((size, size))
        points.append((0, size))
        draw.polygon(points, fill=fg)


def draw_image(category: int, seed: int, size: int) -> Image.Image:
    """The category's visual signature, jittered per post.

    Nothing in an image depends on its user or their niche: an image-only model (1NN-Im,
    CSMN-NoUC, section 5.2) must not be able to tell whose post it sees, or the user context
    would not be what personalizes. A per-user colour tint, as an earlier version drew, let
    CSMN-NoUC name the user's signature hashtags from the colour alone."""
    cat = CATEGORIES[category]
    rng = random.Random(seed)
    delta = [rng.randint(-12, 12) for _ in range(3)]
    top = _shift(_rgb(cat.hue, cat.lightness + 0.15, cat.saturation), delta)
    bottom = _shift(_rgb(cat.hue + 10, cat.lightness - 0.1, cat.saturation), delta)
    fg = _shift(_rgb(cat.hue + 180, 0.5 if cat.saturation else 0.1, cat.saturation + 0.2), delta)
    image = Image.composite(
        Image.new("RGB", (size, size), bottom), Image.new("RGB", (size, size), top),
        _gradient_mask(size),
    )
    _paste_texture(image, cat.texture, _mix(bottom, fg, 0.3), rng)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice((1, 1, 2))):
        _draw_shape(draw, cat.shape, size, fg, _mix(top, bottom, 0.5), rng)
    return image


def image_bytes(job: ImageJob) -> bytes | None:
    """The file content for an image job (None: the file is planted missing)."""
    if job.broken == "missing":
        return None
    if job.broken == "zero_byte":
        return b""
    if job.broken == "not_jpeg":
        return b"<html><body><h1>404 Not Found</h1></body></html>\n"
    buffer = io.BytesIO()
    draw_image(job.category, job.seed, job.size).save(
        buffer, format="JPEG", quality=job.quality
    )
    data = buffer.getvalue()
    if job.broken == "truncated":
        return data[: len(data) // 2]
    return data


def _write_image(job: ImageJob) -> bool:
    data = image_bytes(job)
    if data is None:
        return False
    storage.write_bytes(job.uri, data)
    return True


class ImageWriter:
    """Images through a thread pool, at most ``limit`` in flight (memory stays flat)."""

    def __init__(self, threads: int, limit: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                       thread_name_prefix="synth-img")
        self.pending: deque[Future] = deque()
        self.limit = limit
        self.written = 0

    def submit(self, job: ImageJob) -> None:
        self.pending.append(self.pool.submit(_write_image, job))
        while len(self.pending) > self.limit:
            self.written += self.pending.popleft().result()

    def close(self) -> None:
        try:
            while self.pending:
                self.written += self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

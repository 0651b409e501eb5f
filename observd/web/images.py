"""Pictures made on request for the dome page, cached until their source file changes.

The latest frame is shown with its calibration applied (bias, dark, flat: the masters
the pipeline chose, read from their archived versions), so clouds, focus and trails
look as the quality gate saw them; a stack is re-stretched from its FITS for the large
view; thumbnails are shrunk from the published PNGs so the page stays light even when
the stacks are 4k. Nothing here writes a file.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from io import BytesIO
from typing import Any

import numpy as np
from astropy.io import fits
from loguru import logger
from PIL import Image

from observd import render
from observd.catalog import Catalog
from observd.rawio import BadFrame, read_raw
from observd.reduce import calibrate, prepare

__all__ = ["ImageCache", "frame_png", "png_to_jpeg", "stack_png", "thumbnail_jpeg"]

STRETCHES = ("asinh", "linear", "sqrt", "zscale")
JPEG_QUALITY = 88


class ImageCache:
    """A small LRU of rendered pictures keyed by (what, source mtime, options), bounded
    in entries and in bytes.

    Single-flight: when the warm-up thread and a browser ask for the same picture at
    once, it is made once and the second caller waits for it.
    """

    def __init__(self, size: int = 64, max_bytes: int = 64 * 2**20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[Hashable, threading.Lock] = {}

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            making = self._making.setdefault(key, threading.Lock())
        with making:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            try:
                data = make()
            finally:
                with self._lock:
                    self._making.pop(key, None)
            with self._lock:
                self._items[key] = data
                self._bytes += len(data)
                while len(self._items) > 1 and (
                    len(self._items) > self.size or self._bytes > self.max_bytes
                ):
                    self._bytes -= len(self._items.popitem(last=False)[1])
        return data


def _mtime(path: str | os.PathLike[str]) -> int:
    return os.stat(path).st_mtime_ns


def _master_image(catalog: Catalog, master_id: int | None) -> tuple[dict | None, Any]:
    if not master_id:
        return None, None
    master = catalog.master(master_id)
    for path in (master.get("path"), master.get("current_path")):
        if path and os.path.exists(path):
            return master, fits.getdata(path, 0).astype(np.float32)
    return master, None


def _calibrated(catalog: Catalog, frame: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    """The light as the pipeline calibrated it (without cosmetics); raw on any trouble."""
    lights = catalog.lights("l.frame_id = ?", [frame["id"]])
    if not lights:
        return raw.astype(np.float32)
    light = lights[0]
    try:
        _, bias = _master_image(catalog, light.get("bias_id"))
        dark_row, dark = _master_image(catalog, light.get("dark_id"))
        if dark_row is not None and dark is not None:
            if dark_row["kind"] == "dark" and dark_row.get("exptime") and frame.get("exptime"):
                dark = dark * np.float32(frame["exptime"] / dark_row["exptime"])
            else:  # a dark-rate map: its scaling lives in calibration.py; leave it out
                dark = None
        _, flat = _master_image(catalog, light.get("flat_id"))
        shapes = {a.shape for a in (bias, dark, flat) if a is not None}
        if shapes - {raw.shape}:
            return raw.astype(np.float32)
        return calibrate(raw, prepare(bias, dark, flat), cosmic_factor=None).image
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("dome page: {} shown uncalibrated: {}", frame["path"], exc)
        return raw.astype(np.float32)


def frame_png(
    cache: ImageCache, catalog: Catalog, frame_id: int, max_size: int, fmt: str = "png"
) -> bytes:
    """A quick-look PNG of one frame (calibrated when it is a processed light).

    Raises
    ------
    LookupError
        No such frame, or its file is gone or unreadable (the page shows the reason).
    """
    try:
        frame = catalog.frame(frame_id)
    except Exception as exc:  # sqlite_utils NotFoundError
        raise LookupError(f"no frame {frame_id}") from exc
    path = frame["path"]
    try:
        key = ("frame", frame_id, _mtime(path), max_size, fmt)
    except OSError as exc:
        raise LookupError(f"{path}: {exc.strerror}") from None

    def make() -> bytes:
        try:
            raw = read_raw(path).data
        except (BadFrame, OSError) as exc:
            raise LookupError(f"{path}: {exc}") from None
        image = _calibrated(catalog, frame, raw) if frame["type"] == "light" else raw
        png = render.quicklook(image, max_size=max_size)
        return png_to_jpeg(png) if fmt == "jpeg" else png

    return cache.get(key, make)


def stack_png(cache: ImageCache, fits_path: str, stretch: str, q: float, max_size: int) -> bytes:
    """A stack re-stretched from its FITS: ``q`` is the sky's grey level (asinh) or
    the contrast (zscale); the other stretches take black/white from the data."""
    key = ("stack", fits_path, _mtime(fits_path), stretch, q, max_size)

    def make() -> bytes:
        with fits.open(fits_path, memmap=True) as hdul:
            image = np.asarray(hdul[0].data, dtype=np.float32)
        options: dict[str, float] = {}
        if stretch == "asinh":
            options["sky_grey"] = q
        elif stretch == "zscale":
            options["contrast"] = q
        return render.quicklook(image, max_size=max_size, method=stretch, **options)

    return cache.get(key, make)


def thumbnail_jpeg(cache: ImageCache, path: str, width: int) -> bytes:
    """A product PNG shrunk to ``width`` pixels wide (never enlarged), as a JPEG.

    JPEG because sky noise makes PNG thumbnails of deep stacks several times larger;
    the full PNG stays one click away.
    """
    path = os.path.realpath(path)
    key = ("thumb", path, _mtime(path), width)

    def make() -> bytes:
        with Image.open(path) as img:
            img.load()
            if img.width > width:
                height = max(1, round(img.height * width / img.width))
                img = img.resize((width, height), Image.Resampling.LANCZOS)
            return _jpeg(img)

    return cache.get(key, make)


def _jpeg(img: Image.Image) -> bytes:
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    buf = BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def png_to_jpeg(png: bytes) -> bytes:
    """Re-encode a PNG (a quick look) as a JPEG for the page."""
    with Image.open(BytesIO(png)) as img:
        img.load()
        return _jpeg(img)

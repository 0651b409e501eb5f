"""Calibrate a light: (light - bias - dark) / flat, with cosmetic correction.

The appliers of the masters that :mod:`observd.calibration` makes. Pixels that cannot
be trusted are not guessed at: saturated pixels, pixels under a dead flat and cosmic-ray
hits are returned in a mask (the stack leaves them out); hot pixels, which are known
from the dark-current map, are repaired from their neighbours so that star detection
and alignment do not see them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["Calibrated", "Masters", "calibrate", "cosmic_ray_mask", "prepare", "repair_pixels"]

F32 = np.float32


@dataclass
class Calibrated:
    """A calibrated light.

    Attributes
    ----------
    image : ndarray, float32
        In ADU (bias, dark and flat removed); masked pixels hold repaired values.
    mask : ndarray, bool
        True where the pixel must not be used: saturated, dead flat, cosmic ray.
    counts : dict
        How many pixels each correction touched.
    """

    image: np.ndarray
    mask: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Masters:
    """The masters of a light, combined once for all the lights that share them:
    ``offset`` = bias + dark (ADU), ``inverse_flat`` = 1 / flat (0 where the flat is
    dead), ``dead`` = where it is. Applying them is then one subtraction and one
    multiplication per light."""

    offset: np.ndarray | None = None
    inverse_flat: np.ndarray | None = None
    dead: np.ndarray | None = None
    dead_index: np.ndarray | None = None  # flat indices of ``dead`` (usually few)


def prepare(
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    *,
    min_flat: float = 0.05,
) -> Masters:
    """Combine the selected masters for :func:`calibrate`.

    Parameters
    ----------
    bias, dark, flat
        Master bias (ADU), bias-subtracted dark scaled to the light's exposure (ADU) and
        normalised flat; None skips the step (done upstream, or not available).
    min_flat
        Flat values below this (or not finite) are dead: masked, not divided by.
    """
    offset = None
    if bias is not None or dark is not None:
        offset = np.zeros_like(bias if bias is not None else dark, dtype=F32)
        for part in (bias, dark):
            if part is not None:
                offset += part
    inverse, dead, dead_index = None, None, None
    if flat is not None:
        dead = ~(flat >= min_flat)  # NaN counts as dead
        inverse = np.zeros(flat.shape, dtype=F32)
        np.divide(F32(1.0), flat, out=inverse, where=~dead)
        dead_index = np.flatnonzero(dead)
    return Masters(offset, inverse, dead, dead_index)


def calibrate(
    raw: np.ndarray,
    masters: Masters,
    *,
    hot: np.ndarray | None = None,
    saturation: float | None = 65535.0,
    cosmic_factor: float | None = 4.0,
) -> Calibrated:
    """Calibrate one light: (raw - bias - dark) / flat, with cosmetic correction.

    Parameters
    ----------
    raw
        The raw light (ADU, any numeric dtype); never modified.
    masters
        From :func:`prepare`.
    hot
        Hot-pixel map (bool) from the dark-rate master: repaired from neighbours.
    saturation
        Raw ADU at or above which a pixel is saturated (masked).
    cosmic_factor
        Mask pixels brighter than this many times their brightest neighbour above the
        sky (sharper than any star can be); None switches cosmic-ray masking off.

    Returns
    -------
    Calibrated
    """
    # one pass per step over the frame, in place: at 4096 px a float32 frame is 64 MB
    # and each pass costs ~10 ms of memory bandwidth
    image = np.empty(raw.shape, dtype=F32)  # a new array: raw frames are never touched
    if masters.offset is not None:
        np.subtract(raw, masters.offset, out=image, casting="unsafe")
    else:
        image[...] = raw
    mask = np.zeros(image.shape, dtype=bool)
    counts: dict[str, int] = {}
    if saturation is not None:
        np.greater_equal(raw, saturation, out=mask)
        counts["saturated"] = int(np.count_nonzero(mask))
    if masters.inverse_flat is not None:
        image *= masters.inverse_flat
        dead_index = masters.dead_index
        if dead_index is None:
            dead_index = np.flatnonzero(masters.dead)
        counts["dead_flat"] = int(dead_index.size)
        mask.ravel()[dead_index] = True
    if hot is not None:
        counts["hot"] = repair_pixels(image, hot)
    if cosmic_factor is not None:
        cosmics = cosmic_ray_mask(image, factor=cosmic_factor, exclude=mask)
        counts["cosmic"] = int(np.count_nonzero(cosmics))
        mask |= cosmics
    repair_pixels(image, mask)
    return Calibrated(image, mask, counts)


def repair_pixels(image: np.ndarray, bad: np.ndarray) -> int:
    """Replace bad pixels, in place, by the median of their good 3x3 neighbours.

    Works on the bad pixels' coordinates only (hot pixels are sparse), so the cost does
    not depend on the frame size. Returns the number repaired.
    """
    ny, nx = image.shape
    ys, xs = np.divmod(np.flatnonzero(bad), nx)  # several times faster than np.nonzero
    if ys.size == 0:
        return 0
    values = np.full((len(_NEIGHBOURS), ys.size), np.nan, dtype=F32)
    for k, (dy, dx) in enumerate(_NEIGHBOURS):
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
        good = inside & ~bad[yy, xx]
        values[k, good] = image[yy[good], xx[good]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all neighbours bad: NaN, handled
        fill = np.nanmedian(values, axis=0)
    lost = ~np.isfinite(fill)
    if lost.any():  # no good neighbour at all: the frame's typical value
        fill[lost] = _sky(image)[0]
    image[ys, xs] = fill
    return int(ys.size)


def cosmic_ray_mask(
    image: np.ndarray,
    *,
    factor: float = 4.0,
    nsigma: float = 6.0,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels sharper than a star can be: cosmic-ray hits.

    A pixel is a hit when it is ``nsigma`` above the sky and more than ``factor`` times
    as far above the sky as its brightest neighbour. A star sampled at FWHM >= 2 px has
    its peak at most ~2-3 times its neighbours; a single-pixel hit has neighbours at sky.
    The neighbours of a hit are added when they too stand out (hits spill over). Only
    the pixels above ``nsigma`` are examined (a few per cent of a frame), so the cost is
    about two passes over the image.
    """
    sky, sigma = _sky(image)
    bright = image > F32(sky + nsigma * sigma)
    if exclude is not None:
        bright &= ~exclude
    flat = np.flatnonzero(bright)
    hits = np.zeros(image.shape, dtype=bool)
    if flat.size == 0:
        return hits
    ny, nx = image.shape
    if flat.size > _DENSE_CANDIDATES * image.size:
        # many candidates (a bright nebula, a sky gradient the flat did not take out):
        # the brightest neighbour of every pixel in one OpenCV pass, whose cost does not
        # grow with their number (at the frame's border the pixel stands in for its
        # missing neighbours, as the clipped indices below do)
        ring = np.ones((3, 3), np.uint8)
        ring[1, 1] = 0
        img32 = np.ascontiguousarray(image, dtype=F32)
        limit = cv2.dilate(img32, ring, borderType=cv2.BORDER_REPLICATE)
        limit -= F32(sky)
        np.maximum(limit, F32(sigma), out=limit)
        limit *= F32(factor)
        limit += F32(sky)
        is_hit = img32.ravel()[flat] > limit.ravel()[flat]
        hy, hx = np.divmod(flat[is_hit], nx)
    else:
        ys, xs = np.divmod(flat, nx)
        above = image[ys, xs] - F32(sky)
        neighbours = np.full(ys.size, -np.inf, dtype=F32)
        for dy, dx in _NEIGHBOURS:
            yy, xx = np.clip(ys + dy, 0, ny - 1), np.clip(xs + dx, 0, nx - 1)
            np.maximum(neighbours, image[yy, xx] - F32(sky), out=neighbours)
        is_hit = above > factor * np.maximum(neighbours, F32(sigma))
        hy, hx = ys[is_hit], xs[is_hit]
    hits[hy, hx] = True
    for dy, dx in _NEIGHBOURS:  # spill-over: bright neighbours of a hit
        yy, xx = np.clip(hy + dy, 0, ny - 1), np.clip(hx + dx, 0, nx - 1)
        hits[yy, xx] |= bright[yy, xx]
    return hits


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
#: Above this fraction of candidate pixels, cosmic rays are found with whole-image passes.
_DENSE_CANDIDATES = 0.01


def _sky(image: np.ndarray) -> tuple[float, float]:
    """Sky level and noise from a subsample (robust: median and MAD)."""
    step = max(1, int(np.sqrt(image.size / 65_536)))
    sample = image[::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med))) * 1.4826
    return med, max(mad, 1e-6)

"""Calibrate a light: (light - bias - dark) / flat, with cosmetic correction.

The appliers of the masters that :mod:`observd.calibration` makes. Pixels that cannot
be trusted are not guessed at: saturated pixels, pixels under a dead flat and cosmic-ray
hits are returned in a mask (the stack leaves them out); hot pixels, which are known
from the dark-current map, are repaired from their neighbours so that star detection
and alignment do not see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from numba import njit, prange

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

    The full-frame work is two passes of compiled kernels (numba, both cores): one computes
    the image, the saturation mask and its count; one, after the hot pixels are repaired
    and the sky is known, lists the cosmic-ray candidates and the masked pixels. Everything
    else works on those lists (a few per cent of the frame at most). The first call in a
    process compiles the kernels (seconds, then cached on disk).

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
    raw = _kernel_input(raw)
    ny, nx = raw.shape
    image = np.empty(raw.shape, dtype=F32)  # a new array: raw frames are never touched
    mask = np.empty(raw.shape, dtype=bool)
    saturated = np.empty((ny, _words(nx)), dtype=np.uint64)
    use_hot = hot is not None
    hot_bits = np.empty_like(saturated) if use_hot else _DUMMY_WORDS
    offset = None if masters.offset is None else _operand(masters.offset, raw.shape)
    inverse = None if masters.inverse_flat is None else _operand(masters.inverse_flat, raw.shape)
    if use_hot:
        hot = _kernel_mask(hot, raw.shape)
    # the comparison numpy would make: float32 only for a float32 frame and a weak limit
    sat32 = saturation is not None and raw.dtype == F32 and np.result_type(raw, saturation) == F32
    _apply_kernel(
        raw,
        _DUMMY if offset is None else offset,
        _DUMMY if inverse is None else inverse,
        offset is not None,
        inverse is not None,
        np.nan if saturation is None else float(saturation),  # NaN: nothing is >= it
        sat32,
        hot if use_hot else _DUMMY_MASK,
        use_hot,
        image,
        mask,
        saturated,
        hot_bits,
    )
    bad = _bits_gather(saturated, nx, _DUMMY_MASK, False)
    counts: dict[str, int] = {}
    if saturation is not None:
        counts["saturated"] = int(bad.size)
    if inverse is not None:
        dead_index = masters.dead_index
        if dead_index is None:
            dead_index = np.flatnonzero(masters.dead)
        counts["dead_flat"] = int(dead_index.size)
        mask.ravel()[dead_index] = True
        if dead_index.size:
            bad = np.union1d(bad, dead_index)
    if use_hot:
        hot_index = _bits_gather(hot_bits, nx, _DUMMY_MASK, False)
        _repair_at(image, hot, hot_index)
        counts["hot"] = int(hot_index.size)
    sky = None
    if cosmic_factor is not None:
        sky = _sky(image)  # of the image as the repair below finds it, too
        hits = _cosmic_hits(image, cosmic_factor, 6.0, mask, sky)
        counts["cosmic"] = int(hits.size)
        mask.ravel()[hits] = True
        bad = np.concatenate([bad, hits])  # disjoint: the candidates exclude the mask
    _repair_at(image, mask, bad, sky)
    return Calibrated(image, mask, counts)


def repair_pixels(image: np.ndarray, bad: np.ndarray) -> int:
    """Replace bad pixels, in place, by the median of their good 3x3 neighbours.

    Works on the bad pixels' coordinates only (hot pixels are sparse), so the cost does
    not depend on the frame size. Returns the number repaired.
    """
    if np.ndim(image) != 2:
        raise ValueError(f"expected a 2-D image, not shape {np.shape(image)}")
    bad = _kernel_mask(bad, image.shape)
    flat = np.flatnonzero(bad)
    if flat.size:
        _repair_at(image, bad, flat)
    return int(flat.size)


def _repair_at(
    image: np.ndarray,
    bad: np.ndarray,
    flat: np.ndarray,
    sky: tuple[float, float] | None = None,
) -> None:
    """:func:`repair_pixels` for the bad pixels at ``flat`` (indices into ``image.ravel()``,
    all of them True in ``bad``). Every fill is computed before any is written; ``sky`` is
    ``_sky(image)`` when already known."""
    if flat.size == 0:
        return
    fill = _repair_kernel(image, _kernel_mask(bad, image.shape), flat.astype(np.int64, copy=False))
    lost = ~np.isfinite(fill)
    if lost.any():  # no good neighbour at all: the frame's typical value
        fill[lost] = (_sky(image) if sky is None else sky)[0]
    if image.flags.c_contiguous:
        image.ravel()[flat] = fill
    else:  # ravel() would be a copy
        image[np.divmod(flat, image.shape[1])] = fill


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
    about one pass over the image. The image is taken as float32 (as :func:`calibrate`
    makes it).
    """
    image = np.asarray(image, dtype=F32)
    hits = _cosmic_hits(image, factor, nsigma, exclude, _sky(image))
    mask = np.zeros(image.shape, dtype=bool)
    mask.ravel()[hits] = True
    return mask


def _cosmic_hits(
    image: np.ndarray,
    factor: float,
    nsigma: float,
    exclude: np.ndarray | None,
    sky: tuple[float, float],
) -> np.ndarray:
    """Flat indices of the cosmic-ray hits, sorted (see :func:`cosmic_ray_mask`);
    ``sky`` is ``_sky(image)``."""
    sky, sigma = sky
    threshold = F32(sky + nsigma * sigma)
    ny, nx = image.shape
    use_exclude = exclude is not None
    exclude = np.broadcast_to(_kernel_mask(exclude), image.shape) if use_exclude else _DUMMY_MASK
    above = np.empty((ny, _words(nx)), dtype=np.uint64)
    _above_kernel(image, threshold, above)
    flat = _bits_gather(above, nx, exclude, use_exclude)
    if flat.size == 0:
        return _EMPTY_INDEX
    if flat.size > _DENSE_CANDIDATES * image.size:
        # many candidates (a bright nebula, a sky gradient the flat did not take out):
        # the brightest neighbour of every pixel in one OpenCV pass, whose cost does not
        # grow with their number (at the frame's border the pixel stands in for its
        # missing neighbours, as the clipped indices of the sparse test do)
        ring = np.ones((3, 3), np.uint8)
        ring[1, 1] = 0
        img32 = np.ascontiguousarray(image, dtype=F32)
        limit = cv2.dilate(img32, ring, borderType=cv2.BORDER_REPLICATE)
        limit -= F32(sky)
        np.maximum(limit, F32(sigma), out=limit)
        limit *= F32(factor)
        limit += F32(sky)
        is_hit = img32.ravel()[flat] > limit.ravel()[flat]
    else:
        # numpy's arithmetic: a Python float factor times float32 stays float32
        fac32 = np.result_type(F32, factor) == F32
        is_hit = _sparse_hits_kernel(image, flat, F32(sky), F32(sigma), float(factor), fac32)
    return _spill_kernel(image, exclude, use_exclude, threshold, flat[is_hit])


def _kernel_input(image: np.ndarray) -> np.ndarray:
    """The array as the kernels take it: native byte order, a numeric type they compile
    for (the values, and numpy's arithmetic on them, unchanged)."""
    image = np.asarray(image)
    if image.dtype == np.bool_:
        return image.view(np.uint8)
    if image.dtype == np.float16:
        return image.astype(F32)
    if not image.dtype.isnative:
        return image.astype(image.dtype.newbyteorder("="))
    return image


def _kernel_mask(mask: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A bool map for the kernels, of ``shape`` when given (which the kernels rely on:
    they do not check their indices)."""
    mask = np.asarray(mask)
    mask = mask if mask.dtype == np.bool_ else mask.astype(bool)
    if shape is not None and mask.shape != shape:
        raise ValueError(f"a map of shape {mask.shape} for a frame of shape {shape}")
    return mask


def _operand(master: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A master as the kernels take it: native byte order, the frame's shape (broadcast,
    as numpy would)."""
    master = _kernel_input(master)
    return master if master.shape == shape else np.broadcast_to(master, shape)


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
#: Above this fraction of candidate pixels, cosmic rays are found with whole-image passes.
_DENSE_CANDIDATES = 0.01
_DUMMY = np.zeros((1, 1), dtype=F32)
_DUMMY_MASK = np.zeros((1, 1), dtype=bool)
_DUMMY_WORDS = np.zeros((1, 1), dtype=np.uint64)
_EMPTY_INDEX = np.zeros(0, dtype=np.int64)
#: de Bruijn sequence and table: the index of a word's lowest set bit in two operations
_DEBRUIJN = np.uint64(0x03F79D71B4CB0A89)
_DEBRUIJN_INDEX = np.zeros(64, dtype=np.int64)
_DEBRUIJN_INDEX[[(int(_DEBRUIJN) << b) % 2**64 >> 58 for b in range(64)]] = np.arange(64)


def _words(nx: int) -> int:
    """64-bit words per row of a bit image (a set bit per pixel: 1/8 of a bool image,
    and 64 empty pixels are skipped at once)."""
    return -(-nx // 64)


# ------------------------------------------------------------------------------ kernels
# Compiled on first use (numba, cached on disk). No fastmath: the results are those of the
# numpy steps they replace, bit for bit. Differences of float32 values and their products
# are formed in float64 and rounded once to float32, which is exactly float32 arithmetic
# (53 >= 2 * 24 + 2 bits), and exactly what numpy does for wider raw types.


@njit(cache=True, nogil=True, parallel=True)
def _apply_kernel(raw, offset, inverse, use_offset, use_inverse, saturation, sat32, hot, use_hot,
                  image, mask, saturated, hot_bits):  # fmt: skip
    """image = (raw - offset) * inverse; mask = raw >= saturation, also as bits; the hot
    map as bits."""
    ny, nx = raw.shape
    for i in prange(ny):
        for w in range(saturated.shape[1]):
            j0 = w * 64
            sbits = np.uint64(0)
            hbits = np.uint64(0)
            if j0 + 64 <= nx:  # a whole word: a fixed count, which LLVM unrolls
                for b in range(64):
                    s = _apply_pixel(raw, offset, inverse, use_offset, use_inverse, saturation,
                                     sat32, image, mask, i, j0 + b)  # fmt: skip
                    sbits |= np.uint64(s) << np.uint64(b)
                    if use_hot:
                        hbits |= np.uint64(hot[i, j0 + b]) << np.uint64(b)
            else:
                for b in range(nx - j0):
                    s = _apply_pixel(raw, offset, inverse, use_offset, use_inverse, saturation,
                                     sat32, image, mask, i, j0 + b)  # fmt: skip
                    sbits |= np.uint64(s) << np.uint64(b)
                    if use_hot:
                        hbits |= np.uint64(hot[i, j0 + b]) << np.uint64(b)
            saturated[i, w] = sbits
            if use_hot:
                hot_bits[i, w] = hbits


@njit(cache=True, nogil=True, inline="always")
def _apply_pixel(raw, offset, inverse, use_offset, use_inverse, saturation, sat32, image, mask,
                 i, j):  # fmt: skip
    r = raw[i, j]
    v = np.float64(r)
    if use_offset:
        v = v - np.float64(offset[i, j])
    x = np.float32(v)
    if use_inverse:
        x = np.float32(np.float64(x) * np.float64(inverse[i, j]))
    image[i, j] = x
    s = np.float32(r) >= np.float32(saturation) if sat32 else np.float64(r) >= saturation
    mask[i, j] = s
    return s


@njit(cache=True, nogil=True, parallel=True)
def _above_kernel(image, threshold, bits):
    """The pixels above ``threshold``, as bits."""
    ny, nx = image.shape
    for i in prange(ny):
        for w in range(bits.shape[1]):
            j0 = w * 64
            v = np.uint64(0)
            if j0 + 64 <= nx:
                for b in range(64):
                    v |= np.uint64(image[i, j0 + b] > threshold) << np.uint64(b)
            else:
                for b in range(nx - j0):
                    v |= np.uint64(image[i, j0 + b] > threshold) << np.uint64(b)
            bits[i, w] = v


@njit(cache=True, nogil=True)
def _bits_gather(bits, nx, exclude, use_exclude):
    """The flat indices of the set bits (not excluded), in order: the cost is that of the
    set bits, not of the frame."""
    ny, nw = bits.shape
    total = 0
    for i in range(ny):
        for w in range(nw):
            v = bits[i, w]
            while v:
                v &= v - np.uint64(1)
                total += 1
    out = np.empty(total, dtype=np.int64)
    k = 0
    for i in range(ny):
        for w in range(nw):
            v = bits[i, w]
            while v:
                low = v & (~v + np.uint64(1))
                j = w * 64 + _DEBRUIJN_INDEX[(low * _DEBRUIJN) >> np.uint64(58)]
                v ^= low
                if not (use_exclude and exclude[i, j]):
                    out[k] = i * nx + j
                    k += 1
    return out[:k]


@njit(cache=True, nogil=True, parallel=True)
def _sparse_hits_kernel(image, flat, sky, sigma, factor, fac32):
    """For each candidate: above the sky by more than ``factor`` times its brightest
    neighbour (clipped at the border, NaN propagating like ``np.maximum``)."""
    ny, nx = image.shape
    hit = np.zeros(flat.size, dtype=np.bool_)
    for k in prange(flat.size):
        y = flat[k] // nx
        x = flat[k] - y * nx
        above = np.float32(image[y, x] - sky)
        best = np.float32(-np.inf)
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy == 0 and dx == 0:
                    continue
                yy = min(max(y + dy, 0), ny - 1)
                xx = min(max(x + dx, 0), nx - 1)
                v = np.float32(image[yy, xx] - sky)
                if np.isnan(best) or np.isnan(v):
                    best = np.float32(np.nan)
                elif v > best:
                    best = v
        if np.isnan(best):
            continue  # the comparison with NaN is False
        if sigma > best:
            best = sigma
        if fac32:
            hit[k] = above > np.float32(np.float32(factor) * best)
        else:
            hit[k] = np.float64(above) > factor * np.float64(best)
    return hit


@njit(cache=True, nogil=True)
def _spill_kernel(image, exclude, use_exclude, threshold, hits):
    """The hits and their neighbours that are candidates too (hits spill over), as sorted
    unique flat indices."""
    ny, nx = image.shape
    out = np.empty(hits.size * 9, dtype=np.int64)
    k = 0
    for h in hits:
        out[k] = h
        k += 1
        y = h // nx
        x = h - y * nx
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy == 0 and dx == 0:
                    continue
                yy = min(max(y + dy, 0), ny - 1)
                xx = min(max(x + dx, 0), nx - 1)
                if not (use_exclude and exclude[yy, xx]) and image[yy, xx] > threshold:
                    out[k] = yy * nx + xx
                    k += 1
    return np.unique(out[:k])


@njit(cache=True, nogil=True, parallel=True)
def _repair_kernel(image, bad, flat):
    """The median of the good, finite 3x3 neighbours of each pixel at ``flat`` (NaN when
    there is none), as ``np.nanmedian`` on float32 computes it (the mean of the two middle
    values in float32)."""
    ny, nx = image.shape
    fill = np.empty(flat.size, dtype=np.float32)
    work = np.empty((flat.size, 8), dtype=np.float32)
    for k in prange(flat.size):
        y = flat[k] // nx
        x = flat[k] - y * nx
        vals = work[k]
        m = 0
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy == 0 and dx == 0:
                    continue
                yy = y + dy
                xx = x + dx
                if 0 <= yy < ny and 0 <= xx < nx and not bad[yy, xx]:
                    v = np.float32(image[yy, xx])
                    if not np.isnan(v):
                        # insertion sort: at most 8 values
                        p = m
                        while p > 0 and vals[p - 1] > v:
                            vals[p] = vals[p - 1]
                            p -= 1
                        vals[p] = v
                        m += 1
        if m == 0:
            fill[k] = np.nan
        else:
            lo = vals[(m - 1) // 2]
            hi = vals[m // 2]
            fill[k] = np.float32(lo + hi) / np.float32(2.0)
    return fill


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

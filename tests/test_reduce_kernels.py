"""The compiled calibration (observd.reduce) against the numpy steps it replaced.

The reference below is the numpy implementation of ``calibrate``, ``repair_pixels`` and
``cosmic_ray_mask`` as it was before the kernels (observd f237842), kept verbatim: every
result (image, mask, counts) must be the same, bit for bit, over the raw types, the
masters present or not, the sparse and the dense cosmic-ray paths and odd frame widths.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from observd import reduce

F32 = np.float32

# --------------------------------------------------------------------- the reference


def ref_calibrate(
    raw: np.ndarray,
    masters: reduce.Masters,
    *,
    hot: np.ndarray | None = None,
    saturation: float | None = 65535.0,
    cosmic_factor: float | None = 4.0,
) -> tuple:
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
        counts["hot"] = ref_repair_pixels(image, hot)
    if cosmic_factor is not None:
        cosmics = ref_cosmic_ray_mask(image, factor=cosmic_factor, exclude=mask)
        counts["cosmic"] = int(np.count_nonzero(cosmics))
        mask |= cosmics
    ref_repair_pixels(image, mask)
    return (image, mask, counts)


def ref_repair_pixels(image: np.ndarray, bad: np.ndarray) -> int:
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
        fill[lost] = ref_sky(image)[0]
    image[ys, xs] = fill
    return int(ys.size)


def ref_cosmic_ray_mask(
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
    sky, sigma = ref_sky(image)
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


def ref_sky(image: np.ndarray) -> tuple[float, float]:
    """Sky level and noise from a subsample (robust: median and MAD)."""
    step = max(1, int(np.sqrt(image.size / 65_536)))
    sample = image[::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    med = float(np.median(sample))
    mad = float(np.median(np.abs(sample - med))) * 1.4826
    return med, max(mad, 1e-6)


# ------------------------------------------------------------------------- the tests


def _scene(shape=(256, 300), seed=0, gradient=0.0):
    """A uint16 light: sky, noise, Gaussian stars (a few saturated), cosmic rays, vignetting."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    flat = 1 - 0.2 * (((xx - nx / 2) ** 2 + (yy - ny / 2) ** 2) / (nx * ny / 2))
    img = 1000 + gradient * xx + rng.normal(0, 12, shape)
    for sx, sy, f in zip(rng.uniform(5, nx - 5, 40), rng.uniform(5, ny - 5, 40),
                         10 ** rng.uniform(2.5, 6.5, 40), strict=True):  # fmt: skip
        img += f / (2 * np.pi * 1.3**2) * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * 1.3**2))
    hits = rng.integers(0, min(shape), (2, 30))
    img[hits[0], hits[1]] += 5000
    img[0, 5] += 8000  # a hit on the border
    raw = np.clip(img * flat + 300, 0, 65535).astype(np.uint16)
    bias = (300 + rng.normal(0, 2, shape)).astype(F32)
    dark = rng.uniform(0, 3, shape).astype(F32)
    flat = flat.astype(F32)
    flat[5, 7] = 0.0
    flat[9, 9] = np.nan
    flat[ny - 1, 3] = 0.01
    hot = np.zeros(shape, bool)
    hot[tuple(rng.integers(0, min(shape), (2, 200)))] = True
    hot[:2, :2] = True  # a corner whose hot pixel has no good neighbour
    hot[50, 50:53] = True
    raw[hot] = 20000
    raw[20:23, 40:44] = 65535
    return raw, bias, dark, flat, hot


def _same(new: reduce.Calibrated, ref: tuple) -> None:
    image, mask, counts = ref
    assert new.counts == counts
    np.testing.assert_array_equal(new.mask, mask)
    assert new.image.dtype == F32
    np.testing.assert_array_equal(new.image, image)  # bit for bit (NaN where NaN)


@pytest.mark.parametrize("shape", [(256, 300), (130, 64), (97, 203)])
def test_calibrate_matches_the_numpy_steps(shape):
    raw, bias, dark, flat, hot = _scene(shape)
    before = raw.copy()
    for masters in (
        reduce.prepare(bias, dark, flat),
        reduce.prepare(None, None, flat),
        reduce.prepare(bias, None, None),
        reduce.prepare(),
    ):
        for kw in ({"hot": hot}, {}, {"saturation": None}, {"cosmic_factor": None},
                   {"hot": hot, "saturation": 20000.0, "cosmic_factor": 3.0}):  # fmt: skip
            out = reduce.calibrate(raw, masters, **kw)
            _same(out, ref_calibrate(raw, masters, **kw))
    np.testing.assert_array_equal(raw, before)  # the raw frame is never touched
    out = reduce.calibrate(raw, reduce.prepare(bias, dark, flat), hot=hot)
    assert out.counts["cosmic"] >= 20 and out.counts["saturated"] >= 12
    assert out.mask[20:23, 40:44].all() and out.mask[5, 7] and out.mask[9, 9]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the reference, float16
@pytest.mark.parametrize(
    "dtype", [np.float32, np.float64, ">i2", ">f4", np.int32, np.uint8, np.int64, np.float16]
)
def test_calibrate_matches_for_every_raw_type(dtype):
    raw, bias, dark, flat, hot = _scene((128, 150), seed=1)
    if np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.float16)):
        raw = raw // 256
    typed = raw.astype(dtype)
    masters = reduce.prepare(bias, dark, flat)
    for kw in ({"hot": hot}, {"saturation": 20000}, {"saturation": np.float64(20000.5)}):
        _same(reduce.calibrate(typed, masters, **kw), ref_calibrate(typed, masters, **kw))


def test_calibrate_matches_with_nan_and_a_view():
    raw, bias, dark, flat, hot = _scene((128, 192), seed=2)
    raw = raw.astype(F32)
    raw[60, 60] = np.nan
    raw[61, 62] = np.inf
    view = raw[:, ::2]  # not contiguous
    masters = reduce.prepare(bias[:, ::2], dark[:, ::2], flat[:, ::2])
    _same(
        reduce.calibrate(view, masters, hot=hot[:, ::2]),
        ref_calibrate(view, masters, hot=hot[:, ::2]),
    )


def test_dense_cosmic_path_matches():
    """A sky gradient puts more than 1 % of the pixels above the threshold: the OpenCV path."""
    raw, bias, dark, flat, hot = _scene((200, 256), seed=3, gradient=3.0)
    image = reduce.calibrate(raw, reduce.prepare(bias, dark, flat), cosmic_factor=None).image
    sky, sigma = ref_sky(image)
    assert np.count_nonzero(image > sky + 6 * sigma) > 0.01 * image.size
    masters = reduce.prepare(bias, dark, flat)
    _same(reduce.calibrate(raw, masters, hot=hot), ref_calibrate(raw, masters, hot=hot))
    exclude = np.zeros(image.shape, bool)
    exclude[::7, ::3] = True
    for kw in ({}, {"exclude": exclude}, {"factor": 2.0, "nsigma": 3.0}):
        np.testing.assert_array_equal(
            reduce.cosmic_ray_mask(image, **kw), ref_cosmic_ray_mask(image, **kw)
        )


def test_cosmic_ray_mask_and_repair_match():
    raw, bias, dark, flat, hot = _scene((256, 300), seed=4)
    image = reduce.calibrate(raw, reduce.prepare(bias, dark, flat), cosmic_factor=None).image
    exclude = np.zeros(image.shape, bool)
    exclude[100:140, 100:140] = True
    for kw in ({}, {"exclude": exclude}, {"factor": 2.5}, {"factor": np.float64(2.5)}):
        new, ref = reduce.cosmic_ray_mask(image, **kw), ref_cosmic_ray_mask(image, **kw)
        assert ref.any()
        np.testing.assert_array_equal(new, ref)
    image[30, 30:34] = np.nan  # NaN neighbours are not counted; even counts average
    bad = np.zeros(image.shape, bool)
    bad[tuple(np.random.default_rng(5).integers(0, 256, (2, 800)))] = True
    bad[29:32, 29:32] = True
    bad[-3:, -3:] = True  # a corner with no good neighbour: the sky level
    a, b = image.copy(), image.copy()
    assert reduce.repair_pixels(a, bad) == ref_repair_pixels(b, bad) == np.count_nonzero(bad)
    np.testing.assert_array_equal(a, b)


def test_shapes_are_checked_and_views_repaired_in_place():
    """The kernels do not check indices: a map of another shape is refused, as numpy
    refused it; masters broadcast as numpy broadcast them."""
    raw, bias, dark, flat, hot = _scene((64, 96), seed=6)
    with pytest.raises(ValueError):
        reduce.calibrate(raw, reduce.prepare(bias, dark, flat), hot=hot[:32])
    with pytest.raises(ValueError):
        reduce.calibrate(raw, reduce.prepare(bias[:32], None, None))
    with pytest.raises(ValueError):
        reduce.repair_pixels(np.zeros((64, 96), F32), hot[:, :50])
    row_bias = bias[:1]  # one row for every row
    _same(reduce.calibrate(raw, reduce.Masters(offset=row_bias)),
          ref_calibrate(raw, reduce.Masters(offset=row_bias)))  # fmt: skip
    image = reduce.calibrate(raw, reduce.prepare(bias, dark, flat), cosmic_factor=None).image
    big = np.zeros((64, 192), F32)
    big[:, ::2] = image
    view = big[:, ::2]  # not contiguous: repaired in place all the same
    copy = image.copy()
    assert reduce.repair_pixels(view, hot) == ref_repair_pixels(copy, hot) > 0
    np.testing.assert_array_equal(big[:, ::2], copy)

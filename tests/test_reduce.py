from __future__ import annotations

import numpy as np

from observd.reduce import calibrate, cosmic_ray_mask, prepare, repair_pixels


def _star_field(rng, n=256, fwhm=2.5):
    y, x = np.mgrid[0:n, 0:n]
    img = np.full((n, n), 100.0, np.float32)
    sigma = fwhm / 2.3548
    stars = rng.uniform(10, n - 10, (40, 2))
    for sx, sy in stars:
        img += 5000 * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma**2)).astype(np.float32)
    return img + rng.normal(0, 5, (n, n)).astype(np.float32), stars


def test_calibration_removes_bias_dark_and_flat_exactly():
    rng = np.random.default_rng(1)
    sky = np.full((64, 64), 500.0, np.float32)
    bias = rng.normal(1000, 3, (64, 64)).astype(np.float32)
    dark = rng.uniform(0, 20, (64, 64)).astype(np.float32)
    flat = rng.uniform(0.8, 1.1, (64, 64)).astype(np.float32)
    raw = (sky * flat + bias + dark).astype(np.float32)
    out = calibrate(raw, prepare(bias, dark, flat), cosmic_factor=None)
    np.testing.assert_allclose(out.image, sky, rtol=1e-5)
    assert not out.mask.any()
    assert raw.dtype == np.float32 and raw[0, 0] == (sky * flat + bias + dark)[0, 0]  # untouched


def test_saturated_and_dead_flat_pixels_are_masked_and_filled():
    raw = np.full((32, 32), 2000, np.uint16)
    raw[5, 5] = 65535
    flat = np.ones((32, 32), np.float32)
    flat[10, 10] = 0.0
    flat[11, 11] = np.nan
    out = calibrate(raw, prepare(np.full((32, 32), 1000, np.float32), None, flat))
    assert out.mask[5, 5] and out.mask[10, 10] and out.mask[11, 11]
    assert out.counts["saturated"] == 1 and out.counts["dead_flat"] == 2
    assert np.isfinite(out.image).all() and out.image[10, 10] == 1000


def test_hot_pixels_are_repaired_from_neighbours():
    img = np.full((16, 16), 10.0, np.float32)
    hot = np.zeros((16, 16), bool)
    hot[0, 0] = hot[8, 8] = hot[8, 9] = True
    img[hot] = 5000
    assert repair_pixels(img, hot) == 3
    assert np.all(img == 10.0)


def test_cosmic_rays_are_found_and_stars_are_not():
    rng = np.random.default_rng(2)
    img, stars = _star_field(rng)
    hits = [(20, 30), (100, 200), (201, 57)]
    for y, x in hits:
        img[y, x] += 3000
    mask = cosmic_ray_mask(img)
    for y, x in hits:
        assert mask[y, x]
    for sx, sy in stars:  # no star peak is taken for a cosmic ray
        assert not mask[int(round(sy)), int(round(sx))]
    assert mask.sum() <= 3 * 9

"""Stretches, PNGs, RGB composites and debayering against synthetic images with a known truth."""

from __future__ import annotations

import io
import time
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from observd.render import (
    PRESET_MAPPINGS,
    RenderWarning,
    _lupton,
    auto_stretch,
    bayer_channels,
    bayer_pattern,
    choose_mapping,
    debayer,
    fit_stretch,
    quicklook,
    rgb_composite,
    sky_stats,
    to_png,
)

SKY, SIGMA = 1000.0, 30.0
N = 384


# ------------------------------------------------------------------------ synthetic sky
def moffat(shape, y0, x0, peak, fwhm=3.0, beta=2.5):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    return peak * (1 + ((yy - y0) ** 2 + (xx - x0) ** 2) / alpha**2) ** (-beta)


def add_gaussian_stars(img, ys, xs, fluxes, fwhm=3.0):
    """Add Gaussian stars of the given total fluxes, in place (small stamps)."""
    n_y, n_x = img.shape
    s = fwhm / 2.3548
    r = int(4 * fwhm)
    off = np.arange(-r, r + 1)
    for y, x, f in zip(ys, xs, fluxes, strict=True):
        iy, ix = round(y), round(x)
        yy, xx = iy + off[:, None], ix + off[None, :]
        g = f / (2 * np.pi * s * s) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
        y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, n_y), max(ix - r, 0), min(ix + r + 1, n_x)
        img[y0:y1, x0:x1] += g[y0 - iy + r : y1 - iy + r, x0 - ix + r : x1 - ix + r]
    return img


@pytest.fixture(scope="module")
def galaxy_field():
    """Sky + noise, a 1-sigma-per-pixel disc, a bright Moffat star on a pixel centre."""
    rng = np.random.default_rng(1)
    img = rng.normal(SKY, SIGMA, (N, N))
    yy, xx = np.mgrid[:N, :N]
    disc = np.hypot(yy - 100, xx - 260) < 50
    img += disc * SIGMA
    star = (280, 100)
    img += moffat((N, N), *star, 2e5)
    for y, x, p in rng.uniform((10, 10, 1.5), (N - 10, N - 10, 3.5), (30, 3)):
        img += moffat((N, N), y, x, 10**p)
    return img.astype(np.float32), disc, star


# ---------------------------------------------------------------------------- stretches
def test_sky_stats_robust_nan_safe_and_masked():
    rng = np.random.default_rng(2)
    img = rng.normal(500.0, 12.0, (600, 600)).astype(np.float32)
    add_gaussian_stars(img, *rng.uniform(5, 595, (2, 300)), 10 ** rng.uniform(3, 5, 300))
    img[:50] = np.nan
    sky, sig = sky_stats(img)
    assert sky == pytest.approx(500.0, abs=1.0)
    assert sig == pytest.approx(12.0, rel=0.05)
    mask = np.zeros(img.shape, bool)
    img[100:200] = 1e4  # masked junk does not count
    mask[100:200] = True
    assert sky_stats(img, mask)[0] == pytest.approx(500.0, abs=1.0)
    assert np.isnan(sky_stats(np.full((10, 10), np.nan))[0])


def test_sky_is_dark_grey_with_its_noise_visible(galaxy_field):
    img, disc, _ = galaxy_field
    y = auto_stretch(img)
    assert y.dtype == np.float32 and y.shape == img.shape
    assert np.nanmin(y) >= 0.0 and np.nanmax(y) <= 1.0
    sky = y[200:, 200:][~disc[200:, 200:]]
    assert 0.08 < np.median(sky) < 0.25  # dark grey, not black
    assert np.mean(sky == 0.0) < 0.01  # the noise is not clipped at black...
    assert np.std(sky) > 4 / 255  # ...and is visible (several grey levels)
    assert np.mean(sky >= 0.5) < 0.001


def test_faint_disc_is_visible(galaxy_field):
    img, disc, _ = galaxy_field
    y = auto_stretch(img)
    sky = y[(~disc) & (np.arange(N)[:, None] < 200)]
    lift = y[disc].mean() - np.median(sky)
    # a 1-sigma-per-pixel disc is several grey levels above the sky on average
    assert lift > 5 / 255
    assert lift > 20 * sky.std() / np.sqrt(disc.sum())


def test_bright_star_core_is_not_burnt(galaxy_field):
    img, _, (sy, sx) = galaxy_field
    y = auto_stretch(img)
    assert (y >= 0.99).sum() <= 4  # only the very peak is white
    profile = y[sy, sx : sx + 8]  # core, then the wings: ranking preserved
    assert np.all(np.diff(profile) < 0)
    ring1 = y[sy - 1 : sy + 2, sx - 1 : sx + 2].copy()
    ring1[1, 1] = 0
    assert ring1.max() < 0.98


def test_hot_pixel_does_not_set_the_white_point(galaxy_field):
    img, _, (sy, sx) = galaxy_field
    hot = img.copy()
    hot[10, 10] = 6e5  # a lone spike, three times the star
    hot[30:60, 300] = 6e5  # a hot column: one pixel wide
    hot[20, 300:302] = 5e5  # a two-pixel cosmic ray
    hot[25:27, 200:202] = 1.5e5  # a 2x2 blob counts: a (fainter) star for all we know
    st = fit_stretch(hot)
    assert st.white == pytest.approx(float(img[sy, sx]))
    y = st(hot)
    assert y[sy, sx] == pytest.approx(1.0)


def test_stretch_methods_nan_and_reuse(galaxy_field):
    from astropy.visualization import ZScaleInterval

    img, _, _ = galaxy_field
    img = img.copy()
    img[:20] = np.nan
    for method in ("asinh", "zscale", "linear", "sqrt"):
        y = auto_stretch(img, method=method)
        assert np.isnan(y[:20]).all()
        fin = y[20:]
        assert np.isfinite(fin).all() and fin.min() >= 0 and fin.max() <= 1
        assert 0.02 < np.median(fin) < 0.7, method
    st = fit_stretch(img, method="zscale")
    z1, z2 = ZScaleInterval().get_limits(img[np.isfinite(img)])
    assert st.black == pytest.approx(z1, rel=0.01) and st.white == pytest.approx(z2, rel=0.01)
    # one fitted stretch applied to a cut-out gives the same pixels
    st = fit_stretch(img)
    assert np.array_equal(st(img[100:150, 50:90]), st(img)[100:150, 50:90])
    # explicit limits, integer input, degenerate images
    y = auto_stretch(img, method="linear", black=SKY, white=SKY + 100)
    assert y[200, 200] == pytest.approx(np.clip((img[200, 200] - SKY) / 100, 0, 1), abs=1e-6)
    assert auto_stretch(np.full((8, 8), 7.0)).max() == 0.0
    assert np.isnan(auto_stretch(np.full((8, 8), np.nan))).all()
    raw = np.clip(img[20:], 0, 65535).astype(np.uint16)
    assert 0.05 < np.median(auto_stretch(raw)) < 0.3
    # a stronger stretch control brightens the sky
    assert np.median(auto_stretch(img, sky_grey=0.3)[20:]) > np.median(auto_stretch(img)[20:])


# ---------------------------------------------------------------------------------- PNG
def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_png_orientation_size_and_values():
    ny, nx = 30, 50
    img = np.zeros((ny, nx), np.float32)
    img[0, :] = 1.0  # FITS row 0: the bottom of the picture
    img[:, 0] = 0.5  # column 0: the left
    img[5, 7] = np.nan
    png = _decode(to_png(img))
    assert png.shape == (ny, nx) and png.dtype == np.uint8
    assert (png[-1, 1:] == 255).all() and (png[:-1, 1:] != 255).all()
    assert (png[:-1, 0] == 128).all()
    assert png[ny - 1 - 5, 7] == 0  # NaN drawn black
    rgb = np.zeros((ny, nx, 3), np.float32)
    rgb[0, 0] = (1.0, 0.0, 0.0)
    rgb[-1, -1] = (0.0, 0.0, 2.0)  # clipped
    png = _decode(to_png(rgb))
    assert png.shape == (ny, nx, 3)
    assert tuple(png[-1, 0]) == (255, 0, 0) and tuple(png[0, -1]) == (0, 0, 255)


def test_png_thumbnail_area_averages():
    img = np.indices((300, 400)).sum(axis=0) % 2 * np.float32(1)  # a 0/1 checkerboard
    png = _decode(to_png(img, max_size=100))
    assert png.shape == (75, 100)
    assert np.all(np.abs(png.astype(int) - 128) <= 1)
    assert _decode(to_png(img[:20, :30], max_size=100)).shape == (20, 30)  # never enlarged
    half_nan = np.full((40, 40), 0.8, np.float32)
    half_nan[:, :20] = np.nan  # NaN does not darken its valid neighbours when averaging
    png = _decode(to_png(half_nan, max_size=10))
    assert (png[:, 5:] == 204).all() and (png[:, :5] == 0).all()


def test_png_written_atomically(tmp_path):
    img = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    path = tmp_path / "stacks" / "m51" / "m51_R.png"
    data = to_png(img, path)
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["m51_R.png"]  # no temp files
    to_png(img[::-1], path)  # replaced in place
    assert path.read_bytes() != data
    before = path.read_bytes()
    with pytest.raises(ValueError):
        to_png(np.zeros((4, 4, 2)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["m51_R.png"]


def test_quicklook_one_call(tmp_path, galaxy_field):
    img, _, (sy, sx) = galaxy_field
    path = tmp_path / "ql.png"
    data = quicklook(img, path)
    png = _decode(path.read_bytes())
    assert path.read_bytes() == data and png.shape == img.shape
    assert png[N - 1 - sy, sx] == 255  # the star where FITS puts it, flipped
    thumb = _decode(quicklook(img, None, max_size=96, method="zscale"))
    assert thumb.shape == (96, 96)


# ---------------------------------------------------------------------------------- RGB
GAINS = {"R": 1.7, "V": 1.0, "B": 0.55}
SKIES = {"R": 800.0, "V": 500.0, "B": 300.0}
NOISE = {"R": 25.0, "V": 15.0, "B": 10.0}
GAL = (90, 90)


@pytest.fixture(scope="module")
def star_field():
    """White stars (equal flux in R, V, B before per-filter gains), a red-only galaxy."""
    rng = np.random.default_rng(3)
    n, nstar = 400, 100
    ys, xs = rng.uniform(15, n - 15, (2, nstar))
    flux = 10 ** rng.uniform(3.0, 5.5, nstar)
    stars = add_gaussian_stars(np.zeros((n, n)), ys, xs, flux)
    yy, xx = np.mgrid[:n, :n]
    galaxy = 150.0 * np.exp(-np.hypot(yy - GAL[0], xx - GAL[1]) / 12.0)
    channels = {}
    for k in "RVB":
        img = (stars + (galaxy if k == "R" else 0.0)) * GAINS[k]
        img += SKIES[k] + rng.normal(0.0, NOISE[k], (n, n))
        channels[k] = img.astype(np.float32)
    channels["R"][:, :6] = np.nan  # a footprint edge
    return channels, (ys, xs, flux)


def star_colours(rgb, ys, xs, flux, lo=3.3, hi=4.3):
    """Each star's (R, G, B) over a 5x5 box, normalised to mean 1 (unsaturated stars)."""
    cols = []
    for y, x, f in zip(ys, xs, flux, strict=True):
        if lo < np.log10(f) < hi:
            iy, ix = round(y), round(x)
            box = np.nansum(rgb[iy - 2 : iy + 3, ix - 2 : ix + 3].reshape(-1, 3), axis=0)
            cols.append(box / box.mean())
    return np.array(cols)


def test_rgb_white_stars_come_out_neutral_and_red_galaxy_red(star_field):
    channels, (ys, xs, flux) = star_field
    rgb = rgb_composite(channels)  # default mapping R, V, B; balance on the stars
    assert rgb.shape == (*channels["R"].shape, 3) and rgb.dtype == np.float32
    assert rgb.flags.c_contiguous
    assert np.isnan(rgb[:, :6]).all() and np.isfinite(rgb[:, 6:]).all()
    assert np.nanmin(rgb) >= 0 and np.nanmax(rgb) <= 1
    cols = star_colours(rgb, ys, xs, flux)
    assert len(cols) > 20
    assert np.mean(np.abs(cols[:, 0] - cols[:, 1])) < 0.03
    assert np.mean(np.abs(cols[:, 2] - cols[:, 1])) < 0.03
    r, g, b = rgb[GAL[0] - 3 : GAL[0] + 4, GAL[1] - 3 : GAL[1] + 4].reshape(-1, 3).mean(axis=0)
    assert r > 0.3 and r > 3 * g and r > 3 * b
    sky = rgb[250:350, 250:350].reshape(-1, 3)
    med = np.median(sky, axis=0)
    assert np.ptp(med) < 0.01 and 0.06 < med.mean() < 0.2  # a neutral dark grey sky
    # without balance the per-filter gains show: stars come out red
    raw = star_colours(rgb_composite(channels, balance=None), ys, xs, flux)
    assert np.median(raw[:, 0] / raw[:, 2]) > 2.0


def test_rgb_sky_balance_equalises_noise(star_field):
    channels, _ = star_field
    rgb = rgb_composite(channels, balance="sky", Q=0.001, stretch=50.0)  # ~linear
    sky = rgb[250:350, 250:350].reshape(-1, 3)
    sky = sky[(sky < np.median(sky, axis=0) + 0.1).all(axis=1)]
    noise = sky.std(axis=0)
    assert np.ptp(noise) / noise.mean() < 0.05


def test_rgb_saturated_cores_keep_their_colour():
    n = 96
    rng = np.random.default_rng(4)
    star = moffat((n, n), 48, 48, 1e5, fwhm=4.0)
    ch = {
        k: (star * w + rng.normal(100, 5, (n, n))).astype(np.float32)
        for k, w in (("R", 1.0), ("V", 0.5), ("B", 0.25))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenderWarning)
        rgb = rgb_composite(ch, balance=None)
    core = rgb[48, 48]
    assert core.max() == pytest.approx(1.0)
    assert core[1] / core[0] == pytest.approx(0.5, rel=0.05)
    assert core[2] / core[0] == pytest.approx(0.25, rel=0.05)


def test_rgb_detector_saturated_cores_are_neutral(star_field):
    channels, (ys, xs, flux) = star_field
    clipped = {k: np.minimum(v, 9000.0) for k, v in channels.items()}  # one ADC ceiling
    rgb = rgb_composite(clipped)
    cols = star_colours(rgb, ys, xs, flux)  # unsaturated stars: still neutral
    assert np.mean(np.abs(cols[:, 2] - cols[:, 1])) < 0.03
    for y, x in zip(ys, xs, strict=True):
        iy, ix = round(y), round(x)
        if all(v[iy, ix] >= 9000.0 for v in clipped.values()):
            core = rgb[iy, ix]
            assert np.ptp(core) < 1e-6 and core[0] > 0.5  # white, not magenta or blue
    # the level can be given (per filter); then an unsaturated star keeps its colour
    rgb = rgb_composite(clipped, saturation={"R": 1e9, "V": 1e9, "B": 1e9})
    iy, ix = (round(v) for v in (ys[np.argmax(flux)], xs[np.argmax(flux)]))
    assert np.ptp(rgb[iy, ix]) > 0.1


def test_lupton_matches_astropy():
    from astropy.visualization import make_lupton_rgb

    rng = np.random.default_rng(5)
    r, g, b = (rng.gamma(1.5, 2.0, (40, 40)) * s for s in (30.0, 5.0, 1.0))
    ref = make_lupton_rgb(r, g, b, minimum=0, stretch=3.0, Q=8, output_dtype=np.float64)
    mine = _lupton(np.stack([r, g, b]).astype(np.float32), Q=8.0, stretch=3.0)
    np.testing.assert_allclose(np.moveaxis(mine, 0, -1), ref, atol=2e-5)


def test_rgb_too_few_stars_falls_back_to_sky():
    rng = np.random.default_rng(6)
    ch = {k: rng.normal(100, 5, (64, 64)).astype(np.float32) for k in "RVB"}
    with pytest.warns(RenderWarning, match="balanced on the sky"):
        rgb = rgb_composite(ch)
    assert rgb.shape == (64, 64, 3)


def test_narrowband_and_mappings():
    n = 120
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:n, :n]
    ha_blob = 400 * np.exp(-np.hypot(yy - 40, xx - 40) / 6)
    o3_blob = 400 * np.exp(-np.hypot(yy - 80, xx - 80) / 6)
    ch = {
        "Ha": (ha_blob + rng.normal(50, 4, (n, n))).astype(np.float32),
        "OIII": (o3_blob + rng.normal(20, 2, (n, n))).astype(np.float32),
    }
    for mapping in ({"Ha": "red", "OIII": (0, 1, 1)}, "HOO", "hoo"):
        rgb = rgb_composite(ch, mapping, balance="sky")
        r, g, b = rgb[40, 40]
        assert r > 0.5 and r > 4 * max(g, b)  # Ha: red
        r, g, b = rgb[80, 80]
        assert g == pytest.approx(b, rel=0.01) and g > 4 * r  # OIII: cyan
    # G stands in for V, names match in any case; a missing filter says which
    three = {"r": ch["Ha"], "G": ch["OIII"], "b": ch["OIII"]}
    assert rgb_composite(three, balance="sky").shape == (n, n, 3)
    with pytest.raises(KeyError, match="'SII'"):
        rgb_composite(ch, "SHO")
    with pytest.raises(ValueError, match="blue"):
        rgb_composite(ch, {"Ha": "red", "OIII": "green"})
    assert choose_mapping(["R", "V", "B", "L"]) == "RVB"
    assert choose_mapping(["r", "g", "b"]) == "RGB"
    assert choose_mapping(["Ha", "OIII", "SII"]) == "SHO"
    assert choose_mapping(["Ha", "OIII"]) == "HOO"
    assert choose_mapping(["R", "B"]) is None
    assert set(PRESET_MAPPINGS) == {"RVB", "RGB", "SHO", "HOO"}


# -------------------------------------------------------------------------------- Bayer
PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
LEVEL = {"R": 100.0, "G": 200.0, "B": 300.0}
CV_CODES = {p: getattr(cv2, f"COLOR_Bayer{p}2RGB") for p in PATTERNS}


def mosaic(pattern, shape=(9, 12), levels=LEVEL):
    """A CFA image of a flat colour field: pattern names cfa[0,0], [0,1], [1,0], [1,1]."""
    cfa = np.zeros(shape, np.float32)
    for i, colour in enumerate(pattern):
        cfa[i // 2 :: 2, i % 2 :: 2] = levels[colour]
    return cfa


@pytest.mark.parametrize("pattern", PATTERNS)
def test_debayer_flat_colour_field(pattern):
    cfa = mosaic(pattern)
    for colour, plane in zip("RGB", debayer(cfa, pattern), strict=True):
        assert plane.shape == cfa.shape and plane.dtype == np.float32
        np.testing.assert_allclose(plane, LEVEL[colour], rtol=1e-6)  # borders included
    # float precision and negative values survive (OpenCV's Bayer codes need integers)
    r, g, b = debayer(mosaic(pattern, levels={"R": -1.25, "G": 0.5, "B": 1e-3}), pattern)
    assert np.allclose(r, -1.25) and np.allclose(g, 0.5) and np.allclose(b, 1e-3)
    half = bayer_channels(cfa, pattern)
    assert set(half) == {"R", "G", "B"}
    for colour, plane in half.items():
        assert plane.shape == (4, 6)
        assert np.all(plane == LEVEL[colour])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_debayer_is_opencv_bilinear(pattern):
    rng = np.random.default_rng(8)
    smooth = cv2.GaussianBlur(rng.uniform(1000, 60000, (64, 80)).astype(np.float32), (0, 0), 2)
    cfa = np.round(smooth).astype(np.uint16)
    ref = cv2.cvtColor(cfa, CV_CODES[pattern]).astype(np.float32)
    mine = np.stack(debayer(cfa.astype(np.float32), pattern), axis=-1)
    np.testing.assert_allclose(mine[2:-2, 2:-2], ref[2:-2, 2:-2], atol=1.0)


def test_debayer_fills_nan_from_same_colour_neighbours():
    cfa = mosaic("RGGB", shape=(10, 10))
    cfa[4, 4] = np.nan  # an R site
    cfa[4, 5] = np.nan  # a G site
    r, g, b = debayer(cfa, "RGGB")
    for plane, level in ((r, 100), (g, 200), (b, 300)):
        np.testing.assert_allclose(plane, level)
    lonely = np.full((4, 4), np.nan, np.float32)
    lonely[0, 0] = 5.0
    r, g, b = debayer(lonely, "RGGB")
    assert r[1, 1] == 5.0 and np.isnan(g).all() and np.isnan(b).all()
    half = bayer_channels(cfa, "RGGB")
    assert half["G"][2, 2] == 200.0  # the other green of the cell
    assert np.isnan(half["R"][2, 2])


def test_bayer_pattern_offsets_and_errors():
    assert bayer_pattern("RGGB") == "RGGB"
    assert bayer_pattern("rggb", xoffset=1) == "GRBG"
    assert bayer_pattern("RGGB", yoffset=1) == "GBRG"
    assert bayer_pattern("RGGB", xoffset=1, yoffset=1) == "BGGR"
    cfa = mosaic("RGGB", shape=(10, 10))
    sub = cfa[1:, 1:]  # a sub-frame starting at an odd pixel
    r, g, b = debayer(sub, bayer_pattern("RGGB", xoffset=1, yoffset=1))
    assert np.allclose(r, 100) and np.allclose(b, 300)
    with pytest.raises(ValueError, match="Bayer pattern"):
        debayer(cfa, "RGBG")
    with pytest.raises(ValueError):
        debayer(np.zeros(5), "RGGB")


# ------------------------------------------------------------------------------ timings
@pytest.mark.slow
def test_timings_4096(tmp_path):
    """Timings at 4096 x 4096 (run with ``-m slow``; printed with ``-s``)."""
    rng = np.random.default_rng(9)
    n = 4096
    ys, xs = rng.uniform(15, n - 15, (2, 3000))
    stars = add_gaussian_stars(
        np.zeros((n, n), np.float32), ys, xs, 10 ** rng.uniform(3, 5.5, 3000)
    )
    ch = {k: stars * w + rng.normal(500, 20, (n, n)).astype(np.float32) for k, w in GAINS.items()}
    img = ch["V"]
    cfa = img.copy()
    out = {}

    def clock(name, fn):
        t = time.perf_counter()
        res = fn()
        out[name] = time.perf_counter() - t
        return res

    y = clock("auto_stretch", lambda: auto_stretch(img))
    clock("to_png full", lambda: to_png(y, tmp_path / "a.png"))
    clock("quicklook full", lambda: quicklook(img, tmp_path / "b.png"))
    clock("quicklook 512", lambda: quicklook(img, tmp_path / "c.png", max_size=512))
    rgb = clock("rgb_composite stars", lambda: rgb_composite(ch))
    clock("rgb_composite sky", lambda: rgb_composite(ch, balance="sky"))
    clock("to_png rgb full", lambda: to_png(rgb, tmp_path / "d.png"))
    clock("to_png rgb 1024", lambda: to_png(rgb, tmp_path / "e.png", max_size=1024))
    clock("debayer", lambda: debayer(cfa, "RGGB"))
    clock("bayer_channels", lambda: bayer_channels(cfa, "RGGB"))
    for k, v in out.items():
        print(f"{k:22s} {v:6.2f} s")
    assert out["quicklook 512"] < 2.0

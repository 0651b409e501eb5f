"""The synthetic night must be physically right and agree with its own truth.

Every later test and benchmark leans on :mod:`observd.simulate`, so these tests check the
truth against the pixels (noise, dark current, flats, fluxes, positions, WCS) rather than
that the simulator ran. All nights are 256 px and small; the module runs in ~15 s.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.wcs import WCS

from observd.simulate import (
    CameraModel,
    NightPlan,
    NightTruth,
    load_truth,
    simulate_night,
)

SIZE = 256
CAM = CameraModel(size=SIZE)
SMALL = NightPlan(n_bias=5, dark_exptimes=(60.0,), n_dark=3, filters=("R", "V"), n_flat=3,
                  n_light=3, seed=3)


@pytest.fixture(scope="module")
def maxim(tmp_path_factory) -> NightTruth:
    return simulate_night(tmp_path_factory.mktemp("maxim"), SMALL, CAM, junk=True)


@pytest.fixture(scope="module")
def nina(tmp_path_factory) -> NightTruth:
    plan = NightPlan(n_bias=3, dark_exptimes=(30.0,), n_dark=3, filters=("R", "V", "B"),
                     n_flat=2, dawn_flats=True, n_darkflat=2, n_light=2, dialect="nina", seed=4)
    return simulate_night(tmp_path_factory.mktemp("nina"), plan, CAM, junk=True)


def _calibrated(t: NightTruth, f) -> np.ndarray:
    """A light with the true bias, dark, cosmic rays and flat removed, in e-."""
    raw = fits.getdata(t.path(f)).astype(np.float64)
    e = (raw - t.read("bias.fits")) * t.camera.gain - t.read("dark_rate.fits") * t.camera.gain \
        * f.exptime
    for x, y, electrons in f.cosmic_rays:
        e[int(y), int(x)] -= electrons
    return e / t.read(f"flat_{f.filter}.fits")


def _sky_plane(t: NightTruth, f) -> np.ndarray:
    n = t.camera.size
    ramp = np.arange(n) - (n - 1) / 2
    gx, gy = f.sky_gradient
    return f.sky_rate * f.exptime * (1 + gx * ramp[None, :] / n + gy * ramp[:, None] / n)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- determinism, layout, truth ---------------------------------------------------------


def test_same_seed_same_bytes_and_junk_changes_nothing_else(tmp_path):
    plan = NightPlan(n_bias=2, dark_exptimes=(30.0,), n_dark=2, filters=("R",), n_flat=2,
                     targets=("M 51",), n_light=4, seed=11)
    a = simulate_night(tmp_path / "a", plan, CAM)
    simulate_night(tmp_path / "b", plan, CAM)
    simulate_night(tmp_path / "c", plan, CAM, junk=True)
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb
    assert len([k for k in ta if k.startswith("camera/")]) == len(a.files)
    # junk adds files but leaves every other frame byte-identical
    tc = _tree(tmp_path / "c")
    for k, v in ta.items():
        if k.startswith("camera/"):
            assert tc[k] == v, k
    # another seed gives other pixels
    d = simulate_night(tmp_path / "d", replace(plan, seed=12), CAM)
    f = d.frames("bias")[0]
    assert (tmp_path / "d" / "camera" / f.path).read_bytes() != ta["camera/" + f.path]


def test_layout_truth_outside_and_roundtrip(maxim):
    t = maxim
    cam, truth = t.camera_dir.resolve(), t.truth_dir.resolve()
    assert not truth.is_relative_to(cam) and not cam.is_relative_to(truth)
    on_disk = sorted(p.relative_to(cam).as_posix() for p in cam.rglob("*") if p.is_file())
    assert on_disk == sorted(f.path for f in t.files)  # the temporary name is gone
    assert any(f.written_as and f.written_as.endswith(".tmp") for f in t.files)
    night = t.plan.night
    assert t.file(f"{night}/calibration/Bias-001.fit").type == "bias"
    assert t.file(f"{night}/calibration/Dark-60s-003.fit").exptime == 60.0
    assert t.file(f"{night}/calibration/Flat-V-002.fit").filter == "V"
    assert t.file(f"{night}/M51/M51-001R.fit").target == "M 51"
    assert t.targets["M 51"].reference == f"{night}/M51/M51-001R.fit"
    loaded = load_truth(t.out)
    assert loaded.files == t.files and loaded.plan == t.plan and loaded.camera == t.camera
    assert loaded.targets == t.targets
    # files appear in time order, across local midnight, all of one night
    starts = [f.date_obs for f in t.files if f.date_obs]
    assert starts == sorted(starts)
    tz = ZoneInfo(t.plan.timezone)
    local = [datetime.fromisoformat(f.date_obs).replace(tzinfo=UTC).astimezone(tz)
             for f in t.frames("light")]
    assert min(local).date().isoformat() == night and max(local).hour < 12
    assert max(local).date().isoformat() > night
    assert {f.night for f in t.files} == {night}


def test_nina_layout(nina):
    t = nina
    night = t.plan.night
    kinds = {f.path.split("/")[1] for f in t.files if f.type in ("bias", "dark", "flat",
                                                               "darkflat")}
    assert kinds == {"BIAS", "DARK", "FLAT", "DARKFLAT"}
    lights = t.frames("light", target="M 51")
    assert all(f.path.startswith(f"{night}/M 51/LIGHT/M 51_") for f in lights)
    assert lights[0].path.endswith("_R_60.00s_0001.fits")
    assert len(t.frames("flat", filter="B")) == 4  # dusk + dawn
    assert len(t.frames("darkflat")) == 2 * 3  # one exposure time per filter here
    assert any(f.written_as and f.written_as.endswith(".part") for f in t.files)


MAXIM_KEYS = {"IMAGETYP", "EXPTIME", "EXPOSURE", "DATE-OBS", "XBINNING", "YBINNING",
              "CCD-TEMP", "SET-TEMP", "EGAIN", "XPIXSZ", "YPIXSZ", "INSTRUME", "TELESCOP",
              "SWCREATE", "OBSERVER", "SITELAT", "SITELONG", "FOCALLEN"}
MAXIM_LIGHT = {"FILTER", "OBJECT", "RA", "DEC", "OBJCTRA", "OBJCTDEC", "PIERSIDE"}
NINA_KEYS = {"IMAGETYP", "EXPOSURE", "EXPTIME", "DATE-OBS", "DATE-LOC", "GAIN", "OFFSET",
             "READOUTM", "SET-TEMP", "CCD-TEMP", "SWCREATE", "TELESCOP", "INSTRUME"}
NINA_LIGHT = {"FILTER", "OBJECT", "PIERSIDE", "RA", "DEC"}


@pytest.mark.parametrize("which", ["maxim", "nina"])
def test_headers(which, request):
    t: NightTruth = request.getfixturevalue(which)
    tz = ZoneInfo(t.plan.timezone)
    imagetyp = {"maxim": {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field",
                          "light": "Light Frame", "darkflat": "Dark Frame"},
                "nina": {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "light": "LIGHT",
                         "darkflat": "DARKFLAT"}}[which]
    base, light_keys = (MAXIM_KEYS, MAXIM_LIGHT) if which == "maxim" else (NINA_KEYS, NINA_LIGHT)
    seen = set()
    for f in t.files:
        if f.type == "unknown" or f.expected == "rejected: truncated":
            continue
        with fits.open(t.path(f), do_not_scale_image_data=True) as hl:
            h = hl[0].header
            assert h["BITPIX"] == 16 and h["BZERO"] == 32768 and h["BSCALE"] == 1
            assert hl[0].data.shape == (SIZE, SIZE)
        data = fits.getdata(t.path(f))
        assert data.dtype == np.uint16
        missing = (base | (light_keys if f.type == "light" else set())) - set(h)
        assert not missing, (f.path, missing)
        assert h["IMAGETYP"] == imagetyp[f.type] == f.imagetyp
        assert h["EXPTIME"] == h["EXPOSURE"] == f.exptime
        obs = datetime.fromisoformat(h["DATE-OBS"]).replace(tzinfo=UTC)
        assert abs((obs - datetime.fromisoformat(f.date_obs).replace(tzinfo=UTC))
                   .total_seconds()) < 1e-3
        if which == "nina":
            loc = datetime.fromisoformat(h["DATE-LOC"]).replace(tzinfo=tz)
            assert abs((loc - obs).total_seconds()) < 1e-3
            assert h["SWCREATE"] == "N.I.N.A. 3.1.2.9001 (x64)"
        else:
            assert h["SWCREATE"] == "MaxIm DL Version 6.50"
            assert h["EGAIN"] == t.camera.gain
        assert h["CCD-TEMP"] == pytest.approx(f.ccd_temp, abs=0.051)
        if f.type in ("flat", "light"):
            assert h["FILTER"] == f.filter
        if f.type == "light":
            assert h["OBJECT"] == f.target
            assert h["PIERSIDE"] == f.pier_side in ("EAST", "WEST")
        seen.add(f.type)
    assert {"bias", "dark", "flat", "light"} <= seen
    flips = [f for f in t.frames("light", target=t.plan.targets[0]) if f.transform.flipped]
    assert flips and {f.pier_side for f in flips} == {"EAST"}


# -- detector physics --------------------------------------------------------------------


def test_bias_noise_and_mean(tmp_path):
    n = 16
    t = simulate_night(tmp_path, NightPlan(n_bias=n, dark_exptimes=(), filters=(),
                                           targets=()), CAM)
    stack = np.array([fits.getdata(t.path(f)).astype(np.float64) for f in t.frames("bias")])
    truth = t.read("bias.fits")
    sigma = t.camera.read_noise / t.camera.gain  # ADU
    # a pair difference has sqrt(2) x read noise (+ rounding, 1/12 ADU^2)
    pair = np.std(stack[0] - stack[1]) / np.sqrt(2)
    assert pair == pytest.approx(np.sqrt(sigma**2 + 1 / 12), rel=0.02)
    err = stack.mean(axis=0) - truth
    assert abs(err.mean()) < 4 * sigma / np.sqrt(n * SIZE * SIZE)
    assert np.sqrt(np.mean(err**2)) == pytest.approx(np.sqrt(sigma**2 + 1 / 12) / np.sqrt(n),
                                                     rel=0.03)
    # the structure is really there: columns differ by more than the noise of the mean
    assert np.std(truth.mean(axis=0)) > 0.5


def test_dark_current_hot_pixels_and_warm_dark(tmp_path):
    t = simulate_night(tmp_path, NightPlan(n_bias=0, dark_exptimes=(120.0,), n_dark=7,
                                           filters=(), targets=()), CAM)
    bias, rate = t.read("bias.fits"), t.read("dark_rate.fits")
    hot = t.read("hot_pixels.fits")
    g = t.camera.gain
    darks = t.frames("dark")
    warm = [f for f in darks if f.expected != "ok"]
    assert len(warm) == 1 and warm[0].expected == "rejected: ccd temperature"
    assert warm[0].ccd_temp == pytest.approx(t.camera.set_temp + 2, abs=0.2)
    good = [f for f in darks if f.expected == "ok"]
    cube = np.array([(fits.getdata(t.path(f)) - bias) / 120.0 for f in good])
    med = np.median(cube, axis=0)
    assert hot.sum() == round(t.camera.hot_pixel_fraction * SIZE * SIZE)
    assert np.all(rate[hot] >= 50 * t.camera.dark_current / g * 0.999)
    rel = med[hot] / rate[hot] - 1
    assert abs(np.median(rel)) < 0.01 and np.percentile(np.abs(rel), 90) < 0.08
    # everywhere: the median over frames is unbiased within its noise
    cold = ~hot
    sig = np.sqrt((rate * 120 * g + t.camera.read_noise**2) / g**2 + 1 / 12) / 120.0
    z = (cube.mean(axis=0) - rate)[cold] / (sig[cold] / np.sqrt(len(good)))
    clean = np.abs(z) < 8  # cosmic rays
    assert abs(z[clean].mean()) < 0.02 and np.std(z[clean]) == pytest.approx(1.0, abs=0.05)
    # the warm dark has 2**(1/3) x the dark current
    w = (fits.getdata(t.path(warm[0])) - bias) / 120.0
    assert np.median(w[hot] / rate[hot]) == pytest.approx(warm[0].dark_scale, rel=0.02)
    assert warm[0].dark_scale == pytest.approx(2 ** (1 / 3))
    # cosmic rays are where the truth says, with the electrons it says
    f = good[0]
    raw = fits.getdata(t.path(f)).astype(np.float64)
    cr = np.array(f.cosmic_rays)
    assert len(cr) >= 1
    got = (raw - bias)[cr[:, 1].astype(int), cr[:, 0].astype(int)] * g
    expect = cr[:, 2] + (rate * 120 * g)[cr[:, 1].astype(int), cr[:, 0].astype(int)]
    assert np.all(np.abs(got - expect) < 6 * np.sqrt(expect + t.camera.read_noise**2))


def test_flats_match_true_flat(tmp_path):
    t = simulate_night(tmp_path, NightPlan(n_bias=0, dark_exptimes=(), filters=("V", "B"),
                                           n_flat=9, targets=()), CAM)
    bias, rate = t.read("bias.fits"), t.read("dark_rate.fits")
    y0, y1, x0, x1 = t.camera_info["flat_norm_region"]
    g = t.camera.gain
    truths = {}
    for band in ("V", "B"):
        truth = t.read(f"flat_{band}.fits")
        truths[band] = truth
        assert truth[y0:y1, x0:x1].mean() == pytest.approx(1.0, abs=1e-6)
        assert truth.min() > 0.78 and truth.max() < 1.06  # vignetting, ~1 % response
        norm, levels = [], []
        for f in t.frames("flat", filter=band):
            raw = fits.getdata(t.path(f)).astype(np.float64)
            assert 20000 < raw[y0:y1, x0:x1].mean() < 31000
            assert raw[y0:y1, x0:x1].mean() == pytest.approx(f.flat_level, rel=0.003)
            sig = raw - bias - rate * f.exptime
            levels.append(sig[y0:y1, x0:x1].mean() * g)
            norm.append(sig / sig[y0:y1, x0:x1].mean())
        master = np.median(norm, axis=0)
        res = master / truth - 1
        expect = 1.2533 * np.sqrt(1 / np.mean(levels)) / np.sqrt(len(norm))  # median of 9
        assert abs(res[y0:y1, x0:x1].mean()) < 2e-4
        assert np.sqrt(np.mean(res**2)) == pytest.approx(expect, rel=0.25)
        assert np.sqrt(np.mean(res**2)) < 0.005
    # filters differ by more than the noise (own dust, vignetting depth)
    assert np.abs(truths["V"] / truths["B"] - 1).max() > 0.01


def test_camera_is_the_same_across_nights(tmp_path):
    base = NightPlan(n_bias=1, dark_exptimes=(), filters=("R",), n_flat=1, targets=())
    a = simulate_night(tmp_path / "a", base, CAM)
    b = simulate_night(tmp_path / "b", replace(base, seed=99, night="2026-04-02"), CAM)
    changed = CameraModel(size=SIZE, flat_change=0.03, new_hot_pixels=5)
    c = simulate_night(tmp_path / "c", base, changed)
    more = simulate_night(tmp_path / "d", base, CameraModel(size=SIZE, new_hot_pixels=8))
    for name in ("bias.fits", "dark_rate.fits", "hot_pixels.fits", "flat_R.fits"):
        assert np.array_equal(a.read(name), b.read(name)), name
    diff = c.read("flat_R.fits") / a.read("flat_R.fits") - 1
    assert 0.02 < np.abs(diff).max() < 0.04
    new = c.read("hot_pixels.fits") & ~a.read("hot_pixels.fits")
    assert new.sum() == 5 and (more.read("hot_pixels.fits") & ~a.read("hot_pixels.fits"))[new].all()
    assert sorted(map(tuple, c.camera_info["new_hot_pixels"])) == sorted(
        zip(*np.nonzero(new.T), strict=True))


# -- the sky: fluxes, positions, WCS, defects -------------------------------------------


def _isolated_bright(t: NightTruth, f, lo=1e4, hi=4e5, isolated=True):
    st = t.stars(f.target)
    xs, ys = f.transform.inverse(st["x"], st["y"])
    fl = np.asarray(st[f"flux_{f.filter}"]) * f.transparency * f.exptime
    r = 4 * f.fwhm
    ok = []
    for k in np.nonzero((fl > lo) & (fl < hi))[0]:
        if not (r + 2 < xs[k] < SIZE - r - 3 and r + 2 < ys[k] < SIZE - r - 3):
            continue
        d = np.hypot(xs - xs[k], ys - ys[k])
        d[k] = np.inf
        if isolated and np.any((d < r + 8) & (fl > 0.01 * fl[k])):
            continue
        ok.append(k)
    return xs, ys, fl, np.array(ok, dtype=int)


def test_star_fluxes_match_the_catalogue(maxim):
    t = maxim
    ratios, sigmas = [], []
    for f in t.frames("light", expected="ok"):
        if f.defects:
            continue
        tt = t.targets[f.target]
        sky = t.read(f"sky_{tt.slug}_{f.filter}.fits").astype(np.float64)
        cal = _calibrated(t, f) - _sky_plane(t, f)
        xs, ys, fl, idx = _isolated_bright(t, f, lo=3e3, isolated=False)
        if idx.size == 0:
            continue
        st = t.stars(f.target)[idx]
        r = 4 * f.fwhm
        s, _, _ = sep.sum_circle(cal, xs[idx], ys[idx], r)
        # what else falls into the aperture (galaxy, faint neighbours), from the truth image
        around, _, _ = sep.sum_circle(sky, st["x"], st["y"], r)
        other = around * t.camera.gain / np.asarray(st[f"flux_{f.filter}"]) - 1
        keep = (other < 0.03) & (np.minimum(st["x"], st["y"]) > r + 2) & (
            np.maximum(st["x"], st["y"]) < SIZE - r - 3)  # the whole aperture on the grid
        noise = np.sqrt(fl[idx] * (1 + other) + np.pi * r * r * (
            f.sky_rate * f.exptime + t.camera.read_noise**2)) / fl[idx]
        ratios += list(s[keep] / fl[idx][keep] - other[keep])
        sigmas += list(noise[keep])
    ratios, sigmas = np.array(ratios), np.array(sigmas)
    assert len(ratios) >= 10
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(ratios - 1) < 0.01 + 4.5 * sigmas), (ratios, sigmas)
    assert np.median(np.abs(ratios - 1) / sigmas) < 1.5


def test_truth_sky_image_matches_the_reference_light(maxim):
    t = maxim
    for tt in t.targets.values():
        f = t.file(tt.reference)
        assert f.transform.matrix == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
        sky = t.read(f"sky_{tt.slug}_{f.filter}.fits").astype(np.float64)
        h = fits.getheader(t.truth_dir / f"sky_{tt.slug}_{f.filter}.fits")
        assert h["BUNIT"] == "adu/s" and h["FWHM"] == tt.fwhm_ref
        scale = t.camera.gain * f.transparency * f.exptime
        light = (_calibrated(t, f) - _sky_plane(t, f)) / scale
        var = (f.sky_rate * f.exptime + t.camera.read_noise**2) / scale**2
        # a sum over a large area hardly depends on the seeing (the frame's is not
        # fwhm_ref) if it stays clear of the frame edges (stars just outside shine in)
        # and of saturated stars
        use = np.zeros((SIZE, SIZE), bool)
        use[24:-24, 24:-24] = True
        sat = np.argwhere(fits.getdata(t.path(f)) >= t.camera.saturation)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        for y, x in sat:
            use &= np.hypot(xx - x, yy - y) > 8 * f.fwhm
        got, want = light[use].sum(), sky[use].sum()
        noise = np.sqrt(var * use.sum() + want / scale)
        assert use.sum() > SIZE * SIZE / 4
        assert abs(got - want) < 5 * noise + 0.005 * want, (got, want)


def test_star_stamps_and_galaxy_conserve_flux():
    from observd.simulate import Transform, _add_galaxy, _add_moffat, _make_target

    rng = np.random.default_rng(0)
    for fwhm in (2.5, 3.3, 10.0):
        for flux in (1e3, 5e4, 3e6):  # the three stamp sizes
            img = np.zeros((256, 256), np.float32)  # holds the largest stamp (r = 98 px)
            x, y = rng.uniform(120, 136, 2)
            _add_moffat(img, np.array([x]), np.array([y]), np.array([flux]), fwhm)
            assert img.sum(dtype=np.float64) == pytest.approx(flux, rel=1e-5)
            yy, xx = np.mgrid[:256, :256]
            assert (img * xx).sum() / img.sum() == pytest.approx(x, abs=0.01)
            assert (img * yy).sum() / img.sum() == pytest.approx(y, abs=0.01)
    target = _make_target("M 51", SMALL, CameraModel(size=512), 0.5, 0)
    total = sum(target.galaxy.flux["V"])
    for tr in (Transform.build(512, 0, 0, 0, False), Transform.build(512, 3.3, -2.7, 180.2, True)):
        img = np.zeros((512, 512), np.float32)
        _add_galaxy(img, target.galaxy, "V", tr, 3.0, 1.0)
        assert img.sum(dtype=np.float64) == pytest.approx(total, rel=1e-3)


def _match(t: NightTruth, f, min_flux=3000.0):
    cal = np.ascontiguousarray(_calibrated(t, f) - _sky_plane(t, f), dtype=np.float32)
    bkg = sep.Background(cal, bw=64, bh=64)
    sub = cal - bkg.back()
    objs = sep.extract(sub, 5.0, err=bkg.globalrms, minarea=5)
    objs = objs[(objs["flux"] > min_flux) & (objs["peak"] < 6e4) & (objs["flag"] == 0)]
    x, y, _ = sep.winpos(sub, objs["x"], objs["y"], 0.5 * f.fwhm)
    st = t.stars(f.target)
    px, py = f.transform.inverse(st["x"], st["y"])
    d = np.hypot(x[:, None] - px[None, :], y[:, None] - py[None, :])
    j = np.argmin(d, axis=1)
    near = d[np.arange(len(x)), j] < 1.0
    return x[near] - px[j[near]], y[near] - py[j[near]]


def test_true_transform_maps_catalogue_onto_detections(maxim):
    t = maxim
    lights = [f for f in t.frames("light", expected="ok") if not f.defects]
    ref = lights[0]
    rotated = max((f for f in lights if not f.transform.flipped),
                  key=lambda f: abs(f.transform.rotation_deg))
    flipped = next(f for f in lights if f.transform.flipped)
    assert flipped.target == "M 51"
    assert ref.transform.matrix == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    assert abs(rotated.transform.rotation_deg) > 0.02
    assert abs(abs(flipped.transform.rotation_deg) - 180) < 1
    for f in (ref, rotated, flipped):
        dx, dy = _match(t, f)
        assert len(dx) >= 15, f.path
        assert np.median(np.hypot(dx, dy)) < 0.1, f.path
        assert abs(np.median(dx)) < 0.03 and abs(np.median(dy)) < 0.03, f.path
    # ... and the identity would not do for the flipped frame
    st = t.stars("M 51")[:300]
    px, py = flipped.transform.inverse(st["x"], st["y"])
    assert np.median(np.hypot(px - st["x"], py - st["y"])) > 20


def test_exact_wcs_is_exact_and_others_are_not(maxim):
    t = maxim
    modes = {f.wcs for f in t.frames("light")}
    assert {"exact", "perturbed", "absent"} <= modes
    for name, tt in t.targets.items():
        st = t.stars(name)
        x, y = tt.wcs().all_world2pix(st["ra"], st["dec"], 0)
        assert np.max(np.hypot(x - st["x"], y - st["y"])) < 1e-6
    for f in t.frames("light"):
        if f.expected == "rejected: truncated":
            continue
        h = fits.getheader(t.path(f))
        st = t.stars(f.target)[:200]
        px, py = f.transform.inverse(st["x"], st["y"])
        if f.wcs == "absent":
            assert "CTYPE1" not in h
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy notes MJD-OBS from DATE-OBS
            w = WCS(h)
        x, y = w.all_world2pix(st["ra"], st["dec"], 0)
        err = np.max(np.hypot(x - px, y - py))
        if f.wcs == "exact":
            assert err < 1e-5, f.path
            continue
        # perturbed: wrong by what the truth says, nothing else
        assert err > 0.5, f.path
        shift, rot = f.wcs_error["crpix_shift"], f.wcs_error["rotation_deg"]
        assert 3 <= np.hypot(*shift) <= 20 or 0.3 <= abs(rot) <= 1
        ref = t.targets[f.target].ref_wcs
        crpix = np.array(f.transform.inverse(ref["CRPIX1"] - 1, ref["CRPIX2"] - 1)) + 1 + shift
        assert np.allclose([h["CRPIX1"], h["CRPIX2"]], crpix, atol=1e-9)
        cd_ref = np.array([[ref["CD1_1"], ref["CD1_2"]], [ref["CD2_1"], ref["CD2_2"]]])
        a = np.radians(rot)
        turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        cd = cd_ref @ f.transform.array[:, :2] @ turn
        assert np.allclose([[h["CD1_1"], h["CD1_2"]], [h["CD2_1"], h["CD2_2"]]], cd,
                           rtol=0, atol=1e-15)


def test_defects_are_visible(maxim):
    t = maxim
    lights = t.frames("light", target="NGC 2903")
    clear = next(f for f in lights if f.expected == "ok" and not f.defects)
    by = {d: next(f for f in lights if d in f.defects) for d in ("cloudy", "trailed", "defocused")}
    assert len({f.path for f in by.values()}) == 3 and clear.path not in by
    assert all(f.expected == f"rejected: {d}" for d, f in by.items())
    assert 0.2 <= by["cloudy"].transparency <= 0.3
    assert by["defocused"].fwhm > 3 * 2.5

    def stars(f):
        cal = np.ascontiguousarray(_calibrated(t, f), dtype=np.float32)
        bkg = sep.Background(cal, bw=64, bh=64)
        sub = cal - bkg.back()
        o = sep.extract(sub, 5.0, err=bkg.globalrms, minarea=5)
        return o[(o["flux"] > 5e3) & (o["peak"] < 6e4)]

    ref = stars(clear)
    tr = stars(by["trailed"])
    assert np.median(ref["a"] / ref["b"]) < 1.3 and np.median(tr["a"] / tr["b"]) > 1.6
    # defocus: the peaks of bright stars drop ~10x (peak ~ flux / FWHM^2)
    st = t.stars("NGC 2903")
    peaks = []
    for f in (clear, by["defocused"]):
        cal = _calibrated(t, f) - _sky_plane(t, f)
        x, y = f.transform.inverse(st["x"], st["y"])
        fl = np.asarray(st[f"flux_{f.filter}"]) * f.transparency * f.exptime
        use = (fl > 2e4) & (fl < 3e5) & (x > 3) & (x < SIZE - 4) & (y > 3) & (y < SIZE - 4)
        ix, iy = np.rint(x[use]).astype(int), np.rint(y[use]).astype(int)
        box = np.max([cal[iy + a, ix + b] for a in (-1, 0, 1) for b in (-1, 0, 1)], axis=0)
        peaks.append(np.median(box / fl[use]))
    assert peaks[1] < 0.25 * peaks[0]
    # clouds: the galaxy and its stars are ~4x fainter than in the truth image
    cl = by["cloudy"]
    tt = t.targets["NGC 2903"]
    sky = t.read(f"sky_{tt.slug}_{cl.filter}.fits").astype(np.float64)
    x, y = cl.transform.inverse(tt.galaxy["x"], tt.galaxy["y"])
    got, _, _ = sep.sum_circle(_calibrated(t, cl) - _sky_plane(t, cl), [x], [y], 60.0)
    want, _, _ = sep.sum_circle(sky, [tt.galaxy["x"]], [tt.galaxy["y"]], 60.0)
    ratio = got[0] / (want[0] * t.camera.gain * cl.exptime)
    assert ratio == pytest.approx(cl.transparency, abs=0.01)
    # the satellite trail is a bright line across its frame
    sat = next(f for f in t.frames("light") if "satellite" in f.defects)
    s = sat.extras["satellite"]
    cal = _calibrated(t, sat) - _sky_plane(t, sat)
    u = np.linspace(0.1, 0.9, 50)
    lx = np.round(s["x0"] + u * (s["x1"] - s["x0"])).astype(int)
    ly = np.round(s["y0"] + u * (s["y1"] - s["y0"])).astype(int)
    assert np.median(cal[ly, lx]) > 0.5 * s["peak_e"]
    assert np.hypot(s["x1"] - s["x0"], s["y1"] - s["y0"]) > SIZE / 2
    for x, y in ((s["x0"], s["y0"]), (s["x1"], s["y1"])):  # from edge to edge
        assert min(abs(x + 0.5), abs(y + 0.5), abs(x - SIZE + 0.5), abs(y - SIZE + 0.5)) < 1e-6


def test_junk_files(maxim):
    t = maxim
    junk = {f.expected: f for f in t.files if f.expected.split(":")[0] in ("rejected", "ignored")
            and f.type in ("unknown", "light") and f.expected.split(": ")[1] in
            ("empty", "not FITS", "truncated", "not a FITS file name")}
    assert set(junk) == {"rejected: empty", "rejected: not FITS", "rejected: truncated",
                         "ignored: not a FITS file name"}
    assert t.path(junk["rejected: empty"]).stat().st_size == 0
    assert not t.path(junk["rejected: not FITS"]).read_bytes().startswith(b"SIMPLE")
    trunc = t.path(junk["rejected: truncated"])
    assert trunc.read_bytes().startswith(b"SIMPLE") and trunc.stat().st_size % 2880 != 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy warns of the truncation, then fails
        with pytest.raises(Exception), fits.open(trunc) as hl:  # noqa: B017 - several kinds
            hl[0].data.sum()


# -- live mode ----------------------------------------------------------------------------


def test_live_mode_writes_growing_files_in_time_order(tmp_path):
    plan = NightPlan(n_bias=2, dark_exptimes=(30.0,), n_dark=1, filters=("R",), n_flat=1,
                     targets=("M 51",), n_light=2, defects=False, seed=5)
    out = tmp_path / "live"
    seen: dict[str, list[int]] = {}
    first: dict[str, int] = {}  # path -> index of the scan that first saw it
    done = threading.Event()

    def watch():
        scan = 0
        while not done.is_set():
            scan += 1
            root = out / "camera"
            if root.exists():
                for p in root.rglob("*"):
                    if p.is_file():
                        rel = p.relative_to(root).as_posix()
                        try:
                            seen.setdefault(rel, []).append(p.stat().st_size)
                        except FileNotFoundError:
                            continue
                        first.setdefault(rel, scan)
            time.sleep(0.0005)

    th = threading.Thread(target=watch)
    th.start()
    t0 = time.monotonic()
    try:
        truth = simulate_night(out, plan, CAM, live=True, speed=20000.0, junk=True)
    finally:
        done.set()
        th.join()
    elapsed = time.monotonic() - t0
    # ~12.5 h of night at 20000x is ~2.3 s, plus the chunk pauses
    assert 1.5 < elapsed < 15
    final = {f.path: t.stat().st_size for f in truth.files if (t := truth.path(f)).exists()}
    assert set(final) == {f.path for f in truth.files}
    grew = [p for p, sizes in seen.items() if p in final and min(sizes) < final[p]]
    assert len(grew) >= 3  # the watcher saw partly written files
    tmp = next(f for f in truth.files if f.written_as)
    assert tmp.written_as in seen and not (out / "camera" / tmp.written_as).exists()
    # files show up in the truth's order (the renamed one shows its final name late)
    scans = [first[f.path] for f in truth.files if f.path in first and f.path != tmp.path]
    assert scans == sorted(scans) and len(set(scans)) > len(scans) // 2
    assert load_truth(out).files == truth.files


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="dialect"):
        simulate_night(tmp_path / "x", NightPlan(dialect="sgp"), CAM)
    simulate_night(tmp_path / "y", NightPlan(n_bias=1, dark_exptimes=(), filters=(),
                                             targets=()), CAM)
    with pytest.raises(FileExistsError):
        simulate_night(tmp_path / "y", NightPlan(n_bias=1, dark_exptimes=(), filters=(),
                                                 targets=()), CAM)


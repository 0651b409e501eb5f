"""Running coadd (observd.stack) against a simulated night with a known truth.

One target, one filter, 512 px, 20 lights (the cloudy, trailed and defocused ones left
out as a pipeline would): cosmic rays in every light, a satellite trail in one, the
meridian flip halfway, and residual hot pixels (the dark subtracted 20 % short on them).
Frames are calibrated with the true bias / dark / flat and put on the reference grid
with the true transform (cv2 cubic, NaN outside), so nothing here depends on the
registration module. "Clean" frames are the same frames with the cosmic rays and the
satellite taken out of the raw pixels and the true dark: their plain weighted mean (no
rejection at all) is the ideal the coadd must equal.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace

import cv2
import numpy as np
import pytest
import sep
from astropy.io import fits
from scipy.optimize import least_squares

from observd.simulate import CameraModel, NightPlan, load_truth, simulate_night
from observd.stack import FrameInput, RunningCoadd, fit_sky

SIZE = 512
TARGET, FILTER = "M 51", "R"
HOT_RESIDUAL = 0.2


# ----------------------------------------------------------------------- the night
def _satellite_e(sat: dict, n: int) -> np.ndarray:
    """The satellite's electrons per pixel, as the simulator adds them."""
    x0, y0, x1, y1 = sat["x0"], sat["y0"], sat["x1"], sat["y1"]
    ln = math.hypot(x1 - x0, y1 - y0)
    ux, uy = (x1 - x0) / ln, (y1 - y0) / ln
    xs = np.arange(n, dtype=np.float64)
    d = xs[None, :] * uy - xs[:, None] * ux - (x0 * uy - y0 * ux)
    return sat["peak_e"] * np.exp(-0.5 * (d / sat["sigma_px"]) ** 2)


def _warp(img: np.ndarray, matrix: np.ndarray, n: int) -> np.ndarray:
    return cv2.warpAffine(img, matrix, (n, n), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("stack") / "night"
    plan = NightPlan(n_bias=1, dark_exptimes=(60.0,), n_dark=1, n_flat=1, n_light=20,
                     filters=(FILTER,), targets=(TARGET,), warm_dark=False)
    simulate_night(out, plan, CameraModel(size=SIZE), workers=2)
    tr = load_truth(out)
    n, gain = tr.camera.size, tr.camera.gain
    bias = tr.read("bias.fits").astype(np.float32)
    dark = tr.read("dark_rate.fits").astype(np.float32)
    hot = tr.read("hot_pixels.fits")
    dark_short = dark.copy()
    dark_short[hot] *= 1.0 - HOT_RESIDUAL
    flat = tr.read(f"flat_{FILTER}.fits").astype(np.float32)
    sat_adu = tr.camera_info["saturation_adu"]
    lights = [f for f in tr.frames("light", target=TARGET, filter=FILTER)
              if not f.expected.startswith("rejected")]
    frames, clean, truths = [], [], []
    for i, ft in enumerate(lights):
        raw = fits.getdata(tr.path(ft)).astype(np.float32)
        t = ft.exptime
        saturated = raw >= 0.98 * sat_adu
        img = (raw - bias - dark_short * t) / flat / t
        img[saturated] = np.nan
        w = _warp(img, ft.transform.array, n)
        raw_c = raw.copy()
        for x, y, e in ft.cosmic_rays:
            raw_c[int(y), int(x)] -= e / gain
        if "satellite" in ft.extras:
            raw_c -= (_satellite_e(ft.extras["satellite"], n) * flat / gain).astype(np.float32)
        img_c = (raw_c - bias - dark * t) / flat / t
        img_c[saturated] = np.nan
        wc = _warp(img_c, ft.transform.array, n)
        sky = fit_sky(w)
        frames.append(FrameInput(w, sky_rms=sky.rms, exptime=t, fwhm=ft.fwhm, frame_id=i,
                                 scale=1.0 / ft.transparency, sky=sky.map(), gain=gain))
        clean.append(wc)
        truths.append(ft)
    return {"truth": tr, "frames": frames, "clean": clean, "lights": truths,
            "scene": tr.read(f"sky_{tr.targets[TARGET].slug}_{FILTER}.fits").astype(np.float64)}


def _plain_mean(frames: list[FrameInput], images: list[np.ndarray]) -> np.ndarray:
    """The ideal: inverse-variance weighted mean with the same weights, no rejection."""
    s = np.zeros((SIZE, SIZE))
    w = np.zeros((SIZE, SIZE))
    for f, im in zip(frames, images, strict=True):
        x = (im - f.sky) * f.scale
        ok = np.isfinite(x)
        wt = ok / (f.scale * f.sky_rms) ** 2
        s += np.where(ok, x, 0.0) * wt
        w += wt
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / w


@pytest.fixture(scope="module")
def coadd(night):
    co = RunningCoadd((SIZE, SIZE))
    reports = [co.add(f, return_mask=True) for f in night["frames"]]
    assert all(r.accepted for r in reports)
    return co, reports


@pytest.fixture(scope="module")
def ideal(night):
    return _plain_mean(night["frames"], night["clean"])


@pytest.fixture(scope="module")
def stars(night):
    """Bright, unsaturated, isolated catalogue stars away from the galaxy and the edges."""
    tr = night["truth"]
    st = tr.stars(TARGET)
    x, y, f = np.array(st["x"]), np.array(st["y"]), np.array(st[f"flux_{FILTER}"])
    g = tr.targets[TARGET].galaxy
    keep = []
    for i in np.flatnonzero((f > 800) & (f < 12000)):
        if not (30 < x[i] < SIZE - 31 and 30 < y[i] < SIZE - 31):
            continue
        if math.hypot(x[i] - g["x"], y[i] - g["y"]) < 70:
            continue
        d = np.hypot(x - x[i], y - y[i])
        if (((d < 10) & (f > 0.01 * f[i])) | ((d < 25) & (f > 0.3 * f[i])))[d > 0].any():
            continue
        keep.append(i)
    keep = np.array(keep)
    assert keep.size >= 15
    return x[keep], y[keep], f[keep]


def _moffat_fwhm(img: np.ndarray, x: float, y: float, half: int = 7) -> float:
    """FWHM of a Moffat (beta = 3) fitted to a stamp (NaN if the stamp has no-data)."""
    xi, yi = int(round(x)), int(round(y))
    st = img[yi - half:yi + half + 1, xi - half:xi + half + 1].astype(np.float64)
    if not np.all(np.isfinite(st)):
        return float("nan")
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]

    def resid(p):
        a, x0, y0, al, b = p
        return (a * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / al**2) ** -3.0 + b - st).ravel()

    p = least_squares(resid, [st.max(), x - xi, y - yi, 2.5, 0.0]).x
    return 2 * abs(p[3]) * math.sqrt(2 ** (1 / 3) - 1)


def _mad(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


# ------------------------------------------------------------------- done-when
def test_coadd_is_as_sharp_as_the_frames(night, coadd, stars):
    co, _ = coadd
    xs, ys, _ = stars
    img = co.image
    fw_coadd = np.nanmedian([_moffat_fwhm(img, x, y) for x, y in zip(xs, ys, strict=True)])
    fw_frames = [np.nanmedian([_moffat_fwhm(f.image - f.sky, x, y)
                               for x, y in zip(xs, ys, strict=True)])
                 for f in night["frames"]]
    assert fw_coadd <= 1.05 * np.median(fw_frames)
    # and the coadd's predicted PSF says so too
    assert co.fwhm == pytest.approx(np.median([f.fwhm for f in night["frames"]]), rel=0.06)


def test_background_noise_is_the_ideal_inverse_variance_combination(night, coadd):
    co, _ = coadd
    scene = night["scene"]
    full = co.n_used == len(night["frames"])
    bg = full & (scene < 0.02)  # far from stars and the galaxy
    assert bg.sum() > 20_000
    noise = _mad(co.image[bg] - scene[bg])
    # each frame's true noise, measured the same way
    per_frame = [_mad(((f.image - f.sky) * f.scale)[bg] - scene[bg]) for f in night["frames"]]
    ideal = 1.0 / math.sqrt(sum(1.0 / s**2 for s in per_frame))
    assert noise == pytest.approx(ideal, rel=0.10)
    # the coadd's own noise map (from the frames' sky_rms) is not far off either: the
    # sky rms of one frame is inflated a little by the faint stars of a rich field
    assert np.median(co.sigma[bg]) == pytest.approx(noise, rel=0.2)


def test_bright_star_photometry_matches_the_truth(night, coadd, stars):
    co, _ = coadd
    xs, ys, fs = stars
    gain = night["truth"].camera.gain

    def phot(a):
        f, _, _ = sep.sum_circle(np.nan_to_num(a).astype(np.float64), xs, ys, 9.0,
                                 bkgann=(14.0, 20.0))
        return f

    # the same apertures on the noiseless truth scene (the catalogue rendered with its
    # neighbours and the aperture losses) and on the coadd
    ratio = phot(co.image) / phot(night["scene"])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert _mad(ratio) <= 0.01 and np.std(ratio) <= 0.01
    a = np.column_stack([np.ones_like(xs), (xs - SIZE / 2) / SIZE, (ys - SIZE / 2) / SIZE])
    coef, *_ = np.linalg.lstsq(a, ratio, rcond=None)
    assert np.all(np.abs(coef[1:]) < 0.005)  # < 0.5 % across the field in x and y
    # and against the catalogue fluxes (ADU/s): the aperture loses ~1 % of a Moffat
    cat = phot(co.image) / (fs / gain)
    assert np.median(cat) == pytest.approx(0.985, abs=0.025)


def _defect_positions(night):
    """Grid pixels hit by cosmic rays, the satellite and the (residual) hot pixels."""
    hot = night["truth"].read("hot_pixels.fits")
    hy, hx = np.nonzero(hot)
    out = {"cosmic ray": set(), "satellite": set(), "hot pixel": set()}
    for ft in night["lights"]:
        m = ft.transform
        cr = np.array(ft.cosmic_rays)
        for key, (x, y) in (("cosmic ray", (cr[:, 0], cr[:, 1])), ("hot pixel", (hx, hy))):
            gx, gy = m.apply(x, y)
            out[key] |= set(zip(np.round(gx).astype(int), np.round(gy).astype(int),
                                strict=True))
        if "satellite" in ft.extras:
            s = ft.extras["satellite"]
            t = np.linspace(0.0, 1.0, 4 * SIZE)
            gx, gy = m.apply(s["x0"] + t * (s["x1"] - s["x0"]), s["y0"] + t * (s["y1"] - s["y0"]))
            out["satellite"] |= set(zip(np.round(gx).astype(int), np.round(gy).astype(int),
                                        strict=True))
    return out


def test_no_cosmic_ray_satellite_or_hot_pixel_residual(night, coadd, ideal):
    co, _ = coadd
    clean = np.stack([(c - f.sky) * f.scale for c, f in zip(night["clean"], night["frames"],
                                                             strict=True)])
    n_have = np.isfinite(clean).sum(axis=0)
    # pixels next to a saturated (masked) star core in some frame: the reference itself
    # is a different mix of frames there
    sat = cv2.dilate((~np.isfinite(clean).all(axis=0) & (n_have > 0)).astype(np.uint8),
                     np.ones((7, 7), np.uint8)).astype(bool)
    sig = co.sigma
    diff = co.image - ideal
    # dropping one frame's pixel on a star (where the frames differ by seeing) moves the
    # mean by ~ their scatter / n: that jitter is no defect residual
    with warnings.catch_warnings():  # all-NaN pixels
        warnings.simplefilter("ignore", RuntimeWarning)
        jitter = np.nanstd(clean, axis=0) / np.maximum(n_have, 1)
    z = np.abs(diff) / np.sqrt(sig**2 + jitter**2)
    z_plain = np.abs(diff) / sig
    on_star = night["scene"] > 1.0  # ~ 5 sigma of one frame
    z[~np.isfinite(z) | sat] = 0.0
    z_plain[~np.isfinite(z_plain) | sat | on_star] = 0.0
    r = {"cosmic ray": 1, "satellite": 4, "hot pixel": 1}
    for kind, points in _defect_positions(night).items():
        worst = worst_plain = 0.0
        for x, y in points:
            k = r[kind]
            if k <= x < SIZE - k and k <= y < SIZE - k:
                sl = (slice(y - k, y + k + 1), slice(x - k, x + k + 1))
                worst = max(worst, float(z[sl].max()))
                worst_plain = max(worst_plain, float(z_plain[sl].max()))
        assert worst < 5.0, f"{kind}: a residual of {worst:.1f} sigma"
        assert worst_plain < 5.0, f"{kind}: off the stars, {worst_plain:.1f} sigma"
    # and nowhere else either
    assert z.max() < 5.0


def test_star_cores_of_the_sharpest_frames_are_not_clipped(night, stars):
    """On the clean frames nothing should be rejected near the stars; a naive clip
    (background noise only) cuts the cores of the sharpest frames: the trap."""
    xs, ys, _ = stars
    frames = [replace(f, image=c) for f, c in zip(night["frames"], night["clean"],
                                                    strict=True)]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cores = np.zeros((SIZE, SIZE), bool)
    for x, y in zip(xs, ys, strict=True):
        cores |= (xx - x) ** 2 + (yy - y) ** 2 < 6.0**2
    # the five sharpest; not the satellite frame, whose "clean" version keeps the
    # trail's photon noise
    fwhm = np.array([f.fwhm if "satellite" not in ft.defects else np.inf
                     for f, ft in zip(frames, night["lights"], strict=True)])
    sharp = set(np.argsort(fwhm)[:5].tolist())

    def core_rejections(co: RunningCoadd, fs: list[FrameInput]) -> int:
        total = 0
        for i, f in enumerate(fs):
            rep = co.add(f, return_mask=True)
            if i in sharp and rep.mask is not None:
                total += int((rep.mask & cores).sum())
        return total

    assert core_rejections(RunningCoadd((SIZE, SIZE)), frames) == 0
    naive = RunningCoadd((SIZE, SIZE), psf_margin=0.0, scale_error=0.0,
                         registration_error=0.0)
    plain = [replace(f, gain=None) for f in frames]
    assert core_rejections(naive, plain) > 50


# ----------------------------------------------------------- checkpoints, memory
def _roundtrip(co: RunningCoadd) -> RunningCoadd:
    buf = io.BytesIO()
    np.savez(buf, **co.state())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        return RunningCoadd.from_state({k: z[k] for k in z.files})


@pytest.mark.parametrize("cut", [2, 10])
def test_checkpoint_resumes_bit_identically(night, coadd, cut):
    straight, _ = coadd
    frames = night["frames"]
    co = RunningCoadd((SIZE, SIZE))
    for f in frames[:cut]:
        co.add(f)
    co = _roundtrip(co)
    assert co.frame_ids == list(range(cut))
    # after a crash the caller offers again what the catalog does not list: a frame
    # already in the checkpoint is refused, so nothing counts twice
    again = co.add(frames[cut - 1])
    assert not again.accepted and again.reason == "already in the coadd"
    for f in frames[cut:]:
        co.add(f)
    assert co.frame_ids == straight.frame_ids
    a, b = co.state(), straight.state()
    for key in ("sum", "wsum", "exposure", "psf2", "count", "disputes"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert co.frames == straight.frames
    np.testing.assert_array_equal(co.image, straight.image)


def test_memory_does_not_grow_with_the_number_of_frames(night):
    frames = night["frames"]
    co = RunningCoadd((SIZE, SIZE))
    sizes = []
    for i, f in enumerate(frames + [replace(g, frame_id=100 + j) for j, g in
                                    enumerate(frames)]):
        co.add(f)
        if i in (5, 2 * len(frames) - 1):
            sizes.append((co.nbytes, {k: (v.shape, v.dtype) for k, v in co.state().items()
                                      if isinstance(v, np.ndarray)}))
    assert sizes[0] == sizes[1]
    assert sizes[0][0] == SIZE * SIZE * 27  # 2 float64 + 2 float32 + uint16 + int8 maps


def test_exposure_map_and_totals(night, coadd):
    co, reports = coadd
    t = night["frames"][0].exptime
    n = len(night["frames"])
    assert co.total_exptime == pytest.approx(n * t)
    exp = co.exposure
    # full coverage in the middle, but for cosmic rays and saturated cores
    centre = exp[200:300, 200:300]
    assert np.median(centre) == pytest.approx(n * t)
    assert np.mean(centre >= (n - 2) * t) > 0.99
    np.testing.assert_array_equal(co.n_used == 0, ~np.isfinite(co.image))
    # every frame's cosmic rays were found: each frame rejected some pixels, the
    # satellite frame thousands
    sat = next(i for i, ft in enumerate(night["lights"]) if "satellite" in ft.defects)
    assert reports[sat].n_rejected > 1000
    assert all(r.n_rejected > 0 for r in reports[co.warmup:])


# ------------------------------------------------------------- small synthetic cases
def _synthetic(n=64, seed=0, fwhm=3.0, shift=(0.0, 0.0)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    img = np.zeros((n, n), np.float32)
    s = fwhm / 2.3548
    for x0, y0, f in ((20.3, 20.7, 2000.0), (44.5, 30.2, 800.0), (30.0, 48.0, 300.0)):
        x0, y0 = x0 + shift[0], y0 + shift[1]
        img += f / (2 * np.pi * s * s) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))
    img += 10.0 + rng.normal(0.0, 0.3, (n, n)).astype(np.float32)
    return img


def _fi(img, i, fwhm=3.0, **kw):
    return FrameInput(img, sky_rms=0.3, exptime=60.0, fwhm=fwhm, frame_id=i, sky=10.0, **kw)


def test_warmup_is_fair_to_the_first_frames():
    a, b, c = (_synthetic(seed=s) for s in (1, 2, 3))
    b[10, 10] += 80.0  # a cosmic ray in the first frames: out whichever comes first
    results = []
    for order in ((a, b, c), (b, c, a), (c, a, b)):
        co = RunningCoadd((64, 64))
        reps = [co.add(_fi(img, i)) for i, img in enumerate(order)]
        assert reps[0].warming_up and reps[1].warming_up and not reps[2].warming_up
        results.append(co.image)
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-6, atol=1e-6)
    assert abs(results[0][10, 10]) < 1.0


def test_late_covered_pixels_vote_out_a_defect():
    """Pixels first covered after the warm-up (a dither edge): the first value has a
    cosmic ray; the next frame replaces it (the result does not depend on the order)."""
    frames = [_synthetic(seed=s) for s in range(8)]
    for f in frames[:3]:
        f[:, 50:] = np.nan  # the warm-up frames do not reach the right edge
    frames[3][20, 55] += 60.0  # the first value there is a cosmic ray
    frames[5][21, 56] += 60.0  # and one later, on a pixel with two good values
    co = RunningCoadd((64, 64))
    reps = [co.add(_fi(f, i)) for i, f in enumerate(frames)]
    assert reps[4].n_replaced >= 1
    img = co.image
    assert abs(img[20, 55]) < 1.0 and abs(img[21, 56]) < 1.0
    assert co.n_used[20, 55] == 4 and co.n_used[21, 56] == 4


def test_a_persistent_defect_in_the_mean_is_voted_out():
    """A hot pixel on the same grid pixel in two of the first frames gets into M; the
    frames after it dispute it from below until it is restarted."""
    frames = [_synthetic(seed=s) for s in range(10)]
    for f in frames[:2]:
        f[40, 12] += 50.0
    co = RunningCoadd((64, 64), warmup=2)
    for i, f in enumerate(frames):
        co.add(_fi(f, i))
    assert abs(co.image[40, 12]) < 1.0


def test_a_frame_that_does_not_belong_is_refused():
    co = RunningCoadd((64, 64))
    for i in range(4):
        co.add(_fi(_synthetic(seed=i), i))
    before = co.state()
    bad = _synthetic(seed=9, shift=(4.0, 0.0))  # wrong registration
    rep = co.add(_fi(bad, 9), return_mask=True)
    if rep.accepted:  # three stars only: may stay under the limit; the cores go anyway
        assert rep.n_rejected > 20
    strict = RunningCoadd.from_state(before)
    strict.max_rejected_fraction = 0.005
    rep = strict.add(_fi(bad, 9))
    assert not rep.accepted and "disagrees with the coadd" in rep.reason
    after = strict.state()
    for k in ("sum", "wsum", "count"):
        np.testing.assert_array_equal(after[k], before[k])
    assert strict.frame_ids == [0, 1, 2, 3]


def test_coverage_weights_and_validation():
    co = RunningCoadd((64, 64), warmup=1)
    img = _synthetic(seed=1)
    cov = np.ones((64, 64), np.float32)
    cov[:, :32] = 0.5
    co.add(_fi(img, 0, coverage=cov))
    co.add(_fi(_synthetic(seed=2), 1))
    w = co.weight
    assert w[5, 5] == pytest.approx(1.5 / 0.09, rel=1e-5)
    assert w[5, 50] == pytest.approx(2.0 / 0.09, rel=1e-5)
    assert co.exposure[5, 5] == pytest.approx(90.0)
    with pytest.raises(ValueError, match="shape"):
        co.add(_fi(np.zeros((32, 32), np.float32), 5))
    with pytest.raises(ValueError, match="fwhm"):
        co.add(_fi(img, 6, fwhm=float("nan")))


def test_fit_sky_recovers_a_plane_and_its_noise():
    rng = np.random.default_rng(3)
    n = 256
    yy, xx = np.mgrid[0:n, 0:n]
    plane = 5.0 + 0.4 * (xx - 127.5) / n - 0.2 * (yy - 127.5) / n
    img = plane + rng.normal(0.0, 0.25, (n, n))
    src = rng.random((n, n)) < 0.05  # faint sources, all positive
    img[src] += rng.exponential(2.0, int(src.sum()))
    img[:10] = np.nan
    sk = fit_sky(img.astype(np.float32))
    assert sk.rms == pytest.approx(0.25, rel=0.08)
    assert np.nanmax(np.abs(sk.map() - plane)[10:]) < 0.05


def test_running_kernel_flags_what_the_array_rule_flags(night):
    """The compiled running add judges pixel for pixel what the rule written in numpy
    on whole arrays (``stack_reference.outliers``) flags against the same coadd: the
    kernel's rejected + replaced pixels are exactly the rule's outliers."""
    from observd import stack
    from tests import stack_reference

    def as_x(f: FrameInput) -> FrameInput:
        # the frame already scaled and sky-free (x exactly as the kernel would make it),
        # with the same noise model: bg = scale * rms, Poisson factor scale / (g t)
        rs = slice(0, SIZE)
        x = stack._scaled(np.asarray(f.image), None, f.sky, rs, f.scale, 0.05)
        return replace(f, image=x, sky=0.0, scale=1.0, sky_rms=f.scale * f.sky_rms,
                       gain=f.gain / f.scale)

    co = RunningCoadd((SIZE, SIZE))
    checked = 0
    for f in map(as_x, night["frames"]):
        if co.warming_up:
            co.add(f)
            continue
        a = co._arrays()
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.divide(a["sum"], a["wsum"], dtype=np.float32)
            var0 = np.reciprocal(a["wsum"], dtype=np.float32)
            s2m = a["psf2"] * var0
        fr = stack._Frame(f.frame_id, 1.0, f.sky_rms, f.exptime, f.fwhm, f.gain,
                          co.registration_error)  # fmt: skip
        flag, _ = stack_reference.outliers(co._rules, fr, np.asarray(f.image, np.float32), m, var0,
                                  co._q(), lambda j, s2m=s2m: s2m.flat[j])  # fmt: skip
        rep = co.add(f, return_mask=True)
        assert rep.accepted
        assert not (rep.mask & ~flag).any()  # every rejected pixel is an outlier
        assert rep.n_rejected + rep.n_replaced == int(flag.sum())
        checked += int(flag.sum())
    assert checked > 100  # cosmic rays, the satellite, hot pixels: the rule had work


@pytest.mark.parametrize("k", [2, 3, 4])
def test_warmup_kernel_flags_what_the_array_rule_flags(night, k):
    """The warm-up's compiled test of a frame against the median of the first ``k``
    frames flags exactly what the rule written in numpy flags, pixel for pixel, and the
    compiled lower median equals a plain sort."""
    from observd import stack
    from tests import stack_reference

    co = RunningCoadd((SIZE, SIZE))
    frs, xs = [], []
    for f in night["frames"][:k]:
        x = stack._scaled(np.asarray(f.image), None, f.sky, slice(0, SIZE), f.scale, 0.05)
        frs.append(stack._Frame(f.frame_id, f.scale, f.sky_rms, f.exptime, f.fwhm, f.gain,
                                co.registration_error))  # fmt: skip
        xs.append(x)
    # the lower median by a plain sort, and the first frame holding it
    stackx = np.stack(xs)
    cnt = np.isfinite(stackx).sum(axis=0)
    srt = np.sort(np.where(np.isnan(stackx), np.inf, stackx), axis=0)
    pick = np.take_along_axis(srt, (np.maximum(cnt, 1) - 1)[None] // 2, axis=0)[0]
    med = np.where(cnt > 0, pick, np.nan).astype(np.float32)
    idx = np.where(cnt > 0, np.argmax(stackx == med, axis=0), 0)
    var0 = np.array([fr.bg2 for fr in frs], np.float32)[idx]
    s2m = np.array([fr.sig2 for fr in frs], np.float32)[idx]
    # the seed's one-pass reference: that median, its frame's noise (/ (2 n / pi) from
    # three values on) and PSF
    ref = [np.empty(med.shape, np.float32) for _ in range(3)]
    stack._seed_reference_kernel(tuple(xs), np.array([fr.bg2 for fr in frs], np.float32),
                                 np.array([fr.sig2 for fr in frs], np.float32), *ref)
    assert np.array_equal(ref[0], med, equal_nan=True)
    shrink = np.where(cnt >= 3, np.float32(np.pi / 2) / np.maximum(cnt, 1), 1).astype(np.float32)
    assert np.allclose(ref[1], var0 * shrink, rtol=1e-6)
    assert np.array_equal(ref[2], s2m)
    q = float(np.median([fr.p / fr.bg2 for fr in frs]))
    r = co._rules
    flagged = 0
    for fr, x in zip(frs, xs, strict=True):
        ref, _ = stack_reference.outliers(r, fr, x, med, var0, q, lambda j: s2m.flat[j])
        got = np.zeros(x.shape, np.uint8)
        stack._flag_kernel(x, med, var0, s2m, got, np.float32(fr.bg2), np.float32(fr.p),
                           np.float32(q), np.float32(fr.sig2), np.float32(r.clip), r.grow,
                           np.float32(r.grow_clip), np.float32(r.psf_margin),
                           np.float32(r.scale_error), np.float32(r.curvature_floor),
                           np.float32(fr.reg))  # fmt: skip
        assert np.array_equal(got > 0, ref)
        flagged += int(ref.sum())
    assert flagged > 50  # cosmic rays and the satellite: the rule had work


def test_parallel_kernels_from_two_threads_at_once():
    """The pipeline thread and the copier both run compiled parallel kernels; numba's
    fallback threading layer aborts the process when that happens, so observd asks for
    a thread-safe one (observd/__init__.py). Two coadds filled at once from two threads
    end bit-identical to each other."""
    import threading

    import numba

    rng = np.random.default_rng(5)
    frames = [rng.normal(100.0, 3.0, (256, 256)).astype(np.float32) for _ in range(8)]
    coadds = [RunningCoadd((256, 256)) for _ in range(2)]

    def fill(co: RunningCoadd) -> None:
        for i, img in enumerate(frames):
            co.add(FrameInput(img, sky_rms=3.0, exptime=60.0, fwhm=3.0, frame_id=i,
                              sky=100.0))  # fmt: skip

    threads = [threading.Thread(target=fill, args=(co,)) for co in coadds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert numba.threading_layer() in ("tbb", "omp")
    assert coadds[0].n_frames == coadds[1].n_frames == 8
    assert np.array_equal(coadds[0].image, coadds[1].image, equal_nan=True)


def test_load_kernels_covers_the_pipelines_argument_types():
    """After :func:`observd.stack.load_kernels`, a coadd fed the way the pipeline feeds
    it (ADU float32 frames, float32 coverage, a fitted sky) and pictured after every
    frame compiles nothing new: the first lights do not wait for numba."""
    code = textwrap.dedent("""
        import json
        import numpy as np
        from numba.core.registry import CPUDispatcher
        from observd import stack
        stack.load_kernels()
        kernels = {n: k for n, k in vars(stack).items() if isinstance(k, CPUDispatcher)}
        before = {n: len(k.signatures) for n, k in kernels.items()}
        rng = np.random.default_rng(3)
        co = stack.RunningCoadd((200, 300))
        for i in range(6):
            img = rng.normal(3000.0, 20.0, (200, 300)).astype(np.float32)
            img[50, 60 + i] = 9000.0
            cov = np.ones((200, 300), np.float32)
            cov[:, :i] = 0.0
            fit = stack.fit_sky(img)
            sky = stack.SkyFit(tuple(c / 30.0 for c in fit.coeffs), fit.rms / 30.0, fit.shape)
            co.add(stack.FrameInput(img, unit=1 / 30.0, sky_rms=sky.rms, exptime=30.0,
                                    fwhm=3.1, frame_id=i, coverage=cov, sky=sky, gain=1.2))
            co.image  # published after every frame, from 1 buffered frame on
        after = {n: len(k.signatures) for n, k in kernels.items()}
        print(json.dumps({"before": before, "after": after}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600)  # fmt: skip
    got = json.loads(out.stdout)
    for name in ("_seed_reference_kernel", "_flag_kernel", "_seed_fold_kernel",  # warm-up
                 "_screen_kernel", "_gather_kernel", "_decide_kernel", "_fold_kernel"):
        assert got["before"][name] >= 1, (name, got)
    assert got["after"] == got["before"], got

"""Master bias / dark / flat combiners against a synthetic camera with a known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from observd.combine import (
    DarkRate,
    RunningMaster,
    batch_clipped_mean,
    central_slices,
    combine_flats,
    fit_dark_rate,
    hot_pixel_map,
)
from tests.calib_synth import make_camera

SHAPE = (256, 256)
N_BIAS = 15
EXPTIMES = (30.0, 60.0, 120.0)
N_DARK = 7


@pytest.fixture(scope="module")
def cam():
    return make_camera(seed=11, shape=SHAPE)


@pytest.fixture(scope="module")
def biases(cam):
    return [cam.bias_frame() for _ in range(N_BIAS)]


@pytest.fixture(scope="module")
def bias_master(biases):
    return batch_clipped_mean(biases)


@pytest.fixture(scope="module")
def darks(cam):
    return {t: [cam.dark_frame(t) for _ in range(N_DARK)] for t in EXPTIMES}


@pytest.fixture(scope="module")
def dark_masters(darks):
    out = {}
    for t, frames in darks.items():
        rm = RunningMaster(SHAPE, kind="dark")
        for f in frames:
            assert rm.add(f).accepted
        out[t] = rm
    return out


@pytest.fixture(scope="module")
def dark_rate(dark_masters, bias_master):
    return fit_dark_rate(
        {t: m.master for t, m in dark_masters.items()},
        bias=bias_master.master,
        sigma={t: m.sigma for t, m in dark_masters.items()},
        bias_sigma=bias_master.sigma,
    )


def classic_clipped_mean(frames, sigma, clip=5.0, iters=5):
    """Order-independent reference: clip every frame against the clipped mean of all."""
    st = np.stack(frames).astype(np.float64)
    ref = np.median(st, axis=0)
    acc = np.abs(st - ref) <= clip * sigma
    for _ in range(iters):
        mean = (st * acc).sum(0) / np.maximum(acc.sum(0), 1)
        new = np.abs(st - mean) <= clip * sigma * np.sqrt(1 + 1 / np.maximum(acc.sum(0), 1))
        if np.array_equal(new, acc):
            break
        acc = new
    return (st * acc).sum(0) / np.maximum(acc.sum(0), 1)


# ------------------------------------------------------------------------------ bias
def test_bias_master_accuracy(cam, biases):
    rm = RunningMaster(SHAPE, kind="bias")
    for b in biases:
        rm.add(b)
    ideal = cam.read_noise_adu / np.sqrt(N_BIAS)
    err = rm.master - cam.bias
    assert rm.n == N_BIAS
    assert np.sqrt(np.mean(err**2)) <= 1.1 * ideal  # measured ~1.00
    assert abs(err.mean()) < 0.05 * ideal  # clipping does not bias
    assert rm.noise.read_noise == pytest.approx(cam.read_noise_adu, rel=0.02)
    # per-pixel noise map is honest
    assert np.median(rm.sigma) == pytest.approx(ideal, rel=0.03)


def test_clipping_keeps_gaussian_efficiency(cam):
    frames = [cam.bias_frame(cosmics=False) for _ in range(N_BIAS)]
    master = batch_clipped_mean(frames).master
    plain = np.mean(frames, axis=0)
    ideal = cam.read_noise_adu / np.sqrt(N_BIAS)
    assert np.std(master - cam.bias) / ideal <= 1.02
    # nearly every pixel is the plain mean: efficiency >= 0.98 by a wide margin
    assert np.mean(np.abs(master - plain) > 1e-3) < 2e-3


def test_cosmic_rays_rejected(cam):
    frames = [cam.bias_frame(cosmics=False) for _ in range(10)]
    hit = np.zeros(SHAPE, bool)
    for f in frames:
        before = f.copy()
        cam.cosmic_rays(f, 100.0)  # plenty of hits
        hit |= f != before
    assert hit.sum() > 100
    rm = RunningMaster(SHAPE)
    for f in frames:
        rm.add(f)
    sig = rm.sigma
    z = (rm.master - cam.bias) / sig
    assert np.abs(z[hit]).max() < 5.0
    assert np.all(rm.n_used[hit] < 10)


def test_running_equals_batch_at_every_refresh(biases):
    rm = RunningMaster(SHAPE, kind="bias")
    for k, b in enumerate(biases, start=1):
        res = rm.add(b)
        assert res.accepted and res.n == k
        ref = batch_clipped_mean(biases[:k])
        sigma_master = ref.sigma
        worst = np.max(np.abs(rm.master - ref.master) / sigma_master)
        assert worst <= 0.1, (k, worst)  # measured 0 (the same estimator)
        np.testing.assert_array_equal(rm.n_used, ref.n_used)


def test_sequential_estimator_matches_order_independent_clipping(biases, bias_master):
    """At clip=5 the arrival-order estimator is, in practice, the classic
    order-independent clipped mean (measured: identical at every pixel)."""
    sigma = bias_master.noise.read_noise
    classic = classic_clipped_mean(biases, sigma)
    d = (bias_master.master - classic) / bias_master.sigma
    assert np.mean(np.abs(d) > 0.1) < 1e-4
    assert np.sqrt(np.mean(d**2)) < 0.01
    # and another arrival order gives the same master
    other = batch_clipped_mean(biases[::-1]).master
    d2 = (bias_master.master - other) / bias_master.sigma
    assert np.mean(np.abs(d2) > 0.1) < 1e-4


def test_disagreeing_frame_is_flagged_not_folded(cam, biases):
    rm = RunningMaster(SHAPE)
    for b in biases[:8]:
        rm.add(b)
    before = rm.master.copy()
    yy = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]][0]
    leak = cam.bias_frame() + (60.0 * yy / SHAPE[0]).astype(np.float32)  # light leak
    res = rm.add(leak)
    assert not res.accepted
    assert res.verdict.outlier_fraction > 0.05
    assert "6 sigma" in res.verdict.reason
    np.testing.assert_array_equal(rm.master, before)
    assert rm.n == 8 and rm.stats["frames_flagged"] == 1
    # the next good frame is accepted again
    assert rm.add(biases[8]).accepted


def test_bad_first_frame_is_outvoted_during_warmup(cam, biases):
    bad = biases[0] + np.float32(80.0)  # e.g. a different offset setting
    frames = [bad, *biases[1:9]]
    rm = RunningMaster(SHAPE)
    revised = []
    for f in frames:
        revised += rm.add(f).revised
    v = rm.verdicts
    assert not v[0].accepted and "offset" in v[0].reason
    assert all(x.accepted for x in v[1:])
    assert any(r.index == 0 and not r.accepted for r in revised)
    batch = batch_clipped_mean(frames)
    assert not batch.verdicts[0].accepted
    np.testing.assert_allclose(rm.master, batch.master, atol=1e-3)
    ideal = cam.read_noise_adu / np.sqrt(8)
    assert np.std(rm.master - cam.bias) <= 1.1 * ideal


def test_checkpoint_roundtrip(biases):
    straight = RunningMaster(SHAPE)
    for b in biases:
        straight.add(b)
    for stop in (3, 9):  # in warm-up and running
        rm = RunningMaster(SHAPE)
        for b in biases[:stop]:
            rm.add(b)
        state = rm.state()
        state["meta"] = json.loads(json.dumps(state["meta"]))  # must be JSON-able
        resumed = RunningMaster.from_state(state)
        for b in biases[stop:]:
            resumed.add(b)
        np.testing.assert_array_equal(resumed.master, straight.master)
        assert resumed.n == straight.n


def test_memory_is_bounded(biases):
    rm = RunningMaster(SHAPE)
    for b in biases:
        rm.add(b)
    state = rm.state()
    assert "buffer" not in state  # the warm-up frames are gone
    frame_bytes = SHAPE[0] * SHAPE[1] * 4
    nbytes = sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))
    assert nbytes <= 4.5 * frame_bytes  # sum f64 + count u16 + variance f32


def test_rejects_wrong_input():
    rm = RunningMaster(SHAPE)
    with pytest.raises(ValueError):
        rm.add(np.zeros((10, 10)))
    with pytest.raises(ValueError):
        RunningMaster(SHAPE, kind="flat")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        rm.master  # noqa: B018


# ------------------------------------------------------------------------------ darks
def test_dark_masters_keep_hot_pixels(cam, dark_masters, bias_master):
    for t, rm in dark_masters.items():
        truth = cam.bias + cam.rate_e * t / cam.gain
        sig = np.sqrt(rm.sigma**2 + bias_master.sigma**2)
        z = (rm.master - bias_master.master - (truth - cam.bias)) / sig
        # hot pixels (Poisson noise up to ~100x the read noise) are not clipped away
        assert np.median(rm.n_used[cam.hot]) == N_DARK
        assert abs(np.mean(z[cam.hot])) < 0.3
        assert np.std(z[cam.hot]) < 1.3
        assert abs(np.mean(z)) < 0.05


def test_dark_rate_and_hot_pixels(cam, dark_rate):
    true = cam.rate_e / cam.gain  # ADU/s
    normal = ~cam.hot
    ratio = np.median(dark_rate.rate[normal] / true[normal])
    assert abs(ratio - 1) < 0.03  # measured ~0.3 %
    assert abs(np.median(dark_rate.rate) / np.median(true) - 1) < 0.03
    assert abs(np.median(dark_rate.rate[cam.hot] / true[cam.hot]) - 1) < 0.03
    # the uncertainty map is honest
    z = (dark_rate.rate - true) / dark_rate.sigma
    assert 0.85 < np.std(z[normal]) < 1.15
    # a light of an exposure without its own dark gets a correctly scaled one
    d45 = dark_rate.dark(45.0)
    assert isinstance(dark_rate, DarkRate)
    assert np.median(d45[cam.hot] / (true[cam.hot] * 45)) == pytest.approx(1, abs=0.02)
    # hot pixels: >= 95 % found, <= 1 % false (warm columns are not hot)
    hot = hot_pixel_map(dark_rate.rate, sigma=dark_rate.sigma)
    found = (hot & cam.hot).sum() / cam.hot.sum()
    false = (hot & ~cam.hot).sum()
    assert found >= 0.95
    assert false <= 0.01 * hot.sum()
    assert false <= 0.01 * cam.hot.sum()


def test_dark_offset_model(cam, dark_masters, bias_master):
    """A bias drift between bias and darks: the smooth offset absorbs it, the fit
    through the origin cannot (that is why it is the default)."""
    drift = np.float32(3.0)  # ADU
    masters = {t: m.master + drift for t, m in dark_masters.items()}
    sig = {t: m.sigma for t, m in dark_masters.items()}
    true = cam.rate_e / cam.gain
    normal = ~cam.hot
    smooth = fit_dark_rate(masters, bias=bias_master.master, sigma=sig)
    origin = fit_dark_rate(masters, bias=bias_master.master, sigma=sig, model="origin")
    free = fit_dark_rate(masters, bias=bias_master.master, sigma=sig, model="intercept")
    assert smooth.model == "smooth-offset"
    assert np.median(smooth.offset) == pytest.approx(3.0, abs=0.1)
    assert abs(np.median(smooth.rate[normal] / true[normal]) - 1) < 0.03
    assert np.median(origin.rate[normal] / true[normal]) - 1 > 0.05  # biased
    # the free per-pixel intercept is unbiased too but much noisier
    assert np.std((free.rate - true)[normal]) > 1.5 * np.std((smooth.rate - true)[normal])


def test_warm_dark_is_flagged(cam, darks):
    frames = list(darks[120.0][:5])
    rm = RunningMaster(SHAPE, kind="dark")
    for f in frames:
        assert rm.add(f).accepted
    saved = cam.rate_e
    try:
        cam.rate_e = saved * 2 ** (2 / 6)  # 2 C warmer: 1.26x the dark current
        warm = cam.dark_frame(120.0)
    finally:
        cam.rate_e = saved
    res = rm.add(warm)
    assert not res.accepted
    assert res.verdict.dark_scale == pytest.approx(1.26, abs=0.04)
    assert "dark signal" in res.verdict.reason
    assert rm.add(darks[120.0][5]).accepted


# ------------------------------------------------------------------------------ flats
@pytest.fixture(scope="module")
def flat_set(cam):
    rng = np.random.default_rng(5)
    levels = np.linspace(12000, 30000, 9)
    exptimes = rng.uniform(1, 8, 9)
    frames, stars = [], []
    for lvl, t in zip(levels, exptimes, strict=True):
        f, s = cam.flat_frame(lvl, t, stars=8, star_peak=(0.01, 0.1))
        frames.append(f)
        stars.append(s)
    return frames, list(exptimes), levels, stars


def ideal_flat_noise(cam, levels):
    w = 0
    for lvl in levels:
        s = lvl * cam.flat
        w = w + lvl**2 / (s / cam.gain + cam.read_noise_adu**2)
    return np.sqrt(1 / w) / cam.flat  # relative error of master / truth


def test_master_flat_accuracy_and_noise(cam, flat_set, bias_master, dark_rate):
    frames, exptimes, levels, stars = flat_set
    res = combine_flats(frames, bias=bias_master.master, dark=dark_rate, exptimes=exptimes)
    assert res.n == 9 and all(v.accepted for v in res.verdicts)
    true = cam.flat / np.mean(cam.flat[central_slices(SHAPE)])
    e = int(0.02 * SHAPE[0])
    inner = (slice(e, -e), slice(e, -e))
    rel = (res.master / true - 1)[inner]
    assert np.sqrt(np.mean(rel**2)) < 0.005  # measured ~0.2 %
    ideal = np.sqrt(np.mean(ideal_flat_noise(cam, levels)[inner] ** 2))
    assert np.std(rel) <= 1.1 * ideal  # measured ~1.05
    # stars vanish: where any flat had a star brighter than 1 % of its level
    starry = np.zeros(SHAPE, bool)
    for s, lvl in zip(stars, levels, strict=True):
        starry |= s > 0.01 * lvl * np.mean(cam.flat)
    assert starry.sum() > 50
    assert np.abs(rel[starry[inner]]).max() < 5 * ideal
    # weights follow the signal; the median would be ~1.25x the ideal noise
    w = [v.weight for v in res.verdicts]
    assert w == sorted(w)
    cal = [(f - bias_master.master - dark_rate.dark(t)) for f, t in zip(frames, exptimes,
                                                                          strict=True)]
    cal = [c / np.median(c[central_slices(SHAPE)]) for c in cal]
    med = np.median(cal, axis=0)
    med /= np.median(med[central_slices(SHAPE)])
    assert np.std((med / true - 1)[inner]) > 1.15 * ideal


def test_flat_rejections(cam, flat_set, bias_master, dark_rate):
    frames, exptimes, _, _ = flat_set
    saturated, _ = cam.flat_frame(60000, 2.0)
    saturated = np.minimum(saturated, 65535).astype(np.float32)
    faint, _ = cam.flat_frame(800, 2.0)  # ~1200 e-: SNR ~ 30
    res = combine_flats([*frames[:5], saturated, faint], bias=bias_master.master,
                        dark=dark_rate, exptimes=[*exptimes[:5], 2.0, 2.0])
    v = res.verdicts
    assert [x.accepted for x in v] == [True] * 5 + [False, False]
    assert "saturation" in v[5].reason
    assert "SNR" in v[6].reason and v[6].snr < 50
    # with the gain known, the SNR comes from the noise model
    res2 = combine_flats([*frames[:3], faint], bias=bias_master.master, dark=dark_rate,
                         exptimes=[*exptimes[:3], 2.0], gain=cam.gain,
                         read_noise=cam.read_noise_adu)
    assert not res2.verdicts[3].accepted
    assert res2.verdicts[0].snr == pytest.approx(
        res.verdicts[0].snr, rel=0.05
    )


# ------------------------------------------------------------------ the simulated night
def test_simulated_night_calibrations(tmp_path):
    """observd.simulate's night (256 px): biases, darks with the 2 C warmer one, flats."""
    from astropy.io import fits

    from observd.simulate import CameraModel, NightPlan, simulate_night

    truth = simulate_night(
        tmp_path / "night", NightPlan(targets=(), n_light=0, filters=("R",)),
        CameraModel(size=256), truth_images=False, workers=1,
    )
    cam = truth.camera

    def read(f):
        return fits.getdata(truth.path(f)).astype(np.float32)

    shape = (cam.size, cam.size)
    bias = RunningMaster(shape)
    for f in truth.frames("bias"):
        assert bias.add(read(f)).accepted
    rn_adu = cam.read_noise / cam.gain
    n = bias.n
    assert np.std(bias.master - truth.read("bias.fits")) <= 1.1 * rn_adu / np.sqrt(n)

    masters, sig, flagged = {}, {}, []
    for t in sorted({f.exptime for f in truth.frames("dark")}):
        rm = RunningMaster(shape, kind="dark")
        for f in truth.frames("dark"):
            if f.exptime == t and not rm.add(read(f)).accepted:
                flagged.append(f)
        masters[t], sig[t] = rm.master, rm.sigma
    # the dark taken 2 C warm is caught by its dark signal, no header needed
    assert [f.ccd_temp - cam.set_temp for f in flagged] == [pytest.approx(2.0, abs=0.2)]
    rate = fit_dark_rate(masters, bias=bias.master, sigma=sig, bias_sigma=bias.sigma)
    true_rate = truth.read("dark_rate.fits")
    hot_true = truth.read("hot_pixels.fits")
    assert abs(np.median(rate.rate[~hot_true] / true_rate[~hot_true]) - 1) < 0.03
    hot = hot_pixel_map(rate.rate, sigma=rate.sigma)  # warm columns are not hot
    assert (hot & hot_true).sum() >= 0.95 * hot_true.sum()
    assert (hot & ~hot_true).sum() <= max(1, 0.01 * hot.sum())

    flats = truth.frames("flat", filter="R")
    res = combine_flats([read(f) for f in flats], bias=bias.master, dark=rate,
                        exptimes=[f.exptime for f in flats])
    assert res.n == len(flats)
    true_flat = truth.read("flat_R.fits")
    e = int(0.02 * cam.size)
    rel = (res.master / true_flat - 1)[e:-e, e:-e]
    assert np.sqrt(np.mean(rel**2)) < 0.005
    w = sum(f.flat_level**2 / (f.flat_level * true_flat / cam.gain + rn_adu**2) for f in flats)
    ideal = np.sqrt(np.mean((1 / (w * true_flat**2))[e:-e, e:-e]))
    assert np.std(rel) <= 1.1 * ideal

"""Camera health measurements against a synthetic camera with a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from observd import camera
from observd.combine import (
    RunningMaster,
    batch_clipped_mean,
    combine_flats,
    fit_dark_rate,
    hot_pixel_map,
)
from tests.calib_synth import changed_flat, make_camera

SHAPE = (256, 256)


@pytest.fixture(scope="module")
def cam():
    return make_camera(seed=21, shape=SHAPE, read_noise_e=9.0, gain=1.5)


@pytest.fixture(scope="module")
def biases(cam):
    return [cam.bias_frame() for _ in range(15)]


@pytest.fixture(scope="module")
def bias(biases):
    return batch_clipped_mean(biases)


@pytest.fixture(scope="module")
def flats(cam):
    levels = np.linspace(20000, 30000, 9)  # twilight: every flat at its own level
    return [cam.flat_frame(lvl, 2.0, stars=8)[0] for lvl in levels]


def test_read_noise_from_bias_pairs(cam, biases):
    assert camera.read_noise(biases[:2], gain=cam.gain) == pytest.approx(
        cam.read_noise_e, rel=0.05
    )
    rn = camera.read_noise(biases, gain=cam.gain)
    assert rn == pytest.approx(cam.read_noise_e, rel=0.02)  # measured ~0.3 %
    assert camera.read_noise(biases) == pytest.approx(cam.read_noise_adu, rel=0.02)
    with pytest.raises(ValueError):
        camera.read_noise(biases[:1])


def test_bias_structure(cam, biases, bias):
    s = camera.bias_structure(bias.master)
    assert s.level == pytest.approx(np.median(cam.bias), abs=0.5)
    true_cols = np.std(cam.bias.mean(axis=0))
    true_rows = np.std(cam.bias.mean(axis=1))
    assert s.col_rms == pytest.approx(true_cols, rel=0.05)
    assert s.row_rms == pytest.approx(true_rows, rel=0.1)
    single = camera.bias_structure(biases[0])
    assert single.pixel_rms > s.pixel_rms  # read noise on top of the fixed pattern


def test_gain_by_photon_transfer(cam, flats, bias):
    g = camera.gain_from_flats(flats, bias.master, read_noise_adu=cam.read_noise_adu)
    assert g.gain == pytest.approx(cam.gain, rel=0.05)  # measured ~-1 %
    assert g.n_boxes >= 100 and len(g.pairs) == 4
    # without the read-noise term, and from a single pair
    assert camera.gain_from_flats(flats[:2], bias.master).gain == pytest.approx(
        cam.gain, rel=0.05
    )
    with pytest.raises(ValueError):
        camera.gain_from_flats([flats[0], flats[0] * 3], bias.master)


def test_dark_current_and_hot_pixels(cam, bias, flats):
    masters, sig = {}, {}
    for t in (30.0, 60.0, 120.0):
        rm = RunningMaster(SHAPE, kind="dark")
        for _ in range(7):
            rm.add(cam.dark_frame(t))
        masters[t], sig[t] = rm.master, rm.sigma
    rate = fit_dark_rate(masters, bias=bias.master, sigma=sig, bias_sigma=bias.sigma)
    gain = camera.gain_from_flats(flats, bias.master).gain  # measured, not the truth
    dc = camera.dark_current(rate, gain)
    assert dc == pytest.approx(np.median(cam.rate_e), rel=0.10)  # measured ~1 %
    n_hot = camera.hot_pixel_count(rate)
    assert n_hot == int(hot_pixel_map(rate.rate, sigma=rate.sigma).sum())
    assert n_hot == pytest.approx(cam.hot.sum(), rel=0.05)


def test_vignetting(cam, flats, bias):
    master = combine_flats(flats, bias=bias.master).master
    truth = camera.vignetting(cam.flat)
    assert 0.1 < truth < 0.3
    assert camera.vignetting(master) == pytest.approx(truth, abs=0.005)


def test_flat_change(cam, flats, bias):
    rng = np.random.default_rng(3)
    tonight = combine_flats(flats, bias=bias.master).master
    previous = combine_flats(
        [cam.flat_frame(lvl, 2.0, stars=8)[0] for lvl in np.linspace(21000, 29000, 9)],
        bias=bias.master,
    ).master
    same = camera.flat_change(tonight, previous)
    assert same.status == "ok"
    assert same.rms < 0.001 and same.peak < 0.003  # pixel noise does not count

    saved = cam.flat
    try:
        cam.flat = changed_flat(saved, 0.03, rng)  # a new 3 % dust donut, deeper corners
        changed = combine_flats(
            [cam.flat_frame(lvl, 2.0, stars=8)[0] for lvl in np.linspace(20000, 30000, 9)],
            bias=bias.master,
        ).master
    finally:
        cam.flat = saved
    c = camera.flat_change(changed, previous)
    assert c.status == "alarm"
    assert c.peak > 0.02

    # a global change: 3 % rms is an alarm; a tilt of 0.7 % rms (1.2 % at the
    # edges) is a warning
    xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]][1]
    tilt = (xx - xx.mean()) / np.std(xx)
    big = camera.flat_change(previous * (1 + 0.03 * tilt), previous)
    assert big.rms == pytest.approx(0.03, rel=0.1) and big.status == "alarm"
    small = camera.flat_change(previous * (1 + 0.007 * tilt), previous)
    assert small.rms < 0.01 and small.status == "warn"

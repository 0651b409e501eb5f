"""One-shot-colour (Bayer) cameras stacked as colour, through the real pipeline.

A simulated OSC night (``CameraModel(bayer="RGGB")``: each pixel sees the R, V or B band
of its colour) is calibrated in CFA space, judged and aligned once per frame on the
luminance, debayered, and stacked as the target's R, G and B; the stars' colours in the
stacks are graded against the simulator's truth. The real Seestar S50 M 94 series
(GRBG) goes the same way (slow: twelve 1920 x 1080 frames).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from observd.catalog import Catalog
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night
from tests.conftest import write_config

SIZE = 384


def _run(folder: Path, camera_dir: Path, timezone: str = "America/Los_Angeles"):
    config = load_config(write_config(folder, incoming=str(camera_dir), timezone=timezone))
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    for path in in_time_order(find_frame_files(config.paths.incoming, config), config):
        pipeline.process(path)
    pipeline.finish()
    return config, catalog


@pytest.fixture(scope="module")
def osc_night(tmp_path_factory):
    folder = tmp_path_factory.mktemp("osc")
    plan = NightPlan(
        targets=("M 51",), filters=("L",), n_light=9, n_bias=5, n_dark=5,
        dark_exptimes=(60.0,), n_flat=5, meridian_flip=False, dialect="nina",
    )  # fmt: skip
    truth = simulate_night(folder / "sim", plan, CameraModel(size=SIZE, bayer="RGGB"))
    config, catalog = _run(folder, truth.camera_dir)
    yield truth, config, catalog
    catalog.close()


def _aperture_flux(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    r: float = 7.0,
    r_in: float = 10.0,
    r_out: float = 14.0,
) -> np.ndarray:
    """Sum in a circle minus the median of an annulus (the coadd holds no sky)."""
    out = np.full(x.size, np.nan)
    k = int(math.ceil(r_out))
    off = np.arange(-k, k + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    for i, (xc, yc) in enumerate(zip(x, y, strict=True)):
        ix, iy = int(round(xc)), int(round(yc))
        box = image[iy - k : iy + k + 1, ix - k : ix + k + 1]
        if box.shape != dy.shape or not np.isfinite(box).all():
            continue
        rr = np.hypot(dx + ix - xc, dy + iy - yc)
        sky = np.median(box[(rr >= r_in) & (rr <= r_out)])
        out[i] = box[rr <= r].sum() - (rr <= r).sum() * sky
    return out


def test_a_colour_camera_is_stacked_as_r_g_b_with_one_catalog_row_per_frame(osc_night):
    truth, config, catalog = osc_night
    lights = truth.frames("light")
    rows = catalog.lights()
    assert len(rows) == len(lights)  # one row per raw file, whatever the colours
    stacked = [r for r in rows if r["status"] == "stacked"]
    assert len(stacked) >= len([f for f in lights if f.expected == "ok"]) - 1
    folder = Path(config.paths.products) / "stacks" / truth.plan.night / "m51"
    for colour in "RGB":
        with fits.open(folder / f"m51_{colour}.fits") as hdul:
            assert hdul[0].header["FILTER"] == colour
            assert hdul[0].header["NCOMBINE"] == len(stacked)
            assert hdul[0].header["EXPTIME"] == pytest.approx(60.0 * len(stacked))
            table = hdul["FRAMES"].data
            assert sorted(table["FILE"][table["FATE"] == "used"]) == sorted(
                Path(r["path"]).name for r in stacked
            )
            # the rejected frames are listed with their reasons too
            assert (table["FATE"] == "rejected").sum() == len(rows) - len(stacked)
    coadds = {c["filter"]: c for c in catalog.db["coadds"].rows}
    assert set(coadds) == {"R", "G", "B"}
    for c in coadds.values():  # each checkpoint holds the same frames
        assert sorted(c["checkpoint_frames"]) == sorted(coadds["G"]["checkpoint_frames"])
    rgb = Image.open(folder / "m51_rgb.png")
    assert rgb.mode == "RGB" and min(rgb.size) >= SIZE // 2


def test_star_colours_in_the_stacks_match_the_truth(osc_night):
    truth, config, catalog = osc_night
    folder = Path(config.paths.products) / "stacks" / truth.plan.night / "m51"
    (target,) = catalog.targets(truth.plan.night)
    pad_y, pad_x = target["grid"]["pad"]
    stars = truth.stars("M 51")
    x, y = np.asarray(stars["x"]) + pad_x, np.asarray(stars["y"]) + pad_y
    true = {c: np.asarray(stars[f"flux_{b}"]) for c, b in (("R", "R"), ("G", "V"), ("B", "B"))}
    # bright, unsaturated in every colour, isolated, away from the galaxy and the edges
    ok = (true["B"] > 150) & (true["R"] < 12000) & (true["G"] < 12000)
    gal = truth.targets["M 51"].galaxy
    ok &= np.hypot(x - pad_x - gal["x"], y - pad_y - gal["y"]) > 60
    inner = np.asarray(stars["x"]), np.asarray(stars["y"])
    ok &= (np.minimum(*inner) > 20) & (np.maximum(*inner) < SIZE - 20)
    total = true["R"] + true["G"] + true["B"]
    for i in np.nonzero(ok)[0]:
        near = np.hypot(x - x[i], y - y[i]) < 16
        near[i] = False
        ok[i] &= not (total[near] > 0.02 * total[i]).any()
    idx = np.nonzero(ok)[0]
    assert idx.size >= 10, idx.size
    measured = {}
    for colour in "RGB":
        image = fits.getdata(folder / f"m51_{colour}.fits").astype(np.float64)
        measured[colour] = _aperture_flux(image, x[idx], y[idx])
    good = np.isfinite(measured["R"] + measured["G"] + measured["B"])
    assert good.sum() >= 10
    for colour in ("R", "B"):  # colour = the flux ratio to green, against the truth
        got = measured[colour][good] / measured["G"][good]
        want = true[colour][idx][good] / true["G"][idx][good]
        ratio = got / want
        # the common factors (gain, flat level, transparency) cancel in a colour ratio
        assert abs(np.median(ratio) - 1) < 0.03, (colour, np.median(ratio))
        print(
            colour,
            "colour ratio to the truth: median",
            np.median(ratio),
            "scatter",
            np.median(np.abs(ratio / np.median(ratio) - 1)),
            "stars",
            ratio.size,
        )
        assert np.median(np.abs(ratio / np.median(ratio) - 1)) < 0.02, (colour, ratio)


@pytest.mark.slow
def test_seestar_m94_stacks_in_colour_deeper_than_one_frame(tmp_path, shared_data):
    """The 12 real M 94 subs (GRBG, no calibration frames): all align and stack into
    R, G, B; the background noise of each colour falls as the ideal inverse-variance
    combination of the frames predicts (~sqrt(12) below one frame)."""
    from observd import render

    camera = tmp_path / "camera"
    camera.mkdir()
    subs = sorted((shared_data / "seestar_s50_osc/seestar/examples/1").glob("*.fit"))
    assert len(subs) == 12
    for sub in subs:
        (camera / sub.name).symlink_to(sub)
    config, catalog = _run(tmp_path, camera, timezone="UTC")
    rows = catalog.lights()
    assert [r["status"] for r in rows] == ["stacked"] * 12
    folder = Path(config.paths.products) / "stacks" / "2025-03-26" / "m94"
    (target,) = catalog.targets("2025-03-26")
    pad_y, pad_x = target["grid"]["pad"]
    ref = fits.getdata(subs[0]).astype(np.float32) / np.float32(10.0)  # the reference frame
    one = dict(zip("RGB", render.debayer(ref, "GRBG"), strict=True))
    sky = (slice(150, 650), slice(150, 900))  # sky, away from M 94 (frame pixels)
    grid_sky = (slice(sky[0].start + pad_y, sky[0].stop + pad_y),
                slice(sky[1].start + pad_x, sky[1].stop + pad_x))  # fmt: skip

    def noise(a: np.ndarray) -> float:
        a = a[np.isfinite(a)]
        return float(1.4826 * np.median(np.abs(a - np.median(a))))

    for colour in "RGB":
        with fits.open(folder / f"m94_{colour}.fits") as hdul:
            assert hdul[0].header["NCOMBINE"] == 12
            stack = hdul[0].data
            weights = hdul["FRAMES"].data["WEIGHT"]
            # every frame covers the box (a masked hot pixel or cosmic ray takes a little)
            assert np.median(hdul["EXPMAP"].data[grid_sky]) == pytest.approx(120.0, abs=0.01)
        s_one, s_stack = noise(one[colour][sky]), noise(stack[grid_sky])
        ideal = 1.0 / math.sqrt(float(np.sum(weights)))
        print(f"M 94 {colour}: one frame {s_one:.3f} ADU/s, stack {s_stack:.3f} ADU/s, "
              f"gain {s_one / s_stack:.2f} (sqrt 12 = 3.46), ideal {ideal:.3f}")  # fmt: skip
        assert s_one / s_stack > 2.8
        assert s_stack < 1.15 * ideal
    assert Image.open(folder / "m94_rgb.png").mode == "RGB"


def test_a_crash_mid_night_gives_the_same_colour_stacks(tmp_path):
    """A colour frame is in three coadds (R, G, B): after a crash, the frames after the
    last checkpoint go into each again, once."""
    from tests.test_restart import _run as run_with_crash

    plan = NightPlan(
        targets=("M 51",), filters=("L",), n_light=8, n_bias=3, n_dark=3, dark_exptimes=(60.0,),
        n_flat=3, meridian_flip=False, dialect="nina", defects=False,
    )  # fmt: skip
    truth = simulate_night(tmp_path / "sim", plan, CameraModel(size=256, bayer="RGGB"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config_a, cat_a = run_with_crash(tmp_path / "a", truth.camera_dir, None)
    # 6 of 8 lights in: the checkpoint (every 5 frames) holds 5, one to add again
    config_b, cat_b = run_with_crash(tmp_path / "b", truth.camera_dir, len(truth.files) - 2)
    for colour in "RGB":
        a = next(config_a.paths.products.glob(f"stacks/*/*/*_{colour}.fits"))
        b = next(config_b.paths.products.glob(f"stacks/*/*/*_{colour}.fits"))
        assert fits.getheader(a)["NCOMBINE"] == fits.getheader(b)["NCOMBINE"] == 8
        da, db = fits.getdata(a), fits.getdata(b)
        ok = np.isfinite(da)
        assert np.array_equal(ok, np.isfinite(db))
        assert np.max(np.abs(da[ok] - db[ok])) <= 1e-5 * np.nanmax(np.abs(da))
    assert {r["path"]: r["status"] for r in cat_a.frames()} == {
        r["path"]: r["status"] for r in cat_b.frames()
    }
    for cat in (cat_a, cat_b):
        cat.close()


def test_star_balance_ignores_a_coadds_no_data_border():
    """A coadd on a padded grid has a wide NaN border; the star balance must still find
    its stars (it used to take the border's zeros for the noise, and fall back to the
    sky balance: every star orange)."""
    import warnings

    from observd import render

    rng = np.random.default_rng(1)
    n, k = 300, 45
    yy, xx = np.mgrid[0:n, 0:n]
    colour = np.array([1.6, 1.0, 0.5])  # red stars, all alike: neutral after balancing
    channels = {}
    stars = rng.uniform(k + 15, n - k - 15, (40, 2))
    peaks = np.geomspace(1000.0, 60.0, 40)  # the brightest near "saturation"
    for c, name in enumerate("RGB"):
        img = rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
        for (x, y), peak in zip(stars, peaks, strict=True):
            img += (peak * colour[c] * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.5)).astype(
                np.float32
            )
        img[:k], img[-k:], img[:, :k], img[:, -k:] = np.nan, np.nan, np.nan, np.nan
        channels[name] = img
    with warnings.catch_warnings():
        warnings.simplefilter("error", render.RenderWarning)
        rgb = render.rgb_composite(channels, "RGB")
    x, y = (int(round(v)) for v in stars[10])
    r, g, b = rgb[y, x] if rgb.shape[-1] == 3 else rgb[:, y, x]
    assert max(r, g, b) / min(r, g, b) < 1.1  # the stars white, as they should be


def test_pictures_draw_saturated_cores_bright_not_black():
    """A star saturated in every frame has no data at its core (NaN in the FITS); its
    picture fills the hole from the brightest neighbours; the no-data border stays."""
    from observd.coadds import _fill_cores

    rng = np.random.default_rng(0)
    img = rng.normal(0.0, 1.0, (120, 120)).astype(np.float32)
    yy, xx = np.mgrid[0:120, 0:120]
    img += (5000.0 * np.exp(-((xx - 60) ** 2 + (yy - 60) ** 2) / 8.0)).astype(np.float32)
    img[img > 2000] = np.nan  # the saturated core
    img[:25] = np.nan  # the grid's no-data border
    img[:, -3:] = np.nan  # a thin one along an edge (a frame's drift)
    out = _fill_cores(img)
    assert np.isnan(out[:, -3:]).all()
    img, out = img[:, :-3], out[:, :-3]
    core = np.isnan(img[30:, :])
    assert core.sum() >= 9 and np.isfinite(out[30:, :]).all()
    assert out[30:, :][core].min() >= 1000  # bright, like the rim around it (sky: 0)
    assert np.isnan(out[:25]).all()
    assert np.array_equal(out[np.isfinite(img)], img[np.isfinite(img)])

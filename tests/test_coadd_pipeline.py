"""Issue #5's done-when figures, measured on the stacks the real pipeline writes.

A simulated night (two targets, three filters R V B, cosmic rays in every light, a
satellite trail, hot pixels, the meridian flip of the first target, cloudy / trailed /
defocused frames) goes through :class:`observd.pipeline.Pipeline` -- calibration,
judging, alignment, the running coadd, the products -- and the FITS stacks on disk are
graded against the simulator's truth. At 1024 px with 20 lights per filter (slow) the
thresholds are #5's; the 384 px night of the default suite has fewer, noisier frames and
stars, so a few bounds are looser (each says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sep
from astropy.io import fits
from PIL import Image

from observd import quality
from observd.catalog import Catalog
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night
from observd.stack import fit_sky
from tests.conftest import write_config

FILTERS = ("R", "V", "B")


@dataclass(frozen=True)
class Bounds:
    """The done-when thresholds (1024 px: #5's own)."""

    fwhm_ratio: float  # coadd FWHM / median frame FWHM
    noise: float  # |measured / ideal - 1|
    phot_scatter: float  # robust scatter of star flux / truth
    phot_trend: float  # linear trend across the field (fraction, edge to edge)
    defect_sigma: float  # largest residual at a defect, in sigma
    centroid: float  # px between filters


SIZES = {
    1024: (20, Bounds(1.05, 0.10, 0.01, 0.01, 5.0, 0.1)),
    # 8 lights per filter, ~15 usable stars: photometry limited by their noise, 2 %
    384: (8, Bounds(1.05, 0.10, 0.02, 0.02, 5.0, 0.1)),
}


@pytest.fixture(scope="module", params=[384, pytest.param(1024, marks=pytest.mark.slow)])
def night(request, tmp_path_factory):
    size = request.param
    n_light, bounds = SIZES[size]
    folder = tmp_path_factory.mktemp(f"coadd{size}")
    plan = NightPlan(n_bias=7, n_dark=5, n_flat=7, n_light=n_light, dark_exptimes=(60.0,),
                     warm_dark=False)  # fmt: skip
    truth = simulate_night(folder / "sim", plan, CameraModel(size=size))
    config = load_config(write_config(folder, incoming=str(truth.camera_dir)))
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    for path in in_time_order(find_frame_files(config.paths.incoming, config), config):
        pipeline.process(path)
    pipeline.finish()
    stacks = Path(config.paths.products) / "stacks" / plan.night
    yield truth, catalog, stacks, bounds, pipeline
    catalog.close()


def _stack(stacks: Path, slug: str, filt: str) -> tuple[np.ndarray, np.ndarray, fits.FITS_rec]:
    with fits.open(stacks / slug / f"{slug}_{filt}.fits") as hdul:
        return hdul[0].data.astype(np.float64), hdul["EXPMAP"].data, hdul["FRAMES"].data


def _grid(truth, catalog, name: str):
    """(target row of the first grid, pad_x, pad_y)."""
    target = next(t for t in catalog.targets(truth.plan.night) if t["name"] == name)
    pad_y, pad_x = target["grid"]["pad"]
    return target, pad_x, pad_y


def _scene(truth, name: str, filt: str, shape, pad_x: int, pad_y: int) -> np.ndarray:
    """The noiseless truth (stars + galaxy, ADU/s, transparency 1) on the coadd's grid;
    NaN outside the reference frame's footprint (the truth image covers that only)."""
    slug = truth.targets[name].slug
    sky = fits.getdata(truth.truth_dir / f"sky_{slug}_{filt}.fits").astype(np.float64)
    out = np.full(shape, np.nan)
    out[pad_y : pad_y + sky.shape[0], pad_x : pad_x + sky.shape[1]] = sky
    return out


def _flat_scale(truth, catalog, target_id: int, filt: str) -> float:
    """How much brighter the pipeline's ADU are than the truth's: the master flat is
    normalised over the whole frame, the true flat over its central region."""
    rows = catalog.lights("l.target_id = ? and l.filter = ? and l.verdict = 'accepted'",
                          [target_id, filt])  # fmt: skip
    flat_ids = [r["flat_id"] for r in rows]
    master = catalog.master(max(set(flat_ids), key=flat_ids.count))
    path = master["path"] if Path(master["path"]).is_file() else master["current_path"]
    ratio = fits.getdata(truth.truth_dir / f"flat_{filt}.fits") / fits.getdata(path)
    return float(np.median(ratio))


def _bright_stars(truth, name: str, filt: str, lo: float = 800, hi: float = 12000):
    """Bright, unsaturated, isolated catalogue stars away from the galaxy and the edges
    (reference-frame pixels) and their e-/s."""
    n = truth.camera.size
    st = truth.stars(name)
    x, y = np.asarray(st["x"]), np.asarray(st["y"])
    f = np.asarray(st[f"flux_{filt}"])
    g = truth.targets[name].galaxy
    keep = []
    for i in np.flatnonzero((f > lo) & (f < hi)):
        if not (30 < x[i] < n - 31 and 30 < y[i] < n - 31):
            continue
        if math.hypot(x[i] - g["x"], y[i] - g["y"]) < 70:
            continue
        d = np.hypot(x - x[i], y - y[i])
        if (((d < 12) & (f > 0.01 * f[i])) | ((d < 25) & (f > 0.3 * f[i])))[d > 0].any():
            continue
        keep.append(i)
    keep = np.array(keep, dtype=int)
    return x[keep], y[keep], f[keep]


def _mad(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def _ref_transparency(truth, frames: fits.FITS_rec) -> float:
    """The true transparency of the frame the coadd's photometric scale refers to (the
    filter's first used frame at transparency 1.0 in the FRAMES table: its first frame, or
    when that one was rejected later (cloudy), the next one, which the filter was rescaled
    to)."""
    ref = next(f for f, t, fate in zip(frames["FILE"], frames["TRANSP"], frames["FATE"],
                                       strict=True) if t == 1.0 and fate == "used")  # fmt: skip
    return next(f.transparency for f in truth.frames("light") if Path(f.path).name == ref)


def test_every_target_and_filter_has_a_stack_and_a_colour_picture(night):
    truth, catalog, stacks, _, _ = night
    for name, tt in truth.targets.items():
        for filt in FILTERS:
            image, expmap, frames = _stack(stacks, tt.slug, filt)
            used = (frames["FATE"] == "used").sum()
            assert used >= len([f for f in truth.frames("light", target=name)
                                if f.filter == filt and f.expected == "ok"]) - 1  # fmt: skip
            assert expmap.max() == pytest.approx(used * truth.plan.light_exptime)
        rgb = Image.open(stacks / tt.slug / f"{tt.slug}_rgb.png")
        assert rgb.mode == "RGB" and min(rgb.size) >= truth.camera.size // 2


def test_only_the_latest_checkpoint_of_each_coadd_is_kept(night):
    """A coadd checkpointed again (every 5 frames, and at the end) leaves one file: the
    one the catalog names (the older ones are removed on the writer thread)."""
    _, catalog, _, _, pipeline = night
    rows = list(catalog.db["coadds"].rows)
    named = {Path(r["checkpoint"]) for r in rows}
    assert len(named) == len(rows) and all(p.is_file() for p in named)
    assert max(r["n_frames"] for r in rows) > 5  # some coadd was checkpointed twice
    on_disk = set(pipeline.products.state_dir().glob("coadd_*.npz"))
    assert on_disk == named


def test_coadd_is_as_sharp_as_its_frames(night):
    truth, catalog, stacks, bounds, _ = night
    ratios = []
    for name, tt in truth.targets.items():
        target, _, _ = _grid(truth, catalog, name)
        for filt in FILTERS:
            image, _, frames = _stack(stacks, tt.slug, filt)
            used = {str(f) for f in frames["FILE"][frames["FATE"] == "used"]}
            rows = catalog.lights("l.target_id = ? and l.filter = ?", [target["id"], filt])
            fw_frames = np.median([r["fwhm"] for r in rows if Path(r["path"]).name in used])
            fw_coadd = quality.measure(image.astype(np.float32)).fwhm
            ratios.append(fw_coadd / fw_frames)
            print(f"{name} {filt}: coadd FWHM {fw_coadd:.3f} px, median frame {fw_frames:.3f}"
                  f" px, ratio {fw_coadd / fw_frames:.3f}")  # fmt: skip
    assert max(ratios) <= bounds.fwhm_ratio, ratios


def test_background_noise_is_the_ideal_inverse_variance_combination(night):
    truth, catalog, stacks, bounds, pipeline = night
    for name, tt in truth.targets.items():
        target, pad_x, pad_y = _grid(truth, catalog, name)
        for filt in FILTERS:
            image, expmap, frames = _stack(stacks, tt.slug, filt)
            scene = _scene(truth, name, filt, image.shape, pad_x, pad_y)
            full = expmap >= 0.999 * expmap.max()
            bg = full & (scene < 0.02) & np.isfinite(image)
            assert bg.sum() > 0.2 * truth.camera.size**2
            noise = _mad(image[bg])
            # each used frame as the pipeline put it on the grid, its noise measured the
            # same way on the same pixels, at the coadd's photometric scale
            used = {str(f) for f in frames["FILE"][frames["FATE"] == "used"]}
            rows = catalog.lights("l.target_id = ? and l.filter = ?", [target["id"], filt])
            per_frame = []
            for row in rows:
                if Path(row["path"]).name not in used:
                    continue
                aligned = pipeline.lights.reconstruct(catalog.frame(row["frame_id"]))
                per_second = aligned.image / np.float32(row["exptime"])
                sky = fit_sky(per_second).map()  # as the coadd takes it out
                x = (per_second - sky)[bg] / row["transparency"]
                per_frame.append(_mad(x))
            ideal = 1.0 / math.sqrt(sum(1.0 / v**2 for v in per_frame))
            print(f"{name} {filt}: background noise {noise:.4f} ADU/s, ideal {ideal:.4f},"
                  f" ratio {noise / ideal:.3f} ({len(per_frame)} frames)")  # fmt: skip
            assert abs(noise / ideal - 1) <= bounds.noise, (name, filt, noise, ideal)


def test_bright_star_photometry_matches_the_truth(night):
    truth, catalog, stacks, bounds, _ = night
    for name, tt in truth.targets.items():
        target, pad_x, pad_y = _grid(truth, catalog, name)
        for filt in FILTERS:
            image, _, frames = _stack(stacks, tt.slug, filt)
            scene = _scene(truth, name, filt, image.shape, pad_x, pad_y)
            x, y, f = _bright_stars(truth, name, filt, lo=1000)
            assert x.size >= 5, (name, filt, x.size)
            gx, gy = x + pad_x, y + pad_y

            def phot(a: np.ndarray, gx=gx, gy=gy) -> np.ndarray:
                flux, _, _ = sep.sum_circle(np.nan_to_num(a), gx, gy, 9.0, bkgann=(14.0, 20.0))
                return flux

            t_ref = _ref_transparency(truth, frames) * _flat_scale(
                truth, catalog, target["id"], filt
            )
            # the same apertures on the noiseless truth (neighbours, aperture losses)
            ratio = phot(image) / (phot(scene) * t_ref)
            scatter = _mad(ratio / np.median(ratio))
            n = truth.camera.size
            # the trend weighted by inverse variance (sky-limited: a ratio's error ~ 1/flux)
            w = f / f.max()
            a = np.column_stack([np.ones_like(x), (x - n / 2) / n, (y - n / 2) / n])
            coef, *_ = np.linalg.lstsq(a * w[:, None], ratio / np.median(ratio) * w, rcond=None)
            print(f"{name} {filt}: {x.size} stars, flux / truth {np.median(ratio):.4f},"
                  f" scatter {scatter:.4f}, trend x {coef[1]:+.4f} y {coef[2]:+.4f}")  # fmt: skip
            assert scatter <= bounds.phot_scatter
            assert np.all(np.abs(coef[1:]) <= bounds.phot_trend)


def test_stacks_are_on_the_photometric_scale_of_their_reference_frame(night):
    """The coadd is in ADU/s at the transparency of the filter's reference frame: the
    bright stars' fluxes are the truth's times that transparency (and the master flat's
    normalisation)."""
    truth, catalog, stacks, _, _ = night
    levels: dict[str, float] = {}
    rejected_reference: dict[str, float] = {}
    for name, tt in truth.targets.items():
        target, pad_x, pad_y = _grid(truth, catalog, name)
        for filt in FILTERS:
            image, _, frames = _stack(stacks, tt.slug, filt)
            scene = _scene(truth, name, filt, image.shape, pad_x, pad_y)
            x, y, _ = _bright_stars(truth, name, filt)
            gx, gy = x + pad_x, y + pad_y
            flux = sep.sum_circle(np.nan_to_num(image), gx, gy, 9.0, bkgann=(14.0, 20.0))[0]
            want = sep.sum_circle(np.nan_to_num(scene), gx, gy, 9.0, bkgann=(14.0, 20.0))[0]
            scale = _ref_transparency(truth, frames) * _flat_scale(
                truth, catalog, target["id"], filt
            )
            level = float(np.median(flux / (want * scale)))
            first_fate = frames["FATE"][frames["TRANSP"] == 1.0][0]
            if first_fate == "rejected":  # a cloudy first frame: rescaled to the next one
                rejected_reference[f"{name} {filt}"] = level
            levels[f"{name} {filt}"] = level
    print("stack flux / truth at the reference scale:", levels,
          "rescaled after a rejected reference:", rejected_reference)  # fmt: skip
    assert all(abs(v - 1) <= 0.02 for v in levels.values()), levels


def _defects(truth, name: str, filt: str, used: set[str], pad_x: int, pad_y: int):
    """Grid pixels of the used frames hit by cosmic rays, satellites and hot pixels."""
    hot = fits.getdata(truth.truth_dir / "hot_pixels.fits")
    hy, hx = np.nonzero(hot)
    out: dict[str, set] = {"cosmic ray": set(), "satellite": set(), "hot pixel": set()}
    n = truth.camera.size
    for ft in truth.frames("light", target=name):
        if ft.filter != filt or Path(ft.path).name not in used:
            continue
        m = ft.transform
        points = [("hot pixel", hx, hy)]
        if ft.cosmic_rays:
            cr = np.array(ft.cosmic_rays)
            points.append(("cosmic ray", cr[:, 0], cr[:, 1]))
        if "satellite" in ft.extras:
            s = ft.extras["satellite"]
            t = np.linspace(0.0, 1.0, 4 * n)
            points.append(("satellite", s["x0"] + t * (s["x1"] - s["x0"]),
                           s["y0"] + t * (s["y1"] - s["y0"])))  # fmt: skip
        for kind, x, y in points:
            gx, gy = m.apply(x, y)
            out[kind] |= set(zip(np.round(gx).astype(int) + pad_x,
                                 np.round(gy).astype(int) + pad_y, strict=True))  # fmt: skip
    return out


def test_no_cosmic_ray_satellite_or_hot_pixel_residual(night):
    truth, catalog, stacks, bounds, _ = night
    n_checked = {"cosmic ray": 0, "satellite": 0, "hot pixel": 0}
    for name, tt in truth.targets.items():
        _, pad_x, pad_y = _grid(truth, catalog, name)
        for filt in FILTERS:
            image, expmap, frames = _stack(stacks, tt.slug, filt)
            scene = _scene(truth, name, filt, image.shape, pad_x, pad_y)
            target, _, _ = _grid(truth, catalog, name)
            scene *= _ref_transparency(truth, frames) * _flat_scale(
                truth, catalog, target["id"], filt
            )
            used = {str(f) for f in frames["FILE"][frames["FATE"] == "used"]}
            resid = image - scene
            full = expmap >= 0.999 * expmap.max()
            with np.errstate(invalid="ignore"):
                sigma = _mad(resid[(scene < 0.02) & full])
                # the coadd's zero is its fitted sky, which faint unresolved stars and
                # the galaxy's outskirts lift by ~1 sigma: take the local level out
                on_source = ~np.isfinite(resid) | (scene > 3 * sigma)
                level = sep.Background(np.nan_to_num(resid), mask=on_source, bw=32, bh=32)
                local = sigma * np.sqrt(expmap.max() / np.maximum(expmap, 1e-3))  # fewer frames
                z = (resid - level.back()) / local
                # off the stars and the galaxy: there the truth, rendered with the median
                # seeing, is no exact model of the coadd's PSF
                z[on_source | (expmap < 0.5 * expmap.max())] = 0.0
            ny, nx = image.shape
            worst = {}
            for kind, points in _defects(truth, name, filt, used, pad_x, pad_y).items():
                k = 3 if kind == "satellite" else 1
                w = 0.0
                for x, y in points:
                    if k <= x < nx - k and k <= y < ny - k:
                        # what a defect leaves is light: cosmic rays, trails, dark current
                        w = max(w, float(z[y - k : y + k + 1, x - k : x + k + 1].max()))
                        n_checked[kind] += 1
                worst[kind] = w
            # and nowhere, in either direction, more beyond 5 sigma than noise gives
            # (over-subtraction, clipped star wings, a defect off its recorded place)
            n_off, n_px = int((np.abs(z) > 5).sum()), int((z != 0).sum())
            print(f"{name} {filt}: worst residual (sigma) "
                  + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
                  + f"; {n_off} of {n_px} pixels beyond 5 sigma")  # fmt: skip
            assert max(worst.values()) < bounds.defect_sigma, (name, filt, worst)
            assert n_off <= 3 + 1e-5 * n_px, (name, filt, n_off)  # Gaussian: 5.7e-7 n_px
    assert min(n_checked.values()) > 0, n_checked  # every kind of defect was looked at


def test_stacks_of_a_target_are_aligned_across_filters(night):
    truth, catalog, stacks, bounds, _ = night
    for name, tt in truth.targets.items():
        _, pad_x, pad_y = _grid(truth, catalog, name)
        x, y, _ = _bright_stars(truth, name, "V", lo=400, hi=12000)
        assert x.size >= 5
        pos = {}
        for filt in FILTERS:
            image, _, _ = _stack(stacks, tt.slug, filt)
            cx, cy, flag = sep.winpos(np.nan_to_num(image), x + pad_x, y + pad_y, 1.5)
            pos[filt] = np.column_stack([cx, cy])
        for filt in ("R", "B"):
            d = np.hypot(*(pos[filt] - pos["V"]).T)
            offset = np.hypot(*np.median(pos[filt] - pos["V"], axis=0))
            print(f"{name} {filt}-V: median centroid offset {offset:.3f} px, star by star "
                  f"median {np.median(d):.3f} px, max {d.max():.3f} px")  # fmt: skip
            assert offset <= bounds.centroid / 2  # the stacks' registration
            assert np.median(d) <= bounds.centroid  # star by star (centroid noise too)

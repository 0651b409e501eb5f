"""Grade a stacked image against the simulator's truth, the same way for every tool.

A tool's stack may sit on any pixel grid (observd pads its target grid, Siril may flip
rows, the notebook and ccdproc keep the first light's grid). The grid is found, never
assumed: the brightest true stars are matched to the brightest detections in the stack
(astroalign's triangle matcher on the two point lists, then a least-squares affine fit on
all nearest pairs). Then, on isolated, unsaturated, bright true stars in the central 80 %
of the reference frame, away from the galaxy:

- ``fwhm``: median FWHM (px) of a 2-D Moffat fit (free beta) at each star;
- ``phot_scatter``: robust scatter (1.4826 MAD, %) of aperture flux / true flux;
- ``noise``: background noise per pixel, measured on 4x4-binned sky (resampling
  correlates neighbouring pixels; binning counts that noise honestly) and expressed in
  the stars' own flux scale (true e-/s), so a sum, a mean and a per-second coadd compare:
  lower is deeper.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import sep
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from observd.simulate import NightTruth

__all__ = ["Grade", "grade_stack"]

sep.set_extract_pixstack(10_000_000)
sep.set_sub_object_limit(4096)


@dataclass
class Grade:
    """Truth-graded quality of one stack (NaN where it could not be measured)."""

    fwhm: float = math.nan
    noise: float = math.nan
    phot_scatter: float = math.nan
    n_stars: int = 0
    matched_rms: float = math.nan
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grade_stack(image: np.ndarray, truth: NightTruth, target: str, filt: str) -> Grade:
    """Grade ``image`` (any units, any grid) against the truth of ``target`` in ``filt``.

    Parameters
    ----------
    image
        The stack, 2-D; NaN where it has no data.
    truth
        The night's truth (:func:`observd.simulate.load_truth`).
    target, filt
        Which target and filter the stack is of.

    Returns
    -------
    Grade
    """
    data = np.ascontiguousarray(image, dtype=np.float64)
    bad = ~np.isfinite(data)
    data = np.where(bad, 0.0, data)
    n = truth.camera.size
    tt = truth.targets[target]
    fwhm0 = tt.fwhm_ref or 3.0
    stars = truth.stars(target)
    tx, ty = np.asarray(stars["x"], float), np.asarray(stars["y"], float)
    tflux = np.asarray(stars[f"flux_{filt}"], float)
    try:
        bkg = sep.Background(data, mask=bad, bw=64, bh=64)
    except Exception as exc:  # an empty or broken stack
        return Grade(note=f"no background: {exc}")
    sub = data - bkg.back()
    sub[bad] = 0.0
    try:
        m = _find_mapping(sub, bad, bkg.globalrms, tx, ty, tflux, n)
    except Exception as exc:
        return Grade(note=f"stack not matched to the truth: {type(exc).__name__}: {exc}")
    gx, gy, rms = m
    sel = _grading_stars(truth, target, filt, tx, ty, tflux, fwhm0)
    ok = sel & (gx > 15) & (gy > 15) & (gx < data.shape[1] - 16) & (gy < data.shape[0] - 16)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-tflux[idx])][:300]
    if idx.size < 5:
        return Grade(matched_rms=rms, note=f"only {idx.size} grading stars")
    x, y, f_true = gx[idx], gy[idx], tflux[idx]
    r_ap = 2.5 * fwhm0
    flux, _, flag = sep.sum_circle(sub, x, y, r_ap, mask=bad)
    good = (flag == 0) & np.isfinite(flux) & (flux > 0)
    ratio = flux[good] / f_true[good]
    k = float(np.median(ratio))
    scatter = 100 * 1.4826 * float(np.median(np.abs(ratio / k - 1)))
    fwhms = [_moffat_fwhm(sub, bad, xi, yi, fwhm0) for xi, yi in zip(x, y, strict=True)]
    fwhm = float(np.nanmedian(fwhms)) if np.isfinite(fwhms).any() else math.nan
    noise = _sky_noise(sub, bad, bkg.globalrms, gx, gy, n) / k
    return Grade(fwhm=fwhm, noise=noise, phot_scatter=scatter, n_stars=int(good.sum()),
                 matched_rms=rms)  # fmt: skip


def _find_mapping(sub, bad, rms, tx, ty, tflux, n):
    """Truth reference-grid positions of every star -> stack pixels, and the fit rms."""
    import astroalign

    objs = sep.extract(sub, 10.0, err=rms, mask=bad, minarea=6)
    objs = objs[(objs["flag"] & 0x10) == 0] if len(objs) else objs  # not truncated
    det = np.column_stack([objs["x"], objs["y"]])[np.argsort(-objs["flux"])][:60]
    inside = (tx > 0) & (ty > 0) & (tx < n - 1) & (ty < n - 1)
    order = np.flatnonzero(inside)[np.argsort(-tflux[inside])][:60]
    src = np.column_stack([tx[order], ty[order]])
    tform, _ = astroalign.find_transform(src, det)
    a = tform.params[:2]
    # refine on all pairs within 2 px of the first guess, twice
    tree = cKDTree(np.column_stack([objs["x"], objs["y"]]))
    pool = np.flatnonzero(inside)[np.argsort(-tflux[inside])][:1500]
    for radius in (3.0, 1.5):
        px = a[0, 0] * tx[pool] + a[0, 1] * ty[pool] + a[0, 2]
        py = a[1, 0] * tx[pool] + a[1, 1] * ty[pool] + a[1, 2]
        d, j = tree.query(np.column_stack([px, py]), distance_upper_bound=radius)
        hit = np.isfinite(d)
        if hit.sum() < 6:
            break
        design = np.column_stack([tx[pool][hit], ty[pool][hit], np.ones(hit.sum())])
        dst = np.column_stack([objs["x"][j[hit]], objs["y"][j[hit]]])
        sol, *_ = np.linalg.lstsq(design, dst, rcond=None)
        a = sol.T
        resid = design @ sol - dst
        fit_rms = float(np.sqrt(np.mean(np.sum(resid**2, axis=1))))
    gx = a[0, 0] * tx + a[0, 1] * ty + a[0, 2]
    gy = a[1, 0] * tx + a[1, 1] * ty + a[1, 2]
    return gx, gy, fit_rms


def _grading_stars(truth: NightTruth, target: str, filt: str, tx, ty, tflux, fwhm0):
    """Bright, unsaturated, isolated stars in the central 80 %, away from the galaxy."""
    n = truth.camera.size
    cam = truth.camera
    t = truth.plan.light_exptime
    alpha = 2.5 / (2 * math.sqrt(2 ** (1 / 3) - 1))  # sharpest seeing, Moffat beta 3
    peak = tflux * t * 2 / (math.pi * alpha**2)  # e- in the brightest pixel
    headroom = 0.6 * (cam.saturation - cam.bias_level) * cam.gain
    central = (tx > 0.1 * n) & (tx < 0.9 * n) & (ty > 0.1 * n) & (ty < 0.9 * n)
    bright = (tflux * t > 30_000) & (peak < headroom)
    gal = truth.targets[target].galaxy
    far = np.hypot(tx - gal["x"], ty - gal["y"]) > 6 * gal["disc_scale_px"] + 5 * fwhm0
    tree = cKDTree(np.column_stack([tx, ty]))
    isolated = np.zeros(tx.size, bool)
    cand = np.flatnonzero(central & bright & far)
    for i in cand:
        near = tree.query_ball_point([tx[i], ty[i]], 5 * fwhm0)
        isolated[i] = all(j == i or tflux[j] < 0.01 * tflux[i] for j in near)
    return central & bright & far & isolated


def _moffat_fwhm(sub, bad, x, y, fwhm0) -> float:
    r = int(math.ceil(2.5 * fwhm0))
    ix, iy = int(round(x)), int(round(y))
    stamp = sub[iy - r:iy + r + 1, ix - r:ix + r + 1]
    if stamp.shape != (2 * r + 1, 2 * r + 1) or bad[iy - r:iy + r + 1, ix - r:ix + r + 1].any():
        return math.nan
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(float)
    dx0, dy0 = x - ix, y - iy
    a0 = fwhm0 / 1.02

    def resid(p):
        amp, cx, cy, alpha, beta, bg = p
        rr = ((xx - cx) ** 2 + (yy - cy) ** 2) / alpha**2
        return (amp * (1 + rr) ** (-beta) + bg - stamp).ravel()

    p0 = [max(stamp.max(), 1e-9), dx0, dy0, a0, 3.0, 0.0]
    lo = [0, dx0 - 2, dy0 - 2, 0.3, 1.1, -np.inf]
    hi = [np.inf, dx0 + 2, dy0 + 2, 4 * a0 + 5, 20.0, np.inf]
    try:
        fit = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac", max_nfev=200)
    except ValueError:
        return math.nan
    _, _, _, alpha, beta, _ = fit.x
    return float(2 * alpha * math.sqrt(2 ** (1 / beta) - 1))


def _sky_noise(sub, bad, rms, gx, gy, n) -> float:
    """Per-pixel noise of the sky, from 4x4-binned blocks free of sources."""
    objs, seg = sep.extract(sub, 2.0, err=rms, mask=bad, minarea=4, segmentation_map=True)
    masked = bad | (seg > 0)
    # grow the source mask by 4 px (a 4x4 block touching a source is out anyway)
    grown = masked.copy()
    for s in (1, 2, 3, 4):
        grown[s:, :] |= masked[:-s, :]
        grown[:-s, :] |= masked[s:, :]
        grown[:, s:] |= masked[:, :-s]
        grown[:, :-s] |= masked[:, s:]
    # the central 80 % of the reference frame, mapped to the stack
    x0 = int(max(0, np.percentile(gx, 10)))
    y0 = int(max(0, np.percentile(gy, 10)))
    x1 = int(min(sub.shape[1], np.percentile(gx, 90)))
    y1 = int(min(sub.shape[0], np.percentile(gy, 90)))
    b = 4
    h, w = (y1 - y0) // b * b, (x1 - x0) // b * b
    if h < b or w < b:
        return math.nan
    blk = sub[y0:y0 + h, x0:x0 + w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))
    blk_bad = grown[y0:y0 + h, x0:x0 + w].reshape(h // b, b, w // b, b).any(axis=(1, 3))
    v = blk[~blk_bad]
    if v.size < 20:
        return math.nan
    return float(1.4826 * np.median(np.abs(v - np.median(v))) * b)

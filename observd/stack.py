"""Running coadds as pure array code: aligned frames in, a weighted mean out.

Nothing here reads or writes files or talks to the catalog; the pipeline hands over
frames already calibrated, judged and warped onto the target's grid, writes the
checkpoints (:meth:`RunningCoadd.state`) atomically and records their frame ids.

The coadd (:class:`RunningCoadd`)
    One per target and filter, on the target's reference grid, in ADU/s at the
    photometric scale of the reference frame, *without sky*: each frame's background
    (``FrameInput.sky``, a level or a map, e.g. from :func:`fit_sky`) is removed before
    the frame is scaled, so frames taken at dusk and under the moon add up, and the
    renderer gets a coadd whose zero is the sky. Each frame ``x = scale * (image - sky)``
    is added with the per-pixel weight

        ``w = coverage / (scale^2 * sky_rms^2)``,

    the inverse variance of the scaled frame's background: a transparent, dark-sky frame
    counts most, and a pixel at the edge of a frame's footprint (or next to a masked
    pixel) by the fraction of real pixels behind it. The state is ``sum(w x)`` and
    ``sum(w)`` (float64), the exposure map ``sum(coverage * exptime)``, the coadd's PSF
    map ``sum(w sigma_psf^2)`` (float32), frames per pixel (uint16) and a dispute
    counter (int8): 27 bytes per pixel (450 MB at 4096 px), whatever the number of
    frames; during the warm-up, also the first ``warmup - 1`` frames (8 bytes per pixel
    each). :meth:`RunningCoadd.add` needs ~6 bytes per pixel more while it runs.

Outlier rejection, as frames arrive
    Each pixel of a new frame is compared with the running mean ``M``. The classic
    trap is to clip against ``M`` with a noise model of sky and read noise alone: the
    core of a star in a frame sharper than ``M`` is tens of sigma above ``M``; clip it
    and the sharpest frames lose their cores, the stack blurs and bright stars lose
    flux. Here a pixel is an outlier when

        ``|x - M| - tol > clip * sqrt(var_x + var_M)``

    with ``var_x = scale^2 sky_rms^2 + scale * S / (gain * exptime)`` (the background
    plus the Poisson noise of the sources), ``var_M = (1 + Q M) / sum(w)`` (the same for
    the mean; ``Q`` the weighted mean of the frames' Poisson factors) and ``tol`` the
    *systematic* difference allowed between two images of the same sky (a bound on a
    model error, not a noise: it is not multiplied by ``clip``):

    * PSF mismatch. The coadd's PSF at each pixel is the weighted mix of the PSFs of
      the frames used there: its second moment ``sigma_M^2 = sum(w sigma^2)/sum(w)``
      (second moments add; ``sigma = FWHM / 2.3548``). For two Moffat PSFs (beta = 3)
      of the same flux whose ``sigma^2`` differ by the factor ``ratio >= 1``, the
      sharper one is higher in the core by at most ``ratio - 1`` of the broader one's
      value, and lower in the wings by at most ``ratio^2 - 1`` of its own (the wings
      go as ``alpha^4 / r^6``). So ``tol = psf_margin * (ratio - 1) * S`` where the
      sharper image is the higher one, ``psf_margin * (ratio^2 - 1) * S`` where it is
      the lower one, with ``S = max(min(x, M), 0)``, the lower image at that pixel.
    * Photometric and resampling error: ``scale_error * S`` (1-2 % transparency error;
      a star's peak moves by ~1 % with the resampling phase).
    * Registration error ``d``: ``d * |grad M|`` (a shift changes an image by
      ``d . grad I``), the gradient counted only above three times its own noise, as a
      3x3 local maximum.

    ``S`` is the *lower* of the two images, so an outlier -- always positive in the
    image that has it: a cosmic ray, a trail, a hot pixel -- never sets its own
    tolerance, whether it is in the new frame or got into a young ``M``.

    The PSF bounds are those of point sources. On bright *extended* emission (a galaxy's
    bulge) the real seeing difference is much smaller than ``(ratio^2 - 1) S``, so a
    defect there of less than that (~20-40 % of the local level between frames of
    2.8 and 3.4 px) is kept; with ``n`` frames it leaves that / ``n``.

    Outliers are extended (satellite and aircraft trails; a cosmic ray spread over 4x4
    pixels with negative lobes by the cubic resampling): pixels within ``grow`` px of
    an outlier are rejected too when they are beyond ``grow_clip`` sigma of plain noise
    (hysteresis: the faint wings of a trail go, the sky next to a cosmic ray stays).
    Rejection is symmetric (a dead or over-subtracted pixel is an outlier too).

The first frames, fairly
    The first ``warmup`` (3) frames are buffered and combined jointly: every one is
    judged by the rule above against their per-pixel (lower) median, so no frame is
    privileged by arriving first and a defect in one of them cannot get into ``M``.
    Until then :attr:`RunningCoadd.image` is that joint combination of the frames so far.
    Pixels first covered later (dither, drift, a meridian flip) get a per-pixel vote
    instead: the first value is taken; when the second disagrees and the *negative*
    deviation dominates its neighbourhood (the new frame is lower than the old one by
    more than it is higher anywhere within ``grow`` px), the old value -- the only one
    there, recoverable exactly from the sums -- is replaced, else the new one is
    rejected: the result does not depend on which of the two came first. And wherever
    ``M`` keeps being disputed from below -- more frames in a row rejected there as
    lower than ``M`` than ``M`` holds, e.g. a hot pixel that fell on the same grid pixel
    in two early frames -- the pixel restarts from the latest frame (majority over
    time).

Exactly once, across crashes
    :meth:`RunningCoadd.state` returns every array and a JSON-able ``meta`` (frame ids
    included); :meth:`RunningCoadd.from_state` rebuilds a coadd that continues
    bit-identically. A frame id already in the coadd is refused (a report with a
    ``reason``), so offering again the frames after the last checkpoint never counts one
    twice.

Cost
    Once seeded, :meth:`RunningCoadd.add` is two fused passes over the grid, compiled
    with numba and run on every core: the first computes the scaled frame (the division
    by the exposure time and the sky polynomial evaluated per pixel: no map, no
    temporary frames) and screens every pixel with a necessary condition of the full
    test (the background, the sources' Poisson noise and the photometric margin), noting
    the few candidates' columns as it goes; the candidates get the full model, the
    growth and the vote in one compiled pass by their indices (whole-frame filtering,
    exactly: ``tests/stack_reference.py`` states the rule in numpy and the tests hold
    the kernels to it pixel for pixel); the second pass updates the sums. Measured on
    the 2-core machine: ~25 ms at 2048 px and ~75 ms at 4096 px (memory bandwidth: ~80
    bytes read or written per pixel), the same for frame 10 and frame 200, against 60
    and 210 ms for the numpy passes it replaced (identical decisions, sums within float
    rounding). The first add of a process compiles the kernels (a few seconds; cached on
    disk afterwards; :func:`load_kernels` loads them ahead). The warm-up's joint
    combination (once per coadd) is three kinds of whole-grid pass: the reference (the
    lower median by rank), the test of each frame, and one fold of all the frames:
    ~0.35 s at 4096 px.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from numba import njit, prange
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AddReport",
    "FrameInput",
    "FrameRecord",
    "RunningCoadd",
    "SkyFit",
    "fit_sky",
    "load_kernels",
]

F32 = np.float32
F64 = np.float64
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
STATE_VERSION = 1
# pixels per chunk in the row-chunked kernels: temporaries stay in cache
_CHUNK_PIXELS = 1 << 18
# pixels used for global robust statistics (the sky fit)
_SUBSAMPLE_PIXELS = 1 << 16
# white-noise std of one central-difference gradient component
_GRAD_NOISE = math.sqrt(0.5)
_K3 = np.ones((3, 3), np.uint8)
# actions of pass 1, applied in pass 2
_SKIP, _ADD, _REPLACE, _REJECT_UP, _REJECT_DOWN = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class FrameInput:
    """One light, calibrated and warped onto the target's grid.

    Attributes
    ----------
    image : ndarray, grid shape
        ADU/s (calibrated, divided by the exposure time); NaN outside the footprint and
        where masked (saturated, bad).
    sky_rms : float
        Background noise per pixel of ``image`` (ADU/s), measured on the warped frame
        (resampling smooths the noise; the per-pixel rms is what the test needs).
    exptime : float
        Seconds: the exposure map and the Poisson term.
    fwhm : float
        PSF FWHM in px (quality's measurement): the PSF-mismatch term.
    frame_id : int
        The catalog id; a coadd holds each id at most once.
    coverage : ndarray or None
        0..1 from the warp: the weight multiplier (fraction of good frame pixels behind a
        grid pixel). None: 1 where ``image`` is finite.
    scale : float
        Photometric scale to the reference (1/transparency from matched stars):
        ``image - sky`` is multiplied by it.
    sky : float, SkyFit or ndarray
        Background of ``image`` (ADU/s): a level, a fitted polynomial (:func:`fit_sky`;
        evaluated pixel by pixel as the frame is folded in, no map is made) or a
        grid-shaped map; removed before scaling. The coadd holds no sky.
    gain : float or None
        e-/ADU; with ``exptime`` it gives the Poisson noise of the sources. None: no
        signal term (the PSF-mismatch and scale terms still protect bright stars).
    registration_error : float or None
        Expected error of this frame's transform at the stars (px rms); None: the
        coadd's default.
    unit : float
        ``image * unit`` is in ADU/s: an image still in ADU is passed with ``1 /
        exptime`` (the division is done as the frame is folded in, not as a pass of its
        own). ``sky`` and ``sky_rms`` are in ADU/s whatever ``unit``.
    """

    image: NDArray[Any]
    sky_rms: float
    exptime: float
    fwhm: float
    frame_id: int
    coverage: NDArray[Any] | None = None
    scale: float = 1.0
    sky: float | SkyFit | NDArray[Any] = 0.0
    gain: float | None = None
    registration_error: float | None = None
    unit: float = 1.0


@dataclass(frozen=True)
class FrameRecord:
    """A frame in the coadd (one row of the FITS ``FRAMES`` table).

    Attributes
    ----------
    frame_id : int
    weight : float
        ``1 / (scale^2 sky_rms^2)``, per pixel before the coverage.
    scale, sky_rms, exptime, fwhm : float
        As given.
    n_pixels : int
        Pixels with data (coverage >= ``min_coverage``).
    n_rejected : int
        Of those, rejected as outliers (for a warm-up frame: once the warm-up is done).
    n_replaced : int
        Coadd pixels whose earlier value was voted out and replaced by this frame's.
    """

    frame_id: int
    weight: float
    scale: float
    sky_rms: float
    exptime: float
    fwhm: float
    n_pixels: int = 0
    n_rejected: int = 0
    n_replaced: int = 0


@dataclass(frozen=True)
class AddReport:
    """What :meth:`RunningCoadd.add` did with a frame.

    Attributes
    ----------
    frame_id : int
    accepted : bool
        Folded into the coadd (or, during the warm-up, buffered for it).
    reason : str or None
        Why not: already in the coadd; too many of its pixels disagree.
    weight : float
        ``1 / (scale^2 sky_rms^2)``.
    n_pixels, n_rejected, n_replaced : int
        As in :class:`FrameRecord` (0 for a frame buffered for the warm-up).
    rejected_fraction : float
        ``n_rejected / n_pixels``.
    n_frames : int
        Frames in the coadd after this call.
    warming_up : bool
        Still buffering: the coadd is the joint combination of the frames so far.
    revised : tuple of (FrameRecord, str or None)
        When the warm-up ends: each buffered frame's final record and, for one left out
        by the joint judgement, the reason (it is no longer in :attr:`RunningCoadd.frames`).
    seconds : float
        Wall time of the call.
    mask : ndarray of bool or None
        With ``return_mask=True``: this frame's rejected pixels (None while buffered).
    """

    frame_id: int
    accepted: bool
    reason: str | None
    weight: float
    n_pixels: int
    n_rejected: int
    n_replaced: int
    rejected_fraction: float
    n_frames: int
    warming_up: bool
    revised: tuple[tuple[FrameRecord, str | None], ...]
    seconds: float
    mask: NDArray[np.bool_] | None = None


# --------------------------------------------------------------------------- helpers
def _row_chunks(ny: int, nx: int) -> Iterator[slice]:
    rows = max(16, _CHUNK_PIXELS // max(1, nx))
    for r0 in range(0, ny, rows):
        yield slice(r0, min(ny, r0 + rows))


def _subsample(shape: tuple[int, int]) -> tuple[slice, slice]:
    step = max(1, int(math.ceil(math.sqrt(shape[0] * shape[1] / _SUBSAMPLE_PIXELS))))
    off = step // 2
    return slice(off, None, step), slice(off, None, step)


@dataclass(frozen=True)
class SkyFit:
    """A polynomial background and the noise about it (:func:`fit_sky`).

    Attributes
    ----------
    coeffs : tuple of float
        Polynomial in ``u = (x - cx) / n``, ``v = (y - cy) / n`` (``n`` the larger
        side): ``1, u, v`` (order 1), ``+ u^2, u v, v^2`` (order 2).
    rms : float
        Per-pixel noise about it, from the *lower tail* of the residuals (the 15.9th
        minus the 2.3rd percentile: one sigma of a Gaussian), so faint stars and
        galaxies, always positive, barely inflate it (a 20 % contamination by 5 %).
    shape : (ny, nx)
    """

    coeffs: tuple[float, ...]
    rms: float
    shape: tuple[int, int]

    @property
    def level(self) -> float:
        """The background at the centre."""
        return float(self.coeffs[0])

    def map(self, rows: slice = slice(None)) -> NDArray[np.float32]:
        """The background on the full grid, or on ``rows`` of it (float32)."""
        col, row, u, v, cross = self.terms()
        out = np.add(row[rows].astype(F32)[:, None], col.astype(F32)[None, :])
        if cross:
            out += np.outer((cross * v[rows]).astype(F32), u.astype(F32))
        return out

    def terms(self) -> tuple[NDArray[np.float64], ...]:
        """The polynomial as ``col[x] + row[y] + cross * u[x] * v[y]`` (float64): how
        the coadd's kernel evaluates it pixel by pixel without a map."""
        ny, nx = self.shape
        u, v = _uv(np.arange(nx, dtype=F64), np.arange(ny, dtype=F64), self.shape)
        c = self.coeffs
        col = c[0] + c[1] * u
        row = c[2] * v
        cross = 0.0
        if len(c) > 3:
            col += c[3] * u * u
            row += c[5] * v * v
            cross = float(c[4])
        return col, row, u, v, np.float64(cross)


def _uv(x: NDArray[Any], y: NDArray[Any], shape: tuple[int, int]) -> tuple[NDArray[Any], ...]:
    n = float(max(shape))
    return (x - (shape[1] - 1) / 2.0) / n, (y - (shape[0] - 1) / 2.0) / n


def fit_sky(image: ArrayLike, *, order: int = 1, clip: float = 3.0, iters: int = 6) -> SkyFit:
    """Robust polynomial background of a frame (sources clipped), and its noise.

    A least-squares fit of a plane (``order=1``, enough for a moon gradient) or a
    quadric to a regular subsample of <= 2^16 finite pixels, iterated: pixels more
    than ``clip`` sigma above or below are dropped (stars and galaxies are positive;
    the clip is asymmetric only through them). NaNs (outside the footprint) are
    ignored.

    Parameters
    ----------
    image : 2-D array (ADU/s)
    order : {0, 1, 2}
    clip : float
    iters : int

    Returns
    -------
    SkyFit
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    if order not in (0, 1, 2):
        raise ValueError("order must be 0, 1 or 2")
    shape = (int(a.shape[0]), int(a.shape[1]))
    sy, sx = _subsample(shape)
    sub = np.asarray(a[sy, sx], dtype=F64)
    yy, xx = np.meshgrid(np.arange(shape[0])[sy], np.arange(shape[1])[sx], indexing="ij")
    ok = np.isfinite(sub)
    if np.count_nonzero(ok) < 16:
        raise ValueError("too few finite pixels to fit a sky")
    u, v = _uv(xx[ok].astype(F64), yy[ok].astype(F64), shape)
    z = sub[ok]
    cols = [np.ones_like(u)]
    if order >= 1:
        cols += [u, v]
    if order >= 2:
        cols += [u * u, u * v, v * v]
    A = np.column_stack(cols)
    keep = np.ones(z.size, bool)
    med = float(np.median(z))
    sig = float(np.percentile(z, 50) - np.percentile(z, 15.865))
    keep = np.abs(z - med) <= max(clip * sig, 1e-30) if sig > 0 else keep
    coef = np.zeros(A.shape[1])
    for _ in range(iters):
        coef, *_ = np.linalg.lstsq(A[keep], z[keep], rcond=None)
        r = z - A @ coef
        rk = r[keep]
        sig = float(np.median(rk) - np.percentile(rk, 15.865))
        if not sig > 0:
            break
        new = np.abs(r - np.median(rk)) <= clip * sig
        if np.array_equal(new, keep):
            break
        keep = new
    # the noise from the lower tail of all residuals (1 sigma between the 2.3rd and
    # the 15.9th percentiles of a Gaussian): faint stars and galaxies, positive, barely
    # move it, nor does the clip
    r_all = z - A @ coef
    p02, p16 = np.percentile(r_all, [2.275, 15.866])
    rms = float(p16 - p02)
    # the median of the clipped residuals is the sky's offset from the fit (sources
    # pull a least-squares fit up): move the constant term there
    r = r_all[keep]
    coef = coef.copy()
    coef[0] += float(np.median(r))
    full = [0.0] * 6 if order == 2 else [0.0] * 3
    full[0] = float(coef[0])
    if order >= 1:
        full[1], full[2] = float(coef[1]), float(coef[2])
    if order == 2:
        full[3:6] = [float(c) for c in coef[3:6]]
    return SkyFit(tuple(full), rms, shape)




# ------------------------------------------------------------------- the kernel
@dataclass(frozen=True)
class _Frame:
    """The scalars of a :class:`FrameInput` as the kernels use them."""

    frame_id: int
    scale: float
    sky_rms: float
    exptime: float
    fwhm: float
    gain: float | None
    reg: float  # registration error, px

    @property
    def w0(self) -> float:
        return 1.0 / (self.scale * self.sky_rms) ** 2

    @property
    def bg2(self) -> float:
        return (self.scale * self.sky_rms) ** 2

    @property
    def p(self) -> float:
        """Poisson factor: the variance of ``x`` per unit of signal."""
        return self.scale / (self.gain * self.exptime) if self.gain else 0.0

    @property
    def sig2(self) -> float:
        return (self.fwhm * FWHM_TO_SIGMA) ** 2


@dataclass(frozen=True)
class _Rules:
    clip: float
    grow: int
    grow_clip: float
    psf_margin: float
    scale_error: float
    curvature_floor: float


def _scaled(img: NDArray[Any], cov: NDArray[Any] | None, sky: Any, rs: slice, scale: float,
            min_coverage: float, unit: float = 1.0) -> NDArray[np.float32]:
    """``x = scale * (unit * image - sky)`` of rows ``rs`` (float32), NaN where there
    is no data or the coverage is below ``min_coverage``."""
    a = np.asarray(img[rs], dtype=F32)
    if isinstance(sky, float):
        x = cv2.addWeighted(a, scale * unit, a, 0.0, -scale * sky)
    else:
        s = sky.map(rs) if isinstance(sky, SkyFit) else np.asarray(sky[rs], F32)
        x = cv2.addWeighted(a, scale * unit, s, -scale, 0.0)
    if cov is not None:
        x[~(np.asarray(cov[rs]) >= max(min_coverage, 1e-6))] = np.nan
    return x


def _coverage(x: NDArray[np.float32], cov: NDArray[Any] | None, rs: slice
              ) -> NDArray[np.float32]:
    """The coverage of rows ``rs`` where ``x`` has data, else 0."""
    if cov is None:
        return np.isfinite(x).astype(F32)
    return np.where(np.isfinite(x), np.asarray(cov[rs], F32), F32(0.0))


def _kernel_input(a: NDArray[Any]) -> NDArray[Any]:
    """A C-contiguous float32 (or float64) view or copy for the numba kernels."""
    a = np.asarray(a)
    if a.dtype not in (F32, F64):
        a = a.astype(F32)
    return np.ascontiguousarray(a)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _screen_kernel(img, unit, cov, has_cov, min_cov, sky_map, has_map, col, row, u, v,
                   cross, scale, ssum, wsum, bg2, clip, p, scale_error, xs, act, cols, n_cand,
                   n_valid):
    """Pass 1 of a running add: ``x = scale * (unit * image - sky)`` (NaN without data),
    the action ``_ADD``/``_SKIP``, and a screen for the full model: the columns of the
    candidates of row ``i`` go to ``cols[i, :n_cand[i]]``.

    The screen is a necessary condition of the outlier test (:func:`_decide_kernel`), so it passes
    every pixel the test can flag: there ``sd^2 >= var_M + bg^2 + p S`` and the
    tolerance is at least ``scale_error * S`` (``S`` the lower image, the other terms of
    both are >= 0). First ``(x - M)^2 > clip^2 (var_M + bg^2)``, then
    ``|x - M| > scale_error S + clip sqrt(var_M + bg^2 + p S)``, both a little looser
    (0.999) than exact so that rounding cannot drop a pixel. It leaves the pixels of
    star cores whose difference is within their noise and the photometric margin,
    judged in full before at 10-30x the number.
    """
    ny, nx = xs.shape
    clip2 = clip * clip * np.float32(0.998)
    loose = np.float32(0.999)
    zero = np.float32(0.0)
    for i in prange(ny):
        cnt = 0
        nc = 0
        for j in range(nx):
            if has_map:  # noqa: SIM108 (numba types the branches apart)
                sky = np.float64(sky_map[i, j])
            else:
                sky = col[j] + row[i] + cross * u[j] * v[i]
            x = np.float32(scale * (img[i, j] * unit - sky))
            if has_cov and not cov[i, j] >= min_cov:
                x = np.float32(np.nan)
            xs[i, j] = x
            if np.isnan(x):
                act[i, j] = 0  # _SKIP
                continue
            act[i, j] = 1  # _ADD
            cnt += 1
            w = np.float32(wsum[i, j])
            m = np.float32(ssum[i, j]) / w  # NaN where the coadd is empty
            r = x - m
            var = np.float32(1.0) / w + bg2
            if r * r > var * clip2:
                lo = max(min(x, m), zero)
                if abs(r) > loose * (scale_error * lo + clip * np.sqrt(var + p * lo)):
                    cols[i, nc] = j
                    nc += 1
        n_valid[i] = cnt
        n_cand[i] = nc


@njit(cache=True, nogil=True, parallel=True)
def _gather_kernel(cols, n_cand, start, out):
    """The candidates' flat indices, row after row, from :func:`_screen_kernel`'s rows."""
    nx = cols.shape[1]
    for i in prange(cols.shape[0]):
        for k in range(n_cand[i]):
            out[start[i] + k] = i * nx + cols[i, k]


@njit(cache=True, nogil=True, error_model="numpy")
def _noise(x, m, var0, bg2, p, q):
    """The noise of ``x - m`` (background and the sources' Poisson noise) and the lower
    image ``S``."""
    zero = np.float32(0.0)
    lo = max(min(x, m), zero)
    var = var0 * (np.float32(1.0) + q * max(m, zero))
    var += bg2 + p * lo
    return np.sqrt(var), lo


@njit(cache=True, nogil=True, error_model="numpy")
def _psf_tolerance(rc, lo, s2, sig2, psf_margin, scale_error):
    """The PSF-mismatch and photometric part of the tolerance (module doc)."""
    one = np.float32(1.0)
    if not (np.isfinite(s2) and s2 > np.float32(0.0)):
        s2 = sig2
    ratio = max(s2, sig2) / min(s2, sig2) - one
    # core term where the sharper image is the higher one, else the wing term
    tol = ratio if (rc > np.float32(0.0)) == (sig2 < s2) else ratio * (ratio + np.float32(2.0))
    tol *= psf_margin
    tol += scale_error
    tol *= lo
    return tol


@njit(cache=True, nogil=True, error_model="numpy")
def _reference_at(num, den, var0, sums, y, x):
    """The reference at one pixel: ``M`` and its background variance ``var0``. From the
    coadd's sums (``sums``: ``M = num / den``, ``var0 = 1 / den``; the ``var0`` argument
    unused) or from arrays (the warm-up's median ``num`` and its ``var0``; ``den``
    unused)."""
    if sums:
        w = np.float32(den[y, x])
        return np.float32(num[y, x]) / w, np.float32(1.0) / w
    return np.float32(num[y, x]), np.float32(var0[y, x])


@njit(cache=True, nogil=True, error_model="numpy")
def _outlier_z(y, x0, xs, num, den, var0a, sums, s2a, bg2, p, q, sig2, clip, psf_margin,
               scale_error, curvature_floor, reg):
    """The full test of pixel ``(y, x0)`` of frame ``xs`` against the reference (see
    :func:`_reference_at`; ``s2a`` its PSF sigma^2, or with the sums their weighted PSF
    sum): its signed significance ``(x - M) / sd`` when it is an outlier, else NaN. The
    rule of the module doc, as ``tests/stack_reference.py`` writes it in numpy."""
    ny, nx = xs.shape
    zero = np.float32(0.0)
    x = xs[y, x0]
    m, v0 = _reference_at(num, den, var0a, sums, y, x0)
    s2 = s2a[y, x0] * v0 if sums else s2a[y, x0]
    rc = x - m
    sd, lo = _noise(x, m, v0, bg2, p, q)
    tol = _psf_tolerance(rc, lo, s2, sig2, psf_margin, scale_error)
    if reg > zero:
        hi_v, lo_v, seen = -np.inf, np.inf, False
        for dy in range(-1, 2):
            yy = min(max(y + dy, 0), ny - 1)
            for dx in range(-1, 2):
                xx = min(max(x0 + dx, 0), nx - 1)
                v = _reference_at(num, den, var0a, sums, yy, xx)[0]
                if np.isnan(v):
                    v = xs[yy, xx]
                if not np.isnan(v):
                    seen = True
                    hi_v, lo_v = max(hi_v, v), min(lo_v, v)
        if not seen:
            return np.float32(np.nan)  # no slope: NaN tolerance, never an outlier
        slope = np.float32(hi_v - lo_v) * np.float32(0.5)
        slope -= curvature_floor * np.sqrt(v0)
        tol += reg * max(slope, zero)
    if abs(rc) - tol > clip * sd:
        return rc / sd
    return np.float32(np.nan)


@njit(cache=True, nogil=True, error_model="numpy")
def _grown_z(y, x, xs, num, den, var0a, sums, bg2, p, q):
    """The plain significance ``(x - M) / sd`` of a pixel next to an outlier (NaN where
    either has no data): it is rejected too beyond ``grow_clip``."""
    xv = xs[y, x]
    m, v0 = _reference_at(num, den, var0a, sums, y, x)
    if np.isnan(xv) or np.isnan(m):
        return np.float32(np.nan)
    sd, _ = _noise(xv, m, v0, bg2, p, q)
    return (xv - m) / sd


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _flag_kernel(x, m, var0, s2m, flag, bg2, p, q, sig2, clip, grow, grow_clip, psf_margin,
                 scale_error, curvature_floor, reg):
    """The outlier test on whole arrays (the warm-up's test of each frame against the
    median ``m`` of variance ``var0`` and PSF ``s2m``): ``flag`` (uint8, zeros) gets 2
    at the outliers and 3 where they grew. Returns the number flagged.

    The test reads only ``x`` and the reference, so its rows run in parallel; the
    growth, which reads and writes ``flag`` around each outlier, runs after it, serially.
    """
    ny, nx = x.shape
    clip2 = clip * clip
    n = 0
    for y in prange(ny):
        for x0 in range(nx):
            rc = x[y, x0] - m[y, x0]
            if not rc * rc > (var0[y, x0] + bg2) * clip2:  # the screen (NaN: no data)
                continue
            if not np.isnan(_outlier_z(y, x0, x, m, var0, var0, False, s2m, bg2, p, q, sig2,
                                       clip, psf_margin, scale_error, curvature_floor, reg)):
                flag[y, x0] = 2
                n += 1
    if grow == 0 or n == 0:
        return n
    return _grow_flags(x, m, var0, flag, n, bg2, p, q, grow, grow_clip)


@njit(cache=True, nogil=True, error_model="numpy")
def _grow_flags(x, m, var0, flag, n, bg2, p, q, grow, grow_clip):
    """The growth of :func:`_flag_kernel` (serial: the outliers' windows overlap)."""
    ny, nx = x.shape
    for y in range(ny):  # growth from the outliers (not from the grown pixels)
        for x0 in range(nx):
            if flag[y, x0] != 2:
                continue
            for yy in range(max(y - grow, 0), min(y + grow + 1, ny)):
                for xx in range(max(x0 - grow, 0), min(x0 + grow + 1, nx)):
                    if flag[yy, xx] == 0 and abs(
                            _grown_z(yy, xx, x, m, var0, var0, False, bg2, p, q)) > grow_clip:
                        flag[yy, xx] = 3
                        n += 1
    return n


@njit(cache=True, nogil=True, error_model="numpy")
def _decide_kernel(ci, xs, ssum, wsum, psf2, count, disputes, act, mark, z, bg2, p, q, sig2,
                   clip, grow, grow_clip, psf_margin, scale_error, curvature_floor, reg):
    """The running add's candidates ``ci`` (flat indices) judged in full (reading ``M``
    from the sums), grown, and their fate written to ``act``: the new value rejected
    (``_REJECT_UP``/``_REJECT_DOWN``) or the old one replaced (``_REPLACE``).
    ``mark`` (uint8, zeros) and ``z`` (float32, any) are scratch frames. Returns
    (rejected, replaced)."""
    ny, nx = xs.shape
    zero = np.float32(0.0)
    flagged = np.empty(ci.size * (2 * grow + 1) ** 2, np.int64)
    nf = 0
    for k in range(ci.size):  # the full model at each candidate
        i = ci[k]
        y, x0 = i // nx, i % nx
        zi = _outlier_z(y, x0, xs, ssum, wsum, wsum, True, psf2, bg2, p, q, sig2, clip,
                        psf_margin, scale_error, curvature_floor, reg)
        if not np.isnan(zi):
            mark[y, x0] = 2
            z[y, x0] = zi
            flagged[nf] = i
            nf += 1
    n_hits = nf
    for k in range(n_hits):  # growth: the neighbours of an outlier beyond grow_clip
        i = flagged[k]
        y, x0 = i // nx, i % nx
        for yy in range(max(y - grow, 0), min(y + grow + 1, ny)):
            for xx in range(max(x0 - grow, 0), min(x0 + grow + 1, nx)):
                if mark[yy, xx] != 0:
                    continue
                zn = _grown_z(yy, xx, xs, ssum, wsum, wsum, True, bg2, p, q)
                if abs(zn) > grow_clip:
                    mark[yy, xx] = 3
                    z[yy, xx] = zn
                    flagged[nf] = yy * nx + xx
                    nf += 1
    n_rep = 0
    for k in range(nf):  # each outlier's fate
        i = flagged[k]
        y, x0 = i // nx, i % nx
        zi = z[y, x0]
        up = zi > zero
        ni = np.int64(count[y, x0])
        d = np.int64(disputes[y, x0])
        run = (max(d, 0) if up else max(-d, 0)) + 1
        replace = run > ni
        if not replace and ni == 1:
            # a lone old value: replaced when the negative deviation dominates around
            pos, neg = zero, zero
            for yy in range(max(y - grow, 0), min(y + grow + 1, ny)):
                for xx in range(max(x0 - grow, 0), min(x0 + grow + 1, nx)):
                    if mark[yy, xx] >= 2:
                        pos = max(pos, z[yy, xx])
                        neg = max(neg, -z[yy, xx])
            replace = neg > pos
        if replace:
            act[y, x0] = 2  # _REPLACE
            n_rep += 1
        else:
            act[y, x0] = 3 if up else 4  # _REJECT_UP, _REJECT_DOWN
    return nf - n_rep, n_rep


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _fold_kernel(xs, act, cov, has_cov, w0, ex_per_w, sig2, ssum, wsum, ex, ps, n,
                 dsp):
    """Pass 2 of an add: the sums, as the actions say (``_SKIP``, ``_ADD``, ``_REPLACE``,
    ``_REJECT_UP``, ``_REJECT_DOWN``)."""
    ny, nx = xs.shape
    for i in prange(ny):
        for j in range(nx):
            a = act[i, j]
            if a == 1 or a == 2:  # _ADD, _REPLACE
                if a == 2:
                    ssum[i, j] = 0.0
                    wsum[i, j] = 0.0
                    ex[i, j] = 0.0
                    ps[i, j] = 0.0
                    n[i, j] = 0
                w = (cov[i, j] if has_cov else np.float32(1.0)) * w0
                ssum[i, j] += np.float64(xs[i, j] * w)
                wsum[i, j] += np.float64(w)
                ex[i, j] += w * ex_per_w
                ps[i, j] += w * sig2
                n[i, j] += 1
                dsp[i, j] = 0
            elif a == 3:  # _REJECT_UP: a run of rejections above M
                d = dsp[i, j]
                dsp[i, j] = min(d, 126) + 1 if d > 0 else 1
            elif a == 4:  # _REJECT_DOWN
                d = dsp[i, j]
                dsp[i, j] = max(d, -126) - 1 if d < 0 else -1


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _seed_fold_kernel(xs, covs, hits, w0, ex_per_w, sig2, ssum, wsum, ex, ps, n, dsp):
    """The seed's sums in one pass: each buffered frame ``xs[f]`` (coverage
    ``covs[f]``) added where it has data and was not flagged (``hits[f]``), in frame
    order, with the arithmetic of :func:`_fold_kernel`'s ``_ADD`` (the same sums as a
    pass per frame, to the bit, for a third of the memory traffic)."""
    ny, nx = ssum.shape
    for i in prange(ny):
        for j in range(nx):
            for f in range(len(xs)):
                c = covs[f][i, j]
                if not c > np.float32(0.0) or hits[f][i, j]:
                    continue
                w = c * w0[f]
                ssum[i, j] += np.float64(xs[f][i, j] * w)
                wsum[i, j] += np.float64(w)
                ex[i, j] += w * ex_per_w[f]
                ps[i, j] += w * sig2[f]
                n[i, j] += 1
                dsp[i, j] = 0


@njit(cache=True, nogil=True, inline="always")
def _lower_median_at(xs, i, j):
    """The lower median of pixel ``(i, j)`` over the frames ``xs`` (a tuple of 2-d
    arrays; the minimum of two values, so a positive outlier in one of two never wins):
    (value, the first frame holding it, count of finite values).

    By rank, not by sorting: the value with ``(n - 1) // 2`` finite values before it in
    the stable order. A handful of frames needs no buffer, and there is no data-dependent
    inner loop to mispredict (4x faster than an insertion sort on noise).
    """
    k = len(xs)
    n = 0
    for f in range(k):
        if not np.isnan(xs[f][i, j]):
            n += 1
    if n == 0:
        return np.float32(np.nan), 0, 0
    want = (n - 1) // 2
    for f in range(k):
        v = xs[f][i, j]
        if np.isnan(v):
            continue
        r = 0
        for g in range(k):
            w = xs[g][i, j]
            if w < v or (w == v and g < f):
                r += 1
        if r == want:
            for g in range(f + 1):  # the first frame holding the value
                if xs[g][i, j] == v:
                    return v, g, n
    return np.float32(np.nan), 0, n  # not reached


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _seed_reference_kernel(xs, bg2, sig2, med, var0, s2m):
    """The warm-up's reference in one pass over the frames ``xs`` (a tuple of 2-d
    arrays): their lower median ``med``, its background variance ``var0`` (that of the
    frame it came from, / (2 n / pi) for three and more values) and PSF ``s2m``."""
    ny, nx = med.shape
    half_pi = np.float32(math.pi / 2)
    for i in prange(ny):
        for j in range(nx):
            v, f, n = _lower_median_at(xs, i, j)
            med[i, j] = v
            var0[i, j] = bg2[f] * (half_pi / np.float32(n) if n >= 3 else np.float32(1.0))
            s2m[i, j] = sig2[f]


_kernels_loaded: set[int] = set()  # the warm-up lengths done


def load_kernels(warmup: int = 3) -> None:
    """Load (or compile) every compiled kernel of a coadd with this warm-up now, by taking
    a small coadd through it, its picture after every frame, and running adds, with the
    argument types of the pipeline.

    numba loads a kernel from its disk cache on the first call, ~0.5 s for the warm-up's
    and again for the running add's at the first coadd of a process (and the warm-up's
    kernels once more for each number of buffered frames, which they take as a tuple):
    the first lights waited for that. :class:`observd.coadds.Coadds` calls this on a
    background thread when it makes a coadd. Once per process and warm-up length.
    """
    if warmup in _kernels_loaded:
        return
    rng = np.random.default_rng(0)
    n = 48
    co = RunningCoadd((n, n), warmup=warmup)
    for k in range(warmup + 2):
        img = rng.normal(6000.0, 30.0, (n, n)).astype(F32)
        img[20, 20 + k % 8] += 3000.0  # an outlier for the tests to judge
        cov = np.ones((n, n), F32)
        cov[:, : k % 8 + 1] = 0.0
        fit = fit_sky(img)
        unit = 1.0 / 60.0
        sky = SkyFit(tuple(c * unit for c in fit.coeffs), fit.rms * unit, fit.shape)
        co.add(FrameInput(img, sky_rms=sky.rms, exptime=60.0, fwhm=3.0, frame_id=k,
                          coverage=cov, sky=sky, gain=1.5, unit=unit))  # fmt: skip
        co.image  # noqa: B018 (the picture, during the warm-up a joint combination)
    _kernels_loaded.add(warmup)


# ------------------------------------------------------------------- the coadd
class RunningCoadd:
    """Running, memory-bounded coadd of one target and filter (see the module doc).

    Parameters
    ----------
    shape : (ny, nx)
        The target's grid.
    warmup : int
        Frames combined jointly at the start (judged against their median); 1: none.
    clip : float
        Outlier threshold in sigma of the noise model, beyond the systematic tolerance
        (cosmic rays and satellite trails are tens to hundreds of sigma).
    grow : int
        Pixels within this distance (a square) of an outlier are rejected too when they
        are beyond ``grow_clip`` sigma.
    grow_clip : float
    psf_margin : float
        Factor on the PSF-mismatch bounds (1 = exact for Moffat beta = 3 PSFs).
    registration_error : float
        Default registration error (px rms) of the gradient term.
    scale_error : float
        Relative photometric / resampling error allowed on the signal.
    curvature_floor : float
        The gradient counts above this many sigma of its own noise.
    min_coverage : float
        A frame's pixels with coverage below this are ignored.
    max_rejected_fraction : float
        A frame with more of its pixels rejected is refused whole (it does not belong to
        this grid or scale: a failed registration, a wrong filter).

    Examples
    --------
    >>> coadd = RunningCoadd(grid.shape)
    >>> sky = fit_sky(warped)
    >>> rep = coadd.add(FrameInput(warped, sky_rms=sky.rms, sky=sky.map(), exptime=60.0,
    ...                            fwhm=3.1, frame_id=42, coverage=weight,
    ...                            scale=1 / transparency, gain=1.5))
    >>> coadd.image, coadd.exposure, coadd.sigma      # ADU/s, s, ADU/s
    >>> state = coadd.state()        # np.savez into a temp file, fsync, os.replace
    >>> coadd = RunningCoadd.from_state(dict(np.load(path, allow_pickle=False)))
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        warmup: int = 3,
        clip: float = 5.0,
        grow: int = 2,
        grow_clip: float = 2.5,
        psf_margin: float = 1.25,
        registration_error: float = 0.05,
        scale_error: float = 0.02,
        curvature_floor: float = 3.0,
        min_coverage: float = 0.05,
        max_rejected_fraction: float = 0.1,
    ) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (ny, nx) with positive sides, not {shape}")
        if warmup < 1:
            raise ValueError("warmup must be >= 1")
        if not clip > 0 or not 0 < grow_clip <= clip:
            raise ValueError("need clip > 0 and 0 < grow_clip <= clip")
        if grow < 0 or psf_margin < 0 or registration_error < 0 or scale_error < 0:
            raise ValueError("grow, psf_margin, registration_error, scale_error must be >= 0")
        if curvature_floor < 0 or not 0 <= min_coverage < 1:
            raise ValueError("need curvature_floor >= 0 and 0 <= min_coverage < 1")
        if not 0 < max_rejected_fraction <= 1:
            raise ValueError("max_rejected_fraction must be in (0, 1]")
        self.shape = (int(shape[0]), int(shape[1]))
        self.warmup = int(warmup)
        self.registration_error = float(registration_error)
        self.min_coverage = float(min_coverage)
        self.max_rejected_fraction = float(max_rejected_fraction)
        self._rules = _Rules(float(clip), int(grow), float(grow_clip), float(psf_margin),
                             float(scale_error), float(curvature_floor))
        self._sum = np.zeros(self.shape, F64)  # sum of w x
        self._wsum = np.zeros(self.shape, F64)  # sum of w
        self._exp = np.zeros(self.shape, F32)  # sum of coverage * exptime
        self._psf2 = np.zeros(self.shape, F32)  # sum of w sigma_psf^2
        self._n = np.zeros(self.shape, np.uint16)  # frames per pixel
        # +k / -k: the last k frames here were all rejected above / below M
        self._disputes = np.zeros(self.shape, np.int8)
        self._frames: list[FrameRecord] = []
        self._kernel: list[_Frame] = []  # per frame: what the sums below need
        self._ids: set[int] = set()
        # warm-up buffer: frames, x (scaled, sky removed; NaN = no data), coverage
        self._buf: list[tuple[_Frame, NDArray[np.float32], NDArray[np.float32]]] = []
        self._seeded = self.warmup == 1
        self._provisional: tuple[int, dict[str, NDArray[Any]]] | None = None

    @property
    def clip(self) -> float:
        return self._rules.clip

    @property
    def params(self) -> dict[str, Any]:
        """The constructor's arguments (for the log and the checkpoint)."""
        r = self._rules
        return {"warmup": self.warmup, "clip": r.clip, "grow": r.grow,
                "grow_clip": r.grow_clip, "psf_margin": r.psf_margin,
                "registration_error": self.registration_error, "scale_error": r.scale_error,
                "curvature_floor": r.curvature_floor, "min_coverage": self.min_coverage,
                "max_rejected_fraction": self.max_rejected_fraction}

    # ----------------------------------------------------------------- properties
    @property
    def warming_up(self) -> bool:
        """Frames are still buffered for the joint start."""
        return not self._seeded

    @property
    def n_frames(self) -> int:
        """Frames in the coadd (buffered warm-up frames included)."""
        return len(self._frames)

    @property
    def frame_ids(self) -> list[int]:
        """Ids of the frames in the coadd, in arrival order: record them with each
        checkpoint; the others are to be offered again after a restart."""
        return [f.frame_id for f in self._frames]

    @property
    def frames(self) -> list[FrameRecord]:
        return list(self._frames)

    @property
    def total_exptime(self) -> float:
        """Sum of the exposure times of the frames in the coadd (``EXPTIME``)."""
        return float(sum(k.exptime for k in self._kernel))

    @property
    def fwhm(self) -> float:
        """FWHM (px) of the coadd predicted from the frames': the weighted mean of their
        ``sigma^2``; NaN when empty."""
        sw = sum(k.w0 for k in self._kernel)
        if sw <= 0:
            return float("nan")
        return math.sqrt(sum(k.w0 * k.sig2 for k in self._kernel) / sw) / FWHM_TO_SIGMA

    @property
    def image(self) -> NDArray[np.float32]:
        """The weighted mean (float32, ADU/s at the reference scale, sky removed; NaN
        where no frame contributes)."""
        a = self._current()
        out = np.empty(self.shape, F32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for rs in _row_chunks(*self.shape):
                np.divide(a["sum"][rs], a["wsum"][rs], out=out[rs], casting="same_kind")
        return out

    @property
    def weight(self) -> NDArray[np.float32]:
        """Sum of the weights per pixel (1/(ADU/s)^2): the inverse variance of the
        background of :attr:`image`."""
        return self._current()["wsum"].astype(F32)

    @property
    def exposure(self) -> NDArray[np.float32]:
        """Exposure map: seconds of exposure used per pixel (coverage-weighted)."""
        return self._current()["exposure"].copy()

    @property
    def n_used(self) -> NDArray[np.uint16]:
        """Frames used per pixel."""
        return self._current()["count"].copy()

    @property
    def psf_fwhm(self) -> NDArray[np.float32]:
        """FWHM (px) of the coadd's PSF per pixel (the weighted mix of the frames used
        there); NaN where empty."""
        a = self._current()
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.sqrt(a["psf2"] / a["wsum"].astype(F32)) / F32(FWHM_TO_SIGMA)
        return out.astype(F32)

    @property
    def sigma(self) -> NDArray[np.float32]:
        """Expected 1-sigma noise of :attr:`image` per pixel (ADU/s; inf where empty):
        ``sqrt((1 + Q M+) / sum(w))``, the background and the sources' Poisson noise."""
        a = self._current()
        q = self._q()
        out = np.empty(self.shape, F32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for rs in _row_chunks(*self.shape):
                w = a["wsum"][rs]
                m = a["sum"][rs] / w
                np.maximum(m, 0.0, out=m)
                m *= q
                m += 1.0
                m /= w
                np.sqrt(m, out=out[rs], casting="same_kind")
        out[a["count"] == 0] = np.inf
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held in arrays: constant once the warm-up is over, whatever the number
        of frames."""
        return (sum(a.nbytes for a in self._arrays().values())
                + sum(x.nbytes + c.nbytes for _, x, c in self._buf))

    @property
    def stats(self) -> dict[str, Any]:
        """Numbers for the log, the catalog and the dome page."""
        npx = sum(f.n_pixels for f in self._frames)
        return {
            "frames": self.n_frames,
            "warming_up": self.warming_up,
            "exptime": self.total_exptime,
            "fwhm": self.fwhm,
            "rejected_fraction": (sum(f.n_rejected for f in self._frames) / npx) if npx else 0.0,
            "replaced_pixels": sum(f.n_replaced for f in self._frames),
        }

    def _q(self) -> float:
        """Weighted mean Poisson factor of the frames (for the variance of the mean)."""
        sw = sum(k.w0 for k in self._kernel)
        return sum(k.w0 * k.w0 * k.p for k in self._kernel) / sw if sw > 0 else 0.0

    def frozen(self) -> RunningCoadd | None:
        """During the warm-up, a copy that later adds do not change (it shares the
        buffered frames, which are never modified), whose :attr:`image` can be computed
        on another thread while frames arrive; None once seeded (the sums change in
        place: read them before the next add)."""
        if self._seeded:
            return None
        twin = copy.copy(self)
        twin._buf = list(self._buf)
        twin._frames, twin._kernel = list(self._frames), list(self._kernel)
        twin._provisional = None
        return twin

    def state_arrays(self) -> dict[str, NDArray[Any]]:
        """The live arrays of :meth:`state` once seeded (their names, shapes and types
        are those of every checkpoint of this coadd; do not modify them)."""
        return self._arrays()

    def _arrays(self) -> dict[str, NDArray[Any]]:
        return {"sum": self._sum, "wsum": self._wsum, "exposure": self._exp,
                "psf2": self._psf2, "count": self._n, "disputes": self._disputes}

    def _current(self) -> dict[str, NDArray[Any]]:
        """The arrays, or during the warm-up the joint combination of the buffer."""
        if self._seeded or not self._buf:
            return self._arrays()
        if self._provisional is None or self._provisional[0] != len(self._buf):
            arrays, _, _ = self._seed_combine(commit=False)
            self._provisional = (len(self._buf), arrays)
        return self._provisional[1]

    # ----------------------------------------------------------------------- add
    def add(self, f: FrameInput, *, return_mask: bool = False) -> AddReport:
        """Fold one frame in (or refuse it, with the reason).

        Parameters
        ----------
        f : FrameInput
        return_mask : bool
            Also return the rejected pixels (a bool frame, for diagnostics).

        Returns
        -------
        AddReport
        """
        t0 = time.perf_counter()
        img, cov, sky = self._check(f)
        fr = _Frame(int(f.frame_id), float(f.scale), float(f.sky_rms), float(f.exptime),
                    float(f.fwhm), None if f.gain is None else float(f.gain),
                    self.registration_error if f.registration_error is None
                    else float(f.registration_error))
        if fr.frame_id in self._ids:
            return AddReport(fr.frame_id, False, "already in the coadd", fr.w0, 0, 0, 0, 0.0,
                             self.n_frames, self.warming_up, (), time.perf_counter() - t0)
        unit = float(f.unit)
        if not (math.isfinite(unit) and unit > 0):
            raise ValueError(f"unit must be a finite number > 0, not {f.unit!r}")
        if not self._seeded:
            return self._add_warmup(fr, img, cov, sky, unit, t0, return_mask)
        return self._add_running(fr, img, cov, sky, unit, t0, return_mask)

    def _check(self, f: FrameInput) -> tuple[NDArray[Any], NDArray[Any] | None, Any]:
        img = np.asarray(f.image)
        if img.shape != self.shape:
            raise ValueError(f"frame shape {img.shape} does not match the coadd {self.shape}")
        cov = None if f.coverage is None else np.asarray(f.coverage)
        if cov is not None and cov.shape != self.shape:
            raise ValueError(f"coverage shape {cov.shape} does not match the coadd {self.shape}")
        sky: Any = f.sky
        if isinstance(sky, SkyFit):
            if sky.shape != self.shape:
                raise ValueError(f"sky fit shape {sky.shape} does not match {self.shape}")
        elif np.ndim(sky) == 0:
            sky = float(sky)  # type: ignore[arg-type]
            if not math.isfinite(sky):
                raise ValueError("sky must be finite")
        else:
            sky = np.asarray(sky)
            if sky.shape != self.shape:
                raise ValueError(f"sky map shape {sky.shape} does not match {self.shape}")
        for name in ("sky_rms", "exptime", "fwhm", "scale"):
            v = getattr(f, name)
            if not (isinstance(v, (int, float, np.integer, np.floating))
                    and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, not {v!r}")
        if f.gain is not None and not (math.isfinite(f.gain) and f.gain > 0):
            raise ValueError(f"gain must be > 0 or None, not {f.gain!r}")
        if f.registration_error is not None and not (
                math.isfinite(f.registration_error) and f.registration_error >= 0):
            raise ValueError("registration_error must be >= 0 or None")
        return img, cov, sky

    def _record(self, fr: _Frame, n_px: int = 0, n_rej: int = 0, n_rep: int = 0
                ) -> FrameRecord:
        return FrameRecord(fr.frame_id, fr.w0, fr.scale, fr.sky_rms, fr.exptime, fr.fwhm,
                           n_px, n_rej, n_rep)

    # ------------------------------------------------------------------ warm-up
    def _add_warmup(self, fr: _Frame, img: NDArray[Any], cov: NDArray[Any] | None, sky: Any,
                    unit: float, t0: float, return_mask: bool) -> AddReport:
        x = np.empty(self.shape, F32)
        c = np.empty(self.shape, F32)
        for rs in _row_chunks(*self.shape):
            x[rs] = _scaled(img, cov, sky, rs, fr.scale, self.min_coverage, unit)
            c[rs] = _coverage(x[rs], cov, rs)
        n_px = int(np.count_nonzero(c))
        self._buf.append((fr, x, c))
        self._frames.append(self._record(fr, n_px))
        self._kernel.append(fr)
        self._ids.add(fr.frame_id)
        self._provisional = None
        revised: tuple[tuple[FrameRecord, str | None], ...] = ()
        mask = None
        if len(self._buf) >= self.warmup:
            masks = {}
            arrays, results, refused = self._seed_combine(commit=True, masks=masks)
            revised = tuple(results)
            self._buf = []
            self._seeded = True
            if return_mask:
                mask = masks.get(fr.frame_id)
        rec = next((r for r, _ in revised if r.frame_id == fr.frame_id), self._frames[-1])
        why = next((w for r, w in revised if r.frame_id == fr.frame_id), None)
        return AddReport(fr.frame_id, why is None, why, fr.w0, rec.n_pixels, rec.n_rejected,
                         0, rec.n_rejected / rec.n_pixels if rec.n_pixels else 0.0,
                         self.n_frames, self.warming_up, revised, time.perf_counter() - t0,
                         mask)

    def _seed_combine(self, *, commit: bool, masks: dict[int, NDArray[np.bool_]] | None = None
                      ) -> tuple[dict[str, NDArray[Any]],
                                 list[tuple[FrameRecord, str | None]], list[int]]:
        """Joint combination of the buffered frames: each against their lower median.

        A frame with more than ``max_rejected_fraction`` of its pixels rejected is left
        out (the worst first, then the median is taken again). With ``commit`` the
        coadd's arrays, records and frame sums are set; else new arrays are returned.
        """
        buf = list(self._buf)
        refused: dict[int, str] = {}
        while True:
            flags, counts = self._seed_flags(buf)
            frac = [counts[i][1] / counts[i][0] if counts[i][0] else 0.0
                    for i in range(len(buf))]
            worst = int(np.argmax(frac))
            if len(buf) == 1 or frac[worst] <= self.max_rejected_fraction:
                break
            refused[buf[worst][0].frame_id] = (
                f"disagrees with the other first frames: {100 * frac[worst]:.1f} % of its "
                f"pixels rejected (limit {100 * self.max_rejected_fraction:g} %)")
            buf.pop(worst)
        if commit:  # the arrays are still the zeros of __init__
            arrays = self._arrays()
        else:
            arrays = {"sum": np.zeros(self.shape, F64), "wsum": np.zeros(self.shape, F64),
                      "exposure": np.zeros(self.shape, F32), "psf2": np.zeros(self.shape, F32),
                      "count": np.zeros(self.shape, np.uint16),
                      "disputes": np.zeros(self.shape, np.int8)}
        _seed_fold_kernel(tuple(x for _, x, _ in buf), tuple(c for _, _, c in buf),
                          tuple(flags), np.array([fr.w0 for fr, _, _ in buf], F32),
                          np.array([fr.exptime / fr.w0 for fr, _, _ in buf], F32),
                          np.array([fr.sig2 for fr, _, _ in buf], F32),
                          arrays["sum"], arrays["wsum"], arrays["exposure"], arrays["psf2"],
                          arrays["count"], arrays["disputes"])  # fmt: skip
        results: list[tuple[FrameRecord, str | None]] = []
        by_id = {fr.frame_id: i for i, (fr, _, _) in enumerate(buf)}
        for fr, _, c in self._buf:
            i = by_id.get(fr.frame_id)
            rec = self._record(fr, int(np.count_nonzero(c)), counts[i][1] if i is not None else 0)
            results.append((rec, refused.get(fr.frame_id)))
            if masks is not None and i is not None:
                masks[fr.frame_id] = flags[i] & (c > 0)
        if commit:  # the buffer is all there is before the seed
            self._frames = [r for r, why in results if why is None]
            self._kernel = [fr for fr, _, _ in buf]
            self._ids = {r.frame_id for r in self._frames}
        return arrays, results, list(refused)

    def _seed_flags(self, buf: list[tuple[_Frame, NDArray[np.float32], NDArray[np.float32]]]
                    ) -> tuple[list[NDArray[np.bool_]], list[tuple[int, int]]]:
        """Outliers of each buffered frame against the buffer's per-pixel lower median,
        and per frame (pixels with data, pixels flagged among them)."""
        k = len(buf)
        valid = [b[2] > 0 for b in buf]
        if k == 1:
            return [np.zeros(self.shape, bool)], [(int(np.count_nonzero(valid[0])), 0)]
        frs = [b[0] for b in buf]
        med = np.empty(self.shape, F32)
        var0 = np.empty(self.shape, F32)
        s2m = np.empty(self.shape, F32)
        _seed_reference_kernel(tuple(b[1] for b in buf), np.array([fr.bg2 for fr in frs], F32),
                               np.array([fr.sig2 for fr in frs], F32), med, var0, s2m)
        qseed = float(np.median([fr.p / fr.bg2 for fr in frs]))
        r = self._rules
        flags, counts = [], []
        for i, fr in enumerate(frs):
            flag = np.zeros(self.shape, np.uint8)
            _flag_kernel(buf[i][1], med, var0, s2m, flag, F32(fr.bg2), F32(fr.p), F32(qseed),
                         F32(fr.sig2), F32(r.clip), int(r.grow), F32(r.grow_clip),
                         F32(r.psf_margin), F32(r.scale_error), F32(r.curvature_floor),
                         F32(fr.reg))  # fmt: skip
            hit = flag > 0
            hit &= valid[i]
            flags.append(hit)
            counts.append((int(np.count_nonzero(valid[i])), int(np.count_nonzero(hit))))
        return flags, counts

    # ------------------------------------------------------------------ running
    def _add_running(self, fr: _Frame, img: NDArray[Any], cov: NDArray[Any] | None, sky: Any,
                     unit: float, t0: float, return_mask: bool) -> AddReport:
        """Fold a frame into the seeded coadd: two fused passes over the grid (numba, on
        every core) with the few candidate pixels judged in between, sparsely."""
        ny, nx = self.shape
        xs = np.empty(self.shape, F32)  # the scaled frame, NaN = no data
        act = np.empty(self.shape, np.uint8)
        cols = np.empty(self.shape, np.int32)  # only the candidates' few entries are used
        n_cand = np.empty(ny, np.int64)
        n_valid = np.empty(ny, np.int64)
        img = _kernel_input(img)
        c32 = _kernel_input(cov) if cov is not None else np.zeros((1, 1), F32)
        if isinstance(sky, SkyFit):
            col, row, u, v, cross = sky.terms()
            sky_map = np.zeros((1, 1), F32)
        else:
            level = sky if isinstance(sky, float) else 0.0
            col, row = np.full(nx, level, F64), np.zeros(ny)
            u, v, cross = np.zeros(nx), np.zeros(ny), np.float64(0.0)
            sky_map = np.zeros((1, 1), F32) if isinstance(sky, float) else _kernel_input(sky)
        _screen_kernel(img, float(unit), c32, cov is not None, max(self.min_coverage, 1e-6),
                       sky_map, sky_map.shape == self.shape, col, row, u, v, float(cross),
                       float(fr.scale), self._sum, self._wsum, F32(fr.bg2),
                       F32(self._rules.clip), F32(fr.p), F32(self._rules.scale_error), xs, act,
                       cols, n_cand, n_valid)  # fmt: skip
        n_px = int(n_valid.sum())
        n_rej = n_rep = 0
        start = np.concatenate(([0], np.cumsum(n_cand)[:-1]))
        ci = np.empty(int(n_cand.sum()), np.int64)
        _gather_kernel(cols, n_cand, start, ci)
        if ci.size:
            n_rej, n_rep = self._decide(fr, xs, ci, F32(self._q()), act)
        frac = n_rej / n_px if n_px else 0.0
        mask = ((act == _REJECT_UP) | (act == _REJECT_DOWN)) if return_mask else None
        if frac > self.max_rejected_fraction:
            reason = (f"disagrees with the coadd: {100 * frac:.1f} % of its pixels rejected "
                      f"(limit {100 * self.max_rejected_fraction:g} %)")
            return AddReport(fr.frame_id, False, reason, fr.w0, n_px, n_rej, n_rep, frac,
                             self.n_frames, False, (), time.perf_counter() - t0, mask)
        _fold_kernel(xs, act, c32, cov is not None, F32(fr.w0), F32(fr.exptime / fr.w0),
                     F32(fr.sig2), self._sum, self._wsum, self._exp, self._psf2, self._n,
                     self._disputes)  # fmt: skip
        self._frames.append(self._record(fr, n_px, n_rej, n_rep))
        self._kernel.append(fr)
        self._ids.add(fr.frame_id)
        return AddReport(fr.frame_id, True, None, fr.w0, n_px, n_rej, n_rep, frac,
                         self.n_frames, False, (), time.perf_counter() - t0, mask)

    def _decide(self, fr: _Frame, xs: NDArray[np.float32], ci: NDArray[np.intp],
                q: np.float32, act: NDArray[np.uint8]) -> tuple[int, int]:
        """The fate of the candidates ``ci`` (flat indices) of a running frame: the full
        noise model, the growth, then for each outlier whether the new value is rejected
        or the old one replaced (a lone old value that is the outlier; ``M`` voted out
        where more frames in a row than it holds were rejected on the same side of it).
        Writes ``act``; returns (rejected, replaced)."""
        r = self._rules
        mark = np.zeros(self.shape, np.uint8)
        z = np.empty(self.shape, F32)
        n_rej, n_rep = _decide_kernel(
            ci, xs, self._sum, self._wsum, self._psf2, self._n, self._disputes, act, mark, z,
            F32(fr.bg2), F32(fr.p), F32(q), F32(fr.sig2), F32(r.clip), int(r.grow),
            F32(r.grow_clip), F32(r.psf_margin), F32(r.scale_error), F32(r.curvature_floor),
            F32(fr.reg))  # fmt: skip
        return int(n_rej), int(n_rep)

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to resume: the arrays and a JSON-able ``meta``.

        Keys: ``meta`` (a JSON string: parameters, frame records with their ids, the
        warm-up buffer's frames), ``sum`` and ``wsum`` (float64), ``exposure`` and
        ``psf2`` (float32), ``count`` (uint16), ``disputes`` (int8), and during the
        warm-up ``buffer_x``, ``buffer_c`` (float32, k x ny x nx). The arrays are the
        live ones: write them (``np.savez``) before the next :meth:`add`. Everything
        round-trips exactly.
        """
        meta = {
            "version": STATE_VERSION,
            "shape": list(self.shape),
            "params": self.params,
            "seeded": self._seeded,
            "frames": [asdict(r) for r in self._frames],
            "kernel": [asdict(k) for k in self._kernel],
            "buffer": [asdict(fr) for fr, _, _ in self._buf],
        }
        out: dict[str, Any] = {"meta": json.dumps(meta), **self._arrays()}
        if self._buf:
            out["buffer_x"] = np.stack([x for _, x, _ in self._buf])
            out["buffer_c"] = np.stack([c for _, _, c in self._buf])
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RunningCoadd:
        """Rebuild a coadd from :meth:`state` (the arrays may come from ``np.load``)."""
        raw = state["meta"]
        if isinstance(raw, np.ndarray):
            raw = raw.item() if raw.shape == () else raw
        meta = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"unknown RunningCoadd state version {meta.get('version')}")
        self = cls(tuple(meta["shape"]), **meta["params"])
        dtypes = {"sum": F64, "wsum": F64, "exposure": F32, "psf2": F32, "count": np.uint16,
                  "disputes": np.int8}
        for key, dt in dtypes.items():
            a = np.asarray(state[key])
            if a.shape != self.shape or a.dtype != dt:
                raise ValueError(f"state array {key!r} is {a.dtype}{a.shape}, expected "
                                 f"{np.dtype(dt)}{self.shape}")
        self._sum = np.array(state["sum"], dtype=F64)
        self._wsum = np.array(state["wsum"], dtype=F64)
        self._exp = np.array(state["exposure"], dtype=F32)
        self._psf2 = np.array(state["psf2"], dtype=F32)
        self._n = np.array(state["count"], dtype=np.uint16)
        self._disputes = np.array(state["disputes"], dtype=np.int8)
        self._frames = [FrameRecord(**r) for r in meta["frames"]]
        self._kernel = [_Frame(**k) for k in meta["kernel"]]
        self._ids = {r.frame_id for r in self._frames}
        self._seeded = bool(meta["seeded"])
        if meta["buffer"]:
            bx, bc = np.asarray(state["buffer_x"]), np.asarray(state["buffer_c"])
            if bx.shape != (len(meta["buffer"]), *self.shape) or bx.dtype != F32:
                raise ValueError("state buffer does not match its frames")
            self._buf = [(_Frame(**fr), np.array(bx[i], F32), np.array(bc[i], F32))
                         for i, fr in enumerate(meta["buffer"])]
        return self

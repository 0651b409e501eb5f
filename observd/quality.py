"""Per-frame quality: what a calibrated light looks like, and whether to keep it.

:func:`measure` turns a calibrated image into a :class:`Measurement`: the sky level and
its noise, how many sources stand out, and the shape of the stars (FWHM, elongation)
from the brightest few hundred of them, which are also returned as the :class:`Stars`
that registration matches. :func:`transparency` compares matched stars' fluxes with a
reference frame's. A :class:`Judge` holds the recent accepted frames of each target and
filter and decides with :class:`QualityRules`, giving every rejection a reason that names
the defect and carries its numbers.

How :func:`measure` stays cheap (bench/measure_cost.py, simulated lights of ~3 px
FWHM, 2 cores: ~36 ms at 2048 px, ~50 ms at 4096 px, 2.5-2.8x less than before issue
#7's speed work), with no per-star Python loop:

- the sky: ``sep``'s mesh estimator on a 1-in-2 subsample of the pixels (of ~512 px a
  side from 4 Mpx on: 1 in 4 at 2048 px, 1 in 8 at 4096 px, with 128 px mesh cells) --
  the mesh is coarse anyway, and a subsample keeps the per-pixel noise -- then again
  with every detection masked for the reported level and noise (the wings of stars and
  of a galaxy would make it read 1-4 % high in a dark filter; on a large frame every
  other sample is enough for these two numbers);
- detection on the frame itself, or on a 2x2-binned copy above 8.5 Mpx (a quarter of
  the cost; a star sampled at 2.5 px FWHM is still a star at half of that, though the
  faintest ones are lost: at 2048 px binning would cost 27-33 % of the stars, so it
  does not): a matched filter, a threshold at ``detect_sigma`` times the filtered noise
  and one OpenCV connected-components pass that counts every source; each is seeded at
  its brightest filtered pixel (two merged stars do not become one star between them);
- only the brightest ``~max_stars`` sources are refined, on the full-resolution image:
  postage stamps, Gaussian-windowed centroids and second moments for all of them, and a
  batched Levenberg-Marquardt fit of an elliptical Moffat profile for the brightest ~120
  that are unsaturated and isolated (further down the list when, in a rich 4k field,
  the brightest hundreds are saturated). The fits set the frame's FWHM (pixel response
  removed) and elongation;
- fluxes in circular apertures of twice the frame's median FWHM: the fraction of a
  star's light they hold does not change with the seeing, so a flux ratio between two
  frames is the ratio of their transparencies.

The per-pixel and per-star passes are numba kernels (``_*_kernel``: binning, sky
subtraction + filter + threshold + peak flags, areas and fluxes of the sources, stamps,
moments, the Moffat fits), rows or stars in parallel, each giving what the numpy/OpenCV
code before them gave (to 1e-9, the filter bit for bit). They compile on the first call
in a process that finds no cache (~20 s on 2 cores) and are cached on disk afterwards
(``__pycache__``, or numba's user cache when the package is read-only).

Faint or broad stars (a 5 s exposure at a long focal length, defocus; the M 13 frames of
``../shared/data``: FWHM ~10 px, peaks of 1-5 sigma): when the 3x3 filter leaves fewer
than five good stars, detection runs again with an 8 px Gaussian, then with one of the
stars' measured width (a matched filter: 2-3x the significance of the 3x3 one for such
stars), at 0.7 ``detect_sigma``. Shapes are then those of the frame's mean star (the
median of the flux-normalised stamps, adaptive windowed moments), because 5-parameter
fits of single stars at S/N 10-30 follow the noise (M 13's round stars came out with
an elongation of 1.6). "Bright enough for a shape" is an optimal S/N of 20 at the
frame's PSF: a 10-sigma peak at 2.7 px (as before), 3.4 sigma at 8 px.

Saturated stars are recognised by the ``saturation`` level when given, by masked cores
(the calibration masks clipped pixels), or by round flat tops -- and then everything
as bright as the faintest flat top -- and are left out of the shapes.

The judging logic and its order are described in :class:`Judge`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np
import sep
from numba import njit, prange
from scipy.spatial import cKDTree

__all__ = [
    "Judge",
    "Measurement",
    "QualityRules",
    "Stars",
    "Verdict",
    "frame_metrics",
    "measure",
    "transparency",
]

F32 = np.float32
NAN = float("nan")

#: Frames with at least this many pixels are detected on a 2x2-binned copy (not 2048 px
#: frames: binned, they lose 27-33 % of their sources, the faintest).
BIN_ABOVE_PIXELS = 8_500_000
#: sep's sky mesh in subsample pixels below ``_SKY_BIG_PIXELS`` (64 px of the frame); a
#: 3x3 median filter runs over the mesh cells.
_MESH = 32
#: Frames with at least this many pixels take the sky from a sparser subsample, of about
#: ``_SKY_SIDE`` px a side, with mesh cells of ``_SKY_MESH_PX`` frame px (see
#: ``_sky_sampling``).
_SKY_BIG_PIXELS = 4_000_000
_SKY_SIDE = 512
_SKY_MESH_PX = 128
#: Minimum connected pixels above the threshold for a detection (as in SExtractor/sep).
_MIN_AREA = 5
#: Blocks of rows that ``_sources_kernel`` shares among its threads.
_BLOCKS = 16
#: The detection filter (SExtractor's default 3x3 "pyramid", normalised to sum 1).
_KERNEL = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=F32) / F32(16.0)
#: Aperture radius for fluxes, in units of the frame's median FWHM (Moffat beta=3: 96 %).
APERTURE_FWHM = 2.0
_LN2 = math.log(2.0)
#: What a 1-px box adds to a FWHM^2 (8 ln 2 / 12).
_PIXEL_FWHM2 = 8.0 * math.log(2.0) / 12.0
#: Stars whose Moffat fit sets the frame's FWHM and elongation (the brightest good ones).
_N_FIT = 120
#: Optimal S/N above which a star's shape counts (see ``_min_peak``).
_SHAPE_SNR = 20.0
#: With fewer good stars than this, detection is tried again with a Gaussian filter of
#: ``_RESCUE_KERNEL`` detection px, then of the stars' width, at ``_RESCUE_SIGMA`` times
#: ``detect_sigma`` (a matched filter's noise is lower, and its false sources fewer).
_RESCUE_GOOD = 5
#: The brightest sources refined first, to check the first guess of their width.
_N_PRE = 150
_RESCUE_SIGMA = 0.7
_RESCUE_KERNEL = 8.0
#: Stars stacked for the mean star's shape when too few are good one by one.
_N_STACK = 200


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stars:
    """Detected point sources, brightest first (arrays of equal length).

    Attributes
    ----------
    x, y : ndarray
        0-based pixel centroids (``x`` is the column), Gaussian-windowed on the
        full-resolution image.
    flux : ndarray
        Background-subtracted flux in a circular aperture of radius
        ``APERTURE_FWHM`` times the frame's median FWHM, in the image's units (masked
        pixels count with the values the calibration repaired them to); NaN when the
        aperture leaves the frame or covers non-finite pixels.
    fwhm, elongation : ndarray
        Per star: geometric-mean FWHM (px, pixel response removed) and the ratio of the
        major to the minor FWHM, from an elliptical Moffat fit for the ``good`` stars and
        from windowed second moments (scaled to agree with the fits) for the others;
        NaN when not measurable.
    peak : ndarray
        Brightest pixel above the local sky, image units.
    saturated : ndarray of bool
        The star's core is clipped (at ``saturation``, flat-topped, or masked): its flux
        and shape are not to be trusted. Pass only unsaturated stars to
        :func:`transparency`.
    good : ndarray of bool
        Used for the frame's median FWHM and elongation: unsaturated, isolated, well
        fitted and bright enough.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    elongation: np.ndarray
    peak: np.ndarray
    saturated: np.ndarray | None = None
    good: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        for name in ("saturated", "good"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(n, dtype=bool))
        for f in fields(self):
            if len(getattr(self, f.name)) != n:
                raise ValueError(f"Stars.{f.name} has {len(getattr(self, f.name))} rows, x has {n}")

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def empty(cls) -> Stars:
        """No stars."""
        z = np.zeros(0)
        return cls(z, z, z, z, z, z, np.zeros(0, bool), np.zeros(0, bool))


@dataclass(frozen=True)
class Measurement:
    """What one calibrated frame looks like.

    Attributes
    ----------
    background : float
        Median sky level in the image's units (ADU for a calibrated frame; divide by the
        exposure time for ADU/s).
    background_rms : float
        Sky noise per full-resolution pixel, image units.
    n_stars : int
        Sources detected at ``detect_sigma`` (all of them, before any cap).
    fwhm : float
        Median FWHM of the good stars, px; NaN if none.
    elongation : float
        Median major/minor FWHM ratio of the good stars; NaN if none.
    stars : Stars
        The brightest ``max_stars`` sources, brightest first.
    saturated_stars : int
        Saturated stars among the refined (brightest) ones.
    n_good : int
        Stars behind the medians.
    pixel_scale : float or None
        arcsec/px when it was given.
    binning : int
        1, or 2 when the sky and detection ran on a 2x2-binned copy.
    """

    background: float
    background_rms: float
    n_stars: int
    fwhm: float
    elongation: float
    stars: Stars
    saturated_stars: int
    n_good: int = 0
    pixel_scale: float | None = None
    binning: int = 1

    @property
    def fwhm_arcsec(self) -> float:
        """Median FWHM in arcsec; NaN when the pixel scale is unknown."""
        return self.fwhm * self.pixel_scale if self.pixel_scale else NAN

    def metrics(self) -> dict[str, float]:
        """The scalars, JSON-able, as stored in the catalog (see :func:`frame_metrics`)."""
        return {
            "background": float(self.background),
            "background_rms": float(self.background_rms),
            "n_stars": float(self.n_stars),
            "fwhm": float(self.fwhm),
            "fwhm_arcsec": float(self.fwhm_arcsec),
            "elongation": float(self.elongation),
            "saturated_stars": float(self.saturated_stars),
            "n_good": float(self.n_good),
        }


def frame_metrics(
    m: Measurement,
    *,
    exptime: float | None = None,
    transparency: float | None = None,
    offset: tuple[float, float] | None = None,
    rotation_deg: float | None = None,
) -> dict[str, float | None]:
    """The per-frame row for the catalog: the measurement plus the sky per second and
    what registration found (offset in px and rotation from the target's reference).

    ``Judge.accept`` takes this dict back, so a restart can rebuild the history from
    the catalog.
    """
    row: dict[str, float | None] = dict(m.metrics())
    row["sky_rate"] = m.background / exptime if exptime else None
    row["transparency"] = None if transparency is None else float(transparency)
    if offset is not None:
        row["offset_x"], row["offset_y"] = float(offset[0]), float(offset[1])
        row["offset"] = float(math.hypot(*offset))
    if rotation_deg is not None:
        row["rotation_deg"] = float(rotation_deg)
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


# --------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------


def measure(
    image: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    detect_sigma: float = 5.0,
    max_stars: int = 500,
    saturation: float | None = None,
    pixel_scale: float | None = None,
) -> Measurement:
    """Measure the sky and the stars of a calibrated frame.

    Parameters
    ----------
    image
        2-D calibrated image (any float dtype; not modified).
    mask
        True where a pixel must not be used (saturated, cosmic ray, dead flat). Non-finite
        pixels are masked too. A star with masked pixels in its core counts as saturated.
    detect_sigma
        Detection threshold, in units of the noise of the matched-filtered image (a true
        significance: a 5-sigma threshold gives well under one false source per frame).
    max_stars
        Brightest sources refined and returned.
    saturation
        Level (image units) at or above which a pixel is clipped. Without it, saturated
        stars are recognised by their flat tops (and everything as bright as the faintest
        flat top) and by masked cores.
    pixel_scale
        arcsec/px, for :attr:`Measurement.fwhm_arcsec`.

    Returns
    -------
    Measurement
    """
    data = np.asarray(image)
    if data.ndim != 2:
        raise ValueError(f"measure needs a 2-D image, not shape {data.shape}")
    data = np.ascontiguousarray(data, dtype=F32)
    bad = holes = None
    if mask is not None:
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image {data.shape}")
        bad = np.ascontiguousarray(mask, dtype=bool)  # one layout for the kernels
    binning = 2 if data.size >= BIN_ABOVE_PIXELS and min(data.shape) >= 64 else 1
    small, det_bad, finite = _binned(data, bad, binning)
    if not finite:
        holes = ~np.isfinite(data)
        bad = holes if bad is None else bad | holes
        data = np.where(bad, F32(0.0), data)  # a copy: sep and cv2 must not see NaN
        small, det_bad, _ = _binned(data, bad, binning)
    if bad is not None and not bad.any():
        bad = det_bad = None
    if bad is not None and bad.all():
        return _nothing(NAN, NAN, pixel_scale)
    sky = _background(data, bad, binning)
    if sky is None:
        level = float(np.median(data if bad is None else data[~bad]))
        return _nothing(level, 0.0, pixel_scale, binning)
    det = _detect(small, det_bad, sky, detect_sigma, binning)
    m = _stars(data, bad, holes, det, saturation, max_stars, pixel_scale, NAN)
    if m.n_good < _RESCUE_GOOD and m.n_stars > 0:
        # broad or faint stars (defocus, bad seeing, a long focal length): the 3x3 filter
        # is far from matched and finds only the tips of the brightest. Detect again with
        # a broad Gaussian; the mean star of what it finds gives the stars' width, and a
        # filter of that width (a matched filter maximises their significance) the
        # sources and shapes of the frame
        width = _RESCUE_KERNEL
        for _ in range(2):
            d = _detect(small, det_bad, sky, _RESCUE_SIGMA * detect_sigma, binning,
                        kernel_fwhm=width)  # fmt: skip
            m2 = _stars(data, bad, holes, d, saturation, max_stars, pixel_scale,
                        width * binning)  # fmt: skip
            if not math.isfinite(m2.fwhm):
                break
            m = m2
            matched = float(np.clip(m2.fwhm / binning, 2.0, _RESCUE_KERNEL))
            if abs(matched / width - 1.0) < 0.25:
                break
            width = matched
    return m


def _stars(
    data: np.ndarray,
    bad: np.ndarray | None,
    holes: np.ndarray | None,
    det: dict[str, Any],
    saturation: float | None,
    max_stars: int,
    pixel_scale: float | None,
    psf: float,
) -> Measurement:
    """The measurement from the detections ``det``; ``psf`` is the stars' expected FWHM
    (full-resolution px; NaN: unknown, guessed from the detections)."""
    binning = det["binning"]
    background, rms = det["background"], det["rms"]
    n_stars = len(det["flux"])
    if n_stars == 0 or not rms > 0:
        return _nothing(background, rms, pixel_scale, binning)
    # "bright enough for a shape": an optimal (PSF-weighted) S/N of ~20, which is a peak
    # of 10 sigma for a 2.7 px star and less for broader ones (their light is spread)
    min_peak = _min_peak(rms, psf)

    # refine the brightest sources on the full-resolution image; when too few of them can
    # be trusted for shapes (a rich field at 4k: the brightest hundreds are saturated),
    # refine further batches down the list for the shape measurement alone
    n_keep = min(n_stars, int(max_stars * 1.2) + 10)
    keep = np.arange(n_keep)
    guess = _guess(psf)
    if guess is None:
        guess = _first_guess(data, bad, det, keep)
    # the brightest _N_PRE first: when they show the guess to be off, the rest is
    # refined once, with their width, instead of twice (stars are refined one by one,
    # so two batches give what one would)
    n_pre = _N_PRE if not math.isfinite(psf) and n_keep > 2 * _N_PRE else n_keep
    refs = [_refine(data, bad, det, keep[:n_pre], rms, saturation, guess)]
    redone = False
    if n_pre < n_keep:
        pre = _clipped_median(refs[0]["fwhm"][_usable_all(refs, min_peak, saturation)])
        if math.isfinite(pre) and abs(pre / guess - 1.0) > 0.25:
            guess, redone = pre, True
            refs = [_refine(data, bad, det, keep, rms, saturation, guess)]
        else:
            refs.append(_refine(data, bad, det, keep[n_pre:], rms, saturation, guess))
    usable = _usable_all(refs, min_peak, saturation)
    measured = _clipped_median(np.concatenate([r["fwhm"] for r in refs])[usable[:n_keep]])
    if (not redone and not math.isfinite(psf) and math.isfinite(measured)
            and abs(measured / guess - 1.0) > 0.25):  # fmt: skip
        # the first guess (flux / peak) was off: stamps and window follow the stars (not
        # when the width is known from the filter that found the stars: the moments
        # of faint broad stars wander)
        guess = measured
        refs = [_refine(data, bad, det, keep, rms, saturation, guess)]
        usable = _usable_all(refs, min_peak, saturation)
    fw_guess = guess
    start = n_keep
    while np.count_nonzero(usable) < _N_FIT and start < n_stars and len(refs) < 5:
        more = np.arange(start, min(n_stars, start + 2 * _N_FIT))
        refs.append(_refine(data, bad, det, more, rms, saturation, fw_guess))
        usable = _usable_all(refs, min_peak, saturation)
        start = more[-1] + 1
    allr = {k: np.concatenate([r[k] for r in refs]) for k in _PER_STAR}
    if saturation is None:
        _ceiling(allr)
    if np.count_nonzero(usable) < 5:
        # crowded, or every star is a long trail with maxima along it: shapes from the
        # stars that are at least unsaturated and bright beat no shapes at all
        usable = ~allr["saturated"] & allr["inside"] & (allr["peak"] > min_peak)
    with np.errstate(invalid="ignore"):  # cosmic rays and hot pixels: sharper than stars
        sharp = allr["fwhm"] < 0.5 * _clipped_median(allr["fwhm"][usable])
    usable &= ~sharp

    # shapes: an elliptical Moffat fit of the brightest usable stars; window moments for
    # the others, scaled to the fits so that both agree
    fit = np.flatnonzero(usable)[:_N_FIT]
    fwhm_s, elong_s = allr["fwhm"].copy(), allr["elongation"].copy()
    good = np.zeros(len(fwhm_s), dtype=bool)
    if fit.size:
        ffw, fel = _fit_moffat(
            _gather(refs, "img", fit),
            _gather(refs, "use", fit),
            allr["dx"][fit],
            allr["dy"][fit],
            (allr["cxx"][fit], allr["cxy"][fit], allr["cyy"][fit]),
            allr["peak"][fit],
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.nanmedian(ffw / fwhm_s[fit]) if np.isfinite(ffw).any() else NAN
        if np.isfinite(scale):
            fwhm_s *= scale
        fwhm_s[fit] = np.where(np.isfinite(ffw), ffw, fwhm_s[fit])
        elong_s[fit] = np.where(np.isfinite(fel), fel, elong_s[fit])
        good[fit] = np.isfinite(ffw) & np.isfinite(fel)
    fwhm_med = _clipped_median(fwhm_s[good])
    elong_med = float(np.median(elong_s[good])) if good.any() else NAN
    if math.isfinite(psf):
        # broad or faint stars, detected with a filter of their width: fits of single
        # stars at a S/N of 10-30 widen and elongate them (a 5-parameter fit follows the
        # noise), so the frame's shape is that of its mean star, stacked from the
        # isolated unsaturated ones (windows of their width keep the centroids from
        # locking onto noise, which would stack into a sharp spike)
        cand = np.flatnonzero(
            ~allr["saturated"] & allr["inside"] & allr["isolated"] & ~sharp
        )[:_N_STACK]  # fmt: skip
        if cand.size >= _RESCUE_GOOD:
            sf, se = _stacked_shape(_gather(refs, "img", cand), _gather(refs, "use", cand),
                                    allr["dx"][cand], allr["dy"][cand], psf)  # fmt: skip
            if math.isfinite(sf) and math.isfinite(se):
                fwhm_med, elong_med = sf, se
                good[:] = False
                good[cand] = True

    # the returned stars: the first batch, brightest first by aperture flux
    n1 = n_keep
    radius = APERTURE_FWHM * (fwhm_med if np.isfinite(fwhm_med) else fw_guess)
    flux = _aperture_flux(data, holes, allr["x"][:n1], allr["y"][:n1], radius, allr["sky"][:n1])
    keep = np.flatnonzero(~sharp[:n1])
    rank = np.where(np.isfinite(flux), flux, allr["flux_iso"][:n1])[keep]
    sel = keep[np.argsort(-rank, kind="stable")][:max_stars]
    sat = allr["saturated"]
    stars = Stars(
        x=allr["x"][sel],
        y=allr["y"][sel],
        flux=flux[sel],
        fwhm=fwhm_s[sel],
        elongation=elong_s[sel],
        peak=allr["peak"][sel],
        saturated=sat[sel],
        good=good[sel],
    )
    return Measurement(
        background=background,
        background_rms=float(rms),
        n_stars=n_stars,
        fwhm=float(fwhm_med),
        elongation=float(elong_med),
        stars=stars,
        saturated_stars=int(np.count_nonzero(sat & ~sharp)),
        n_good=int(good.sum()),
        pixel_scale=pixel_scale,
        binning=binning,
    )


_PER_STAR = (
    "x",
    "y",
    "dx",
    "dy",
    "sky",
    "flux_iso",
    "fwhm",
    "elongation",
    "cxx",
    "cxy",
    "cyy",
    "okm",
    "peak",
    "level",
    "saturated",
    "flat_top",
    "inside",
    "isolated",
)


def _usable(r: Mapping[str, np.ndarray], min_peak: float) -> np.ndarray:
    """Stars whose shape can be trusted: unsaturated, isolated, inside the frame, and
    bright (peak > ``min_peak``, see :func:`_min_peak`)."""
    return ~r["saturated"] & r["isolated"] & r["inside"] & (r["peak"] > min_peak)


def _min_peak(rms: float, fwhm: float) -> float:
    """The peak (image units) of a star bright enough for its shape to be measured: an
    optimal S/N of ``_SHAPE_SNR``. A Gaussian star of peak ``A`` and width ``sigma`` has
    ``S/N = A / rms * sigma * sqrt(pi)``: 10 sigma at 2.7 px FWHM, 3.4 sigma at 8 px.
    Never above 10 sigma (sharp stars keep the historical cut), never below 3."""
    if not math.isfinite(fwhm) or fwhm <= 0:
        return 10.0 * rms
    snr_per_peak = fwhm / 2.3548 * math.sqrt(math.pi)
    return rms * float(np.clip(_SHAPE_SNR / snr_per_peak, 3.0, 10.0))


def _guess(psf: float) -> float | None:
    """A first FWHM for the stamps and windows of :func:`_refine` (None: its own)."""
    return float(np.clip(psf, 1.0, 30.0)) if math.isfinite(psf) else None


def _usable_all(refs: list[dict[str, Any]], min_peak: float,
                saturation: float | None) -> np.ndarray:
    """:func:`_usable` over all batches, after the clipping ceiling of :func:`_ceiling`."""
    r = {
        k: np.concatenate([b[k] for b in refs])
        for k in ("saturated", "isolated", "inside", "peak", "level", "flat_top")
    }
    if saturation is None:
        _ceiling(r)
    return _usable(r, min_peak)


def _ceiling(r: dict[str, np.ndarray]) -> None:
    """Without a known saturation level: once three stars show flat tops, the clipping
    level is the faintest of their tops (the flat moves it by its own variations), and
    everything that reaches 90 % of it may be clipped or non-linear too."""
    tops = r["level"][r["flat_top"]]
    if tops.size >= 3:
        r["saturated"] |= r["level"] >= 0.9 * float(np.min(tops))


def _gather(refs: list[dict[str, Any]], key: str, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (over the concatenated batches) of a per-batch stamp array, padded to
    the first batch's stamp size."""
    out = []
    base = 0
    r0 = refs[0]["r"]
    for r in refs:
        n = len(r["x"])
        sel = idx[(idx >= base) & (idx < base + n)] - base
        a = r[key][sel]
        if r["r"] != r0:
            pad = r0 - r["r"]
            a = np.pad(a, ((0, 0), (pad, pad), (pad, pad)))
        out.append(a)
        base += n
    return np.concatenate(out)


def _nothing(
    background: float, rms: float, pixel_scale: float | None, binning: int = 1
) -> Measurement:
    return Measurement(background, rms, 0, NAN, NAN, Stars.empty(), 0, 0, pixel_scale, binning)


def _binned(
    data: np.ndarray, bad: np.ndarray | None, factor: int
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """The detection image (``data`` binned by ``factor``), its mask (a binned pixel is
    bad when any of its pixels is) and whether every binned pixel is finite (a NaN or
    an infinity anywhere makes its bin non-finite). Binning by 2 is one numba pass over
    the frame and the mask instead of three."""
    if factor == 1:
        return data, bad, bool(np.isfinite(data).all())
    if factor == 2:
        none = np.zeros((0, 0), dtype=bool)
        small, small_bad, finite = _bin2_kernel(data, none if bad is None else bad)
        return small, (None if bad is None else small_bad), bool(finite)
    small = _bin(data, factor)
    return small, None if bad is None else _bin_mask(bad, factor), bool(np.isfinite(small).all())


@njit(cache=True, nogil=True, parallel=True)
def _bin2_kernel(data, bad):  # pragma: no cover - compiled
    """2x2 means (summed as OpenCV's area resampling does, so bit for bit the same),
    the ORed mask (``bad`` of size 0: none) and whether every mean is finite; rows in
    parallel. Compiled by numba on first use (cached on disk)."""
    h, w = data.shape[0] // 2, data.shape[1] // 2
    has_bad = bad.size > 0
    out = np.empty((h, w), dtype=np.float32)
    out_bad = np.zeros((h if has_bad else 0, w if has_bad else 0), dtype=np.bool_)
    finite = np.ones(h, dtype=np.bool_)
    quarter = np.float32(0.25)
    for y in prange(h):
        ok = True
        for x in range(w):
            v = ((data[2 * y, 2 * x] + data[2 * y, 2 * x + 1])
                 + (data[2 * y + 1, 2 * x] + data[2 * y + 1, 2 * x + 1])) * quarter  # fmt: skip
            out[y, x] = v
            ok &= np.isfinite(v)
            if has_bad:
                out_bad[y, x] = (bad[2 * y, 2 * x] or bad[2 * y, 2 * x + 1]
                                 or bad[2 * y + 1, 2 * x] or bad[2 * y + 1, 2 * x + 1])  # fmt: skip
        finite[y] = ok
    return out, out_bad, finite.all()


def _bin(data: np.ndarray, factor: int) -> np.ndarray:
    """``factor`` x ``factor`` mean (1: the image itself; an odd last row or column is
    dropped); OpenCV's area resampling is exactly that, and three times faster than
    numpy's strided sums."""
    if factor == 1:
        return data
    h, w = data.shape[0] // factor, data.shape[1] // factor
    return cv2.resize(data[: factor * h, : factor * w], (w, h), interpolation=cv2.INTER_AREA)


def _bin_mask(bad: np.ndarray, factor: int) -> np.ndarray:
    """A binned pixel is bad when any of its pixels is."""
    if factor == 1:
        return bad
    h, w = bad.shape[0] // factor, bad.shape[1] // factor
    b = bad[: factor * h, : factor * w]
    out = b[0::factor, 0::factor].copy()
    for i in range(factor):  # strided ORs: several times faster than any(axis=...)
        for j in range(factor):
            if i or j:
                out |= b[i::factor, j::factor]
    return out


def _background(data: np.ndarray, bad: np.ndarray | None, binning: int) -> dict[str, Any] | None:
    """sep's mesh sky on a 1-in-``step`` subsample of the full-resolution pixels (see
    :func:`_sky_sampling`: the mesh is coarse anyway, and the subsample keeps the
    per-pixel noise, which a binned pixel would halve); None when there is no sky to
    speak of (a constant image)."""
    step, mesh = _sky_sampling(data.shape, binning)
    samp = np.array(data[::step, ::step], dtype=F32, order="C")
    samp_bad = None if bad is None else np.ascontiguousarray(bad[::step, ::step])
    mesh = int(np.clip(min(samp.shape) // 8, 8, mesh))
    try:
        bkg = sep.Background(samp, mask=samp_bad, bw=mesh, bh=mesh, fw=3, fh=3)
    except Exception:  # sep refuses e.g. a constant image: there is nothing to see
        return None
    if not bkg.globalrms > 0:
        return None
    return {"samp": samp, "samp_bad": samp_bad, "step": step, "mesh": mesh,
            "back": bkg.back(dtype=F32), "rms": bkg.rms(dtype=F32)}  # fmt: skip


def _sky_sampling(shape: tuple[int, ...], binning: int) -> tuple[int, int]:
    """The sky's subsample step and its largest mesh (subsample px).

    Below ``_SKY_BIG_PIXELS``, every ``2 x binning``-th pixel and a 32-px mesh (64 px of
    the frame): as always. Above, a subsample of about ``_SKY_SIDE`` px a side (1 in 4
    at 2048 px, 1 in 8 at 4096 px) and a mesh of ``_SKY_MESH_PX`` frame px: at least 256
    samples per mesh cell (1024 at 2048 px), a quarter of the cost or less, and the sky
    level, noise and star counts move by well under 1 % (bench/measure_cost.py).
    """
    if shape[0] * shape[1] < _SKY_BIG_PIXELS:
        return 2 * binning, _MESH
    step = 2 * binning
    while max(shape) / (2 * step) >= _SKY_SIDE:
        step *= 2
    return step, max(8, _SKY_MESH_PX // step)


def _kernel(fwhm: float | None) -> tuple[np.ndarray | None, float]:
    """The detection filter and its noise gain ``sqrt(sum k^2)``: SExtractor's 3x3
    pyramid, or (``fwhm`` given) a normalised separable Gaussian of that FWHM."""
    if fwhm is None:
        return None, float(np.sqrt((_KERNEL.astype(np.float64) ** 2).sum()))
    sigma = fwhm / 2.3548
    r = max(1, int(math.ceil(2.5 * sigma)))
    g = cv2.getGaussianKernel(2 * r + 1, sigma, ktype=cv2.CV_32F)
    return g, float((g.astype(np.float64) ** 2).sum())  # sum of the 2-D k^2 = (sum g^2)^2


def _detect(
    small: np.ndarray,
    det_bad: np.ndarray | None,
    sky: Mapping[str, Any],
    detect_sigma: float,
    binning: int,
    kernel_fwhm: float | None = None,
) -> dict[str, Any]:
    """Sky level, noise and every source of the detection image ``small`` (the frame
    binned by ``binning``).

    The mesh maps of :func:`_background` are resized to the detection image. Detection:
    a matched filter (the 3x3 pyramid, or a Gaussian of ``kernel_fwhm`` detection px),
    a threshold and one connected-components pass (merged stars count once, as without
    deblending). Each source is seeded at its brightest filtered pixel, not at the
    centroid of its footprint, which for two merged stars lies between them. Sources
    come sorted by isophotal flux, brightest first; positions are full-resolution pixels.
    """
    size = (small.shape[1], small.shape[0])
    back = cv2.resize(sky["back"], size, interpolation=cv2.INTER_LINEAR)
    rms_map = cv2.resize(sky["rms"], size, interpolation=cv2.INTER_LINEAR)
    k1, knorm = _kernel(kernel_fwhm)
    bad_k = np.zeros((0, 0), dtype=bool) if det_bad is None else det_bad
    sub = _subtract_kernel(small, back, bad_k)
    if k1 is None:  # the 3x3 pyramid: filtered and thresholded in one pass
        filt = np.zeros((0, 0), dtype=F32)
    else:
        filt = cv2.sepFilter2D(sub, -1, k1, k1, borderType=cv2.BORDER_REPLICATE)
    gain, factor = F32(1.0 / binning), F32(detect_sigma * knorm)
    filt, above = _threshold_kernel(sub, filt, rms_map, gain, factor, bad_k, _KERNEL)

    def thresh(flat: np.ndarray) -> np.ndarray:
        """The threshold at flat indices: the noise of a binned pixel (a mean of
        binning^2 independent pixels) times ``detect_sigma`` and the filter's gain."""
        return (rms_map.ravel()[flat] * gain) * factor

    n_lab, labels = cv2.connectedComponentsWithAlgorithm(
        above, 8, cv2.CV_32S, cv2.CCL_SPAGHETTI
    )
    background, rms = _sky(
        sky["samp"], sky["samp_bad"], above, sky["step"], binning, sky["mesh"]
    )

    # isophotal flux and area per component, and its peaks (local maxima of the filter)
    rows = -(-above.shape[0] // _BLOCKS)
    starts = np.zeros(_BLOCKS + 1, dtype=np.int64)
    starts[1:] = np.cumsum([np.count_nonzero(above[i : i + rows])
                            for i in range(0, rows * _BLOCKS, rows)])  # fmt: skip
    area, iso, plab, pval, ppos, main_val, main_pos = _sources_kernel(
        above, labels, filt, sub, n_lab, starts
    )

    real = np.flatnonzero((area >= _MIN_AREA) & (np.arange(n_lab) > 0) & (main_val > 0))
    order = real[np.argsort(-iso[real], kind="stable")]
    py, px = np.divmod(main_pos[order], small.shape[1])
    # every significant peak, secondary ones of merged stars included, for isolation
    sig = (pval >= 0.05 * main_val[plab]) & (pval >= 2.0 * thresh(ppos))
    qy, qx = np.divmod(ppos[sig], small.shape[1])
    half = (binning - 1) / 2.0
    return {
        "background": background,
        "rms": rms,
        "binning": binning,
        "kernel_fwhm": 2.0 if kernel_fwhm is None else kernel_fwhm,
        "n": len(order),
        "x": px * binning + half,
        "y": py * binning + half,
        "sky": back[py, px].astype(np.float64),
        "flux": iso[order] * binning * binning,
        "peak_f": main_val[order],
        # filtered peak over the filtered noise: the significance of each source
        "snr": main_val[order] / (thresh(main_pos[order]) / detect_sigma),
        "peaks": (qx * binning + half, qy * binning + half, pval[sig]),
    }


@njit(cache=True, nogil=True, parallel=True)
def _subtract_kernel(small, back, bad):  # pragma: no cover - compiled
    """``small - back``, 0 where ``bad`` (of size 0: nothing is bad); rows in parallel.
    Compiled by numba on first use (cached on disk)."""
    h, w = small.shape
    has_bad = bad.size > 0
    sub = np.empty((h, w), dtype=np.float32)
    for y in prange(h):
        for x in range(w):
            sub[y, x] = 0.0 if has_bad and bad[y, x] else small[y, x] - back[y, x]
    return sub


@njit(cache=True, nogil=True, parallel=True)
def _threshold_kernel(sub, filt, rms, gain, factor, bad, kernel):  # pragma: no cover
    """The filtered image and a code per pixel: 0 below the threshold, 1 above it
    (``filt > rms * gain * factor`` in float32, as numpy did, and not ``bad``), 2 above
    it and a peak (not below any of its 8 neighbours in the frame). ``filt`` of size 0:
    filtered here with the 3x3 ``kernel`` (edge pixels replicated, taps summed in row
    order as OpenCV's filter2D does: bit for bit the same), in the same pass. Rows in
    parallel. Compiled by numba on first use (cached on disk)."""
    h, w = sub.shape
    has_bad = bad.size > 0
    own = filt.size == 0
    out = np.empty((h, w), dtype=np.float32) if own else filt
    above = np.empty((h, w), dtype=np.uint8)
    for y in prange(h):
        if own:
            r0, r1, r2 = sub[max(y - 1, 0)], sub[y], sub[min(y + 1, h - 1)]
            o = out[y]
            _filter_row(r0, r1, r2, o, kernel, 0, min(w, 1))
            for x in range(1, w - 1):  # the interior: no clamping, vectorised
                acc = kernel[0, 0] * r0[x - 1]
                acc += kernel[0, 1] * r0[x]
                acc += kernel[0, 2] * r0[x + 1]
                acc += kernel[1, 0] * r1[x - 1]
                acc += kernel[1, 1] * r1[x]
                acc += kernel[1, 2] * r1[x + 1]
                acc += kernel[2, 0] * r2[x - 1]
                acc += kernel[2, 1] * r2[x]
                acc += kernel[2, 2] * r2[x + 1]
                o[x] = acc
            _filter_row(r0, r1, r2, o, kernel, max(w - 1, 1), w)
        for x in range(w):
            above[y, x] = out[y, x] > (rms[y, x] * gain) * factor
        if has_bad:
            for x in range(w):
                above[y, x] &= not bad[y, x]
    for y in prange(h):  # local maxima (not below any of the 8 neighbours) get a 2
        f0, f1, f2 = out[max(y - 1, 0)], out[y], out[min(y + 1, h - 1)]
        cmax = np.empty(w, dtype=np.float32)
        for x in range(w):
            cmax[x] = max(max(f0[x], f1[x]), f2[x])
        for x in range(w):
            m = max(max(cmax[max(x - 1, 0)], cmax[x]), cmax[min(x + 1, w - 1)])
            above[y, x] += above[y, x] & (f1[x] >= m)
    return out, above


@njit(cache=True, nogil=True)
def _filter_row(r0, r1, r2, out, kernel, start, stop):  # pragma: no cover - compiled
    """The 3x3 filter of :func:`_threshold_kernel` at columns ``start:stop`` of a row,
    with the edge columns replicated."""
    w = r1.size
    for x in range(start, stop):
        x0, x2 = max(x - 1, 0), min(x + 1, w - 1)
        acc = kernel[0, 0] * r0[x0]
        acc += kernel[0, 1] * r0[x]
        acc += kernel[0, 2] * r0[x2]
        acc += kernel[1, 0] * r1[x0]
        acc += kernel[1, 1] * r1[x]
        acc += kernel[1, 2] * r1[x2]
        acc += kernel[2, 0] * r2[x0]
        acc += kernel[2, 1] * r2[x]
        acc += kernel[2, 2] * r2[x2]
        out[x] = acc


@njit(cache=True, nogil=True, parallel=True)
def _sources_kernel(above, labels, filt, sub, n_lab, starts):  # pragma: no cover
    """Area and isophotal flux (sum of ``sub``) of every component of ``labels``, and
    its peaks (code 2 in ``above``, see :func:`_threshold_kernel`), as
    (label, value, flat index), in raster order, and the main (highest, then first)
    peak's value and flat index per component. One pass over the frame in parallel
    blocks of rows (block ``b`` holds ``starts[b + 1] - starts[b]`` pixels above the
    threshold; ``above`` is skipped 8 bytes at a time) instead of a dozen over the
    pixels above the threshold. Compiled by numba on first use (cached on disk)."""
    h, w = labels.shape
    nb = starts.size - 1
    rows = (h + nb - 1) // nb
    areas = np.zeros((nb, n_lab), dtype=np.int64)
    isos = np.zeros((nb, n_lab))
    plab = np.empty(starts[nb], dtype=np.int64)
    pval = np.empty(starts[nb], dtype=filt.dtype)
    ppos = np.empty(starts[nb], dtype=np.int64)
    counts = np.zeros(nb, dtype=np.int64)
    w8 = w // 8
    for blk in prange(nb):
        k = starts[blk]
        area, iso = areas[blk], isos[blk]
        for y in range(blk * rows, min((blk + 1) * rows, h)):
            row = above[y]
            words = row[: 8 * w8].view(np.uint64)
            for j in range(w8 + 1):
                if j < w8 and words[j] == 0:
                    continue
                for x in range(8 * j, min(8 * j + 8, w)):
                    if not row[x]:
                        continue
                    lab = labels[y, x]
                    area[lab] += 1
                    iso[lab] += sub[y, x]
                    v = filt[y, x]
                    if row[x] == 2:
                        plab[k], pval[k], ppos[k] = lab, v, y * w + x
                        k += 1
        counts[blk] = k - starts[blk]
    n = 0
    main_val = np.zeros(n_lab)
    main_pos = np.zeros(n_lab, dtype=np.int64)
    seen = np.zeros(n_lab, dtype=np.bool_)
    for blk in range(nb):  # the peaks of the blocks, one after the other
        for j in range(counts[blk]):
            src = starts[blk] + j
            lab, v = plab[src], pval[src]
            plab[n], pval[n], ppos[n] = lab, v, ppos[src]
            if not seen[lab] or v > main_val[lab]:  # the first of the highest
                seen[lab] = True
                main_val[lab], main_pos[lab] = v, ppos[src]
            n += 1
    return (areas.sum(axis=0), isos.sum(axis=0), plab[:n], pval[:n], ppos[:n],
            main_val, main_pos)  # fmt: skip


def _sky(
    samp: np.ndarray,
    samp_bad: np.ndarray | None,
    above: np.ndarray,
    step: int,
    binning: int,
    mesh: int,
) -> tuple[float, float]:
    """Sky level and noise per full-resolution pixel, away from every source.

    sep's estimator again on the subsample, with the detections (grown by 2 subsample
    px) masked: the first pass saw the wings of stars and of the galaxy, and read 1-4 %
    high in a dark filter. The subsample takes every ``step``-th pixel, the detection
    image bins by ``binning``. Only the two global numbers are wanted: on a large frame
    (see :func:`_sky_sampling`) every other sample of the subsample is enough, in mesh
    cells of 16 x 16 samples (the median of a few hundred cells).
    """
    if step >= binning:
        objs = above[:: step // binning, :: step // binning]
    else:
        f = binning // step
        objs = np.repeat(np.repeat(above, f, axis=0), f, axis=1)
    h, w = min(objs.shape[0], samp.shape[0]), min(objs.shape[1], samp.shape[1])
    objs = objs[:h, :w] != 0  # a bool copy (``above`` may hold codes, see _threshold_kernel)
    samp = np.ascontiguousarray(samp[:h, :w])  # odd frame sizes differ by one
    grown = cv2.dilate(objs.view(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if grown.mean() < 0.5:  # a crowded field keeps too little sky when grown
        objs = grown
    if samp_bad is not None:
        objs |= samp_bad[:h, :w]
    if samp.size * step * step >= _SKY_BIG_PIXELS:
        samp, objs, mesh = samp[::2, ::2], objs[::2, ::2], min(mesh, 16)
        samp, objs = np.ascontiguousarray(samp), np.ascontiguousarray(objs)
    try:
        b = sep.Background(samp, mask=objs, bw=mesh, bh=mesh, fw=3, fh=3)
    except Exception:
        good = samp[~objs]
        return (float(np.median(good)), NAN) if good.size else (NAN, NAN)
    return float(b.globalback), float(b.globalrms)


def _clipped_median(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return NAN
    for _ in range(3):
        med = np.median(v)
        mad = 1.4826 * np.median(np.abs(v - med))
        keep = np.abs(v - med) <= 3.0 * max(mad, 0.02 * med)
        if keep.all() or keep.sum() < 3:
            break
        v = v[keep]
    return float(np.median(v))


def _stamps(
    data: np.ndarray, bad: np.ndarray | None, xc: np.ndarray, yc: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Square stamps of half-size ``r`` around the rounded centres: values, a validity
    mask (inside the frame and not bad), and the integer centres. Outside the frame the
    values are those of the nearest edge pixel (and not valid)."""
    ix, iy = np.rint(xc).astype(np.int64), np.rint(yc).astype(np.int64)
    none = np.zeros((0, 0), dtype=bool)
    vals, valid = _stamps_kernel(data, none if bad is None else bad, ix, iy, r)
    return vals, valid, ix, iy


@njit(cache=True, nogil=True, parallel=True)
def _stamps_kernel(data, bad, ix, iy, r):  # pragma: no cover - compiled
    """The gather of :func:`_stamps` (``bad`` of size 0: nothing is bad), stars in
    parallel: one fancy-indexing gather of the frame and one of the mask cost several
    times more. Compiled by numba on first use (cached on disk)."""
    ny, nx = data.shape
    n, s = ix.size, 2 * r + 1
    has_bad = bad.size > 0
    vals = np.empty((n, s, s), dtype=data.dtype)
    valid = np.empty((n, s, s), dtype=np.bool_)
    for i in prange(n):
        for a in range(s):
            y = iy[i] + a - r
            yc = min(max(y, 0), ny - 1)
            for b in range(s):
                x = ix[i] + b - r
                xc = min(max(x, 0), nx - 1)
                vals[i, a, b] = data[yc, xc]
                ok = 0 <= y < ny and 0 <= x < nx
                valid[i, a, b] = ok and not (has_bad and bad[yc, xc])
    return vals, valid


def _first_guess(
    data: np.ndarray, bad: np.ndarray | None, det: Mapping[str, Any], which: np.ndarray
) -> float:
    """A first FWHM (px) of the sources ``which``: flux / peak of the brighter half,
    without the flat-topped ones (saturated), from 5x5 stamps."""
    xc, yc = det["x"][which], det["y"][which]
    sky, flux_iso = det["sky"][which], det["flux"][which]
    n = len(which)
    v, ok, _, _ = _stamps(data, bad, xc, yc, 2)
    v = np.where(ok, v, -np.inf).reshape(n, -1)
    top = v.max(axis=1)
    flat = np.count_nonzero(v >= top[:, None] - 0.03 * np.abs(top - sky)[:, None], axis=1) >= 5
    with np.errstate(invalid="ignore", divide="ignore"):
        size = 2.3548 * np.sqrt(np.maximum(flux_iso, 0) / (2 * np.pi * (top - sky)))
    s = size[: max(10, n // 2)][~flat[: max(10, n // 2)]]
    s = s[np.isfinite(s)]
    return float(np.clip(np.median(s), 1.0, 30.0)) if s.size else 3.0


def _refine(
    data: np.ndarray,
    bad: np.ndarray | None,
    det: Mapping[str, Any],
    which: np.ndarray,
    rms: float,
    saturation: float | None,
    fw_guess: float,
) -> dict[str, Any]:
    """Centroids, second moments, peaks, saturation and isolation of sources ``which``
    (indices into the detections), star by star on full-resolution stamps, with stamps
    and windows for stars of FWHM ``fw_guess``."""
    xc, yc = det["x"][which], det["y"][which]
    sky, flux_iso = det["sky"][which], det["flux"][which]
    n = len(which)
    r = int(np.clip(math.ceil(1.5 * fw_guess + 2.0), 4, 30))

    vals, valid, ix, iy = _stamps(data, bad, xc, yc, r)
    vals -= sky[:, None, None].astype(F32)
    ny, nx = data.shape
    inside = (ix - r >= 0) & (iy - r >= 0) & (ix + r < nx) & (iy + r < ny)
    peak = np.where(valid, vals, -np.inf).reshape(n, -1).max(axis=1).astype(np.float64)
    o = np.arange(-r, r + 1, dtype=np.float64)

    # saturation: the clipping level, a flat top, or a masked core
    rr = o[:, None] ** 2 + o[None, :] ** 2
    core = rr <= max(1.5, 0.6 * fw_guess) ** 2
    use = valid.copy()
    sat = np.zeros(n, dtype=bool)
    if saturation is not None:
        clipped = (vals + sky[:, None, None]) >= saturation * (1 - 1e-6)
        sat |= np.any(clipped & core & valid, axis=(1, 2))
        use &= ~clipped
    top = valid & (vals >= (peak - 0.03 * np.abs(peak))[:, None, None])
    flat_top = (np.count_nonzero(top, axis=(1, 2)) >= 5) & (peak > 50.0 * rms)
    if bad is not None:
        frame = _inframe(ix, iy, r, data.shape)
        sat |= np.count_nonzero(core & frame & ~valid, axis=(1, 2)) >= 2
    img = np.where(use, vals, F32(0.0)).astype(np.float64)

    # Gaussian-windowed centroid and second moments; the window is separable
    sw2 = max(fw_guess / 2.3548, 0.8) ** 2
    x0, y0, mxx, myy, mxy = _moments_kernel(img, sw2, 5)
    # undo the window (exact for a Gaussian): C = (M^-1 - W^-1)^-1
    det_m = mxx * myy - mxy**2
    with np.errstate(invalid="ignore", divide="ignore"):
        ixx, iyy, ixy = myy / det_m - 1 / sw2, mxx / det_m - 1 / sw2, -mxy / det_m
        d2 = ixx * iyy - ixy**2
        cxx, cyy, cxy = iyy / d2, ixx / d2, -ixy / d2
        okm = (det_m > 0) & (ixx > 0) & (iyy > 0) & (d2 > 0) & np.isfinite(cxx)
        # a star as large as the window (a trail along its length) cannot be unwindowed:
        # twice the windowed moments start the fit instead
        raw_ok = det_m > 0
        cxx = np.where(okm, cxx, np.where(raw_ok, 2 * mxx, sw2))
        cxy = np.where(okm, cxy, np.where(raw_ok, 2 * mxy, 0.0))
        cyy = np.where(okm, cyy, np.where(raw_ok, 2 * myy, sw2))
        l1, l2 = _eig2(cxx, cxy, cyy)
        fwhm_m = np.where(okm, 2.3548 * (l1 * l2) ** 0.25, NAN)
        elong_m = np.where(okm, np.sqrt(l1 / l2), NAN)
    # a clipped core is a round plateau; the ridge of a trailed star is flat along the
    # trail only, and must not pass for saturation (it would take every star of a
    # trailed frame out of the shape measurement)
    flat_top &= ~(elong_m > 1.5)
    sat |= flat_top
    if flat_top.any():
        use[flat_top] &= ~top[flat_top]
        img[flat_top] *= use[flat_top]

    # isolation: no other peak above 10 % of the star's within 2 FWHM + 2 px
    px_, py_, pv_ = det["peaks"]
    k = min(6, len(px_))
    if k == 0:  # no peak list to compare with: nothing is known to crowd the stars
        isolated = np.ones(n, dtype=bool)
    else:
        dist, nb = _tree(det).query(np.column_stack([xc, yc]), k=k)
        dist, nb = dist.reshape(n, k), nb.reshape(n, k)
        nbc = np.minimum(nb, len(px_) - 1)
        close = (dist < 2.0 * fw_guess + 2.0) & (dist > 0.75 * det["binning"]) & (nb < len(px_))
        brighter = pv_[nbc] > 0.1 * det["peak_f"][which][:, None]
        isolated = ~np.any(close & brighter, axis=1)
    return {
        "x": x0 + ix,
        "y": y0 + iy,
        "dx": x0,
        "dy": y0,
        "sky": sky,
        "flux_iso": flux_iso,
        "fwhm": fwhm_m,
        "elongation": elong_m,
        "cxx": cxx,
        "cxy": cxy,
        "cyy": cyy,
        "okm": okm,
        "peak": peak,
        "level": peak + sky,
        "saturated": sat,
        "flat_top": flat_top,
        "inside": inside,
        "isolated": isolated,
        "fwhm_guess": fw_guess,
        "img": img,
        "use": use,
        "r": r,
    }


@njit(cache=True, nogil=True, parallel=True)
def _moments_kernel(img, sw2, iterations):  # pragma: no cover - compiled
    """Gaussian-windowed centroids (``iterations`` re-centrings of the window, each
    within half a stamp of the centre) and second moments of the stamps ``img`` (n, s,
    s; negative pixels count as 0), the window of variance ``sw2`` being separable.
    Stars in parallel. Compiled by numba on first use (cached on disk)."""
    n, s = img.shape[0], img.shape[1]
    r = (s - 1) // 2
    x0, y0 = np.zeros(n), np.zeros(n)
    mxx, myy, mxy = np.empty(n), np.empty(n), np.empty(n)
    for i in prange(n):
        pos = np.maximum(img[i], 0.0)
        wx, wy = np.empty(s), np.empty(s)
        row, col = np.empty(s), np.empty(s)
        for it in range(iterations + 1):
            for k in range(s):
                wx[k] = np.exp(-0.5 * (k - r - x0[i]) ** 2 / sw2)
                wy[k] = np.exp(-0.5 * (k - r - y0[i]) ** 2 / sw2)
            row[:] = 0.0
            col[:] = 0.0
            for yy in range(s):
                for xx in range(s):
                    row[yy] += pos[yy, xx] * wx[xx]
                    col[xx] += pos[yy, xx] * wy[yy]
            tot = 0.0
            for k in range(s):
                tot += row[k] * wy[k]
            if not tot > 0:
                tot = 1.0
            if it == iterations:  # the moments about the final centre
                sxx, syy, sxy = 0.0, 0.0, 0.0
                for k in range(s):
                    sxx += col[k] * wx[k] * (k - r - x0[i]) ** 2
                    syy += row[k] * wy[k] * (k - r - y0[i]) ** 2
                for yy in range(s):
                    for xx in range(s):
                        sxy += pos[yy, xx] * wy[yy] * (yy - r - y0[i]) * wx[xx] * (xx - r - x0[i])
                mxx[i], myy[i], mxy[i] = sxx / tot, syy / tot, sxy / tot
                break
            cx, cy = 0.0, 0.0
            for k in range(s):
                cx += col[k] * wx[k] * (k - r)
                cy += row[k] * wy[k] * (k - r)
            x0[i] = min(max(cx / tot, -r / 2), r / 2)
            y0[i] = min(max(cy / tot, -r / 2), r / 2)
    return x0, y0, mxx, myy, mxy


def _tree(det: Mapping[str, Any]) -> cKDTree:
    """The KD-tree of every significant peak (built once per frame, kept in ``det``)."""
    t = det.get("_tree")
    if t is None:
        # unbalanced: a third of the build time, the same neighbours
        t = cKDTree(np.column_stack(det["peaks"][:2]), balanced_tree=False, compact_nodes=False)
        det["_tree"] = t  # type: ignore[index]
    return t


def _eig2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (larger, smaller) of symmetric 2x2 matrices [[a, b], [b, c]]."""
    h = 0.5 * (a + c)
    d = np.sqrt(np.maximum(0.25 * (a - c) ** 2 + b * b, 0.0))
    return h + d, h - d


def _inframe(ix: np.ndarray, iy: np.ndarray, r: int, shape: tuple[int, ...]) -> np.ndarray:
    o = np.arange(-r, r + 1)
    rin = ((iy[:, None] + o) >= 0) & ((iy[:, None] + o) < shape[0])
    cin = ((ix[:, None] + o) >= 0) & ((ix[:, None] + o) < shape[1])
    return rin[:, :, None] & cin[:, None, :]


def _fit_moffat(
    img: np.ndarray,
    use: np.ndarray,
    dx0: np.ndarray,
    dy0: np.ndarray,
    cov: tuple[np.ndarray, np.ndarray, np.ndarray],
    peak: np.ndarray,
    iterations: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """FWHM and elongation from a batched Levenberg-Marquardt fit of an elliptical
    Moffat profile ``A (1 + d^T P d)^-beta`` about the windowed centroid.

    Parameters are (A, Pxx, Pxy, Pyy, beta); P starts from the windowed covariance C as
    ``k C^-1 / (2 ln 2)`` with ``k = 2^(1/beta) - 1`` (the Gaussian's half-maximum
    ellipse). The centre stays at the windowed centroid (good to a few hundredths of a
    pixel for these bright stars; a free centre would cost two more parameters and only
    move the FWHM by its square). All stars iterate together; each keeps its own damping
    and only takes steps that lower its chi-square. Returns NaN where the fit failed.
    """
    n, s, _ = img.shape
    if n == 0:
        return np.zeros(0), np.zeros(0)
    cxx, cxy, cyy = cov
    det = cxx * cyy - cxy**2
    sane = np.isfinite(det) & (det > 1e-6) & (cxx > 0)
    cxx, cxy, cyy = np.where(sane, cxx, 1.0), np.where(sane, cxy, 0.0), np.where(sane, cyy, 1.0)
    beta0 = 3.0
    det = cxx * cyy - cxy**2
    f = (2.0 ** (1.0 / beta0) - 1.0) / (2.0 * _LN2) / det
    p = np.stack([np.maximum(peak, 1e-6), f * cyy, -f * cxy, f * cxx, np.full(n, beta0)], axis=1)
    p = np.ascontiguousarray(p, dtype=np.float64)
    _moffat_kernel(np.ascontiguousarray(img, dtype=np.float64), np.ascontiguousarray(use),
                   np.ascontiguousarray(dx0, dtype=np.float64),
                   np.ascontiguousarray(dy0, dtype=np.float64), p, iterations)  # fmt: skip
    a, pxx, pxy, pyy, beta = (p[:, i] for i in range(5))
    l1, l2 = _eig2(pxx, pxy, pyy)
    with np.errstate(invalid="ignore", divide="ignore"):
        # FWHM along the axes; the model is sampled at pixel centres while the pixels
        # integrate the light, which widens a star by a 1-px box (variance 1/12 per
        # axis, + 0.46 px^2 to the FWHM^2): take it out, as the seeing is wanted
        k = 2.0 ** (1.0 / beta) - 1.0
        f_min2 = 4.0 * k / l1 - _PIXEL_FWHM2
        f_maj2 = 4.0 * k / l2 - _PIXEL_FWHM2
        fwhm = (f_min2 * f_maj2) ** 0.25
        elong = np.sqrt(f_maj2 / f_min2)
    ok = (
        (a > 0)
        & (beta > 1.1)
        & (beta < 40)
        & (l2 > 0)
        & (f_min2 > 0)
        & np.isfinite(fwhm)
        & (fwhm > 0.3)
        & (fwhm < 2.0 * s)
    )
    return np.where(ok, fwhm, NAN), np.where(ok, elong, NAN)


@njit(cache=True, nogil=True, parallel=True)
def _moffat_kernel(img, use, dx0, dy0, p, iterations):  # pragma: no cover - compiled
    """The Levenberg-Marquardt iterations of :func:`_fit_moffat`, in place on ``p``
    (n, 5). Each star's pixels are the valid ones of its stamp inside a circle of radius
    r. All stars step together and stop together (when each has converged in the same
    iteration), as the batched numpy version did. Compiled by numba on first use
    (cached on disk)."""
    n, s = img.shape[0], img.shape[1]
    r = (s - 1) // 2
    m = 0
    for yy in range(-r, r + 1):
        for xx in range(-r, r + 1):
            m += xx * xx + yy * yy <= r * r
    ox, oy = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64)
    k = 0
    for yy in range(-r, r + 1):
        for xx in range(-r, r + 1):
            if xx * xx + yy * yy <= r * r:
                ox[k], oy[k] = xx, yy
                k += 1
    # the model's pieces at the current parameters (0) and at the trial ones (1)
    base, q, lq = np.empty((2, n, m)), np.empty((2, n, m)), np.empty((2, n, m))
    lam = np.full(n, 1e-2)
    c_old = np.empty(n)
    done = np.zeros(n, dtype=np.bool_)
    for i in prange(n):
        c_old[i] = _moffat_eval(img[i], use[i], dx0[i], dy0[i], p[i], r, ox, oy,
                                base[0, i], q[0, i], lq[0, i])  # fmt: skip
    for _ in range(iterations):
        for i in prange(n):
            done[i] = _moffat_step(img[i], use[i], dx0[i], dy0[i], p[i], r, ox, oy,
                                   base[:, i], q[:, i], lq[:, i], lam, c_old, i)  # fmt: skip
        if done.all():
            break


@njit(cache=True, nogil=True)
def _moffat_eval(img, use, x0, y0, p, r, ox, oy, base, q, lq):  # pragma: no cover
    """Chi-square of the model ``p``, keeping its pieces in ``base``, ``q``, ``lq``."""
    c = 0.0
    for k in range(ox.size):
        dx, dy = ox[k] - x0, oy[k] - y0
        q[k] = p[1] * dx * dx + p[2] * (2.0 * dx * dy) + p[3] * dy * dy
        lq[k] = np.log1p(max(q[k], -0.99))
        base[k] = np.exp(-p[4] * lq[k])
        if use[oy[k] + r, ox[k] + r]:
            c += (img[oy[k] + r, ox[k] + r] - p[0] * base[k]) ** 2
    return c


@njit(cache=True, nogil=True)
def _moffat_step(img, use, x0, y0, p, r, ox, oy, base, q, lq, lam, c_old, i):  # pragma: no cover
    """One damped Gauss-Newton step of star ``i``; True when it was taken and
    improved chi-square by no more than 1e-6 of it (converged)."""
    jtj = np.zeros((5, 5))
    g = np.zeros(5)
    jr = np.empty(5)
    for k in range(ox.size):
        if not use[oy[k] + r, ox[k] + r]:
            continue
        dx, dy = ox[k] - x0, oy[k] - y0
        mod = p[0] * base[0, k]
        dq = -p[4] * mod / (1.0 + q[0, k])
        jr[0], jr[1], jr[2] = base[0, k], dq * (dx * dx), dq * (2.0 * dx * dy)
        jr[3], jr[4] = dq * (dy * dy), -mod * lq[0, k]
        res = img[oy[k] + r, ox[k] + r] - mod
        for a in range(5):
            g[a] += jr[a] * res
            for b in range(a, 5):
                jtj[a, b] += jr[a] * jr[b]
    for a in range(5):
        for b in range(a):
            jtj[a, b] = jtj[b, a]
    for a in range(5):
        jtj[a, a] += lam[i] * jtj[a, a] + 1e-12
    step = _solve5(jtj, g)
    if not np.isfinite(step).all():
        return True  # a degenerate star: it stays where it is
    trial = p + step
    trial[4] = min(max(trial[4], 1.1), 40.0)
    c_new = np.inf
    if trial[1] > 0 and trial[3] > 0 and trial[1] * trial[3] > trial[2] ** 2:
        c_new = _moffat_eval(img, use, x0, y0, trial, r, ox, oy, base[1], q[1], lq[1])
    better = c_new < c_old[i]
    converged = better and c_old[i] - c_new <= 1e-6 * c_old[i]
    if better:
        p[:] = trial
        base[0, :], q[0, :], lq[0, :] = base[1], q[1], lq[1]
        c_old[i] = c_new
        lam[i] = max(lam[i] / 3.0, 1e-7)
    else:
        lam[i] = min(lam[i] * 4.0, 1e7)
    return converged


@njit(cache=True, nogil=True)
def _solve5(a, b):  # pragma: no cover - compiled
    """``a x = b`` for a small dense system: Gaussian elimination with partial pivoting
    (``a`` and ``b`` are overwritten); NaN when singular."""
    n = b.size
    for k in range(n):
        piv = k
        for j in range(k + 1, n):
            if abs(a[j, k]) > abs(a[piv, k]):
                piv = j
        if a[piv, k] == 0.0:
            return np.full(n, np.nan)
        if piv != k:
            for c in range(n):
                a[k, c], a[piv, c] = a[piv, c], a[k, c]
            b[k], b[piv] = b[piv], b[k]
        for j in range(k + 1, n):
            f = a[j, k] / a[k, k]
            for c in range(k, n):
                a[j, c] -= f * a[k, c]
            b[j] -= f * b[k]
    x = np.empty(n)
    for k in range(n - 1, -1, -1):
        acc = b[k]
        for c in range(k + 1, n):
            acc -= a[k, c] * x[c]
        x[k] = acc / a[k, k]
    return x


def _stacked_shape(
    img: np.ndarray, use: np.ndarray, dx: np.ndarray, dy: np.ndarray, fw_guess: float
) -> tuple[float, float]:
    """FWHM and elongation of the median of faint stars' stamps (sky-subtracted,
    normalised by their flux, centred on the nearest pixel to each windowed centroid),
    from its adaptive windowed second moments.

    Each stamp's own border median is taken off first (stars on a nebula or a cluster's
    glow sit on a pedestal the mesh sky does not follow). Centring to the nearest pixel
    widens the stack by a uniform +-0.5 px (variance 1/12 px^2 per axis), taken out of
    the result with the pixel response, as for the fits of single stars.
    """
    n, s, _ = img.shape
    r = (s - 1) // 2
    ox, oy = np.rint(dx).astype(np.int64), np.rint(dy).astype(np.int64)
    rr = min(r - int(max(np.abs(ox).max(), np.abs(oy).max())), int(math.ceil(1.5 * fw_guess + 2)))
    if rr < 3:
        return NAN, NAN
    o = np.arange(-rr, rr + 1)
    k = np.arange(n)[:, None, None]
    rows, cols = (r + oy)[:, None, None] + o[None, :, None], (r + ox)[:, None, None] + o
    sub, ok = img[k, rows, cols], use[k, rows, cols]
    border = np.zeros(sub.shape[1:], dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    ped = np.array([np.median(v[u & border]) if (u & border).any() else 0.0
                    for v, u in zip(sub, ok, strict=True)])  # fmt: skip
    sub = np.where(ok, sub - ped[:, None, None], np.nan)
    # each star normalised by its flux, then the median: neighbours, cosmic rays and hot
    # pixels fall at random places and do not survive it
    circ = (o[:, None] ** 2 + o[None, :] ** 2) <= rr * rr
    flux = np.nansum(np.where(circ, sub, 0.0), axis=(1, 2))
    keep = flux > 0
    if np.count_nonzero(keep) < 3:
        return NAN, NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stack = np.nanmedian(sub[keep] / flux[keep, None, None], axis=0)
    if not np.isfinite(stack).all():
        return NAN, NAN
    dx, dy, ox, oy = dx[keep], dy[keep], ox[keep], oy[keep]
    # adaptive Gaussian-windowed moments (window matched to the star, unwindowed
    # exactly for a Gaussian): robust for any profile, a flat-topped or donut-like
    # defocused star included, where a Moffat fit trades width for ellipticity
    g = o.astype(np.float64)
    pos = np.clip(stack, 0.0, None)
    x0, y0 = float(np.mean(dx - ox)), float(np.mean(dy - oy))
    sw2 = (max(fw_guess, 1.0) / 2.3548) ** 2
    cov = None
    for _ in range(12):
        w = pos * np.exp(-0.5 * ((g[None, :] - x0) ** 2 + (g[:, None] - y0) ** 2) / sw2)
        tot = w.sum()
        if not tot > 0:
            return NAN, NAN
        x0, y0 = float((w * g[None, :]).sum() / tot), float((w * g[:, None]).sum() / tot)
        ddx, ddy = g[None, :] - x0, g[:, None] - y0
        mom = np.array([[(w * ddx * ddx).sum(), (w * ddx * ddy).sum()],
                        [(w * ddx * ddy).sum(), (w * ddy * ddy).sum()]]) / tot  # fmt: skip
        try:
            inv = np.linalg.inv(mom) - np.eye(2) / sw2
            cov = np.linalg.inv(inv)
        except np.linalg.LinAlgError:
            return NAN, NAN
        lam = np.linalg.eigvalsh(cov)
        if not (lam > 0).all() or abs(x0) > rr / 2 or abs(y0) > rr / 2:
            return NAN, NAN
        new = float(np.sqrt(lam[0] * lam[1]))
        if abs(new / sw2 - 1.0) < 0.01:
            break
        sw2 = new
    # the pixel box and the +-0.5 px centring: 1/12 px^2 each, per axis
    lam = np.linalg.eigvalsh(cov - np.eye(2) * (2.0 / 12.0))
    if not (lam > 0).all():
        return NAN, NAN
    return 2.3548 * float((lam[0] * lam[1]) ** 0.25), float(math.sqrt(lam[1] / lam[0]))


def _aperture_flux(
    data: np.ndarray,
    holes: np.ndarray | None,
    x: np.ndarray,
    y: np.ndarray,
    radius: float,
    sky: np.ndarray,
) -> np.ndarray:
    """Circular-aperture fluxes minus the local sky (sep's exact overlap); NaN for
    apertures that leave the frame or cover non-finite pixels.

    Masked pixels that hold values are summed: the calibration repairs the pixels it
    masks (a cosmic ray in a star's wing), and leaving them out would bias the flux
    low by a different amount in every frame.
    """
    if len(x) == 0:
        return np.zeros(0)
    radius = float(max(radius, 2.0))
    s, _, flag = sep.sum_circle(data, x, y, radius, mask=holes, subpix=5)
    flux = s - sky * math.pi * radius * radius
    badflag = (flag & (sep.APER_TRUNC | sep.APER_HASMASKED | sep.APER_ALLMASKED)) != 0
    return np.where(badflag, NAN, flux)


# --------------------------------------------------------------------------------------
# transparency
# --------------------------------------------------------------------------------------


def transparency(
    ref_flux: np.ndarray, flux: np.ndarray, *, exptime_ratio: float = 1.0, min_stars: int = 3
) -> float:
    """Flux of matched stars against a reference frame's, per unit exposure.

    Parameters
    ----------
    ref_flux, flux
        Fluxes of the same stars (matched, same order) in the reference frame and in this
        frame, same units and aperture convention (:attr:`Stars.flux`). Leave saturated
        stars out (:attr:`Stars.saturated`).
    exptime_ratio
        This frame's exposure time over the reference's.
    min_stars
        Fewer usable pairs give NaN.

    Returns
    -------
    float
        Robust median of ``flux / (ref_flux * exptime_ratio)`` over the well-measured
        stars: the brightest half of the reference's (noise on faint stars would widen the
        spread), after dropping the very brightest tenth (near saturation) when there are
        many, with a 3-sigma (MAD) clip. NaN when there are too few, or when the ratios
        scatter by more than half their median (fluxes dominated by noise).
    """
    ref = np.asarray(ref_flux, dtype=np.float64).ravel()
    f = np.asarray(flux, dtype=np.float64).ravel()
    if ref.shape != f.shape:
        raise ValueError(f"ref_flux has {ref.size} stars, flux {f.size}")
    if not exptime_ratio > 0:
        raise ValueError(f"exptime_ratio must be > 0, not {exptime_ratio}")
    ok = np.isfinite(ref) & np.isfinite(f) & (ref > 0)
    ref, f = ref[ok], f[ok]
    if ref.size < min_stars:
        return NAN
    order = np.argsort(-ref, kind="stable")
    if ref.size >= 20:
        order = order[ref.size // 10 :]
    order = order[: max(min_stars, min(len(order) // 2 + 1, 200))]
    ratio = f[order] / (ref[order] * exptime_ratio)
    for _ in range(3):
        med = np.median(ratio)
        mad = 1.4826 * np.median(np.abs(ratio - med))
        keep = np.abs(ratio - med) <= 3.0 * max(mad, 1e-3 * abs(med))
        if keep.all() or keep.sum() < min_stars:
            break
        ratio = ratio[keep]
    med = float(np.median(ratio))
    spread = 1.4826 * float(np.median(np.abs(ratio - med)))
    if not med > 0 or spread > _MAX_TRANSPARENCY_SPREAD * med:
        return NAN  # the stars' fluxes are noise (faint stars on a glow): not measurable
    return med


_MAX_TRANSPARENCY_SPREAD = 0.5
"""Star-to-star scatter of the flux ratios (relative) beyond which a transparency is not
a measurement: a cloud dims every star alike (scatter of a few per cent), noise does not."""


# --------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the :class:`Judge`.

    Attributes
    ----------
    min_stars
        Absolute: fewer detected sources -> ``"no stars"`` (dome closed, overcast, lost).
    max_elongation
        Median major/minor FWHM above it -> ``"trailing"``, except where the recent frames
        (as for the FWHM rule) are themselves above ``max_elongation / elongation_factor``
        (an instrument whose stars are never round): then above ``elongation_factor``
        times their median.
    elongation_factor
        See ``max_elongation``.
    fwhm_factor
        Relative: FWHM above this times the recent median -> ``"seeing/focus"``.
    max_fwhm_px, max_fwhm_arcsec
        Optional absolute FWHM limits (None: off), also ``"seeing/focus"``.
    min_transparency
        Relative: transparency below this fraction of the recent clear level ->
        ``"clouds"``.
    star_fraction
        Relative: fewer stars than this fraction of the recent median -> ``"clouds"``.
    window
        Recent accepted frames per target and filter that the relative rules look at.
    min_history
        Accepted frames of a target+filter needed before its relative rules apply (and
        before a provisional frame is reviewed). One is enough: a single earlier frame
        that is itself bad makes the next ones look better, never worse, and
        :meth:`Judge.review` catches a bad first frame.
    fwhm_min_frames
        Frames the FWHM reference wants: fewer in the target+filter, and the target's
        frames in all filters are used, then the night's (seeing is not a property of the
        filter).
    clear_quantile
        Quantile of the recent transparencies taken as the clear-sky level (clouds only
        ever dim, so the upper part of the history is the clear sky).
    """

    min_stars: int = 5
    max_elongation: float = 1.4
    elongation_factor: float = 1.25
    fwhm_factor: float = 1.6
    max_fwhm_px: float | None = None
    max_fwhm_arcsec: float | None = None
    min_transparency: float = 0.4
    star_fraction: float = 0.4
    window: int = 10
    min_history: int = 1
    fwhm_min_frames: int = 3
    clear_quantile: float = 0.8

    def __post_init__(self) -> None:
        problems = []
        if self.min_stars < 0:
            problems.append("min_stars must be >= 0")
        if not self.max_elongation > 1:
            problems.append("max_elongation must be > 1")
        if not self.fwhm_factor > 1:
            problems.append("fwhm_factor must be > 1")
        if not 0 <= self.min_transparency < 1 or not 0 <= self.star_fraction < 1:
            problems.append("min_transparency and star_fraction must be in [0, 1)")
        if self.window < 1 or self.min_history < 1 or self.min_history > self.window:
            problems.append("need 1 <= min_history <= window")
        if not 1 <= self.fwhm_min_frames <= self.window:
            problems.append("need 1 <= fwhm_min_frames <= window")
        if not 0 < self.clear_quantile <= 1:
            problems.append("clear_quantile must be in (0, 1]")
        if problems:
            raise ValueError("quality rules: " + "; ".join(problems))


@dataclass(frozen=True)
class Verdict:
    """A frame's fate and why.

    Attributes
    ----------
    accepted : bool
    reason : str or None
        The first failed rule, e.g. ``"trailing: elongation 2.3 > 1.4"``; None if accepted.
    numbers : dict
        Everything the rules looked at (the frame's values, the references they were
        compared with, and the ratios).
    failures : tuple of str
        Every failed rule, in the order checked (``reason`` is the first).
    provisional : bool
        Accepted without a same target+filter history to compare with (the first frame
        of a filter): the relative cloud rules could not run. :meth:`Judge.review`
        confirms or overturns it once more frames of that filter are accepted.
    """

    accepted: bool
    reason: str | None
    numbers: dict[str, float]
    failures: tuple[str, ...] = ()
    provisional: bool = False


Key = tuple[str, str]
_ENTRY_FIELDS = ("n_stars", "fwhm", "fwhm_arcsec", "elongation", "transparency")


def _values(m: Measurement | Mapping[str, Any], transparency: float | None) -> dict[str, float]:
    if isinstance(m, Measurement):
        d: dict[str, Any] = m.metrics()
    else:
        d = dict(m)
    out = {}
    for k in _ENTRY_FIELDS:
        v = d.get(k)
        out[k] = NAN if v is None else float(v)
    if transparency is not None:
        out["transparency"] = float(transparency)
    return out


def _median(v: Iterable[float]) -> float:
    a = np.array([x for x in v if math.isfinite(x)], dtype=np.float64)
    return float(np.median(a)) if a.size else NAN


class Judge:
    """Accept or reject frames against the night's own recent frames.

    History is kept per ``key = (target, filter)``: the last ``window`` *accepted* frames
    (rejected ones are outliers by definition and would drag the references towards the
    defect). The rules run in this order and the first failure is the reason (all
    failures are in :attr:`Verdict.failures`):

    1. ``no stars`` -- fewer than ``min_stars`` sources, or not one measurable star
       (absolute). Nothing else can be judged then.
    2. ``trailing`` -- median elongation > ``max_elongation`` (absolute: round is round
       whatever the night). First, because a trail also widens the FWHM (in one axis),
       lowers the peaks (fewer detections) and spreads the flux: checked later, a trailed
       frame would be called "seeing/focus" or "clouds".
    3. ``seeing/focus`` -- FWHM > ``fwhm_factor`` x the recent median FWHM (and the
       optional absolute limits). Before the cloud rules, because a defocused frame also
       loses its faint stars (lower peaks), while clouds do not widen stars. The reference
       is the key's recent frames, or -- with fewer than ``fwhm_min_frames`` of them --
       the target's in any filter, then the night's: seeing and focus are not a property
       of the filter, and the first frame of a filter must not escape.
    4. ``clouds`` (transparency) -- the given transparency over the key's clear level (a
       high quantile of its recent transparencies; 1.0 without any) <
       ``min_transparency``. The most direct measure of clouds; the clear level makes a
       hazy flux reference harmless.
    5. ``clouds`` (stars) -- fewer stars than ``star_fraction`` x the key's recent median
       (star counts depend on the filter, so only the key's own frames). Catches clouds
       when no transparency could be measured (no matches, no reference yet).

    The first frames: one earlier accepted frame of the key is enough for the relative
    rules (``min_history``): if that frame was itself bad, the next ones look better than
    it, never worse, so no good frame is lost. The very first frame of a target+filter
    has no same-filter company: rules 1-3 run (3 against the target's other filters) but
    the cloud rules cannot, and if it is the flux reference its transparency is 1 by
    definition. Its verdict is therefore ``provisional``. The caller accepts it into the
    history (so that later frames are compared with it) and holds it back from the stack;
    :meth:`review`, called after each :meth:`accept`, re-judges it against the frames
    accepted after it and confirms or rejects it. A cloudy first frame is caught there:
    the next frames of its filter, measured against it, come out 3-5 times brighter,
    i.e. it is at 0.2-0.3 of their clear level.

    Parameters
    ----------
    rules
        Thresholds; defaults as in :class:`QualityRules`.

    Examples
    --------
    The pipeline, per light (``t`` from :func:`transparency` against the key's flux
    reference; 1.0 for the reference itself, None before there is one)::

        verdict = judge.judge((target, filt), m, transparency=t)
        if verdict.accepted:
            judge.accept((target, filt), m, t, frame=frame_id)
            stack_it = not verdict.provisional
        for frame, revised in judge.review((target, filt)):
            ...  # stack a confirmed frame, or record the rejection of a revised one
    """

    STATE_FORMAT = "observd-quality-judge"

    def __init__(self, rules: QualityRules | None = None) -> None:
        self.rules = rules or QualityRules()
        self._history: dict[Key, list[dict[str, Any]]] = {}
        self._seq = 0

    # -- judging ---------------------------------------------------------------------

    def judge(
        self, key: Key, m: Measurement | Mapping[str, Any], *, transparency: float | None = None
    ) -> Verdict:
        """Judge one frame of ``key = (target, filter)`` against the recent history.

        Parameters
        ----------
        key
            ``(target, filter)``.
        m
            The frame's :class:`Measurement` (or its stored :meth:`Measurement.metrics`).
        transparency
            From :func:`transparency` against the key's flux reference (1.0 for the
            reference itself); None when not measured.

        Returns
        -------
        Verdict
            The history is not changed: call :meth:`accept` for frames that are used.
        """
        key = _key(key)
        own = self._recent(key)
        provisional = len(own) < self.rules.min_history
        return self._judge(key, _values(m, transparency), own, provisional)

    def _judge(
        self, key: Key, v: dict[str, float], own: list[dict[str, Any]], provisional: bool
    ) -> Verdict:
        r = self.rules
        nums: dict[str, float] = {k: v[k] for k in _ENTRY_FIELDS}
        fails: list[str] = []
        n = v["n_stars"]
        enough_own = len(own) >= r.min_history
        # 1. no stars
        if not n >= r.min_stars:
            fails.append(f"no stars: {_fmt_int(n)} detected (< {r.min_stars})")
        elif not math.isfinite(v["fwhm"]):
            fails.append(f"no stars: {_fmt_int(n)} sources, none measurable as a star")
        # 2. trailing: beyond the absolute limit, unless this instrument's recent frames
        # are all that elongated (an alt-az field, a tilted sensor): then beyond a
        # factor of their median
        el = v["elongation"]
        if math.isfinite(el) and el > r.max_elongation:
            scope, hist = self._fwhm_history(key, own)
            usual = _median(e["elongation"] for e in hist)
            nums["elongation_ref"] = usual
            if not (math.isfinite(usual) and usual > r.max_elongation / r.elongation_factor):
                fails.append(f"trailing: elongation {el:.2f} > {r.max_elongation:g}")
            elif el > r.elongation_factor * usual:
                fails.append(
                    f"trailing: elongation {el:.2f} > {r.elongation_factor:g} x recent "
                    f"median {usual:.2f}"
                )
        # 3. seeing/focus
        fw = v["fwhm"]
        if math.isfinite(fw):
            scope, hist = self._fwhm_history(key, own)
            ref = _median(e["fwhm"] for e in hist)
            nums["fwhm_ref"] = ref
            nums["fwhm_ref_frames"] = float(len(hist))
            if math.isfinite(ref) and ref > 0:
                nums["fwhm_ratio"] = fw / ref
                if fw > r.fwhm_factor * ref:
                    where = {
                        "filter": "recent median",
                        "target": "recent median (all filters)",
                        "night": "recent median of the night",
                    }[scope]
                    fails.append(
                        f"seeing/focus: FWHM {fw:.1f} px > {r.fwhm_factor:g} x {where} {ref:.1f} px"
                    )
            if r.max_fwhm_px is not None and fw > r.max_fwhm_px:
                fails.append(f"seeing/focus: FWHM {fw:.1f} px > {r.max_fwhm_px:g} px")
            fa = v["fwhm_arcsec"]
            if r.max_fwhm_arcsec is not None and math.isfinite(fa) and fa > r.max_fwhm_arcsec:
                fails.append(f'seeing/focus: FWHM {fa:.1f}" > {r.max_fwhm_arcsec:g}"')
        # 4. clouds: transparency
        t = v["transparency"]
        if math.isfinite(t):
            ts = [e["transparency"] for e in own if math.isfinite(e["transparency"])]
            clear = float(np.quantile(ts, r.clear_quantile)) if ts else 1.0
            if not clear > 0:
                clear = 1.0
            t_rel = t / clear
            nums["transparency_clear"] = clear
            nums["transparency_rel"] = t_rel
            if t_rel < r.min_transparency:
                extra = (
                    ""
                    if not ts or abs(clear - 1.0) < 0.05
                    else f" (flux {t:.2f} x the reference's, clear frames at {clear:.2f})"
                )
                fails.append(f"clouds: transparency {t_rel:.2f} < {r.min_transparency:g}" + extra)
        # 5. clouds: star count
        if enough_own and n >= r.min_stars:
            ref_n = _median(e["n_stars"] for e in own)
            nums["n_stars_ref"] = ref_n
            if math.isfinite(ref_n) and ref_n > 0:
                nums["n_stars_ratio"] = n / ref_n
                if n < r.star_fraction * ref_n:
                    fails.append(
                        f"clouds: {_fmt_int(n)} stars < {100 * r.star_fraction:.0f} % "
                        f"of recent median {_fmt_int(ref_n)}"
                    )
        nums["history_frames"] = float(len(own))
        nums = {k: float(x) for k, x in nums.items()}
        if fails:
            return Verdict(False, fails[0], nums, tuple(fails), False)
        return Verdict(True, None, nums, (), provisional)

    def _recent(self, key: Key, exclude: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        h = [e for e in self._history.get(key, []) if e is not exclude]
        return h[-self.rules.window :]

    def _fwhm_history(
        self, key: Key, own: list[dict[str, Any]]
    ) -> tuple[str, list[dict[str, Any]]]:
        """The FWHM reference frames: the key's own recent ones when there are
        ``fwhm_min_frames``, else the target's in any filter, else the night's (a median
        of one or two frames is too easily a lucky or an unlucky moment), else whatever
        exists, most specific first."""
        w, need = self.rules.window, self.rules.fwhm_min_frames
        target = sorted(
            (e for k, h in self._history.items() if k[0] == key[0] for e in h),
            key=lambda e: e["seq"],
        )[-w:]
        night = sorted((e for h in self._history.values() for e in h), key=lambda e: e["seq"])[-w:]
        scopes = (("filter", own), ("target", target), ("night", night))
        for scope, hist in scopes:
            if len(hist) >= need:
                return scope, hist
        return next(((sc, h) for sc, h in scopes if h), ("filter", []))

    # -- history ---------------------------------------------------------------------

    def accept(
        self,
        key: Key,
        m: Measurement | Mapping[str, Any],
        transparency: float | None = None,
        *,
        frame: str | None = None,
    ) -> None:
        """Record an accepted (used) frame in the history of ``key``.

        Parameters
        ----------
        key
            ``(target, filter)``.
        m
            The :class:`Measurement`, or its stored metrics (:func:`frame_metrics`), which
            is how a restart rebuilds the history from the catalog.
        transparency
            As passed to :meth:`judge`.
        frame
            An identifier (catalog id or path) that :meth:`review` gives back.
        """
        key = _key(key)
        v = _values(m, transparency)
        own = self._history.setdefault(key, [])
        provisional = len(own[-self.rules.window :]) < self.rules.min_history
        self._seq += 1
        own.append({**v, "seq": self._seq, "frame": frame, "provisional": provisional})
        # keep a few windows for review; older frames never matter again
        keep = 4 * self.rules.window
        if len(own) > keep:
            del own[: len(own) - keep]

    def review(self, key: Key) -> list[tuple[str | None, Verdict]]:
        """Re-judge the provisional frames of ``key`` against the frames accepted since.

        Call it after each :meth:`accept`. A provisional frame is resolved once
        ``min_history`` other frames of its key have been accepted.

        Returns
        -------
        list of (frame, Verdict)
            Every provisional frame resolved now: confirmed (accepted, no longer
            provisional) or rejected with its reason (and taken out of the history).
            Frames still waiting for company are not listed (see :meth:`pending`).
        """
        key = _key(key)
        out: list[tuple[str | None, Verdict]] = []
        for e in [e for e in self._history.get(key, []) if e["provisional"]]:
            others = self._recent(key, exclude=e)
            if len(others) < self.rules.min_history:
                continue
            v = {k: e[k] for k in _ENTRY_FIELDS}
            verdict = self._judge(key, v, others, False)
            if verdict.accepted:
                e["provisional"] = False
            else:
                self._history[key].remove(e)
            out.append((e["frame"], verdict))
        return out

    def rescale_transparency(self, key: Key, factor: float) -> None:
        """Divide the recorded transparencies of ``key`` by ``factor``: its flux reference
        was replaced by one ``factor`` times brighter (a cloudy first frame)."""
        for e in self._history.get(_key(key), []):
            if e.get("transparency") is not None and math.isfinite(e["transparency"]):
                e["transparency"] /= factor

    def pending(self) -> list[tuple[Key, str | None]]:
        """Accepted frames still provisional, as ``(key, frame)``: at the end of a night,
        the only frame of a filter stays provisional; the caller decides (its verdict
        passed every rule that could run)."""
        return [(k, e["frame"]) for k, h in self._history.items() for e in h if e["provisional"]]

    def history(self, key: Key) -> list[dict[str, Any]]:
        """The accepted frames of ``key`` (copies), oldest first."""
        return [dict(e) for e in self._history.get(_key(key), [])]

    def state(self) -> dict[str, Any]:
        """JSON-able state: a restart resumes with :meth:`from_state`."""
        return {
            "format": self.STATE_FORMAT,
            "version": 1,
            "rules": asdict(self.rules),
            "seq": self._seq,
            "history": [
                {"target": k[0], "filter": k[1], "frames": [_json_entry(e) for e in h]}
                for k, h in self._history.items()
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], rules: QualityRules | None = None) -> Judge:
        """A judge with the history of :meth:`state`; ``rules`` override the stored ones."""
        if state.get("format") != cls.STATE_FORMAT:
            raise ValueError("not a quality judge state")
        judge = cls(rules or QualityRules(**state.get("rules", {})))
        judge._seq = int(state.get("seq", 0))
        for item in state.get("history", []):
            entries = []
            for e in item["frames"]:
                entry = {k: NAN if e.get(k) is None else float(e[k]) for k in _ENTRY_FIELDS}
                entry.update(
                    seq=int(e["seq"]),
                    frame=e.get("frame"),
                    provisional=bool(e.get("provisional", False)),
                )
                entries.append(entry)
            judge._history[(str(item["target"]), str(item["filter"]))] = entries
        return judge


def _key(key: Key) -> Key:
    target, filt = key
    return (str(target), str(filt))


def _json_entry(e: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in e.items()}


def _fmt_int(v: float) -> str:
    return str(int(round(v))) if math.isfinite(v) else "no"

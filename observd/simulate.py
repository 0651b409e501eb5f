"""A synthetic, deterministic night at the telescope, with its complete truth.

:func:`simulate_night` writes what the camera PC of a 0.7 m telescope would write in one
night -- biases, darks, twilight flats, lights of a few targets, in MaxIm DL/ACP or
N.I.N.A. style -- into ``out/camera/``, and everything a test needs to judge a pipeline
into ``out/truth/`` beside it (never inside the watched folder).

Physics, in electrons then ADU, for one pixel ``(x, y)`` of a frame of exposure ``t``::

    e-  = Poisson( flat * (sky + transparency * (stars + galaxy)) * t + dark * t )
          + cosmic rays,  clipped at full_well
    ADU = round( bias + (e- + N(0, read_noise)) / gain ),  clipped to [0, 65535]

``sky`` is the background actually reaching the detector (``sky_rate`` in the truth, with
its small linear gradient); ``transparency`` dims only the astronomical sources. Poisson
noise is exact where the expected count is below 1000 e-; above that a Gaussian with the
same mean and variance is used (flats, star cores). ADU are rounded to the nearest
integer, so means are unbiased. There is no non-linearity, blooming or bias jitter
between frames: the bias of every frame is exactly ``truth/bias.fits`` plus read noise.

The sky: each target has a fixed star catalogue (about 42 stars/arcmin^2 from V = 11 to
21, with B-V colours; the same stars whatever the frame size) and a galaxy (exponential
disc with two arms and a redder n=4 bulge) at its catalogue position. Stars are Moffat
(beta = 3) postage stamps with exact sub-pixel centres, integrated over each pixel
(2x2 Gauss-Legendre) and normalised to their exact flux; the galaxy is integrated the
same way and convolved with the same PSF. Seeing wanders between 2.5 and 4 px, the sky
falls after twilight (from 19:30) and rises with the moon (from 02:00 local), with a 1-3 %
linear gradient; clear-sky transparency is 0.97-1.

Pointing: the first light of a target defines its reference grid (identity transform).
Later lights drift by 0.5-2 px/min, are re-centred when more than max(5 % of the frame,
26 px) off, are dithered by up to ``NightPlan.dither`` px and rotate slowly (0.02-0.06
deg/h); with ``meridian_flip`` the first target turns by 180 deg halfway through, with a
8-25 px re-centring offset. Every light records its exact frame -> grid transform.

Conventions used everywhere in the truth: pixel coordinates are 0-based ``(x, y)`` =
``(column, row)`` of the stored array with pixel centres on integers (numpy, sep, cv2,
astropy ``origin=0``); only FITS ``CRPIX`` is 1-based. Rates are e-/s unless a file says
``BUNIT = 'adu/s'``. Randomness is keyed by purpose (camera seed, plan seed, frame
identity), so the same inputs give the same bytes, and ``junk=True`` or ``live=True`` do
not change the other frames.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from loguru import logger
from scipy.signal import fftconvolve

from observd.headers import slugify

__all__ = [
    "CameraModel",
    "FileTruth",
    "NightPlan",
    "NightTruth",
    "TargetTruth",
    "Transform",
    "load_truth",
    "simulate_night",
]

TRUTH_FORMAT = "observd-simulate-truth"
TRUTH_VERSION = 1

# --------------------------------------------------------------------------------------
# Public dataclasses
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraModel:
    """The physical camera on the telescope; the same ``camera_seed`` (and ``size``) gives
    the same bias structure, dark-current map, hot pixels and flats on every night.

    Parameters
    ----------
    size
        Frames are ``size x size`` pixels (256 for tests ... 4096 for benchmarks).
    gain
        e-/ADU (written as ``EGAIN``).
    read_noise
        Read noise in e- (Gaussian).
    bias_level
        Mean bias in ADU; the bias map adds per-column offsets (~1 ADU rms, a few columns
        3-6 ADU), a row gradient of 2.5 ADU bottom to top and a fixed 0.4 ADU pixel pattern.
    dark_current
        Median dark current in e-/s/pixel at ``set_temp``; the map is lognormal around it
        (about 30 % scatter).
    hot_pixel_fraction
        Fraction of hot pixels (dark current 50-2000x the median, log-uniform).
    warm_columns
        Number of warm columns (dark current 4-10x the median over part of the column);
        they are *not* in the hot-pixel mask.
    full_well
        Electrons at which a pixel saturates (above the ADC range by default, so saturation
        shows as 65535 ADU).
    saturation
        ADC maximum in ADU; every value is clipped to ``[0, saturation]``.
    set_temp
        Cooler set point, deg C (``SET-TEMP``); ``CCD-TEMP`` sits within ~0.1 C of it.
    binning
        Binning written in ``XBINNING``/``YBINNING``; the simulated pixels are the binned ones.
    gain_setting, offset_setting, readout_mode
        Camera settings written by N.I.N.A. (``GAIN``, ``OFFSET``, ``READOUTM``).
    pixel_size
        Pixel size in micron (``XPIXSZ``/``YPIXSZ``).
    pixel_scale
        arcsec/pixel; with ``pixel_size`` it fixes the focal length.
    aperture
        Telescope aperture in mm.
    instrument, telescope
        ``INSTRUME`` and ``TELESCOP``.
    cosmic_rate
        Cosmic-ray events per megapixel per second of exposure (lights and darks get at
        least one each).
    camera_seed
        Seed of everything fixed in the camera.
    flat_change
        This night's flat differs from the ``camera_seed`` baseline by about this fraction:
        a new dust donut of depth ``flat_change`` and vignetting deeper by
        ``flat_change / 2`` at the corners (0.03 => a 3 % change).
    new_hot_pixels
        Extra hot pixels appearing on this night, on top of the baseline ones
        (deterministic from ``camera_seed``; the first ``k`` of ``k + m`` are the same).
    bayer
        A one-shot-colour camera: the colours of the pixels ``[0, 0]``, ``[0, 1]``,
        ``[1, 0]``, ``[1, 1]`` of the stored array (``"RGGB"``, ``"BGGR"``, ``"GRBG"``,
        ``"GBRG"``; written as ``BAYERPAT`` with ``ROWORDER = 'TOP-DOWN'``). Each pixel
        of a light sees the stars and the galaxy through the band of its colour: R, V
        and B (``flux_R``, ``flux_V``, ``flux_B`` in the stars' truth, whatever the
        plan's filters); the sky, the flats and the wheel's filter (e.g. ``"L"``) are
        the same for the three colours. None (default): a mono camera.
    """

    size: int = 1024
    gain: float = 1.5
    read_noise: float = 9.0
    bias_level: float = 1000.0
    dark_current: float = 0.05
    hot_pixel_fraction: float = 5e-4
    warm_columns: int = 2
    full_well: float = 150_000.0
    saturation: int = 65535
    set_temp: float = -10.0
    binning: int = 1
    gain_setting: int = 100
    offset_setting: int = 10
    readout_mode: str = "Normal"
    pixel_size: float = 9.0
    pixel_scale: float = 0.6
    aperture: float = 700.0
    instrument: str = "FLI PL16803"
    telescope: str = "UNIV 0.7m CDK"
    cosmic_rate: float = 0.3
    camera_seed: int = 7
    flat_change: float = 0.0
    new_hot_pixels: int = 0
    bayer: str | None = None

    @property
    def focal_length(self) -> float:
        """Focal length in mm implied by ``pixel_size`` and ``pixel_scale``."""
        return self.pixel_size * 1e-3 * 206264.806 / self.pixel_scale


@dataclass(frozen=True)
class NightPlan:
    """What the observatory does in one night.

    Parameters
    ----------
    night
        Local date of the evening, ``YYYY-MM-DD``; frames after local midnight carry the
        next UTC (and local) date but belong to this night.
    timezone
        IANA timezone of the site (``DATE-OBS`` is always UTC).
    dialect
        ``"maxim"`` (MaxIm DL/ACP headers and names) or ``"nina"`` (N.I.N.A.).
    n_bias
        Biases, from 17:30 local.
    dark_exptimes, n_dark
        Exposure times of darks and the number per exposure time (after the biases).
    filters
        Filters used for flats and lights, in wheel order.
    n_flat
        Twilight flats per filter at dusk (from 18:20 local), 20-30 kADU, a few faint stars
        at different places in each, one fixed exposure time per filter.
    dawn_flats
        Also take ``n_flat`` flats per filter at dawn (from 06:00 local).
    n_darkflat
        Dark flats per flat exposure time, after the dusk flats (``DARKFLAT`` in N.I.N.A.,
        ``Dark Frame`` in MaxIm).
    targets
        Target names (``OBJECT``); each gets a fixed star catalogue and a galaxy.
    n_light, light_exptime
        Lights per target and filter (filters interleaved: R V B R V B ...), and their
        exposure time. Lights run from 19:30 to about 05:00 local, targets one after
        the other.
    wcs
        WCS in light headers: ``"exact"``, ``"perturbed"`` (CRPIX off by 3-20 px and/or
        CD rotated by 0.3-1 deg), ``"absent"``, or ``"mixed"`` (about 50/25/25 %, each
        present when there are at least 3 lights). Recorded per frame.
    meridian_flip
        The first target flips by 180 deg halfway through its sequence (plus a
        re-centring offset); ``PIERSIDE`` changes from ``WEST`` to ``EAST``.
    defects
        Cosmic rays in every light and dark; per target one cloudy, one trailed and one
        defocused light (distinct frames, never the reference frame); one satellite trail
        on another light of the first target; and (with ``warm_dark``) one dark taken
        2 C warmer than the set point.
    warm_dark
        With ``defects``: the middle dark of the longest exposure time has
        ``CCD-TEMP = SET-TEMP + 2`` and 2**(2/6) times the dark current.
    dither
        Random dither radius in pixels between lights (0 for none).
    seed
        Seed of everything that changes from night to night.
    observer, latitude, longitude, elevation
        ``OBSERVER`` and the site (degrees, east-positive longitude, metres).
    """

    night: str = "2026-03-14"
    timezone: str = "America/Los_Angeles"
    dialect: str = "maxim"
    n_bias: int = 15
    dark_exptimes: tuple[float, ...] = (30.0, 60.0, 120.0)
    n_dark: int = 7
    filters: tuple[str, ...] = ("R", "V", "B")
    n_flat: int = 9
    dawn_flats: bool = False
    n_darkflat: int = 0
    targets: tuple[str, ...] = ("M 51", "NGC 2903")
    n_light: int = 20
    light_exptime: float = 60.0
    wcs: str = "mixed"
    meridian_flip: bool = True
    defects: bool = True
    warm_dark: bool = True
    dither: float = 3.0
    seed: int = 1
    observer: str = "ACP Scheduler"
    latitude: float = 32.8403
    longitude: float = -116.4278
    elevation: float = 1859.0


@dataclass(frozen=True)
class Transform:
    """The true affine map from a light's pixels to its target's reference grid.

    ``(X, Y) = matrix @ (x, y, 1)``, 0-based pixel coordinates. It is a rotation by
    ``rotation_deg`` (counter-clockwise in the (x, y) plane, 180 deg included after a
    meridian flip) about the frame centre ``c = ((size-1)/2, (size-1)/2)`` followed by a
    shift: the frame centre lands on ``c + (dx, dy)``. The 2x3 matrix is exactly what
    ``cv2.warpAffine(frame, matrix, (size, size))`` needs to put a frame on the grid.
    """

    matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    dx: float
    dy: float
    rotation_deg: float
    flipped: bool

    @classmethod
    def build(cls, size: int, dx: float, dy: float, rotation_deg: float, flipped: bool):
        """The transform of a frame of ``size`` px rotated by ``rotation_deg`` and shifted."""
        c = (size - 1) / 2.0
        a = math.radians(rotation_deg)
        ca, sa = math.cos(a), math.sin(a)
        tx = c + dx - (ca * c - sa * c)
        ty = c + dy - (sa * c + ca * c)
        return cls(((ca, -sa, tx), (sa, ca, ty)), float(dx), float(dy), float(rotation_deg),
                   bool(flipped))

    @property
    def array(self) -> np.ndarray:
        """The 2x3 matrix as a float64 array."""
        return np.array(self.matrix, dtype=np.float64)

    def apply(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Frame pixel coordinates -> reference-grid pixel coordinates."""
        m = self.matrix
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return m[0][0] * x + m[0][1] * y + m[0][2], m[1][0] * x + m[1][1] * y + m[1][2]

    def inverse(self, x_ref: Any, y_ref: Any) -> tuple[np.ndarray, np.ndarray]:
        """Reference-grid pixel coordinates -> frame pixel coordinates."""
        (a, b, tx), (c, d, ty) = self.matrix
        det = a * d - b * c
        u = np.asarray(x_ref, dtype=np.float64) - tx
        v = np.asarray(y_ref, dtype=np.float64) - ty
        return (d * u - b * v) / det, (-c * u + a * v) / det

    def to_dict(self) -> dict[str, Any]:
        return {"matrix": [list(r) for r in self.matrix], "dx": self.dx, "dy": self.dy,
                "rotation_deg": self.rotation_deg, "flipped": self.flipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Transform:
        m = d["matrix"]
        return cls((tuple(m[0]), tuple(m[1])), d["dx"], d["dy"], d["rotation_deg"],
                   d["flipped"])


@dataclass(frozen=True)
class FileTruth:
    """The truth about one file in the camera folder.

    Parameters
    ----------
    path
        Path relative to ``out/camera`` (POSIX separators).
    type
        ``'bias'``, ``'dark'``, ``'flat'``, ``'darkflat'``, ``'light'``, or ``'unknown'``
        (junk that is not a frame at all).
    filter, exptime, target, night
        What a perfect header reader should find (``filter`` is None for bias and darks
        even where a N.I.N.A. header carries the wheel position; ``target`` only for
        lights).
    date_obs
        Exposure start, UTC ISO (``YYYY-MM-DDTHH:MM:SS.sss``, no zone suffix).
    dialect, imagetyp
        The header dialect and the exact ``IMAGETYP`` written.
    expected
        What a correct pipeline does with the file: ``"ok"``, or ``"rejected: <why>"``
        with why in ``cloudy``, ``trailed``, ``defocused``, ``ccd temperature``,
        ``truncated``, ``empty``, ``not FITS``; or ``"ignored: not a FITS file name"``.
    defects
        Notable defects: ``cloudy``, ``trailed``, ``defocused``, ``satellite``,
        ``ccd temperature`` (cosmic rays are listed in ``cosmic_rays`` instead).
    wcs, wcs_error
        Lights: ``'exact'``, ``'perturbed'`` or ``'absent'``; for perturbed ones
        ``{"crpix_shift": [sx, sy], "rotation_deg": r}``, the error written into the header.
    transform
        Lights: the true frame -> reference-grid transform.
    fwhm, beta
        Lights and flats: Moffat FWHM (px) and beta of the PSF (defocused: 3.2x seeing).
    sky_rate, sky_gradient
        Lights: background e-/s/px at the frame centre as it reaches the detector (clouds
        included) and its fractional gradient ``(gx, gy)`` across the frame width:
        ``sky(x, y) = sky_rate * (1 + gx (x - c)/size + gy (y - c)/size)``. Flats: the
        twilight illumination in e-/s/px.
    transparency
        Lights: the factor applied to star and galaxy fluxes (1 = clear).
    ccd_temp, dark_scale
        Sensor temperature written, and the factor applied to the dark-current map.
    flat_level
        Flats: the mean ADU aimed at (bias included) in the central normalisation region;
        the frame's mean is within ~0.1 % of it.
    pier_side
        Lights: ``'EAST'`` or ``'WEST'``.
    written_as
        Temporary name the file was first written under (junk), else None.
    cosmic_rays
        ``[[x, y, electrons], ...]``: every pixel hit, electrons added before read noise.
    extras
        ``trail`` (``length_px``, ``angle_deg``: the stars are smeared along a centred line),
        ``satellite`` (``x0, y0, x1, y1`` where it enters and leaves the frame,
        ``sigma_px`` of its Gaussian profile, ``peak_e`` electrons on its axis),
        ``flat_stars`` (``[[x, y, electrons], ...]`` in a twilight flat).
    """

    path: str
    type: str
    filter: str | None
    exptime: float | None
    target: str | None
    night: str
    date_obs: str | None
    dialect: str
    imagetyp: str | None
    expected: str = "ok"
    defects: tuple[str, ...] = ()
    wcs: str | None = None
    wcs_error: dict[str, Any] | None = None
    transform: Transform | None = None
    fwhm: float | None = None
    beta: float | None = None
    sky_rate: float | None = None
    sky_gradient: tuple[float, float] | None = None
    transparency: float | None = None
    ccd_temp: float | None = None
    dark_scale: float = 1.0
    flat_level: float | None = None
    pier_side: str | None = None
    written_as: str | None = None
    cosmic_rays: tuple[tuple[int, int, float], ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "transform":
                v = v.to_dict() if v is not None else None
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileTruth:
        d = dict(d)
        if d.get("transform") is not None:
            d["transform"] = Transform.from_dict(d["transform"])
        d["defects"] = tuple(d.get("defects") or ())
        d["cosmic_rays"] = tuple(tuple(c) for c in d.get("cosmic_rays") or ())
        if d.get("sky_gradient") is not None:
            d["sky_gradient"] = tuple(d["sky_gradient"])
        return cls(**d)


@dataclass(frozen=True)
class TargetTruth:
    """The truth about one target.

    Parameters
    ----------
    name, slug
        ``OBJECT`` and its file-name slug (``"M 51"`` -> ``"m51"``).
    ra, dec
        Catalogue position (deg, ICRS); the galaxy sits exactly here.
    reference
        Path of the first light: the reference grid is that frame's pixel grid (its
        transform is the identity).
    ref_wcs
        FITS keywords of the exact TAN WCS of the reference grid (CRPIX 1-based).
    fwhm_ref
        FWHM (px) with which ``sky_<slug>_<filter>.fits`` is rendered: the median seeing of
        the target's clear lights.
    galaxy
        Galaxy parameters on the reference grid (px, deg) and its flux per filter
        (``flux``: {filter: e-/s}, disc + bulge).
    meridian_flip
        Whether this target flips halfway.
    n_stars
        Rows of ``stars_<slug>.ecsv``.
    """

    name: str
    slug: str
    ra: float
    dec: float
    reference: str | None
    ref_wcs: dict[str, Any]
    fwhm_ref: float | None
    galaxy: dict[str, Any]
    meridian_flip: bool
    n_stars: int

    def wcs(self) -> WCS:
        """The reference grid's WCS."""
        return WCS(fits.Header(list(self.ref_wcs.items())))


@dataclass
class NightTruth:
    """Everything true about a simulated night; written to ``out/truth/truth.json``.

    Parameters
    ----------
    out
        The folder given to :func:`simulate_night` (``camera/`` and ``truth/`` inside).
    plan, camera
        The inputs.
    files
        Every file written into the camera folder, in the order it appeared.
    targets
        Per target name.
    camera_info
        Derived camera facts: ``focal_length``, ``saturation_adu``, ``hot_pixels`` (count),
        ``new_hot_pixels`` (list of ``[x, y]``), ``warm_columns`` (``[x, y0, y1, factor]``),
        ``dust`` (donuts: filter or 'all', x, y, r_in, r_out, depth), ``flat_norm_region``
        (``[y0, y1, x0, x1]``: the flats have mean 1 in ``flat[y0:y1, x0:x1]``),
        ``dark_doubling_temp`` (deg C).
    """

    out: Path
    plan: NightPlan
    camera: CameraModel
    files: list[FileTruth]
    targets: dict[str, TargetTruth]
    camera_info: dict[str, Any]

    @property
    def camera_dir(self) -> Path:
        """The watched folder."""
        return self.out / "camera"

    @property
    def truth_dir(self) -> Path:
        return self.out / "truth"

    def path(self, f: FileTruth) -> Path:
        """Absolute path of a file."""
        return self.camera_dir / f.path

    def file(self, path: str | Path) -> FileTruth:
        """The entry of a file, by path relative to the camera folder or absolute."""
        p = Path(path)
        rel = p.relative_to(self.camera_dir).as_posix() if p.is_absolute() else p.as_posix()
        for f in self.files:
            if f.path == rel:
                return f
        raise KeyError(rel)

    def frames(self, type: str | None = None, *, target: str | None = None,
               filter: str | None = None, expected: str | None = None) -> list[FileTruth]:
        """Files matching every given criterion (``expected="ok"`` for usable ones)."""
        return [f for f in self.files
                if (type is None or f.type == type)
                and (target is None or f.target == target)
                and (filter is None or f.filter == filter)
                and (expected is None or f.expected == expected)]

    def read(self, name: str) -> np.ndarray:
        """A truth image by file name: ``bias.fits`` (ADU), ``dark_rate.fits`` (ADU/s),
        ``hot_pixels.fits`` (returned as bool), ``flat_<filter>.fits``,
        ``sky_<slug>_<filter>.fits`` (ADU/s)."""
        data = fits.getdata(self.truth_dir / name)
        return data.astype(bool) if name.startswith("hot_pixels") else data

    def stars(self, target: str) -> Table:
        """The star catalogue of a target: ``x``, ``y`` on the reference grid, ``ra``,
        ``dec``, ``mag_v``, ``b_v`` and ``flux_<filter>`` in e-/s."""
        return Table.read(self.truth_dir / f"stars_{self.targets[target].slug}.ecsv")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TRUTH_FORMAT,
            "version": TRUTH_VERSION,
            "plan": _jsonable(asdict(self.plan)),
            "camera": _jsonable(asdict(self.camera)),
            "camera_info": self.camera_info,
            "targets": {k: _jsonable(asdict(v)) for k, v in self.targets.items()},
            "files": [f.to_dict() for f in self.files],
        }


def load_truth(out: str | Path) -> NightTruth:
    """Read ``out/truth/truth.json`` back into a :class:`NightTruth`.

    Parameters
    ----------
    out
        The folder that was given to :func:`simulate_night`.

    Returns
    -------
    NightTruth
    """
    out = Path(out)
    d = json.loads((out / "truth" / "truth.json").read_text())
    if d.get("format") != TRUTH_FORMAT:
        raise ValueError(f"{out / 'truth' / 'truth.json'} is not an observd simulation truth")
    return NightTruth(
        out=out,
        plan=_from_dict(NightPlan, d["plan"]),
        camera=_from_dict(CameraModel, d["camera"]),
        files=[FileTruth.from_dict(f) for f in d["files"]],
        targets={k: TargetTruth(**v) for k, v in d["targets"].items()},
        camera_info=d["camera_info"],
    )


# --------------------------------------------------------------------------------------
# Bands, targets, constants
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Band:
    zp: float  # magnitude giving 1 e-/s through the 0.7 m
    colour: float  # m_band = V + colour * (B-V)
    sky: float  # dark-sky brightness, mag/arcsec^2 (a suburban site)
    flat_exptime: float  # s
    vignetting: float  # corner depth of the vignetting
    seeing: float  # FWHM factor
    twilight: float  # sky excess just after dusk (fraction of the dark sky)
    moon: float  # sky excess once the moon is up


_BANDS = {
    "B": _Band(22.0, 1.0, 21.2, 6.0, 0.18, 1.06, 3.0, 2.0),
    "V": _Band(22.5, 0.0, 20.3, 3.0, 0.16, 1.03, 2.0, 1.2),
    "R": _Band(22.7, -0.57, 19.5, 2.0, 0.15, 1.0, 1.5, 0.8),
    "I": _Band(22.2, -1.1, 18.8, 2.0, 0.14, 0.97, 1.2, 0.6),
    "L": _Band(23.6, -0.3, 19.6, 1.0, 0.16, 1.02, 1.8, 1.0),
    "HA": _Band(18.6, -0.6, 17.8, 30.0, 0.15, 1.0, 0.8, 0.3),
}
_DEFAULT_BAND = _Band(22.5, 0.0, 20.3, 3.0, 0.16, 1.03, 2.0, 1.2)


def _band(name: str) -> _Band:
    return _BANDS.get(name.strip().upper().replace("-ALPHA", "A").replace("H-", "H"),
                      _DEFAULT_BAND)


# name slug -> ra, dec, disc V mag, disc scale length ("), disc axis ratio, PA (deg),
# bulge V mag, bulge Re (")
_KNOWN_TARGETS: dict[str, tuple[float, ...]] = {
    "m51": (202.469575, 47.195258, 11.6, 11.0, 0.78, 20.0, 12.6, 3.5),
    "ngc2903": (143.042125, 21.500833, 12.0, 8.0, 0.45, 17.0, 13.5, 2.5),
    "m101": (210.802267, 54.348750, 11.0, 22.0, 0.9, 40.0, 13.0, 4.0),
    "m81": (148.888221, 69.065295, 10.6, 18.0, 0.52, 157.0, 11.3, 8.0),
    "ngc4565": (189.086584, 25.987674, 11.9, 16.0, 0.15, 136.0, 13.4, 4.0),
    "m82": (148.969687, 69.679383, 11.5, 12.0, 0.38, 65.0, 13.0, 3.0),
}

_GL = 0.5 / math.sqrt(3.0)  # 2-point Gauss-Legendre nodes on a unit pixel: +-0.2887
_BETA = 3.0  # Moffat beta of every star
_STAR_DENSITY = 42.0  # stars per arcmin^2 from V = 11 to 21 (a rich field)
_MAG_RANGE = (11.0, 21.0)
_COUNT_SLOPE = 0.15  # dN/dm ~ 10**(0.15 m)
_CELL = 2.0  # arcmin: the catalogue is generated cell by cell, so it never depends on size
_DARK_DOUBLING = 6.0  # deg C per doubling of dark current
_GAUSS_ABOVE = 1000.0  # e-: Poisson below, Gaussian approximation above


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % (1 << 63) for k in keys]))


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


# --------------------------------------------------------------------------------------
# The camera: bias, dark current, hot pixels, flats
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CameraMaps:
    bias: np.ndarray  # ADU, float32
    dark: np.ndarray  # e-/s, float32
    hot: np.ndarray  # bool
    flats: dict[str, np.ndarray]  # float32, mean 1 in the central region
    info: dict[str, Any]


def _norm_region(n: int) -> tuple[int, int, int, int]:
    a, b = n // 4, n - n // 4
    return a, b, a, b


def _donut(flat: np.ndarray, x: float, y: float, r_out: float, depth: float) -> None:
    """Multiply ``flat`` in place by a dust donut (shadow of dust out of focus)."""
    n = flat.shape[0]
    r_in = 0.55 * r_out
    w = max(0.7, 0.08 * r_out)
    x0, x1 = max(0, int(x - r_out - 4 * w)), min(n, int(x + r_out + 4 * w) + 2)
    y0, y1 = max(0, int(y - r_out - 4 * w)), min(n, int(y + r_out + 4 * w) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    r = np.hypot(xx - x, yy - y)
    ring = 0.5 * (np.tanh((r - r_in) / w) - np.tanh((r - r_out) / w))
    disc = 0.5 * (1.0 - np.tanh((r - r_out) / w))
    flat[y0:y1, x0:x1] *= (1.0 - depth * (0.65 * ring + 0.35 * disc)).astype(np.float32)


@lru_cache(maxsize=1)
def _camera_maps(cam: CameraModel, filters: tuple[str, ...]) -> _CameraMaps:
    n = cam.size
    s = n / 1024.0
    seed = cam.camera_seed
    info: dict[str, Any] = {"focal_length": cam.focal_length, "saturation_adu": cam.saturation,
                            "dark_doubling_temp": _DARK_DOUBLING}

    # bias: columns, a row gradient, a fixed pixel pattern
    rng = _rng(seed, 1, n)
    col = rng.normal(0.0, 1.0, n)
    strong = rng.choice(n, size=min(n, 3), replace=False)
    col[strong] += rng.uniform(3.0, 6.0, strong.size) * rng.choice([-1.0, 1.0], strong.size)
    row = 2.5 * np.arange(n) / n
    bias = (cam.bias_level + col[None, :] + row[:, None]).astype(np.float32)
    bias += rng.normal(0.0, 0.4, (n, n)).astype(np.float32)

    # dark current: lognormal map, warm columns, hot pixels
    rng = _rng(seed, 2, n)
    dark = rng.standard_normal((n, n), dtype=np.float32)
    dark *= np.float32(0.25 * math.log(10.0) / 2.0)
    np.exp(dark, out=dark)
    dark *= np.float32(cam.dark_current)
    warm = []
    for _ in range(cam.warm_columns):
        x = int(rng.integers(0, n))
        y0 = int(rng.integers(0, n // 2))
        factor = float(rng.uniform(4.0, 10.0))
        dark[y0:, x] *= np.float32(factor)
        warm.append([x, y0, n, factor])
    info["warm_columns"] = warm
    n_hot = int(round(cam.hot_pixel_fraction * n * n))
    hot_idx = rng.choice(n * n, size=n_hot, replace=False) if n_hot else np.zeros(0, np.int64)
    factors = np.exp(rng.uniform(math.log(50.0), math.log(2000.0), n_hot))
    hot = np.zeros(n * n, dtype=bool)
    dark.ravel()[hot_idx] = (factors * cam.dark_current).astype(np.float32)
    hot[hot_idx] = True
    # new hot pixels of this night: an order-preserving stream, so k is a prefix of k + m
    new_xy: list[list[int]] = []
    if cam.new_hot_pixels > 0:
        rng = _rng(seed, 3, n)
        cand = rng.integers(0, n * n, size=4 * cam.new_hot_pixels + 16)
        cfac = np.exp(rng.uniform(math.log(50.0), math.log(2000.0), cand.size))
        seen: set[int] = set()
        for i, c in zip(cand.tolist(), cfac.tolist(), strict=True):
            if hot[i] or i in seen:
                continue
            seen.add(i)
            dark.ravel()[i] = np.float32(c * cam.dark_current)
            hot[i] = True
            new_xy.append([i % n, i // n])
            if len(new_xy) == cam.new_hot_pixels:
                break
    info["hot_pixels"] = int(hot.sum())
    info["new_hot_pixels"] = new_xy
    hot = hot.reshape(n, n)

    # flats: vignetting x pixel response x dust donuts, per filter
    rng = _rng(seed, 4, n)
    cx = n / 2 + rng.normal(0.0, 0.03 * n)
    cy = n / 2 + rng.normal(0.0, 0.03 * n)
    yy, xx = np.ogrid[0:n, 0:n]
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2).astype(np.float32) / np.float32((0.5 * n) ** 2 * 2)
    vig_shape = 0.6 * r2 + 0.4 * r2 * r2
    prnu = rng.standard_normal((n, n), dtype=np.float32)
    common = []
    for _ in range(int(rng.integers(2, 4))):
        common.append(("all", float(rng.uniform(0.1, 0.9) * n), float(rng.uniform(0.1, 0.9) * n),
                       float(rng.uniform(15.0, 35.0) * s), float(rng.uniform(0.01, 0.03))))
    change = None
    if cam.flat_change:
        rc = _rng(seed, 5, n)
        change = ("night", float(rc.uniform(0.15, 0.85) * n), float(rc.uniform(0.15, 0.85) * n),
                  float(25.0 * s), float(cam.flat_change))
    dust: list[list[Any]] = []
    flats: dict[str, np.ndarray] = {}
    y0, y1, x0, x1 = _norm_region(n)
    for f in filters:
        rf = _rng(seed, 6, n, _key(f))
        b = _band(f)
        depth = b.vignetting + rf.uniform(-0.01, 0.01)
        flat = 1.0 - np.float32(depth) * vig_shape
        if cam.flat_change:
            flat *= 1.0 - np.float32(0.5 * cam.flat_change) * r2
        own = prnu * np.float32(0.0095)
        own += rf.standard_normal((n, n), dtype=np.float32) * np.float32(0.0031)
        own += np.float32(1.0)
        flat *= own
        donuts = list(common)
        if rf.random() < 0.6:
            donuts.append((f, float(rf.uniform(0.1, 0.9) * n), float(rf.uniform(0.1, 0.9) * n),
                           float(rf.uniform(30.0, 60.0) * s), float(rf.uniform(0.01, 0.02))))
        if change is not None:
            donuts.append(change)
        for who, x, y, r_out, dep in donuts:
            _donut(flat, x, y, r_out, dep)
            entry = [who, x, y, 0.55 * r_out, r_out, dep]
            if entry not in dust:
                dust.append(entry)
        flat /= np.float32(flat[y0:y1, x0:x1].mean(dtype=np.float64))
        flats[f] = flat.astype(np.float32, copy=False)
    info["dust"] = dust
    info["flat_norm_region"] = [y0, y1, x0, x1]
    return _CameraMaps(bias, dark, hot, flats, info)


# --------------------------------------------------------------------------------------
# The sky: targets, star catalogues, galaxies
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Galaxy:
    x: float  # centre on the reference grid, px
    y: float
    pa: float  # deg, in the pixel frame of the reference grid
    h: float  # disc scale length, px
    q: float
    re: float  # bulge effective radius, px
    qb: float
    arms: float
    pitch: float  # deg
    flux: dict[str, tuple[float, float]]  # filter -> (disc, bulge) e-/s
    norm: tuple[float, float]  # integrals of the unit shapes, px^2

    @property
    def extent(self) -> float:
        return max(6.5 * self.h, 12.0 * self.re) + 2.0

    def shapes(self, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unnormalised disc and bulge surface brightness at offsets from the centre."""
        a = math.radians(self.pa)
        ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
        u = dx * ca + dy * sa
        v = (dy * ca - dx * sa) / np.float32(self.q)
        r = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        spiral = np.log(r / np.float32(self.h) + np.float32(0.3)) / np.float32(
            math.tan(math.radians(self.pitch)))
        disc = np.exp(-r / np.float32(self.h))
        disc *= 1.0 + np.float32(self.arms) * np.cos(2.0 * (theta - spiral))
        disc *= 0.5 * (1.0 - np.tanh((r - np.float32(6.0 * self.h)) / np.float32(0.5 * self.h)))
        vb = (dy * ca - dx * sa) / np.float32(self.qb)
        rb = np.sqrt(u * u + vb * vb + np.float32(1.0))  # a 1 px core: no cusp to sample
        bulge = np.exp(np.float32(-7.669) * ((rb / np.float32(self.re)) ** 0.25 - 1.0))
        bulge *= 0.5 * (1.0 - np.tanh((rb - np.float32(10.0 * self.re)) / np.float32(self.re)))
        return disc, bulge

    def rate(self, band: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        disc, bulge = self.shapes(dx, dy)
        fd, fb = self.flux[band]
        disc *= np.float32(fd / self.norm[0])
        disc += bulge * np.float32(fb / self.norm[1])
        return disc


@dataclass(frozen=True)
class _Target:
    name: str
    slug: str
    ra: float
    dec: float
    ref_wcs: dict[str, Any]
    stars_x: np.ndarray  # reference grid, px
    stars_y: np.ndarray
    flux: dict[str, np.ndarray]  # filter -> e-/s
    table: Table
    galaxy: _Galaxy
    galaxy_info: dict[str, Any]


def _target_params(name: str) -> tuple[float, ...]:
    slug = slugify(name)
    if slug in _KNOWN_TARGETS:
        return _KNOWN_TARGETS[slug]
    r = _rng(_key(slug), 11)
    return (float(r.uniform(0, 360)), float(np.degrees(np.arcsin(r.uniform(-0.2, 0.95)))),
            float(r.uniform(11.5, 13.0)), float(r.uniform(6.0, 14.0)), float(r.uniform(0.3, 0.9)),
            float(r.uniform(0, 180)), float(r.uniform(12.5, 14.0)), float(r.uniform(2.0, 4.0)))


def _wcs_dict(crval: tuple[float, float], crpix: tuple[float, float],
              cd: np.ndarray) -> dict[str, Any]:
    return {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
            "RADESYS": "ICRS", "CRVAL1": float(crval[0]), "CRVAL2": float(crval[1]),
            "CRPIX1": float(crpix[0]), "CRPIX2": float(crpix[1]),
            "CD1_1": float(cd[0, 0]), "CD1_2": float(cd[0, 1]),
            "CD2_1": float(cd[1, 0]), "CD2_2": float(cd[1, 1])}


def _rot(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _catalogue(slug: str, ra0: float, dec0: float, radius_arcmin: float):
    """Stars in cells of the tangent plane around the target: the same stars whatever the
    field size. Returns ra, dec, V, B-V."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cd = np.eye(2) / 60.0  # "pixels" of 1 arcmin, +x east, +y north
    k = int(math.ceil(radius_arcmin / _CELL))
    m1, m2 = _MAG_RANGE
    e1, e2 = 10 ** (_COUNT_SLOPE * m1), 10 ** (_COUNT_SLOPE * m2)
    xi, eta, mag, bv = [], [], [], []
    for i in range(-k, k):
        for j in range(-k, k):
            r = _rng(_key(slug), 12, i + 100000, j + 100000)
            m = int(r.poisson(_STAR_DENSITY * _CELL * _CELL))
            u = r.random((m, 4))
            xi.append((i + u[:, 0]) * _CELL)
            eta.append((j + u[:, 1]) * _CELL)
            mag.append(np.log10(e1 + u[:, 2] * (e2 - e1)) / _COUNT_SLOPE)
            bv.append(np.clip(0.75 + 0.3 * np.sqrt(2) * _erfinv(2 * u[:, 3] - 1), -0.1, 1.8))
    xi_a, eta_a = np.concatenate(xi), np.concatenate(eta)
    ra, dec = w.wcs_pix2world(xi_a, eta_a, 0)
    return ra, dec, np.concatenate(mag), np.concatenate(bv)


def _erfinv(y: np.ndarray) -> np.ndarray:
    from scipy.special import erfinv

    return erfinv(np.clip(y, -0.999999, 0.999999))


def _make_target(name: str, plan: NightPlan, cam: CameraModel, theta0: float,
                 index: int) -> _Target:
    n = cam.size
    slug = slugify(name)
    ra0, dec0, v_disc, h_as, q, pa_sky, v_bulge, re_as = _target_params(name)
    # the reference grid: the first light's pointing (a few arcsec off the target)
    r = _rng(plan.seed, 13, index)
    off = r.normal(0.0, 12.0, 2) / 3600.0
    crval = (ra0 + off[0] / math.cos(math.radians(dec0)), dec0 + off[1])
    scale = cam.pixel_scale / 3600.0
    cd = scale * np.array([[-1.0, 0.0], [0.0, 1.0]]) @ _rot(theta0)
    crpix = ((n + 1) / 2.0, (n + 1) / 2.0)
    ref = _wcs_dict(crval, crpix, cd)
    wref = WCS(fits.Header(list(ref.items())))
    # stars in a circle covering the grid, its drift and its flipped twin
    radius = (n * math.sqrt(2) / 2 + 0.12 * n + 40) * cam.pixel_scale / 60.0 + 1.0
    ra, dec, mag_v, bv = _catalogue(slug, ra0, dec0, radius)
    x, y = wref.wcs_world2pix(ra, dec, 0)
    margin = 0.12 * n + 40
    keep = (x > -margin) & (x < n - 1 + margin) & (y > -margin) & (y < n - 1 + margin)
    ra, dec, mag_v, bv, x, y = ra[keep], dec[keep], mag_v[keep], bv[keep], x[keep], y[keep]
    order = np.argsort(mag_v, kind="stable")
    ra, dec, mag_v, bv, x, y = (a[order] for a in (ra, dec, mag_v, bv, x, y))
    flux = {}
    table = Table()
    table["id"] = np.arange(1, len(x) + 1)
    table["x"], table["y"] = x, y
    table["ra"], table["dec"] = ra, dec
    table["mag_v"], table["b_v"] = mag_v, bv
    for f in _bands_rendered(plan, cam):
        b = _band(f)
        flux[f] = 10 ** (-0.4 * (mag_v + b.colour * bv - b.zp))
        table[f"flux_{f}"] = flux[f]
        table[f"flux_{f}"].unit = "electron / s"
    table.meta["target"] = name
    table.meta["comment"] = ("x, y: 0-based pixel position on the reference grid; flux_<filter>: "
                             "e-/s at transparency 1 (before the flat)")
    # the galaxy, at the catalogue position
    gx, gy = (float(v) for v in wref.wcs_world2pix(ra0, dec0, 0))
    # position angle on the sky -> in the pixel frame (north is +y rotated by theta0)
    pa = (90.0 + pa_sky + theta0) % 180.0
    gflux = {}
    for f in _bands_rendered(plan, cam):
        b = _band(f)
        gflux[f] = (float(10 ** (-0.4 * (v_disc + b.colour * 0.55 - b.zp))),
                    float(10 ** (-0.4 * (v_bulge + b.colour * 1.0 - b.zp))))
    proto = _Galaxy(gx, gy, pa, h_as / cam.pixel_scale, q, re_as / cam.pixel_scale,
                    min(1.0, q + 0.25), 0.35, 20.0, gflux, (1.0, 1.0))
    gal = replace(proto, norm=_galaxy_norm(proto))
    info = {"x": gx, "y": gy, "pa_deg": pa, "disc_scale_px": proto.h, "axis_ratio": q,
            "bulge_re_px": proto.re, "bulge_axis_ratio": proto.qb, "arm_amplitude": proto.arms,
            "b_v_disc": 0.55, "b_v_bulge": 1.0,
            "flux": {f: fd + fb for f, (fd, fb) in gflux.items()},
            "flux_disc": {f: v[0] for f, v in gflux.items()},
            "flux_bulge": {f: v[1] for f, v in gflux.items()}}
    return _Target(name, slug, ra0, dec0, ref, x, y, flux, table, gal, info)


# a colour camera's pixels: colour -> the band they see
_BAYER_BANDS = {"R": "R", "G": "V", "B": "B"}


def _bands_rendered(plan: NightPlan, cam: CameraModel) -> list[str]:
    """The bands a light is rendered in: the plan's filters, or a colour camera's three
    (whatever filter is in its wheel)."""
    return list(_BAYER_BANDS.values()) if cam.bayer else list(plan.filters)


def _bayer_sites(pattern: str, n: int) -> dict[str, np.ndarray]:
    """colour -> bool mask of its pixels on an ``n x n`` mosaic."""
    out = {c: np.zeros((n, n), bool) for c in "RGB"}
    for k, colour in enumerate(pattern.upper()):
        out[colour][k // 2::2, k % 2::2] = True
    return out


def _galaxy_norm(g: _Galaxy) -> tuple[float, float]:
    """Integrals of the unit disc and bulge shapes (4x4 sub-pixel sampling)."""
    e = int(math.ceil(g.extent))
    o = (np.arange(-e, e + 1, dtype=np.float32)[:, None]
         + (np.arange(4, dtype=np.float32)[None, :] + 0.5) / 4 - 0.5).ravel()
    sd = sb = 0.0
    for k in range(0, o.size, 256):
        dy = o[k:k + 256, None]
        d, b = g.shapes(np.broadcast_to(o[None, :], (dy.size, o.size)),
                        np.broadcast_to(dy, (dy.size, o.size)))
        sd += float(d.sum(dtype=np.float64))
        sb += float(b.sum(dtype=np.float64))
    return sd / 16.0, sb / 16.0


# --------------------------------------------------------------------------------------
# Rendering kernels
# --------------------------------------------------------------------------------------


def _moffat_alpha(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _moffat_radius(fwhm: float, beta: float, missing: float) -> int:
    """Radius holding all but ``missing`` of a Moffat's flux."""
    a = _moffat_alpha(fwhm, beta)
    return int(math.ceil(a * math.sqrt(missing ** (-1.0 / (beta - 1.0)) - 1.0)))


def _add_moffat(img: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                fwhm: float, beta: float = _BETA, *, electrons: np.ndarray | None = None,
                missing: float | None = None) -> None:
    """Add Moffat stars of total ``flux`` centred at ``(x, y)`` into ``img`` in place.

    Each postage stamp holds all but 0.5 % (faint), 0.05 % or 0.01 % (bright) of a Moffat
    profile, sampled with 2x2 Gauss-Legendre points per pixel, and is renormalised so that
    it sums exactly to the star's flux (pixels off the frame are lost, as on a detector).
    ``electrons`` (default ``flux``) chooses the stamp size; ``missing`` forces one size.
    """
    if x.size == 0:
        return
    ny, nx = img.shape
    flat_img = img.reshape(-1)
    a2 = np.float32(_moffat_alpha(fwhm, beta) ** 2)
    e = flux if electrons is None else electrons
    if missing is not None:
        radii = np.full(x.shape, _moffat_radius(fwhm, beta, missing))
    else:
        radii = np.where(e < 2e4, _moffat_radius(fwhm, beta, 5e-3),
                         np.where(e < 1e6, _moffat_radius(fwhm, beta, 5e-4),
                                  _moffat_radius(fwhm, beta, 1e-4)))
    for rad in np.unique(radii):
        rad = int(rad)
        sel = np.nonzero((radii == rad) & (x > -rad - 1) & (x < nx + rad) & (y > -rad - 1)
                         & (y < ny + rad))[0]
        if sel.size == 0:
            continue
        size = 2 * rad + 1
        o = np.arange(-rad, rad + 1)
        of = o.astype(np.float32)
        per = max(1, 100_000 // (size * size))  # cache-sized chunks
        for k in range(0, sel.size, per):
            s = sel[k:k + per]
            ix = np.rint(x[s]).astype(np.int64)
            iy = np.rint(y[s]).astype(np.int64)
            fx = (x[s] - ix).astype(np.float32)
            fy = (y[s] - iy).astype(np.float32)
            prof = np.zeros((s.size, size, size), dtype=np.float32)
            for gx in (-_GL, _GL):
                ax = (of[None, :] - fx[:, None] + np.float32(gx)) ** 2 / a2
                for gy in (-_GL, _GL):
                    ay = (of[None, :] - fy[:, None] + np.float32(gy)) ** 2 / a2
                    q = 1.0 / (1.0 + ay[:, :, None] + ax[:, None, :])
                    if beta == 3.0:
                        prof += q * q * q
                    else:
                        prof += q ** np.float32(beta)
            norm = (flux[s] / prof.sum(axis=(1, 2), dtype=np.float64)).astype(np.float32)
            prof *= norm[:, None, None]
            rows = iy[:, None] + o[None, :]
            cols = ix[:, None] + o[None, :]
            ok = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
            idx = rows[:, :, None] * nx + cols[:, None, :]
            np.add.at(flat_img, idx[ok], prof[ok])


def _moffat_kernel(fwhm: float, beta: float = _BETA) -> np.ndarray:
    rad = _moffat_radius(fwhm, beta, 5e-4)
    k = np.zeros((2 * rad + 1, 2 * rad + 1), dtype=np.float32)
    _add_moffat(k, np.array([float(rad)]), np.array([float(rad)]), np.array([1.0]), fwhm, beta,
                missing=5e-4)
    return k


def _add_galaxy(img: np.ndarray, g: _Galaxy, band: str, tr: Transform, fwhm: float,
                scale: float) -> None:
    """Add the galaxy (rate x ``scale``), seen through ``tr`` and convolved with the PSF."""
    n = img.shape[0]
    kern = _moffat_kernel(fwhm)
    kr = kern.shape[0] // 2
    xc, yc = (float(v) for v in tr.inverse(g.x, g.y))
    e = int(math.ceil(g.extent)) + kr
    x0, y0 = int(math.floor(xc)) - e, int(math.floor(yc)) - e
    x1, y1 = x0 + 2 * e + 2, y0 + 2 * e + 2
    if x1 <= 0 or y1 <= 0 or x0 >= n or y0 >= n:
        return
    xs = np.arange(x0, x1, dtype=np.float64)
    ys = np.arange(y0, y1, dtype=np.float64)
    (a, b, tx), (c, d, ty) = tr.matrix
    acc = np.zeros((ys.size, xs.size), dtype=np.float32)
    for ox in (-_GL, _GL):
        for oy in (-_GL, _GL):
            xx = xs[None, :] + ox
            yy = ys[:, None] + oy
            dx = (a * xx + b * yy + tx - g.x).astype(np.float32)
            dy = (c * xx + d * yy + ty - g.y).astype(np.float32)
            acc += g.rate(band, dx, dy)
    acc *= np.float32(scale / 4.0)
    conv = fftconvolve(acc, kern, mode="same").astype(np.float32)
    np.maximum(conv, 0.0, out=conv)
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(n, x1), min(n, y1)
    img[cy0:cy1, cx0:cx1] += conv[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def _trail_kernel(length: float, angle_deg: float) -> np.ndarray:
    """A normalised line of ``length`` px, centred, for a trailed (tracking-lost) frame."""
    half = int(math.ceil(length / 2)) + 2
    k = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float64)
    t = np.linspace(-length / 2, length / 2, 401)
    a = math.radians(angle_deg)
    px = half + t * math.cos(a)
    py = half + t * math.sin(a)
    ix, iy = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - ix, py - iy
    for ddx, ddy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                          (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (iy + ddy, ix + ddx), wgt)
    return (k / k.sum()).astype(np.float32)


def _add_satellite(img: np.ndarray, sat: dict[str, float]) -> None:
    n = img.shape[0]
    x0, y0, x1, y1 = sat["x0"], sat["y0"], sat["x1"], sat["y1"]
    ln = math.hypot(x1 - x0, y1 - y0)
    ux, uy = (x1 - x0) / ln, (y1 - y0) / ln
    sig = sat["sigma_px"]
    xs = np.arange(n, dtype=np.float32)
    dist = xs[None, :] * np.float32(uy) - xs[:, None] * np.float32(ux)
    dist -= np.float32(x0 * uy - y0 * ux)
    dist /= np.float32(sig)
    np.square(dist, out=dist)
    dist *= np.float32(-0.5)
    np.exp(dist, out=dist)
    dist *= np.float32(sat["peak_e"])
    img += dist


def _noisy_electrons(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson draw (Gaussian approximation above ``_GAUSS_ABOVE`` e-), float32.

    Works in blocks of rows (cache-sized: twice as fast as one big draw at 4096 px).
    """
    out = np.empty_like(lam)
    rows = max(1, (1 << 19) // lam.shape[1])
    for r0 in range(0, lam.shape[0], rows):
        lb, ob = lam[r0:r0 + rows], out[r0:r0 + rows]
        big = lb >= _GAUSS_ABOVE
        nb = int(np.count_nonzero(big))
        if nb == 0:
            ob[...] = rng.poisson(lb)
        elif nb == lb.size:
            ob[...] = rng.standard_normal(lb.shape, dtype=np.float32)
            ob *= np.sqrt(lb)
            ob += lb
        else:
            small = ~big
            ob[small] = rng.poisson(lb[small])
            lg = lb[big]
            ob[big] = lg + np.sqrt(lg) * rng.standard_normal(nb, dtype=np.float32)
    return out


def _cosmic_rays(rng: np.random.Generator, n: int, exptime: float,
                 rate: float) -> list[list[float]]:
    """Cosmic-ray hits: short sharp tracks of 1-7 px, 500-10000 e- per pixel."""
    count = max(1, int(rng.poisson(rate * n * n / 1e6 * exptime)))
    hits: dict[tuple[int, int], float] = {}
    for _ in range(count):
        x, y = rng.uniform(0, n, 2)
        length = int(rng.choice([1, 1, 2, 2, 3, 4, 5, 7]))
        a = rng.uniform(0, math.pi)
        for j in range(length):
            px, py = int(x + j * math.cos(a)), int(y + j * math.sin(a))
            if 0 <= px < n and 0 <= py < n:
                e = float(np.clip(rng.lognormal(math.log(2000.0), 0.6), 500, 10000))
                hits[(px, py)] = hits.get((px, py), 0.0) + round(e, 1)
    return [[px, py, e] for (px, py), e in sorted(hits.items())]


# --------------------------------------------------------------------------------------
# Planning: every file, its time, its truth, its header
# --------------------------------------------------------------------------------------


@dataclass
class _Frame:
    kind: str  # bias, dark, flat, darkflat, light; junk: empty, text, log
    path: str
    key: tuple[int, ...]
    start: datetime | None = None  # UTC
    exptime: float = 0.0
    filter: str | None = None
    target: str | None = None
    ccd_temp: float | None = None
    dark_scale: float = 1.0
    transform: Transform | None = None
    fwhm: float | None = None
    sky_rate: float | None = None
    sky_gradient: tuple[float, float] | None = None
    transparency: float | None = None
    defects: list[str] = field(default_factory=list)
    trail: dict[str, float] | None = None
    satellite: dict[str, float] | None = None
    wcs_mode: str | None = None
    wcs_error: dict[str, Any] | None = None
    pier_side: str | None = None
    flat_level: float | None = None
    flat_stars: list[list[float]] = field(default_factory=list)
    cosmic_rays: list[list[float]] = field(default_factory=list)
    expected: str = "ok"
    junk: str | None = None  # None, "tmp", "truncated", "empty", "text", "log"
    written_as: str | None = None
    appear: float = 0.0  # epoch seconds: when the file shows up in the folder
    header: fits.Header | None = None

    @property
    def type(self) -> str:
        return self.kind if self.kind in ("bias", "dark", "flat", "darkflat", "light") \
            else "unknown"


def _local(night: date, hh: int, mm: int, tz: ZoneInfo) -> datetime:
    day = night if hh >= 12 else night + timedelta(days=1)
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=tz)


def _epoch(t: datetime) -> float:
    return t.timestamp()


def _utc(ts: float, dialect: str) -> datetime:
    ts = round(ts) if dialect == "maxim" else round(ts, 3)
    return datetime.fromtimestamp(ts, tz=UTC)


def _smooth(t_hours: float, phases: np.ndarray, periods: Sequence[float]) -> float:
    return float(sum(math.sin(2 * math.pi * t_hours / p + ph) for p, ph in zip(periods, phases,
                                                                                strict=False)))


def _validate(plan: NightPlan, cam: CameraModel) -> None:
    problems = []
    if plan.dialect not in ("maxim", "nina"):
        problems.append(f"dialect must be 'maxim' or 'nina', not {plan.dialect!r}")
    if plan.wcs not in ("exact", "perturbed", "absent", "mixed"):
        problems.append(f"wcs must be exact, perturbed, absent or mixed, not {plan.wcs!r}")
    if cam.size < 64:
        problems.append(f"size must be at least 64 px, not {cam.size}")
    for name in ("n_bias", "n_dark", "n_flat", "n_darkflat", "n_light"):
        if getattr(plan, name) < 0:
            problems.append(f"{name} must be >= 0")
    if plan.light_exptime <= 0 or any(t <= 0 for t in plan.dark_exptimes):
        problems.append("exposure times must be > 0")
    if len(set(plan.filters)) != len(plan.filters) or len(set(plan.targets)) != len(plan.targets):
        problems.append("filters and targets must be unique")
    if len({slugify(t) for t in plan.targets}) != len(plan.targets):
        problems.append("two targets share a slug")
    if cam.bayer is not None and (len(cam.bayer) != 4 or sorted(cam.bayer.upper()) != list("BGGR")
                                  or cam.bayer.upper()[0] == cam.bayer.upper()[3]):
        problems.append(f"bayer must be RGGB, BGGR, GRBG or GBRG, not {cam.bayer!r}")
    if cam.gain <= 0 or cam.read_noise < 0:
        problems.append("gain must be > 0 and read_noise >= 0")
    try:
        date.fromisoformat(plan.night)
        ZoneInfo(plan.timezone)
    except (ValueError, KeyError) as exc:
        problems.append(f"bad night or timezone: {exc}")
    if problems:
        raise ValueError("; ".join(problems))


def _plan(plan: NightPlan, cam: CameraModel, targets: dict[str, _Target],
          maps: _CameraMaps, junk: bool) -> list[_Frame]:
    tz = ZoneInfo(plan.timezone)
    night = date.fromisoformat(plan.night)
    n = cam.size
    seed = plan.seed
    frames: list[_Frame] = []
    readout = 2.0 + 2.0 * (n / 1024) ** 2  # s between the end of one exposure and the next

    def temp(*key: int) -> float:
        return round(cam.set_temp + float(_rng(seed, 30, *key).normal(0.0, 0.04)), 2)

    # biases and darks, from 17:30
    t = _epoch(_local(night, 17, 30, tz))
    for k in range(plan.n_bias):
        frames.append(_Frame("bias", "", (1, k), start=_utc(t, plan.dialect),
                             ccd_temp=temp(1, k)))
        t += readout + 1.0
    t += 60.0
    warm = None
    if plan.defects and plan.warm_dark and plan.n_dark >= 3 and plan.dark_exptimes:
        warm = (max(range(len(plan.dark_exptimes)), key=lambda i: plan.dark_exptimes[i]),
                plan.n_dark // 2)
    for ti, et in enumerate(plan.dark_exptimes):
        for k in range(plan.n_dark):
            fr = _Frame("dark", "", (2, ti, k), start=_utc(t, plan.dialect), exptime=float(et),
                        ccd_temp=temp(2, ti, k))
            if warm == (ti, k):
                fr.ccd_temp = round(fr.ccd_temp + 2.0, 2)
                fr.dark_scale = 2.0 ** (2.0 / _DARK_DOUBLING)
                fr.defects.append("ccd temperature")
                fr.expected = "rejected: ccd temperature"
            frames.append(fr)
            t += et + readout
    # dusk flats (and dark flats), from 18:20
    t = max(t + 120.0, _epoch(_local(night, 18, 20, tz)))

    def flats(t: float, dawn: bool) -> float:
        order = list(enumerate(plan.filters))
        for fi, f in (order[::-1] if dawn else order):
            et = _band(f).flat_exptime
            rf = _rng(seed, 31, fi, int(dawn))
            for k in range(plan.n_flat):
                frac = k / max(1, plan.n_flat - 1)
                level = (21000.0 + 8000.0 * frac) if dawn else (29000.0 - 8000.0 * frac)
                level += float(rf.normal(0.0, 300.0))
                key = (3, fi, k + (plan.n_flat if dawn else 0))
                fr = _Frame("flat", "", key, start=_utc(t, plan.dialect), exptime=et, filter=f,
                            ccd_temp=temp(*key))
                fr.flat_level = level
                fr.sky_rate = (level - cam.bias_level) * cam.gain / et
                fr.fwhm = float(rf.uniform(3.0, 5.0))
                for _ in range(int(rf.integers(3, 9))):
                    peak = fr.sky_rate * et * float(rf.uniform(0.005, 0.03))
                    a = _moffat_alpha(fr.fwhm, _BETA)
                    fr.flat_stars.append([float(rf.uniform(0, n - 1)), float(rf.uniform(0, n - 1)),
                                          peak * math.pi * a * a / (_BETA - 1)])
                frames.append(fr)
                t += et + readout + 6.0
            t += 45.0
        return t

    t = flats(t, dawn=False)
    flat_times = sorted({_band(f).flat_exptime for f in plan.filters})
    for ti, et in enumerate(flat_times):
        for k in range(plan.n_darkflat if plan.filters else 0):
            frames.append(_Frame("darkflat", "", (4, ti, k), start=_utc(t, plan.dialect),
                                 exptime=et, ccd_temp=temp(4, ti, k)))
            t += et + readout
    # lights, 19:30 to 05:00
    l_start = max(t + 300.0, _epoch(_local(night, 19, 30, tz)))
    l_end = _epoch(_local(night, 5, 0, tz))
    r_n = _rng(seed, 32)
    see_ph = r_n.uniform(0, 2 * math.pi, 2)
    tr_ph = r_n.uniform(0, 2 * math.pi)
    grad_dir = r_n.uniform(0, 2 * math.pi)
    moonrise = _epoch(_local(night, 2, 0, tz))
    nf = len(plan.filters)
    n_seq = plan.n_light * nf
    window = (l_end - l_start) / max(1, len(plan.targets))
    lights_by_target: dict[str, list[_Frame]] = {}
    t_next = l_start
    for ti, name in enumerate(plan.targets):
        if n_seq == 0:
            break
        rng = _rng(seed, 33, ti)
        cadence = max(window / n_seq, plan.light_exptime + readout + 8.0)
        t0 = max(l_start + ti * window, t_next)
        speed = rng.uniform(0.5, 2.0) / 60.0
        ang = rng.uniform(0, 2 * math.pi)
        vel = np.array([math.cos(ang), math.sin(ang)]) * speed
        omega = rng.uniform(0.02, 0.06) * rng.choice([-1.0, 1.0]) / 3600.0  # deg/s
        flip_at = (n_seq + 1) // 2 if (plan.meridian_flip and ti == 0 and n_seq >= 2) else None
        cand = [j for j in range(1, n_seq) if j != flip_at]
        picks = [int(j) for j in rng.permutation(cand)] if plan.defects else []
        cloudy, trailed, defocused = (picks + [None, None, None])[:3]
        sat_at = picks[3] if (ti == 0 and len(picks) > 3) else None
        extra = 1 if (junk and ti == len(plan.targets) - 1) else 0
        centre_off = np.zeros(2)
        t_centre = None
        frames_t: list[_Frame] = []
        for j in range(n_seq + extra):
            fi = j % nf
            f = plan.filters[fi]
            tj = t0 + j * cadence + float(rng.uniform(0, 3.0))
            if j == 0:
                t_centre = tj
            flipped = flip_at is not None and j >= flip_at
            if flipped and j == flip_at:
                a = rng.uniform(0, 2 * math.pi)
                centre_off = rng.uniform(8.0, 25.0) * np.array([math.cos(a), math.sin(a)])
                t_centre = tj
            d = centre_off + vel * (tj - t_centre)
            if np.hypot(*d) > max(0.05 * n, 26.0):  # the scheduler re-centres the target
                centre_off = rng.normal(0.0, 1.5, 2)
                t_centre = tj
                d = centre_off.copy()
            if j > 0 and plan.dither > 0:
                a, rr = rng.uniform(0, 2 * math.pi), plan.dither * math.sqrt(rng.random())
                d = d + rr * np.array([math.cos(a), math.sin(a)])
            rot = omega * (tj - t0) + (180.0 if flipped else 0.0)
            tr = (Transform.build(n, 0.0, 0.0, 0.0, False) if j == 0 else
                  Transform.build(n, float(d[0]), float(d[1]), rot, flipped))
            th = (tj - l_start) / 3600.0
            b = _band(f)
            fwhm = 3.1 + 0.35 * _smooth(th, see_ph[:1], (3.3,)) + 0.15 * _smooth(
                th, see_ph[1:], (0.8,))
            fwhm = float(np.clip(fwhm * b.seeing, 2.5, 4.0))
            sky0 = 10 ** (-0.4 * (b.sky - b.zp)) * cam.pixel_scale ** 2
            moon = 0.0 if tj < moonrise else min(1.0, (tj - moonrise) / 5400.0)
            sky = sky0 * (1.0 + b.twilight * math.exp(-(tj - l_start) / 1500.0) + b.moon * moon)
            g = 0.01 + 0.02 * moon
            fr = _Frame("light", "", (5, ti, j), start=_utc(tj, plan.dialect),
                        exptime=float(plan.light_exptime), filter=f, target=name,
                        ccd_temp=temp(5, ti, j), transform=tr, fwhm=fwhm,
                        sky_gradient=(g * math.cos(grad_dir), g * math.sin(grad_dir)),
                        transparency=0.985 + 0.015 * math.sin(2 * math.pi * th / 2.7 + tr_ph),
                        pier_side="EAST" if flipped or flip_at is None else "WEST")
            if j == cloudy:
                fr.transparency = float(rng.uniform(0.2, 0.3))
                sky *= 1.3
                fr.defects.append("cloudy")
                fr.expected = "rejected: cloudy"
            if j == trailed:
                fr.trail = {"length_px": float(rng.uniform(10.0, 15.0)),
                            "angle_deg": float(rng.uniform(0.0, 180.0))}
                fr.defects.append("trailed")
                fr.expected = "rejected: trailed"
            if j == defocused:
                fr.fwhm = fwhm * 3.2
                fr.defects.append("defocused")
                fr.expected = "rejected: defocused"
            if j == sat_at:
                fr.satellite = _satellite(rng, n, fwhm)
                fr.defects.append("satellite")
            if j == n_seq:
                fr.junk = "truncated"
                fr.expected = "rejected: truncated"
            fr.sky_rate = float(sky)
            frames_t.append(fr)
        t_next = t0 + n_seq * cadence
        lights_by_target[name] = frames_t
        frames.extend(frames_t)
    # WCS in the headers
    lights = [f for f in frames if f.kind == "light" and f.junk is None]
    for f in frames:
        if f.junk == "truncated":
            f.wcs_mode = "exact"
    rw = _rng(seed, 34)
    if plan.wcs == "mixed":
        modes = ["exact", "perturbed", "absent"][:len(lights)]
        modes += [str(m) for m in rw.choice(["exact", "exact", "perturbed", "absent"],
                                            max(0, len(lights) - 3))]
        modes = [modes[i] for i in rw.permutation(len(modes))]
    else:
        modes = [plan.wcs] * len(lights)
    for fr, mode in zip(lights, modes, strict=True):
        fr.wcs_mode = mode
        if mode == "perturbed":
            variant = int(rw.integers(0, 3))
            a = rw.uniform(0, 2 * math.pi)
            shift = rw.uniform(3.0, 20.0) * np.array([math.cos(a), math.sin(a)]) \
                if variant != 1 else np.zeros(2)
            rot = rw.uniform(0.3, 1.0) * rw.choice([-1.0, 1.0]) if variant != 0 else 0.0
            fr.wcs_error = {"crpix_shift": [float(shift[0]), float(shift[1])],
                            "rotation_deg": float(rot)}
    # dawn flats
    if plan.dawn_flats and plan.filters:
        last = max((f.start.timestamp() + f.exptime for f in frames if f.junk is None),
                   default=0.0)
        flats(max(last + 600.0, _epoch(_local(night, 6, 0, tz))), dawn=True)
    # cosmic rays
    if plan.defects:
        for fr in frames:
            if fr.kind in ("light", "dark"):
                fr.cosmic_rays = _cosmic_rays(_rng(seed, 40, *fr.key), n, fr.exptime,
                                              cam.cosmic_rate)
    # appearance: end of exposure plus download
    for fr in frames:
        fr.appear = fr.start.timestamp() + fr.exptime + readout * 0.5
    frames.sort(key=lambda f: (f.appear, f.key))
    _name_files(frames, plan)
    if junk:
        frames = _add_junk(frames, plan, lights_by_target)
    return frames


def _satellite(rng: np.random.Generator, n: int, fwhm: float) -> dict[str, float]:
    c = (n - 1) / 2
    px, py = c + rng.uniform(-0.3, 0.3, 2) * n
    a = rng.uniform(0, math.pi)
    ux, uy = math.cos(a), math.sin(a)
    ts = []
    for p, u in ((px, ux), (py, uy)):
        if abs(u) > 1e-9:
            ts += [(-0.5 - p) / u, (n - 0.5 - p) / u]
    lo = max(min(ts[0], ts[1]), min(ts[2:] or [-np.inf]))
    hi = min(max(ts[0], ts[1]), max(ts[2:] or [np.inf]))
    t0, t1 = lo, hi  # the part of the line inside the frame
    return {"x0": px + t0 * ux, "y0": py + t0 * uy, "x1": px + t1 * ux, "y1": py + t1 * uy,
            "sigma_px": fwhm / 2.3548, "peak_e": float(rng.uniform(1500.0, 4000.0))}


def _name_files(frames: list[_Frame], plan: NightPlan) -> None:
    tz = ZoneInfo(plan.timezone)
    night = plan.night
    counters: dict[tuple[Any, ...], int] = {}
    for fr in frames:
        if fr.path:
            continue
        loc = fr.start.astimezone(tz)
        stamp = loc.strftime("%Y-%m-%d_%H-%M-%S")
        if fr.kind == "light":
            k = fr.key[2] // max(1, len(plan.filters)) + 1
        else:
            ck = (fr.kind, fr.filter, fr.exptime)
            counters[ck] = counters.get(ck, 0) + 1
            k = counters[ck]
        if plan.dialect == "maxim":
            base = f"{night}/calibration"
            if fr.kind == "bias":
                fr.path = f"{base}/Bias-{k:03d}.fit"
            elif fr.kind == "dark":
                fr.path = f"{base}/Dark-{fr.exptime:g}s-{k:03d}.fit"
            elif fr.kind == "darkflat":
                fr.path = f"{base}/DarkFlat-{fr.exptime:g}s-{k:03d}.fit"
            elif fr.kind == "flat":
                fr.path = f"{base}/Flat-{fr.filter}-{k:03d}.fit"
            else:
                d = fr.target.replace(" ", "")
                fr.path = f"{night}/{d}/{d}-{k:03d}{fr.filter}.fit"
        else:
            if fr.kind == "light":
                fr.path = (f"{night}/{fr.target}/LIGHT/{fr.target}_{stamp}_{fr.filter}_"
                           f"{fr.exptime:.2f}s_{k:04d}.fits")
            elif fr.kind == "flat":
                fr.path = f"{night}/FLAT/{stamp}_{fr.filter}_{fr.exptime:.2f}s_{k:04d}.fits"
            else:
                fr.path = f"{night}/{fr.kind.upper()}/{stamp}_{fr.exptime:.2f}s_{k:04d}.fits"


def _add_junk(frames: list[_Frame], plan: NightPlan,
              lights: dict[str, list[_Frame]]) -> list[_Frame]:
    """Camera-PC junk: a light written under a temporary name and renamed, a zero-byte
    file, a text file named like FITS, a truncated light, an observing log."""
    if not lights:
        return frames
    night = plan.night
    first = plan.targets[0]
    seq = lights[first]
    d = first.replace(" ", "") if plan.dialect == "maxim" else f"{first}/LIGHT"
    normal = [f for f in seq if f.expected == "ok" and f.key[2] > 0 and f.junk is None]
    if normal:
        tmp = normal[len(normal) // 2]
        tmp.junk = "tmp"
        tmp.written_as = tmp.path + (".tmp" if plan.dialect == "maxim" else ".part")
    mid = seq[len(seq) // 2].appear
    # a zero-byte file named like the next frame (a save that died)
    f0, k = plan.filters[0], plan.n_light + 2
    if plan.dialect == "maxim":
        empty_name = f"{first.replace(' ', '')}-{k:03d}{f0}.fit"
    else:
        stamp = datetime.fromtimestamp(mid + 17.0, tz=ZoneInfo(plan.timezone))
        empty_name = (f"{first}_{stamp:%Y-%m-%d_%H-%M-%S}_{f0}_{plan.light_exptime:.2f}s_"
                      f"{len(seq) + 1:04d}.fits")
    empty = _Frame("empty", f"{night}/{d}/{empty_name}", (9, 1), appear=mid + 17.0,
                   expected="rejected: empty", junk="empty")
    text_name = "FocusMax_log.fit" if plan.dialect == "maxim" else "AutoFocus_log.fits"
    text = _Frame("text", f"{night}/{d}/{text_name}", (9, 2), appear=mid + 41.0,
                  expected="rejected: not FITS", junk="text")
    log_name = f"ACP-{night}.log" if plan.dialect == "maxim" else f"NINA-{night}.log"
    log = _Frame("log", f"{night}/{log_name}", (9, 3), appear=seq[0].appear - 600.0,
                 expected="ignored: not a FITS file name", junk="log")
    out = frames + [empty, text, log]
    out.sort(key=lambda f: (f.appear, f.key))
    return out


# --------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------


def _sexa(value: float, decimals: int, signed: bool) -> str:
    sign = "-" if value < 0 else "+"
    v = abs(value)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60) * 3600
    s = round(s, decimals)
    if s >= 60:
        s -= 60
        m += 1
    if m >= 60:
        m -= 60
        d += 1
    sec = f"{s:0{3 + decimals if decimals else 2}.{decimals}f}"
    return f"{sign if signed else ''}{d:02d} {m:02d} {sec}"


_IMAGETYP = {
    "maxim": {"bias": "Bias Frame", "dark": "Dark Frame", "darkflat": "Dark Frame",
              "flat": "Flat Field", "light": "Light Frame"},
    "nina": {"bias": "BIAS", "dark": "DARK", "darkflat": "DARKFLAT", "flat": "FLAT",
             "light": "LIGHT"},
}


def _frame_wcs(fr: _Frame, tgt: _Target, cam: CameraModel) -> tuple[dict[str, Any], tuple]:
    """True WCS of a light (and the pointing of its centre)."""
    ref = tgt.ref_wcs
    tr = fr.transform
    cd_ref = np.array([[ref["CD1_1"], ref["CD1_2"]], [ref["CD2_1"], ref["CD2_2"]]])
    rm = tr.array[:, :2]
    p0 = tr.inverse(ref["CRPIX1"] - 1.0, ref["CRPIX2"] - 1.0)
    true = _wcs_dict((ref["CRVAL1"], ref["CRVAL2"]), (float(p0[0]) + 1, float(p0[1]) + 1),
                     cd_ref @ rm)
    return true, p0


def _header(fr: _Frame, plan: NightPlan, cam: CameraModel,
            targets: dict[str, _Target]) -> fits.Header:
    tz = ZoneInfo(plan.timezone)
    maxim = plan.dialect == "maxim"
    h = fits.Header()
    it = _IMAGETYP[plan.dialect][fr.kind]
    start = fr.start
    iso_utc = start.strftime("%Y-%m-%dT%H:%M:%S") if maxim else \
        start.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0"
    iso_loc = start.astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0"
    tgt = targets.get(fr.target) if fr.target else None
    ptg = None
    true_wcs = None
    if tgt is not None:
        true_wcs, _ = _frame_wcs(fr, tgt, cam)
        w = WCS(fits.Header(list(true_wcs.items())))
        c = (cam.size - 1) / 2
        ra, dec = (float(v) for v in w.wcs_pix2world(c, c, 0))
        r = _rng(plan.seed, 50, *fr.key)
        err = (r.normal(0.0, 20.0, 2) + np.array([25.0, -15.0])) / 3600.0
        ptg = (ra + err[0] / math.cos(math.radians(dec)), dec + err[1])
    if maxim:
        if tgt is not None:
            h["OBJECT"] = (fr.target, "Target object name")
        h["TELESCOP"] = (cam.telescope, "telescope used to acquire this image")
        h["INSTRUME"] = (cam.instrument, "instrument or camera used")
        h["OBSERVER"] = (plan.observer, "observer")
        h["DATE-OBS"] = (iso_utc, "[ISO 8601] UTC date/time of exposure start")
        h["EXPTIME"] = (fr.exptime, "[sec] Duration of exposure")
        h["EXPOSURE"] = (fr.exptime, "[sec] Duration of exposure")
        h["SET-TEMP"] = (cam.set_temp, "CCD temperature setpoint in C")
        h["CCD-TEMP"] = (fr.ccd_temp, "CCD temperature at start of exposure in C")
        h["XPIXSZ"] = (cam.pixel_size * cam.binning, "Pixel Width in microns (after binning)")
        h["YPIXSZ"] = (cam.pixel_size * cam.binning, "Pixel Height in microns (after binning)")
        h["XBINNING"] = (cam.binning, "Binning factor in width")
        h["YBINNING"] = (cam.binning, "Binning factor in height")
        h["XORGSUBF"] = (0, "Subframe X position in binned pixels")
        h["YORGSUBF"] = (0, "Subframe Y position in binned pixels")
        if fr.kind in ("flat", "light"):
            h["FILTER"] = (fr.filter, "Filter used when taking image")
        h["IMAGETYP"] = (it, "Type of image")
        h["FOCALLEN"] = (round(cam.focal_length, 1), "[mm] Focal length")
        h["APTDIA"] = (cam.aperture, "[mm] Aperture diameter")
        h["EGAIN"] = (cam.gain, "Electronic gain in e-/ADU")
        h["SITELAT"] = (_sexa(plan.latitude, 0, True), "Latitude of the imaging location")
        h["SITELONG"] = (_sexa(plan.longitude, 0, True), "Longitude of the imaging location")
        if ptg is not None:
            h["RA"] = (round(ptg[0], 6), "[deg] Telescope RA (J2000)")
            h["DEC"] = (round(ptg[1], 6), "[deg] Telescope Dec (J2000)")
            h["OBJCTRA"] = (_sexa(ptg[0] / 15.0, 2, False), "[hms J2000] Target right ascension")
            h["OBJCTDEC"] = (_sexa(ptg[1], 1, True), "[dms J2000] Target declination")
            h["PIERSIDE"] = (fr.pier_side, "Side of pier telescope is on")
        h["SWCREATE"] = ("MaxIm DL Version 6.50", "Name of software that created the image")
    else:
        h["IMAGETYP"] = (it, "Type of exposure")
        h["EXPOSURE"] = (fr.exptime, "[s] Exposure duration")
        h["EXPTIME"] = (fr.exptime, "[s] Exposure duration")
        h["DATE-LOC"] = (iso_loc, "Time of observation (local)")
        h["DATE-OBS"] = (iso_utc, "Time of observation (UTC)")
        h["XBINNING"] = (cam.binning, "X axis binning factor")
        h["YBINNING"] = (cam.binning, "Y axis binning factor")
        h["GAIN"] = (cam.gain_setting, "Sensor gain")
        h["OFFSET"] = (cam.offset_setting, "Sensor gain offset")
        h["EGAIN"] = (cam.gain, "[e-/ADU] Electrons per A/D unit")
        h["XPIXSZ"] = (cam.pixel_size * cam.binning, "[um] Pixel X axis size")
        h["YPIXSZ"] = (cam.pixel_size * cam.binning, "[um] Pixel Y axis size")
        h["INSTRUME"] = (cam.instrument, "Imaging instrument name")
        h["SET-TEMP"] = (cam.set_temp, "[degC] CCD temperature setpoint")
        h["CCD-TEMP"] = (round(fr.ccd_temp, 1), "[degC] CCD temperature")
        h["READOUTM"] = (cam.readout_mode, "Sensor readout mode")
        h["TELESCOP"] = (cam.telescope, "Name of telescope")
        h["FOCALLEN"] = (round(cam.focal_length), "[mm] Focal length")
        h["FOCRATIO"] = (round(cam.focal_length / cam.aperture, 2), "Focal ratio")
        if ptg is not None:
            h["RA"] = (ptg[0], "[deg] RA of telescope")
            h["DEC"] = (ptg[1], "[deg] Declination of telescope")
        h["SITEELEV"] = (plan.elevation, "[m] Observation site elevation")
        h["SITELAT"] = (plan.latitude, "[deg] Observation site latitude")
        h["SITELONG"] = (plan.longitude, "[deg] Observation site longitude")
        h["FWHEEL"] = ("FLI CFW", "Filter Wheel name")
        if plan.filters:  # the wheel reports its position on every frame, darks included
            h["FILTER"] = (fr.filter or plan.filters[0], "Active filter name")
        if tgt is not None:
            h["OBJECT"] = (fr.target, "Name of the object of interest")
            h["OBJCTRA"] = (_sexa(tgt.ra / 15.0, 0, False), "[H M S] RA of imaged object")
            h["OBJCTDEC"] = (_sexa(tgt.dec, 0, True), "[D M S] Declination of imaged object")
            h["PIERSIDE"] = (fr.pier_side, "Telescope pointing state")
        h["ROWORDER"] = ("TOP-DOWN", "FITS Image Orientation")
        h["EQUINOX"] = (2000.0, "Equinox of celestial coordinate system")
        h["SWCREATE"] = ("N.I.N.A. 3.1.2.9001 (x64)", "Software that created this file")
    if cam.bayer:
        h["BAYERPAT"] = (cam.bayer.upper(), "Bayer colour pattern")
        h["ROWORDER"] = ("TOP-DOWN", "FITS Image Orientation")
    if true_wcs is not None and fr.wcs_mode in ("exact", "perturbed"):
        w = dict(true_wcs)
        if fr.wcs_mode == "perturbed":
            err = fr.wcs_error
            w["CRPIX1"] += err["crpix_shift"][0]
            w["CRPIX2"] += err["crpix_shift"][1]
            cd = np.array([[w["CD1_1"], w["CD1_2"]], [w["CD2_1"], w["CD2_2"]]])
            cd = cd @ _rot(err["rotation_deg"])
            w.update(CD1_1=float(cd[0, 0]), CD1_2=float(cd[0, 1]), CD2_1=float(cd[1, 0]),
                     CD2_2=float(cd[1, 1]))
        if maxim:
            h["PLTSOLVD"] = (True, "Plate has been solved by PinPoint")
        for k, v in w.items():
            h[k] = v
    return h


# --------------------------------------------------------------------------------------
# Rendering one frame
# --------------------------------------------------------------------------------------


def _render(fr: _Frame, plan: NightPlan, cam: CameraModel, maps: _CameraMaps,
            targets: dict[str, _Target]) -> np.ndarray:
    """The uint16 pixels of one frame."""
    n = cam.size
    rng = _rng(plan.seed, 60, *fr.key)
    t = fr.exptime
    if fr.kind == "bias":
        electrons = np.zeros((n, n), dtype=np.float32)
    else:
        lam = maps.dark * np.float32(fr.dark_scale * t)
        if fr.kind in ("flat", "light"):
            flat = maps.flats[fr.filter]
            scene = np.zeros((n, n), dtype=np.float32)
            if fr.kind == "light":
                tgt = targets[fr.target]
                if cam.bayer:  # each colour's pixels see their own band
                    for colour, sites in _bayer_sites(cam.bayer, n).items():
                        own = _light_scene(fr, tgt, _BAYER_BANDS[colour], n)
                        scene[sites] = own[sites]
                        del own
                else:
                    scene = _light_scene(fr, tgt, fr.filter, n)
                c = (n - 1) / 2
                gx, gy = fr.sky_gradient
                ramp = np.arange(n, dtype=np.float32) - np.float32(c)
                sky = (np.float32(fr.sky_rate * t) * (1 + np.float32(gx / n) * ramp))[None, :] \
                    + (np.float32(fr.sky_rate * t * gy / n) * ramp)[:, None]
                scene += sky
                if fr.satellite is not None:
                    _add_satellite(scene, fr.satellite)
            else:
                scene += np.float32(fr.sky_rate * t)
                if fr.flat_stars:
                    st = np.array(fr.flat_stars)
                    _add_moffat(scene, st[:, 0], st[:, 1], st[:, 2], fr.fwhm)
            scene *= flat
            lam += scene
        electrons = _noisy_electrons(lam, rng)
        if fr.cosmic_rays:
            cr = np.array(fr.cosmic_rays)
            np.add.at(electrons, (cr[:, 1].astype(np.int64), cr[:, 0].astype(np.int64)),
                      cr[:, 2].astype(np.float32))
        np.minimum(electrons, np.float32(cam.full_well), out=electrons)
    noise = rng.standard_normal((n, n), dtype=np.float32)
    noise *= np.float32(cam.read_noise)
    electrons += noise
    electrons *= np.float32(1.0 / cam.gain)
    electrons += maps.bias
    np.rint(electrons, out=electrons)
    np.clip(electrons, 0, cam.saturation, out=electrons)
    return electrons.astype(np.uint16)


def _light_scene(fr: _Frame, tgt: _Target, band: str, n: int) -> np.ndarray:
    """Stars and galaxy of a light in one band, e- (before the flat, without sky)."""
    scene = np.zeros((n, n), dtype=np.float32)
    scale = fr.transparency * fr.exptime
    xs, ys = fr.transform.inverse(tgt.stars_x, tgt.stars_y)
    _add_moffat(scene, xs, ys, tgt.flux[band] * scale, fr.fwhm)
    _add_galaxy(scene, tgt.galaxy, band, fr.transform, fr.fwhm, scale)
    if fr.trail is not None:
        kern = _trail_kernel(fr.trail["length_px"], fr.trail["angle_deg"])
        scene = fftconvolve(scene, kern, mode="same").astype(np.float32)
        np.maximum(scene, 0.0, out=scene)
    return scene


def _fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(data=data, header=header).writeto(buf)
    return buf.getvalue()


def _scene_truth(tgt: _Target, band: str, n: int, fwhm: float, gain: float,
                 exptime: float) -> np.ndarray:
    """Noiseless stars + galaxy on the reference grid, ADU/s, unit flat, transparency 1."""
    img = np.zeros((n, n), dtype=np.float32)
    ident = Transform.build(n, 0.0, 0.0, 0.0, False)
    _add_moffat(img, tgt.stars_x, tgt.stars_y, tgt.flux[band] / gain, fwhm,
                electrons=tgt.flux[band] * exptime)
    _add_galaxy(img, tgt.galaxy, band, ident, fwhm, 1.0 / gain)
    return img


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def simulate_night(
    out: str | Path,
    plan: NightPlan | None = None,
    camera: CameraModel | None = None,
    *,
    live: bool = False,
    speed: float = 60.0,
    junk: bool = False,
    truth_images: bool = True,
    workers: int | None = None,
) -> NightTruth:
    """Write a synthetic night into ``out/camera/`` and its truth into ``out/truth/``.

    Parameters
    ----------
    out
        Output folder; ``out/camera`` (the camera PC's folder, to be watched) and
        ``out/truth`` must not exist yet or be empty.
    plan, camera
        What is observed and with which camera (defaults: ``NightPlan()``,
        ``CameraModel()``).
    live
        Write files in time order as the night unfolds (``speed`` simulated seconds per
        real second), each file in 4 chunks with pauses, so a watcher sees growing files.
        The truth is written first. Otherwise everything is written as fast as possible and
        each file's mtime is set to the simulated moment it appeared.
    speed
        Simulated seconds per real second in live mode.
    junk
        Add camera-PC junk (a light first written under a ``.tmp``/``.part`` name then
        renamed, a zero-byte file, a text file named ``.fit(s)``, a truncated light, an
        observing log), each recorded in the truth with its expected outcome.
    truth_images
        Write ``sky_<slug>_<filter>.fits`` (skip for large benchmark nights).
    workers
        Threads rendering frames in batch mode (default: up to 4, by CPU count).

    Returns
    -------
    NightTruth
    """
    plan = plan if plan is not None else NightPlan()
    cam = camera if camera is not None else CameraModel()
    _validate(plan, cam)
    out = Path(out)
    cam_dir, truth_dir = out / "camera", out / "truth"
    for d in (cam_dir, truth_dir):
        if d.exists() and any(d.iterdir()):
            raise FileExistsError(f"{d} is not empty; simulate into a fresh folder")
        d.mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()
    maps = _camera_maps(cam, tuple(plan.filters))
    r_cam = _rng(cam.camera_seed, 8)
    theta0 = float(r_cam.uniform(-2.0, 2.0))  # the camera's angle on the sky before a flip
    targets = {name: _make_target(name, plan, cam, theta0, i)
               for i, name in enumerate(plan.targets)}
    frames = _plan(plan, cam, targets, maps, junk)
    for fr in frames:
        if fr.kind in ("bias", "dark", "flat", "darkflat", "light"):
            fr.header = _header(fr, plan, cam, targets)

    truth = _truth(out, plan, cam, maps, targets, frames)
    _write_truth(truth, maps, targets, frames, truth_images)
    logger.info("simulate: {} files, {} px, {} dialect -> {}", len(frames), cam.size,
                plan.dialect, cam_dir)
    if live:
        _write_live(frames, cam_dir, plan, cam, maps, targets, speed)
    else:
        nw = workers if workers is not None else min(4, os.cpu_count() or 1)

        def work(fr: _Frame) -> None:
            _write_file(fr, cam_dir, plan, cam, maps, targets)

        if nw > 1:
            with ThreadPoolExecutor(nw) as ex:
                list(ex.map(work, frames))
        else:
            for fr in frames:
                work(fr)
    logger.info("simulate: done in {:.1f} s", time.perf_counter() - t_begin)
    return truth


def _payload(fr: _Frame, plan: NightPlan, cam: CameraModel, maps: _CameraMaps,
             targets: dict[str, _Target]) -> bytes:
    if fr.junk == "empty":
        return b""
    if fr.junk == "text":
        return (b"FocusMax V4 log\r\nAutofocus started\r\nHFD 4.21 at 11520\r\n"
                b"HFD 3.02 at 11680\r\nAutofocus complete, position 11644\r\n")
    if fr.junk == "log":
        return (f"{plan.night} ACP observing log\r\nStarting plan\r\n").encode()
    data = _fits_bytes(_render(fr, plan, cam, maps, targets), fr.header)
    if fr.junk == "truncated":
        return data[: int(0.6 * len(data))]
    return data


def _write_file(fr: _Frame, cam_dir: Path, plan: NightPlan, cam: CameraModel,
                maps: _CameraMaps, targets: dict[str, _Target]) -> None:
    data = _payload(fr, plan, cam, maps, targets)
    final = cam_dir / fr.path
    final.parent.mkdir(parents=True, exist_ok=True)
    first = cam_dir / fr.written_as if fr.written_as else final
    with open(first, "wb") as fh:
        fh.write(data)
    if first != final:
        os.replace(first, final)
    os.utime(final, (fr.appear, fr.appear))


def _write_live(frames: list[_Frame], cam_dir: Path, plan: NightPlan, cam: CameraModel,
                maps: _CameraMaps, targets: dict[str, _Target], speed: float) -> None:
    if speed <= 0:
        raise ValueError("speed must be > 0")
    events: list[tuple[float, int, str, _Frame]] = []
    for i, fr in enumerate(frames):
        events.append((fr.appear, i, "write", fr))
        if fr.written_as:
            events.append((fr.appear + 20.0, i, "rename", fr))
    events.sort(key=lambda e: (e[0], e[1]))
    if not events:
        return
    sim0 = events[0][0] - 1.0
    real0 = time.monotonic()
    for when, _, action, fr in events:
        final = cam_dir / fr.path
        if action == "rename":
            _sleep_until(real0 + (when - sim0) / speed)
            os.replace(cam_dir / fr.written_as, final)
            continue
        data = _payload(fr, plan, cam, maps, targets)
        _sleep_until(real0 + (when - sim0) / speed)
        target = cam_dir / fr.written_as if fr.written_as else final
        target.parent.mkdir(parents=True, exist_ok=True)
        download = 2.0 * (cam.size / 1024) ** 2  # s (simulated) to move the file
        pause = max(download / speed, 0.04) / 4
        step = max(1, -(-len(data) // 4))
        with open(target, "wb") as fh:
            for k in range(0, max(len(data), 1), step):
                fh.write(data[k:k + step])
                fh.flush()
                if k + step < len(data):
                    time.sleep(pause)


def _sleep_until(t: float) -> None:
    dt = t - time.monotonic()
    if dt > 0:
        time.sleep(dt)


# --------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    kw = {}
    for f in fields(cls):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def _truth(out: Path, plan: NightPlan, cam: CameraModel, maps: _CameraMaps,
           targets: dict[str, _Target], frames: list[_Frame]) -> NightTruth:
    files = []
    for fr in frames:
        files.append(FileTruth(
            path=fr.path, type=fr.type, filter=fr.filter if fr.kind in ("flat", "light") else None,
            exptime=fr.exptime if fr.type != "unknown" else None, target=fr.target,
            night=plan.night,
            date_obs=fr.start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] if fr.start else None,
            dialect=plan.dialect,
            imagetyp=_IMAGETYP[plan.dialect].get(fr.kind), expected=fr.expected,
            defects=tuple(fr.defects), wcs=fr.wcs_mode, wcs_error=fr.wcs_error,
            transform=fr.transform, fwhm=fr.fwhm,
            beta=_BETA if fr.kind in ("light", "flat") else None, sky_rate=fr.sky_rate,
            sky_gradient=fr.sky_gradient, transparency=fr.transparency, ccd_temp=fr.ccd_temp,
            dark_scale=fr.dark_scale, flat_level=fr.flat_level, pier_side=fr.pier_side,
            written_as=fr.written_as,
            cosmic_rays=tuple(tuple(c) for c in fr.cosmic_rays),
            extras={k: v for k, v in (("trail", fr.trail), ("satellite", fr.satellite),
                                      ("flat_stars", fr.flat_stars or None)) if v is not None},
        ))
    tts = {}
    for name, tg in targets.items():
        lights = [f for f in frames if f.kind == "light" and f.target == name]
        ref = next((f.path for f in lights if f.key[2] == 0), None)
        clear = [f.fwhm for f in lights if not f.defects and f.junk != "truncated"]
        tts[name] = TargetTruth(
            name=name, slug=tg.slug, ra=tg.ra, dec=tg.dec, reference=ref, ref_wcs=tg.ref_wcs,
            fwhm_ref=float(np.median(clear)) if clear else None, galaxy=tg.galaxy_info,
            meridian_flip=any(f.transform.flipped for f in lights), n_stars=len(tg.table))
    return NightTruth(out, plan, cam, files, tts, maps.info)


def _write_fits(path: Path, data: np.ndarray, cards: Iterable[tuple[str, Any, str]]) -> None:
    h = fits.Header()
    for k, v, c in cards:
        h[k] = (v, c)
    fits.PrimaryHDU(data=data, header=h).writeto(path)


def _write_truth(truth: NightTruth, maps: _CameraMaps, targets: dict[str, _Target],
                 frames: list[_Frame], truth_images: bool) -> None:
    d = truth.truth_dir
    cam = truth.camera
    (d / "truth.json").write_text(json.dumps(truth.to_dict(), indent=1) + "\n")
    _write_fits(d / "bias.fits", maps.bias, [("BUNIT", "adu", "true bias per pixel")])
    _write_fits(d / "dark_rate.fits", (maps.dark / np.float32(cam.gain)).astype(np.float32),
                [("BUNIT", "adu/s", "true dark current at SET-TEMP"),
                 ("SET-TEMP", cam.set_temp, "[degC]")])
    _write_fits(d / "hot_pixels.fits", maps.hot.astype(np.uint8),
                [("COMMENT", "1 = hot pixel (dark current >= 50x median)", "")])
    y0, y1, x0, x1 = maps.info["flat_norm_region"]
    for f, flat in maps.flats.items():
        _write_fits(d / f"flat_{_safe(f)}.fits", flat,
                    [("FILTER", f, "filter"),
                     ("NORMREG", f"[{y0}:{y1}, {x0}:{x1}]", "numpy region with mean 1")])
    for name, tg in targets.items():
        tg.table.write(d / f"stars_{tg.slug}.ecsv", overwrite=True)
        if not truth_images:
            continue
        fwhm = truth.targets[name].fwhm_ref
        if fwhm is None:
            continue
        for f in _bands_rendered(truth.plan, cam):
            img = _scene_truth(tg, f, cam.size, fwhm, cam.gain, truth.plan.light_exptime)
            cards = [("BUNIT", "adu/s", "stars + galaxy, unit flat, transparency 1"),
                     ("OBJECT", name, ""), ("FILTER", f, ""),
                     ("FWHM", fwhm, "[px] Moffat FWHM of the rendering"),
                     ("BETA", _BETA, "Moffat beta"),
                     ("COMMENT", "no sky background; reference grid of the target", "")]
            cards += [(k, v, "") for k, v in tg.ref_wcs.items()]
            _write_fits(d / f"sky_{tg.slug}_{_safe(f)}.fits", img, cards)


def _safe(name: str) -> str:
    s = "".join(ch for ch in name if ch.isalnum() or ch in "+-_")
    return s or slugify(name)

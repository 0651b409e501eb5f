"""Pictures for people: stretches, quick-look PNGs, RGB composites, debayering.

Pure array code: images in, arrays or PNG bytes out. The only file this module writes is
the PNG a caller names, and that write is atomic (:func:`observd.products.atomic_write_bytes`).

Conventions (callers rely on these)
    *Orientation.* Every array here is in FITS order: row 0 is the *bottom* of the
    picture, as DS9 and astropy show it. :func:`to_png` alone flips, so row 0 of the
    array is the bottom row of the PNG. Do not flip before calling it.

    *Values.* Stretched images and composites are float32 in 0..1; a pixel with no data
    (NaN in the input: outside a coadd's footprint) stays NaN, and :func:`to_png` draws it
    black. Input images are any real dtype (float32 coadds, uint16 raw frames).

    *Masks.* ``mask`` is True for pixels to *ignore* (numpy.ma / astropy convention).
    It only keeps pixels out of the statistics; they are still drawn.

Stretches (:func:`fit_stretch`, :func:`auto_stretch`)
    The sky level and its noise come from an iteratively 3-sigma-clipped median and MAD
    of a regular subsample (<= 250 000 pixels, odd steps so a Bayer mosaic is sampled in
    all its colours), NaN-safe. The black point is ``shadows`` (2.8) noise sigmas below
    the sky, so only 0.3 % of pure-noise pixels clip to black: the sky is a dark grey
    with its noise visible, not a black floor. The white point is the brightest pixel
    that has light around it in both directions (its brighter horizontal and its
    brighter vertical neighbour each hold a fifth of its height above the sky): star
    peaks count; hot pixels, hot columns and cosmic-ray streaks do not. Only the peak
    pixel of the brightest star reaches 1.0.

    ``asinh`` (default): ``y = asinh((x - black) / soft) / asinh((white - black) / soft)``.
    The softening ``soft`` is solved so that the sky lands on ``sky_grey`` (0.15): it is
    tied to the noise (``shadows * sigma`` above black) and to the dynamic range, and
    comes out near one noise sigma for a typical coadd, so the curve is linear and steep
    across the noise (a galaxy's faint disc shows) and logarithmic above (star cores
    keep their gradient instead of burning into white discs). ``softening=`` (in units
    of the noise sigma) fixes it instead. ``zscale``: IRAF/DS9 zscale limits
    (:class:`astropy.visualization.ZScaleInterval`), linear. ``linear`` and ``sqrt``:
    black as above, white at the 99.5th percentile.

    :func:`fit_stretch` returns the :class:`Stretch` (its limits, for the dome page's
    stretch control or to apply one stretch to several views); :func:`auto_stretch` fits
    and applies in one call.

RGB composites (:func:`rgb_composite`)
    1. Each filter's sky (clipped median) is subtracted; with ``balance`` set, each
       filter is divided by its sky noise so that filters of very different depth mix on
       an equal footing.
    2. Filters are mixed into red, green, blue by ``mapping``: three names (default R, V,
       B; G and V stand in for each other), a preset name (``"RVB"``, ``"RGB"``,
       ``"SHO"``, ``"HOO"``) or a dict ``filter -> colour`` (a name such as ``"cyan"`` or
       ``(r, g, b)`` weights). Each colour is the weighted mean of its filters.
    3. Balance: ``"stars"`` scales the colours so the median colour of the bright
       unsaturated stars is neutral (aperture photometry with a local-background annulus,
       median of log flux ratios over up to 300 stars with an aperture SNR >= 25 and a
       peak below half-way from the sky to the saturation level); with fewer than 5
       such stars it falls back to ``"sky"`` and warns (:class:`RenderWarning`).
       ``"sky"`` makes the sky noise of the three colours equal. ``None`` keeps the
       fluxes as given (sky subtracted only).
       Pixels saturated in any filter (``saturation``, or else a plateau of at least 9
       pixels within 10 % of a filter's maximum) hold no colour: they and a 1 px margin
       are made neutral (all colours at their largest), so clipped star cores are white,
       not the magenta of unequal gains on equal clipped values.
    4. Lupton et al. (2004) asinh on the intensity ``I = (r + g + b) / 3``, the math of
       :func:`astropy.visualization.make_lupton_rgb`, in float32 and in place: each
       colour times ``f(I) / I``; where a colour exceeds 1 all three are scaled down
       together, so stars too bright for the stretch keep their colour. The
       black point is common to the three colours, ``shadows`` noise sigmas below the
       sky, so the sky is a neutral dark grey; ``stretch`` (in units of the sky noise)
       is solved so the sky sits at ``sky_grey``. Stars brighter than about
       ``95 * stretch`` saturate, in colour.
    Sky gradients (light pollution, moonlight) are not modelled: only a constant sky
    per filter is removed.

One-shot-colour cameras (:func:`debayer`, :func:`bayer_channels`)
    ``pattern`` names the colours of ``cfa[0, 0]``, ``cfa[0, 1]``, ``cfa[1, 0]``,
    ``cfa[1, 1]`` of the array *as stored* (row 0 = the first row in the file; e.g.
    ``"RGGB"``). That is what ``BAYERPAT`` means with ``ROWORDER = 'TOP-DOWN'``
    (N.I.N.A., SharpCap, ZWO; the Seestar frames' green diagonal agrees). For
    MaxIm-style ``XBAYROFF``/``YBAYROFF``, or a cropped sub-frame, shift it with
    :func:`bayer_pattern`; a pattern given for the top-left of a ``BOTTOM-UP`` picture
    of ``ny`` rows is ``bayer_pattern(p, yoffset=(ny - 1) % 2)`` for the array.
    :func:`debayer` is a bilinear demosaic with the kernel of OpenCV's
    ``cv2.cvtColor(..., COLOR_Bayer*2RGB)``. That call only accepts 8- and 16-bit
    integers, so the same kernel runs here as a normalised convolution
    (``cv2.filter2D``) on float32: calibrated values keep their fractions and negative
    noise, NaN pixels (masked) are filled from the neighbours of the same colour, and
    the border is mirrored with the mosaic's parity (edge pixels get all colours too).
    The tests check it against ``cv2.cvtColor`` on 16-bit data, pattern by pattern
    (OpenCV's two-letter codes name the *second* row's pair: RGGB is ``COLOR_BayerBG``;
    its four-letter aliases, ``COLOR_BayerRGGB``, follow the usual naming).
    :func:`bayer_channels` is the superpixel split (half resolution, the two greens
    averaged) for star detection and quick colour previews.

Cost at 4096 x 4096 float32 (a 2-core development machine shared with other jobs;
``tests/test_render.py::test_timings_4096``, marked slow, prints them):
:func:`auto_stretch` 0.1 s; :func:`quicklook` full size 1.2-1.5 s (zlib on a noisy
8-bit image, ~13 MB), with ``max_size=512`` 0.04 s; :func:`rgb_composite` 1.4-2.5 s
and ~0.5 GB beyond its inputs; :func:`to_png` of that RGB 3.4 s and ~38 MB at full size,
0.5 s at ``max_size=1024``; :func:`debayer` 0.3-0.6 s; :func:`bayer_channels` 0.05 s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from observd.products import atomic_write_bytes

__all__ = [
    "PRESET_MAPPINGS",
    "RenderWarning",
    "Stretch",
    "auto_stretch",
    "bayer_channels",
    "bayer_pattern",
    "choose_mapping",
    "debayer",
    "fit_stretch",
    "quicklook",
    "rgb_composite",
    "sky_stats",
    "to_png",
]

F32 = np.float32
MAD_TO_SIGMA = 1.482602218505602

StretchMethod = Literal["asinh", "zscale", "linear", "sqrt"]
Balance = Literal["stars", "sky"] | None
ColourSpec = str | Sequence[float]
MappingSpec = str | Sequence[str] | Mapping[str, ColourSpec]

#: Pixels drawn from an image for its sky statistics.
MAX_SAMPLES = 250_000

#: Named colours for narrowband mappings, as (red, green, blue) weights.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}

#: Named mappings: (red, green, blue) filters, or filter -> colour for narrowband.
PRESET_MAPPINGS: dict[str, tuple[str, str, str] | dict[str, str]] = {
    "RVB": ("R", "V", "B"),
    "RGB": ("R", "G", "B"),
    "SHO": {"SII": "red", "Ha": "green", "OIII": "blue"},  # the "Hubble palette"
    "HOO": {"Ha": "red", "OIII": "cyan"},
}

_GREEN_ALIASES = {"V": "G", "G": "V"}


class RenderWarning(UserWarning):
    """A picture was made, but not quite as asked (e.g. star balance fell back to sky)."""


# ------------------------------------------------------------------------- statistics
def _subsample(image: NDArray, mask: NDArray | None, max_samples: int) -> NDArray:
    """Finite, unmasked values on a regular grid with an odd step (all Bayer colours)."""
    step = max(1, math.ceil(math.sqrt(image.shape[0] * image.shape[1] / max_samples)))
    step |= 1
    sub = np.asarray(image[::step, ::step], dtype=F32)
    keep = np.isfinite(sub)
    if mask is not None:
        keep &= ~np.asarray(mask, dtype=bool)[::step, ::step]
    return sub[keep]


def _clipped_stats(values: NDArray, nsigma: float = 3.0, iters: int = 5) -> tuple[float, float]:
    """Median and MAD-sigma after iterative clipping about the median."""
    a = values.astype(np.float64, copy=False)
    if a.size == 0:
        return math.nan, math.nan
    med = float(np.median(a))
    sig = MAD_TO_SIGMA * float(np.median(np.abs(a - med)))
    for _ in range(iters):
        if not sig > 0:
            break
        sel = a[np.abs(a - med) <= nsigma * sig]
        new_med = float(np.median(sel))
        new_sig = MAD_TO_SIGMA * float(np.median(np.abs(sel - new_med)))
        if abs(new_med - med) <= 1e-4 * sig and abs(new_sig - sig) <= 1e-4 * sig:
            med, sig = new_med, new_sig
            break
        med, sig = new_med, new_sig
    return med, sig


def sky_stats(
    image: ArrayLike, mask: ArrayLike | None = None, *, max_samples: int = MAX_SAMPLES
) -> tuple[float, float]:
    """Sky level and sky noise of an image, robustly.

    Parameters
    ----------
    image
        2-D image; NaN and infinite pixels are ignored.
    mask
        True for pixels to ignore.
    max_samples
        At most about this many pixels are used (a regular grid with an odd step).

    Returns
    -------
    sky, sigma : float
        The 3-sigma-clipped median and the MAD-based standard deviation of the sky
        (NaN when the image holds no finite pixel).
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"sky_stats: expected a 2-D image, got shape {img.shape}")
    m = None if mask is None else np.asarray(mask, dtype=bool)
    return _clipped_stats(_subsample(img, m, max_samples))


def _peak_without_spikes(
    image: NDArray, sky: float, mask: NDArray | None, threshold: float
) -> float:
    """The brightest pixel that has light around it in both directions.

    A pixel counts when its brighter horizontal neighbour *and* its brighter vertical
    neighbour both hold at least a fifth of its height above the sky: a star peak does
    (even an undersampled one), a hot pixel, a hot column or row, and a cosmic-ray
    streak do not. Only pixels above ``threshold`` are examined (a high percentile of the
    subsample): one comparison pass over the image, then 4 neighbours per candidate.
    """
    ny, nx = image.shape
    with np.errstate(invalid="ignore"):
        above = image > threshold
    if mask is not None:
        above &= ~mask
    flat = np.flatnonzero(above)
    if flat.size == 0:
        return math.nan
    vals = image.ravel()[flat].astype(np.float64)
    order = np.argsort(vals)[::-1]
    flat, vals = flat[order], vals[order]
    ys, xs = np.divmod(flat, nx)

    def brighter(y1, x1, y2, x2):
        a = np.where((y1 >= 0) & (x1 >= 0), image[np.maximum(y1, 0), np.maximum(x1, 0)], np.nan)
        b = np.where(
            (y2 < ny) & (x2 < nx), image[np.minimum(y2, ny - 1), np.minimum(x2, nx - 1)], np.nan
        )
        return np.fmax(a.astype(np.float64), b.astype(np.float64))  # NaN only if both are

    horiz = brighter(ys, xs - 1, ys, xs + 1)
    vert = brighter(ys - 1, xs, ys + 1, xs)
    with np.errstate(invalid="ignore"):
        ok = np.fmin(horiz, vert) - sky >= 0.2 * (vals - sky)
    if not ok.any():
        return math.nan
    return float(vals[np.argmax(ok)])


# --------------------------------------------------------------------------- stretches
@dataclass(frozen=True)
class Stretch:
    """A fitted display stretch; call it on an image to get float32 values in 0..1.

    Attributes
    ----------
    method
        ``"asinh"``, ``"zscale"``, ``"linear"`` or ``"sqrt"``.
    black, white
        Data values drawn black (0) and white (1).
    softening
        asinh softening in data units (asinh only; NaN otherwise).
    sky, sigma
        The sky level and noise measured (for information; NaN if not measured).
    """

    method: str
    black: float
    white: float
    softening: float = math.nan
    sky: float = math.nan
    sigma: float = math.nan

    def __call__(self, image: ArrayLike) -> NDArray[np.float32]:
        """Apply the stretch; NaN stays NaN, everything else lands in 0..1."""
        out = np.array(image, dtype=F32, copy=True)
        span = self.white - self.black
        if not span > 0:
            out[np.isfinite(out)] = 0.0
            return out
        out -= F32(self.black)
        if self.method == "asinh":
            soft = self.softening
            out *= F32(1.0 / soft)
            np.arcsinh(out, out=out)
            out *= F32(1.0 / math.asinh(span / soft))
        else:
            out *= F32(1.0 / span)
        np.clip(out, 0.0, 1.0, out=out)
        if self.method == "sqrt":
            np.sqrt(out, out=out)
        return out


def _solve_softening(d: float, span: float, sky_grey: float) -> float:
    """Softening ``s`` with ``asinh(d / s) / asinh(span / s) == sky_grey``.

    The ratio falls monotonically from 1 (s -> 0, logarithmic) to ``d / span``
    (s -> infinity, linear); bisection in log(s). When even the linear limit puts the
    sky above ``sky_grey`` (little dynamic range), the stretch is as linear as allowed.
    """
    lo, hi = math.log(d * 1e-4), math.log(span * 1e4)

    def ratio(logs: float) -> float:
        s = math.exp(logs)
        return math.asinh(d / s) / math.asinh(span / s)

    if ratio(hi) >= sky_grey:
        return math.exp(hi)
    if ratio(lo) <= sky_grey:
        return math.exp(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if ratio(mid) > sky_grey:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def fit_stretch(
    image: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    method: StretchMethod = "asinh",
    black: float | None = None,
    white: float | None = None,
    shadows: float = 2.8,
    sky_grey: float = 0.15,
    softening: float | None = None,
    contrast: float = 0.25,
) -> Stretch:
    """Fit a display stretch to an image (see the module notes for the choices).

    Parameters
    ----------
    image
        2-D image in any real dtype; NaN pixels are ignored.
    mask
        True for pixels to keep out of the statistics.
    method
        ``"asinh"`` (default), ``"zscale"``, ``"linear"`` or ``"sqrt"``.
    black, white
        Data values for black and white; None chooses them: black ``shadows`` sigma
        below the sky (zscale: z1); white the brightest non-spike pixel (asinh), the
        99.5th percentile (linear, sqrt) or z2 (zscale).
    shadows
        Black point, in noise sigmas below the sky.
    sky_grey
        asinh: the grey level (0..1) of the sky; the stretch control of the dome page
        (0.05 gentle, 0.15 default, 0.3 hard).
    softening
        asinh: the softening in units of the sky noise; overrides ``sky_grey``.
    contrast
        zscale: the contrast parameter of :class:`~astropy.visualization.ZScaleInterval`.

    Returns
    -------
    Stretch
        Call it on ``image`` (or on a cut-out or a rebinned copy of it).
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"fit_stretch: expected a 2-D image, got shape {img.shape}")
    if method not in ("asinh", "zscale", "linear", "sqrt"):
        raise ValueError(f"fit_stretch: unknown method {method!r}")
    m = None if mask is None else np.asarray(mask, dtype=bool)
    sample = _subsample(img, m, MAX_SAMPLES)
    if sample.size == 0:
        b = 0.0 if black is None else float(black)
        return Stretch(method, b, b + 1.0 if white is None else float(white), 1.0)
    sky, sigma = _clipped_stats(sample)
    if not sigma > 0:  # a constant (or noiseless) sky: borrow a scale from the range
        sigma = max(1e-3 * float(sample.max() - sky), 1e-12 * max(abs(sky), 1.0))
        sigma = sigma if sigma > 0 else 1.0

    if method == "zscale":
        from astropy.visualization import ZScaleInterval

        z1, z2 = ZScaleInterval(contrast=contrast).get_limits(sample)
        b = float(z1) if black is None else float(black)
        w = float(z2) if white is None else float(white)
        return Stretch("zscale", b, w, math.nan, sky, sigma)

    b = sky - shadows * sigma if black is None else float(black)
    if white is not None:
        w = float(white)
    elif method == "asinh":
        top = float(np.percentile(sample, 99.9))
        w = _peak_without_spikes(img, sky, m, max(top, sky + 5.0 * sigma))
        if not math.isfinite(w):
            w = float(sample.max())
    else:
        w = float(np.percentile(sample, 99.5))
    if not w > b:
        w = b + max(10.0 * sigma, 1e-12)
    if method != "asinh":
        return Stretch(method, b, w, math.nan, sky, sigma)

    span = w - b
    if softening is not None:
        soft = float(softening) * sigma
    else:
        d = sky - b
        soft = _solve_softening(d, span, sky_grey) if d > 0 else sigma
    return Stretch("asinh", b, w, soft, sky, sigma)


def auto_stretch(
    image: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    method: StretchMethod = "asinh",
    black: float | None = None,
    white: float | None = None,
    shadows: float = 2.8,
    sky_grey: float = 0.15,
    softening: float | None = None,
    contrast: float = 0.25,
) -> NDArray[np.float32]:
    """Stretch an image for display: float32 in 0..1 (NaN stays NaN), FITS orientation.

    Parameters are those of :func:`fit_stretch`; the defaults (asinh, sky at a 0.15 grey,
    black 2.8 sigma below the sky, white at the brightest star's peak) show faint
    extended structure above the sky while bright star cores keep their gradient.

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``image``.
    """
    st = fit_stretch(
        image, mask=mask, method=method, black=black, white=white, shadows=shadows,
        sky_grey=sky_grey, softening=softening, contrast=contrast,
    )  # fmt: skip
    return st(image)


# -------------------------------------------------------------------------------- PNG
def _downscale(image: NDArray, max_size: int | None) -> NDArray:
    """Area-average so the longer side is <= max_size (never enlarges); NaN-aware."""
    img = np.asarray(image)
    ny, nx = img.shape[:2]
    if max_size is None or max(ny, nx) <= max_size:
        return img
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    f = max(ny, nx) / max_size
    size = (max(1, round(nx / f)), max(1, round(ny / f)))  # cv2 wants (width, height)
    img = img.astype(F32, copy=False)
    valid = np.isfinite(img)
    if valid.all():
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    num = cv2.resize(np.where(valid, img, F32(0)), size, interpolation=cv2.INTER_AREA)
    den = cv2.resize(valid.astype(F32), size, interpolation=cv2.INTER_AREA)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den <= 1e-6] = np.nan
    return out


def to_png(
    image01: ArrayLike,
    path: str | Path | None = None,
    *,
    max_size: int | None = None,
    compress_level: int = 6,
) -> bytes:
    """Encode a stretched image (or RGB composite) as an 8-bit PNG.

    Parameters
    ----------
    image01
        ``(ny, nx)`` grey or ``(ny, nx, 3)`` RGB, values in 0..1 (clipped), FITS
        orientation: row 0 becomes the *bottom* row of the PNG. NaN is drawn black.
    path
        When given, the PNG is also written there atomically (its folder is created).
    max_size
        Longest side of the PNG in pixels: a thumbnail, area-averaged (never enlarged).
    compress_level
        zlib level (0-9), Pillow's default.

    Returns
    -------
    bytes
        The PNG file's content.
    """
    img = np.asarray(image01)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"to_png: expected (ny, nx) or (ny, nx, 3), got shape {img.shape}")
    img = _downscale(img, max_size)
    scaled = img[::-1].astype(F32) * F32(255)  # FITS row 0 -> bottom row of the PNG
    scaled += F32(0.5)
    scaled[np.isnan(scaled)] = 0.0
    u8 = np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)
    buf = BytesIO()
    Image.fromarray(np.ascontiguousarray(u8), mode="L" if u8.ndim == 2 else "RGB").save(
        buf, format="PNG", compress_level=compress_level
    )
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def quicklook(
    image: ArrayLike,
    path: str | Path | None = None,
    *,
    max_size: int | None = None,
    mask: ArrayLike | None = None,
    method: StretchMethod = "asinh",
    **stretch_options: float | None,
) -> bytes:
    """Stretch an image and encode it as a PNG, in one call.

    Parameters
    ----------
    image
        2-D image, FITS orientation (row 0 at the bottom of the PNG).
    path
        Where to write the PNG (atomically); None only returns the bytes.
    max_size
        Longest side of the PNG. The image is area-averaged *before* the stretch is
        fitted, so a thumbnail's stretch follows the (lower) noise of what is shown; it is
        also much faster.
    mask, method, stretch_options
        As for :func:`fit_stretch` (``black``, ``white``, ``shadows``, ``sky_grey``,
        ``softening``, ``contrast``).

    Returns
    -------
    bytes
        The PNG file's content.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"quicklook: expected a 2-D image, got shape {img.shape}")
    if max_size is not None and max(img.shape) > max_size:
        img = _downscale(img, max_size)
        if mask is not None:
            mask = _downscale(np.asarray(mask, dtype=F32), max_size) > 0.5
    stretched = auto_stretch(img, mask=mask, method=method, **stretch_options)  # type: ignore[arg-type]
    return to_png(stretched, path)


# --------------------------------------------------------------------------------- RGB
def _lookup(channels: Mapping[str, NDArray], name: str) -> str:
    """The key of ``channels`` for filter ``name``: exact, any case, then G <-> V."""
    if name in channels:
        return name
    folded = {k.casefold(): k for k in channels}
    if name.casefold() in folded:
        return folded[name.casefold()]
    alias = _GREEN_ALIASES.get(name.upper())
    if alias is not None and alias.casefold() in folded:
        return folded[alias.casefold()]
    raise KeyError(
        f"rgb_composite: no channel for filter {name!r} (have: {', '.join(channels) or 'none'})"
    )


def _colour(spec: ColourSpec) -> tuple[float, float, float]:
    if isinstance(spec, str):
        try:
            return COLOURS[spec.lower()]
        except KeyError:
            raise ValueError(
                f"unknown colour {spec!r}; use one of {', '.join(COLOURS)} or (r, g, b)"
            ) from None
    w = tuple(float(v) for v in spec)
    if len(w) != 3 or min(w) < 0 or not any(w):
        raise ValueError(f"colour weights must be 3 non-negative numbers, got {spec!r}")
    return w  # type: ignore[return-value]


def _resolve_mapping(
    channels: Mapping[str, NDArray], mapping: MappingSpec | None
) -> tuple[list[str], NDArray[np.float64]]:
    """(channel keys used, weights (nfilters, 3)) with each colour column summing to 1."""
    if mapping is None:
        mapping = PRESET_MAPPINGS["RVB"]
    if isinstance(mapping, str):
        try:
            mapping = PRESET_MAPPINGS[mapping.upper()]
        except KeyError:
            raise ValueError(
                f"unknown mapping {mapping!r}; presets: {', '.join(PRESET_MAPPINGS)}"
            ) from None
    if isinstance(mapping, Mapping):
        pairs = [(_lookup(channels, f), _colour(c)) for f, c in mapping.items()]
    else:
        names = list(mapping)
        if len(names) != 3:
            raise ValueError(f"a mapping lists 3 filters (red, green, blue), got {names}")
        pairs = [
            (_lookup(channels, f), COLOURS[c])
            for f, c in zip(names, ("red", "green", "blue"), strict=True)
        ]
    keys: list[str] = []
    rows: list[NDArray] = []
    for key, w in pairs:  # a filter named twice adds its weights
        if key in keys:
            rows[keys.index(key)] = rows[keys.index(key)] + np.asarray(w)
        else:
            keys.append(key)
            rows.append(np.asarray(w, dtype=np.float64))
    weights = np.array(rows)
    col = weights.sum(axis=0)
    if np.any(col <= 0):
        missing = [c for c, s in zip(("red", "green", "blue"), col, strict=True) if s <= 0]
        raise ValueError(f"rgb_composite: no filter feeds {', '.join(missing)}")
    return keys, weights / col


def choose_mapping(filters: Iterable[str]) -> str | None:
    """The preset mapping a set of filters supports, or None.

    ``RVB`` (R, V, B), ``RGB`` (R, G, B), ``SHO`` (SII, Ha, OIII), ``HOO`` (Ha, OIII), in
    that order; names match case-insensitively. The pipeline's "a target with three
    filters gets a composite" is ``choose_mapping(filters) is not None`` unless the
    configuration names a mapping.
    """
    have = {f.casefold() for f in filters}
    for name, preset in PRESET_MAPPINGS.items():
        if all(f.casefold() in have for f in preset):
            return name
    return None


def _star_gains(
    lin: NDArray[np.float32],
    noise: NDArray[np.float64],
    peaks_ok: NDArray[np.bool_] | None,
    *,
    max_stars: int = 300,
    min_stars: int = 5,
) -> tuple[NDArray[np.float64] | None, int]:
    """Per-colour gains making the median star colour neutral (None: too few stars).

    ``lin``: (3, ny, nx) sky-subtracted colours; ``noise``: their sky sigmas;
    ``peaks_ok``: (ny, nx) True where the inputs are not saturated (None: all fine).
    """
    _, ny, nx = lin.shape
    det = np.zeros((ny, nx), F32)
    for c in range(3):
        det += np.where(np.isfinite(lin[c]), lin[c], F32(0)) * F32(1.0 / noise[c])
    smooth = cv2.GaussianBlur(det, (0, 0), 1.0)
    del det
    # the noise of the data alone: a coadd's no-data border (zeros here) would drag it
    # to 0 and leave no star above it
    no_data = ~np.isfinite(lin).all(axis=0)
    _, s_sig = _clipped_stats(_subsample(smooth, no_data, MAX_SAMPLES))
    del no_data
    if not s_sig > 0:
        return None, 0
    local_max = smooth >= cv2.dilate(smooth, np.ones((5, 5), np.uint8))
    r_ap, r_in, r_out = 5, 8, 12
    border = np.zeros_like(local_max)
    border[r_out:-r_out, r_out:-r_out] = True
    ys, xs = np.nonzero(local_max & border & (smooth > 30.0 * s_sig))
    if ys.size < min_stars:
        return None, int(ys.size)
    order = np.argsort(smooth[ys, xs])[::-1][: 4 * max_stars]
    ys, xs = ys[order], xs[order]
    del smooth, local_max

    off = np.arange(-r_out, r_out + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    r2 = (dy**2 + dx**2).ravel()
    ap, ann, core = r2 <= r_ap**2, (r2 >= r_in**2) & (r2 <= r_out**2), r2 <= 2
    yy = ys[:, None] + dy.ravel()[None, :]
    xx = xs[:, None] + dx.ravel()[None, :]
    keep = np.ones(ys.size, bool)
    if peaks_ok is not None:
        keep &= peaks_ok[yy[:, core], xx[:, core]].all(axis=1)
    flux = np.empty((3, ys.size))
    for c in range(3):
        box = lin[c][yy, xx].astype(np.float64)  # (nstars, npix)
        keep &= np.isfinite(box).all(axis=1)
        bkg = np.median(box[:, ann], axis=1)
        flux[c] = box[:, ap].sum(axis=1) - ap.sum() * bkg
    keep &= (flux > 0).all(axis=0)
    # bright: aperture SNR >= 25 in every colour (sky noise only): colours to 4 %
    keep &= (flux / (noise[:, None] * math.sqrt(ap.sum())) >= 25.0).all(axis=0)
    flux = flux[:, keep][:, :max_stars]
    n = flux.shape[1]
    if n < min_stars:
        return None, n
    logf = np.log(flux)
    colour = logf - logf.mean(axis=0)  # each star's log colour about its mean
    gains = np.exp(-np.median(colour, axis=1))
    return gains, n


def rgb_composite(
    channels: Mapping[str, ArrayLike],
    mapping: MappingSpec | None = None,
    *,
    balance: Balance = "stars",
    stretch: float | None = None,
    Q: float = 8.0,
    shadows: float = 2.8,
    sky_grey: float = 0.12,
    saturation: float | Mapping[str, float] | None = None,
) -> NDArray[np.float32]:
    """An RGB composite of a target's coadds, Lupton asinh stretch.

    Parameters
    ----------
    channels
        Filter name -> 2-D coadd, all on the same grid (FITS orientation), NaN outside
        the footprint. Extra filters not in ``mapping`` are ignored.
    mapping
        ``("R", "V", "B")`` (default): the filters for red, green, blue; G and V stand in
        for each other. A preset name (:data:`PRESET_MAPPINGS`: ``"RVB"``, ``"RGB"``,
        ``"SHO"``, ``"HOO"``), or a dict filter -> colour (``"red"``, ``"cyan"``, ... or
        ``(r, g, b)`` weights), e.g. ``{"Ha": "red", "OIII": (0, 1, 1)}``.
    balance
        ``"stars"``: the median colour of bright unsaturated stars is neutral (falls back
        to ``"sky"`` with a :class:`RenderWarning` below 5 stars); ``"sky"``: equal sky
        noise in the three colours; None: fluxes as given (sky subtracted).
    stretch
        Lupton's linear range, in units of the sky noise of the balanced colours; None
        puts the sky at ``sky_grey``.
    Q
        Lupton's asinh softening (0 would be linear).
    shadows
        The black point, in sky-noise sigmas below the sky (common to the colours).
    sky_grey
        Grey level of the sky when ``stretch`` is None.
    saturation
        Detector saturation level in input units, sky included (one number, or per
        filter; a filter left out is estimated): saturated pixels are drawn neutral and
        stars peaking above half-way from the sky to it are not used for the balance.
        None: detected as a plateau at a filter's maximum, or no saturation.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx, 3)`` float32 in 0..1, FITS orientation; NaN where any used filter is
        NaN. Pass it to :func:`to_png`.
    """
    if balance not in ("stars", "sky", None):
        raise ValueError(f"rgb_composite: unknown balance {balance!r}")
    keys, weights = _resolve_mapping(channels, mapping)
    images = [np.asarray(channels[k]) for k in keys]
    shape = images[0].shape
    if len(shape) != 2 or any(im.shape != shape for im in images):
        shapes = {k: np.asarray(channels[k]).shape for k in keys}
        raise ValueError(f"rgb_composite: channels must be 2-D and on one grid, got {shapes}")
    ny, nx = shape

    # 1. per filter: sky, noise, and the scale that enters the mix
    stats = [sky_stats(im) for im in images]
    if any(not (s > 0) for _, s in stats):
        raise ValueError("rgb_composite: a channel has no finite pixels or no sky noise")
    scale = [1.0 if balance is None else 1.0 / s for _, s in stats]

    # 2. mix into (3, ny, nx) float32, sky removed
    lin = np.zeros((3, ny, nx), F32)
    for im, (sky, _), sc, w in zip(images, stats, scale, weights, strict=True):
        f = im.astype(F32, copy=True)
        f -= F32(sky)
        f *= F32(sc)
        for c in range(3):
            if w[c]:
                lin[c] += F32(w[c]) * f
        del f
    valid = np.isfinite(lin).all(axis=0)
    step = max(1, math.ceil(math.sqrt(ny * nx / MAX_SAMPLES))) | 1
    vsub = valid[::step, ::step]
    samples = np.stack([lin[c][::step, ::step][vsub] for c in range(3)])
    noise = np.array([_clipped_stats(samples[c])[1] for c in range(3)])
    if not np.all(noise > 0):
        raise ValueError("rgb_composite: a colour has no sky noise")

    # saturation level of each filter: given, detected (a plateau), or its maximum
    levels = []
    saturated = np.zeros((ny, nx), bool)
    for k, im, (sky_f, _) in zip(keys, images, stats, strict=True):
        given = saturation.get(k) if isinstance(saturation, Mapping) else saturation
        top = float(np.nanmax(im))
        level = _plateau_level(im, sky_f, top) if given is None else float(given)
        if math.isfinite(level):
            with np.errstate(invalid="ignore"):
                saturated |= im >= level
        levels.append(level if math.isfinite(level) else top)

    # 3. balance
    gains = np.ones(3)
    if balance == "sky":
        gains = 1.0 / noise
    elif balance == "stars":
        peaks_ok = np.ones((ny, nx), bool)
        for im, (sky_f, _), top in zip(images, stats, levels, strict=True):
            # linear with a margin: peaks below half-way from the sky to saturation
            with np.errstate(invalid="ignore"):
                peaks_ok &= ~(im >= sky_f + 0.5 * (top - sky_f))
        star_gains, nstars = _star_gains(lin, noise, peaks_ok)
        if star_gains is None:
            warnings.warn(
                f"rgb_composite: {nstars} bright unsaturated stars (< 5): balanced on the sky",
                RenderWarning,
                stacklevel=2,
            )
            gains = 1.0 / noise
        else:
            gains = star_gains
    # common unit: the mean sky noise of the balanced colours
    unit = float(np.mean(noise * gains))
    gains = gains / unit
    for c in range(3):
        lin[c] *= F32(gains[c])
    if saturated.any():  # no colour is measured there: neutral, with a 1 px margin
        saturated = cv2.dilate(saturated.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        lin[:, saturated] = lin[:, saturated].max(axis=0)

    # 4. Lupton asinh, common black point (in units of the mean sky noise)
    lin += F32(shadows)
    q = _lupton_q(Q)
    if stretch is None:  # f(shadows) == sky_grey
        stretch = q * shadows / math.sinh(10.0 * sky_grey * math.asinh(0.1 * q))
    out = _lupton(lin, Q=q, stretch=float(stretch))
    out[:, ~valid] = np.nan
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def _plateau_level(image: NDArray, sky: float, top: float) -> float:
    """Saturation level when the image has a saturated plateau, else inf.

    Saturated stars share one top value (within the flat's few per cent), so at least a
    3x3 block's worth of pixels lies within 10 % (of the height above the sky) of the
    maximum; an unsaturated star's peak has one or two such pixels.
    """
    level = sky + 0.9 * (top - sky)
    with np.errstate(invalid="ignore"):
        count = int(np.count_nonzero(image >= level))
    return level if count >= 9 else math.inf


def _lupton_q(Q: float) -> float:
    """Q as astropy's LuptonAsinhStretch uses it (tiny Q -> 0.1, capped at 1e10)."""
    return 0.1 if abs(Q) < 2.0**-23 else min(float(Q), 1e10)


def _lupton(rgb: NDArray[np.float32], *, Q: float, stretch: float) -> NDArray[np.float32]:
    """astropy's ``RGBImageMappingLupton`` (minimum already subtracted), in place.

    ``f(I) = asinh(Q I / stretch) * 0.1 / asinh(0.1 Q)``, ``I = mean of the colours``;
    each colour times ``f(I) / I``, clipped at 0, and pixels where a colour exceeds 1
    scaled down by their largest colour.
    """
    intensity = rgb.mean(axis=0, dtype=F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        fac = np.arcsinh(intensity * F32(Q / stretch))
        fac *= F32(0.1 / math.asinh(0.1 * Q))
        fac /= intensity
    fac[~(intensity > 0)] = 0.0
    del intensity
    rgb *= fac[None]
    np.maximum(rgb, 0.0, out=rgb)
    peak = rgb.max(axis=0)
    over = peak > 1.0
    if over.any():
        rgb[:, over] /= peak[over]
    return rgb


# ------------------------------------------------------------------------------ Bayer
_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def _check_pattern(pattern: str) -> str:
    p = pattern.strip().upper()
    if p not in _PATTERNS:
        raise ValueError(f"unknown Bayer pattern {pattern!r}; expected one of {_PATTERNS}")
    return p


def bayer_pattern(pattern: str, *, xoffset: int = 0, yoffset: int = 0) -> str:
    """The pattern seen from pixel ``(yoffset, xoffset)`` of a mosaic.

    For a sub-frame starting at that pixel, or for MaxIm-style ``XBAYROFF`` /
    ``YBAYROFF`` keywords: ``bayer_pattern("RGGB", xoffset=1) == "GRBG"``.
    """
    p = _check_pattern(pattern)
    grid = [[p[0], p[1]], [p[2], p[3]]]
    return "".join(grid[(r + yoffset) % 2][(c + xoffset) % 2] for r in (0, 1) for c in (0, 1))


def _sites(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """Colour -> (row, column) offsets in the 2x2 cell."""
    p = _check_pattern(pattern)
    out: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for i, colour in enumerate(p):
        out[colour].append(divmod(i, 2))
    return out


def _check_cfa(cfa: ArrayLike) -> NDArray:
    a = np.asarray(cfa)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"expected a 2-D mosaic of at least 2x2 pixels, got shape {a.shape}")
    return a


_TENT = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], F32)  # red, blue: bilinear
_CROSS = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], F32)  # green: bilinear
_TENT5 = np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]).astype(F32)  # filling NaN holes
_MIRROR = cv2.BORDER_REFLECT_101


def debayer(cfa: ArrayLike, pattern: str) -> tuple[NDArray[np.float32], ...]:
    """Bilinear demosaic of a colour-filter-array image, in float32.

    Parameters
    ----------
    cfa
        2-D mosaic (calibrated: bias, dark and flat applied in CFA space), any real dtype.
        NaN pixels are treated as missing.
    pattern
        ``"RGGB"``, ``"BGGR"``, ``"GRBG"`` or ``"GBRG"``: the colours of ``cfa[0, 0]``,
        ``cfa[0, 1]``, ``cfa[1, 0]``, ``cfa[1, 1]`` (see :func:`bayer_pattern`).

    Returns
    -------
    R, G, B : numpy.ndarray
        float32, full resolution, same shape as ``cfa``. Each is the measured value at
        its own sites and the mean of the nearest same-colour neighbours elsewhere
        (OpenCV's bilinear kernel, as a normalised convolution: the border mirrors the
        mosaic (same-colour pixels), and next to NaN pixels only the valid neighbours
        count). A NaN pixel is filled in every colour, its own from the same-colour
        pixels up to 2 px away; NaN remains only where there is none.
    """
    a = _check_cfa(cfa).astype(F32, copy=False)
    finite = np.isfinite(a)
    complete = bool(finite.all())
    values = a if complete else np.where(finite, a, F32(0))
    out = []
    for colour, sites in _sites(pattern).items():
        m = np.zeros(a.shape, F32)
        for r, c in sites:
            m[r::2, c::2] = 1.0
        kernel = _CROSS if colour == "G" else _TENT
        # reflect-101 keeps the mosaic's parity: the mirrored pixel has the same colour
        if complete:  # every pixel has weight 4 from its neighbours: one convolution
            res = cv2.filter2D(values * m, -1, kernel * F32(0.25), borderType=_MIRROR)
        else:
            m *= finite
            res = _normalised_convolution(values * m, m, kernel)
            holes = np.isnan(res)
            if holes.any():  # a missing pixel of this colour: its neighbours 2 px away
                wide = _normalised_convolution(values * m, m, _TENT5)
                res[holes] = wide[holes]
        out.append(res)
    return tuple(out)


def _normalised_convolution(num: NDArray, weight: NDArray, kernel: NDArray) -> NDArray:
    """conv(num) / conv(weight); NaN where no weight reaches."""
    top = cv2.filter2D(num, -1, kernel, borderType=_MIRROR)
    den = cv2.filter2D(weight, -1, kernel, borderType=_MIRROR)
    with np.errstate(invalid="ignore", divide="ignore"):
        res = top / den
    res[den < 0.5] = np.nan
    return res


def bayer_channels(cfa: ArrayLike, pattern: str) -> dict[str, NDArray[np.float32]]:
    """Superpixel split: one R, G, B value per 2x2 cell (half resolution).

    The two greens are averaged (one alone where the other is NaN). An odd last row or
    column is dropped. Superpixel ``(i, j)`` covers pixels ``2i..2i+1``, ``2j..2j+1``:
    its centre is full-resolution pixel ``(2i + 0.5, 2j + 0.5)``, so a WCS carries over
    with ``CRPIX -> (CRPIX + 0.5) / 2`` and ``CD -> 2 CD``.

    Returns
    -------
    dict
        ``{"R": ..., "G": ..., "B": ...}``, float32 arrays of shape ``(ny // 2, nx // 2)``.
    """
    a = _check_cfa(cfa)
    ny, nx = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
    a = a[:ny, :nx]
    out: dict[str, NDArray[np.float32]] = {}
    for colour, sites in _sites(pattern).items():
        planes = [a[r::2, c::2].astype(F32) for r, c in sites]
        if len(planes) == 1:
            out[colour] = planes[0]
        else:
            g1, g2 = planes
            with np.errstate(invalid="ignore"):
                g = (g1 + g2) * F32(0.5)
            g = np.where(np.isnan(g1), g2, np.where(np.isnan(g2), g1, g))
            out[colour] = g.astype(F32, copy=False)
    return out

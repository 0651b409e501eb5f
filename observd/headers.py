"""Header dialects -> one normalised description of a frame.

Nothing else in observd parses FITS headers. Every capture program (MaxIm DL, ACP,
TheSkyX, N.I.N.A., SGP, SharpCap, ASIImg, Seestar, IRAF-style observatories) writes the
same facts differently; :func:`describe` turns any of them into a :class:`FrameInfo`,
and says in ``problems`` what it could not establish and why.

Cards are read one at a time and a malformed card (ZWO's unquoted ``6,4E-05``, an
over-long line) yields its raw text instead of an exception, so one bad card never
costs the whole description. ``describe`` never builds an astropy WCS: it is called on
every file and must stay well under a millisecond.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import timezone as fixed_offset
from functools import lru_cache
from pathlib import Path, PurePath
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from astropy.io import fits
from astropy.io.fits.card import Undefined

__all__ = ["FRAME_TYPES", "FrameInfo", "Setup", "describe", "slugify"]

FRAME_TYPES = ("bias", "dark", "flat", "darkflat", "light", "unknown")


@dataclass(frozen=True)
class Setup:
    """What must match between a light and the masters that calibrate it."""

    binning: str = "1x1"  # "XxY"
    gain: float | None = None
    offset: float | None = None
    readout: str | None = None  # readout mode / speed, as the camera names it
    set_temp: float | None = None  # cooler set point, deg C
    shape: tuple[int, int] | None = None  # numpy order (ny, nx)
    bayer: str | None = None  # e.g. "RGGB"; None for a mono camera

    def key(self) -> str:
        """A short file-name-safe identifier, e.g. ``1x1_g100_o10_t-10_1024x1024``."""
        parts = [f"bin{self.binning}"]
        if self.gain is not None:
            parts.append(f"g{_num(self.gain)}")
        if self.offset is not None:
            parts.append(f"o{_num(self.offset)}")
        if self.readout:
            parts.append(f"m{slugify(self.readout)}")
        if self.set_temp is not None:
            parts.append(f"t{_num(self.set_temp)}")
        if self.shape is not None:
            parts.append(f"{self.shape[1]}x{self.shape[0]}")
        if self.bayer:
            parts.append(self.bayer.lower())
        return "_".join(parts)


def _num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class FrameInfo:
    """The normalised description of one raw file.

    ``problems`` lists, in plain words, every fact that could not be established or
    that contradicts another (``"no exposure time (EXPTIME/EXPOSURE/EXPOINUS)"``); an
    empty tuple means the frame is fully described. ``sources`` says where each fact
    came from (``{"type": "IMAGETYP", "target": "folder"}``) so a reason can be audited.

    ``calstat`` says what was done to the pixels before observd saw them: ``None`` for
    a raw frame; the letters ``B`` (bias), ``D`` (dark), ``F`` (flat) in that order for
    the steps the header names (MaxIm/ACP ``CALSTAT``, MaxIm or SBIG ``HISTORY``
    lines, ccdproc ``SUBBIAS``/``SUBDARK``/``FLATCOR``, IRAF ``ZEROCOR``/``DARKCOR``);
    ``"C"`` when the header says it was calibrated but not how (``HISTORY Process
    Calibrate``, or a non-zero ``PEDESTAL`` with ``SWMODIFY``). Such a frame must not
    be calibrated again.

    ``egain`` is the detector's conversion factor in e-/ADU (``EGAIN``, or an
    IRAF-style ``GAIN`` whose comment says e-/ADU); the camera's gain *setting* is
    ``setup.gain``.
    """

    type: str  # one of FRAME_TYPES
    filter: str | None
    exptime: float | None  # seconds
    target: str | None  # display name, e.g. "M 51"; None for calibration frames
    date_obs: datetime | None  # timezone-aware UTC
    night: str | None  # "YYYY-MM-DD", local date of the evening (site timezone)
    setup: Setup = field(default_factory=Setup)
    ccd_temp: float | None = None  # measured sensor temperature, deg C
    telescope: str | None = None
    instrument: str | None = None
    calstat: str | None = None  # "BDF", "B", ... or "C" (calibrated, steps unknown)
    has_wcs: bool = False
    problems: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)
    egain: float | None = None  # e-/ADU
    pointing: tuple[float, float] | None = None  # (RA, Dec) deg where the telescope pointed
    pixel_scale: float | None = None  # arcsec/px from pixel size and focal length

    @property
    def target_slug(self) -> str | None:
        return slugify(self.target) if self.target else None


def slugify(name: str) -> str:
    """File-name-safe lower-case slug: ``"M 51"`` -> ``"m51"``, ``"NGC 7023"`` -> ``"ngc7023"``."""
    slug = re.sub(r"[^a-z0-9+\-_.]", "", name.strip().lower().replace(" ", ""))
    return slug.strip(".") or "unnamed"


# --------------------------------------------------------------------------- vocabulary

# IMAGETYP values, compared lower-case with everything but letters removed.
_IMAGETYP = {
    "light": "light", "lightframe": "light", "object": "light", "science": "light",
    "expose": "light",  # LCO OBSTYPE
    "bias": "bias", "biasframe": "bias", "zero": "bias", "offset": "bias",
    "dark": "dark", "darkframe": "dark",
    "flat": "flat", "flatfield": "flat", "flatframe": "flat", "domeflat": "flat",
    "skyflat": "flat", "twilightflat": "flat", "twiflat": "flat", "lampflat": "flat",
    "darkflat": "darkflat", "flatdark": "darkflat", "darkflatframe": "darkflat",
    "flatdarkframe": "darkflat",
}  # fmt: skip
# Values that are real frame types, but not frames observd calibrates or stacks.
_NOT_FOR_US = {
    "tricolorimage": "a colour composite",
    "focus": "a focus frame",
    "comp": "a comparison-lamp frame",
    "arc": "a comparison-lamp frame",
}
_TYPE_KEYS = ("IMAGETYP", "IMAGETYPE", "OBSTYPE", "FRAMETYP")

# Words in file and folder names (camel case split, lower-cased).
_NAME_TYPES = {
    "bias": "bias", "biases": "bias", "zero": "bias", "zeros": "bias",
    "dark": "dark", "darks": "dark",
    "flat": "flat", "flats": "flat", "flatfield": "flat", "flatfields": "flat",
    "skyflat": "flat", "skyflats": "flat", "domeflat": "flat", "domeflats": "flat",
    "darkflat": "darkflat", "darkflats": "darkflat", "flatdark": "darkflat",
    "flatdarks": "darkflat",
    "light": "light", "lights": "light", "science": "light",
}  # fmt: skip
# Folder words that never name a target: frame types, dates, storage words, filters.
_GENERIC_WORDS = set(_NAME_TYPES) | {
    "calibration", "calibrations", "calib", "cal", "master", "masters", "raw", "data",
    "image", "images", "fits", "fit", "frame", "frames", "sub", "subs", "capture",
    "captures", "session", "sessions", "night", "nights", "incoming", "camera", "seq",
    "sequence", "autosave", "tmp", "temp", "new", "sec", "secs", "min",
    "lum", "luminance", "red", "green", "blue", "ha", "oiii", "sii", "hb", "clear",
    "ircut", "lp", "uv", "ir", "nb", "rgb",
}  # fmt: skip

_NO_FILTER = {"", "none", "empty", "open", "no filter", "nofilter", "n/a", "na", "-", "(none)"}
_FILTER_KEYS = ("FILTER", "FILTERS", "FILTNAME", "INSFLNAM", "FILT-1")
_WHEEL_KEYS = ("FWHEEL", "FILTWHEL", "FILTERWH")

_EXPOSURE_KEYS = ("EXPTIME", "EXPOSURE", "EXP_TIME")  # seconds
_BAYER_PATTERNS = {"RGGB", "BGGR", "GRBG", "GBRG"}
_CELESTIAL = {"RA--", "DEC-", "GLON", "GLAT", "ELON", "ELAT"}
_WCS_MATRIX = tuple(f"{m}{i}_{j}" for m in ("CD", "PC") for i in (1, 2) for j in (1, 2))

_CATALOGUES = {
    "m": "M", "messier": "M", "ngc": "NGC", "ic": "IC", "sh2": "Sh2", "abell": "Abell",
    "arp": "Arp", "ldn": "LDN", "lbn": "LBN", "vdb": "vdB", "ugc": "UGC", "pgc": "PGC",
    "mel": "Mel", "melotte": "Mel", "cr": "Cr", "collinder": "Cr", "barnard": "Barnard",
    "caldwell": "Caldwell",
}  # fmt: skip
_DESIGNATION = (
    r"(messier|melotte|mel|m|ngc|ic|sh\s?2|abell|arp|ldn|lbn|vdb|ugc|pgc|collinder|cr"
    r"|barnard|caldwell)[\s_\-]*0*(\d{1,6})([a-z]?)"
)
_DESIGNATION_FULL = re.compile(_DESIGNATION, re.I)
_DESIGNATION_IN_NAME = re.compile(rf"(?<![a-z0-9]){_DESIGNATION}(?![a-z0-9])", re.I)

_ISO_DATE = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d*))?)?)?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?",
    re.I,
)
_OLD_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{2})")  # FITS DD/MM/YY
_TIME = re.compile(r"(\d{1,2})[: ](\d{2})(?:[: ](\d{2})(?:\.(\d*))?)?")
_TIME_KEYS = ("TIME-OBS", "UT", "UTC", "UTSTART", "UT-START", "TIME-BEG")
_MJD0 = datetime(1858, 11, 17, tzinfo=UTC)

_HIST_BIAS = re.compile(r"\b(bias|zero)[ -]?(subtract|correct)")
_HIST_DARK = re.compile(r"\bdark[ -]?(subtract|correct)")
_HIST_FLAT = re.compile(r"\bflat[ -]?(field|correct|divid)")
_HIST_CALIBRATED = re.compile(r"\bcalibrat")
_HIST_NEEDLES = {
    _HIST_BIAS: ("bias", "zero"),
    _HIST_DARK: ("dark",),
    _HIST_FLAT: ("flat",),
    _HIST_CALIBRATED: ("calibrat",),
}
_EGAIN_COMMENT = re.compile(r"e-?\s*/\s*adu|electrons?\s+per\s+(adu|a/d|data)", re.I)
_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")


# --------------------------------------------------------------------------- card access


class _Cards:
    """Header values read one card at a time; a malformed card gives its raw text."""

    __slots__ = ("broken", "header")

    def __init__(self, header: fits.Header) -> None:
        self.header = header
        self.broken: dict[str, str | None] = {}  # keyword -> raw text of an unparsable card

    def has(self, key: str) -> bool:
        try:
            return key in self.header
        except Exception:
            return False

    def get(self, key: str) -> object | None:
        """The value, stripped; None when absent, empty or undefined."""
        try:
            if key not in self.header:  # cheaper than the KeyError inside Header.get
                return None
            value = self.header[key]
        except Exception:  # astropy VerifyError: the card is not valid FITS
            value = self.broken[key] = _raw_value(self.header, key)
        if value is None or isinstance(value, Undefined):
            return None
        if isinstance(value, str):
            return value.strip() or None
        return value

    def text(self, key: str) -> str | None:
        value = self.get(key)
        if value is None or isinstance(value, bool):
            return None
        return " ".join(str(value).split()) or None

    def number(self, key: str) -> float | None:
        return _to_float(self.get(key))[0]

    def comment(self, key: str) -> str:
        try:
            return str(self.header.comments[key])
        except Exception:
            return ""

    def history(self) -> list[str]:
        """All HISTORY lines, lower-case.

        Read from the card images as read (``_image``): ``card.value`` costs an astropy
        configuration lookup per card, and ACP headers carry a hundred HISTORY lines.
        """
        if not self.has("HISTORY"):
            return []
        lines = []
        for card in self.header.cards:
            try:
                if card.keyword != "HISTORY":
                    continue
                image = getattr(card, "_image", None)
                lines.append((image[8:] if image else str(card.value)).lower())
            except Exception:
                continue
        return lines


def _raw_value(header: fits.Header, key: str) -> str | None:
    """The value text of a card astropy cannot parse, read from the card as it was read.

    ``card.image`` would "fix" (rewrite) the caller's card and warn, so the image kept
    by astropy (``_image``) is parsed here instead.
    """
    try:
        image = getattr(header.cards[key], "_image", None)
    except Exception:
        return None
    if not image:
        return None
    text = (image[10:] if image[8:10] == "= " else image[8:]).strip()
    if text.startswith("'"):
        match = re.match(r"'((?:[^']|'')*)'", text)
        text = match.group(1).replace("''", "'") if match else text[1:]
    else:
        text = text.split("/", 1)[0]
    return text.strip() or None


def _to_float(value: object) -> tuple[float | None, bool]:
    """``(number, repaired)``; numbers in strings are accepted (PixInsight quotes them)
    and a lone decimal comma (``'6,4E-05'``) is repaired, which the caller may flag."""
    if value is None or isinstance(value, bool):
        return None, False
    if isinstance(value, int | float):
        number = float(value)
        return (number if math.isfinite(number) else None), False
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            if text.count(",") == 1 and "." not in text:
                try:
                    number = float(text.replace(",", "."))
                except ValueError:
                    return None, False
                return (number if math.isfinite(number) else None), True
            return None, False
        return (number if math.isfinite(number) else None), False
    return None, False


# --------------------------------------------------------------------------- describe


def describe(
    header: fits.Header,
    path: Path | str | None = None,
    *,
    timezone: str = "UTC",
    filter_aliases: Mapping[str, Sequence[str]] | None = None,
    shape: tuple[int, ...] | None = None,
) -> FrameInfo:
    """Describe one frame from its header, with the path as a fallback.

    Parameters
    ----------
    header
        The header of the image HDU (for a tile-compressed file, the image header).
    path
        The file's path; folder and file names are used only when the header is silent.
        Up to three folders above the file are read, so pass the path as found under
        the watched folder.
    timezone
        IANA name of the site's timezone; a night runs from local noon to local noon.
    filter_aliases
        Canonical filter name -> aliases (``{"R": ["Red", "r'", "Rc"]}``), matched
        case-insensitively, except that one-letter names match exactly: Sloan ``r``
        and Johnson ``R`` stay apart unless the aliases join them.
    shape
        Numpy shape of the data when known (else taken from NAXISn).

    Returns
    -------
    FrameInfo

    Raises
    ------
    ValueError
        If ``timezone`` is not a known IANA timezone (a configuration error, not a
        property of the frame).
    """
    zone = _zone(timezone)
    cards = _Cards(header)
    where = PurePath(path) if path is not None else None
    aliases = _AliasTable(filter_aliases)
    problems: list[str] = []
    sources: dict[str, str] = {}

    frame_shape = _shape(cards, shape, problems, sources)
    ftype = _frame_type(cards, where, problems, sources)
    exptime = _exposure(cards, problems, sources)
    filt, wheel = _filter(cards, where, aliases, problems, sources)
    if ftype in ("bias", "dark", "darkflat") and filt is not None:
        # the wheel position during a closed-shutter frame means nothing for its use
        sources["filter"] = f"{filt!r} in the header, not used for a {ftype}"
        filt = None
    date_obs = _date_obs(cards, zone, problems, sources)
    night = None
    if date_obs is not None:
        night = (date_obs.astimezone(zone) - timedelta(hours=12)).date().isoformat()
        sources["night"] = f"date_obs in {timezone}"

    target = None
    if ftype in ("light", "unknown"):
        target = _normalise_target(cards.text("OBJECT") or cards.text("OBJNAME"))
        if target:
            sources["target"] = "OBJECT" if cards.text("OBJECT") else "OBJNAME"
        elif ftype == "light" and where is not None:
            target = _target_from_path(where, aliases, sources)

    egain, gain = _gains(cards, sources)
    setup = Setup(
        binning=_binning(cards, sources),
        gain=gain,
        offset=_first_number(cards, ("OFFSET", "BLKLEVEL"), "offset", sources),
        readout=_first_text(cards, ("READOUTM", "READMODE"), "readout", sources),
        set_temp=_set_temp(cards, sources),
        shape=frame_shape,
        bayer=_bayer(cards, sources),
    )
    calstat = _calstat(cards, sources)
    _check_consistency(ftype, exptime, target, filt, wheel, problems)

    return FrameInfo(
        type=ftype,
        filter=filt,
        exptime=exptime,
        target=target,
        date_obs=date_obs,
        night=night,
        setup=setup,
        ccd_temp=_ccd_temp(cards, sources),
        telescope=_first_text(cards, ("TELESCOP",), "telescope", sources),
        instrument=_first_text(cards, ("INSTRUME",), "instrument", sources),
        calstat=calstat,
        has_wcs=_has_wcs(cards),
        problems=tuple(problems),
        sources=sources,
        egain=egain,
        pointing=_pointing(cards),
        pixel_scale=_pixel_scale(cards),
    )


@lru_cache(maxsize=8)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (expected an IANA name)") from None


# --------------------------------------------------------------------------- frame type


def _frame_type(
    cards: _Cards, where: PurePath | None, problems: list[str], sources: dict[str, str]
) -> str:
    key = next((k for k in _TYPE_KEYS if cards.get(k) is not None), None)
    raw = cards.text(key) if key else None
    squashed = re.sub(r"[^a-z]", "", raw.lower()) if raw else ""

    product = _product(cards, key, raw, squashed)
    if product:
        problems.append(product[0])
        sources["type"] = product[1]
        return "unknown"
    if key and raw:
        sources["type"] = key
        if squashed in _IMAGETYP:
            return _IMAGETYP[squashed]
        if squashed in _NOT_FOR_US:
            problems.append(
                f"{_NOT_FOR_US[squashed]} ({key} '{raw}'), not for calibration or stacking"
            )
        else:
            problems.append(f"unknown {key} '{raw}'")
        return "unknown"

    # The header is silent: the file name, then up to two folders above it.
    if where is not None:
        levels = [("filename", _stem(where))]
        levels += [("folder", part.name) for part in list(where.parents)[:2] if part.name]
        for origin, name in levels:
            kind = _type_from_words(_words(name))
            if kind == "master":
                problems.append(f"already a master (the {origin} '{name}' says so)")
                sources["type"] = origin
                return "unknown"
            if kind:
                sources["type"] = origin
                return kind
    problems.append("no IMAGETYP and the file name does not say")
    return "unknown"


def _product(
    cards: _Cards, key: str | None, raw: str | None, squashed: str
) -> tuple[str, str] | None:
    """``(why, keyword)`` when the file is a processed product, not a raw frame."""
    if key and raw and "master" in squashed:
        return f"already a master ({key} '{raw}')", key
    calframe = cards.text("CALFRAME")  # Astro Pixel Processor
    if calframe and "master" in calframe.lower():
        return f"already a master (CALFRAME '{calframe}')", "CALFRAME"
    if cards.has("INTEGRAT"):  # Astro Pixel Processor
        why = f"already an integration of several frames (INTEGRAT '{cards.text('INTEGRAT')}')"
        return why, "INTEGRAT"
    for count_key in ("STACKCNT", "NCOMBINE"):
        count = cards.number(count_key)
        if count is not None and count > 1:
            return f"already a stack of {count:g} frames ({count_key} = {count:g})", count_key
    return None


def _stem(where: PurePath) -> str:
    name = where.name
    for suffix in (".bz2", ".gz", ".fz", ".txt", ".fits", ".fit", ".fts", ".hdr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _words(name: str) -> list[str]:
    """``'MasterDark_30s'`` -> ``['master', 'dark', 's']``."""
    return [w.lower() for w in _WORDS.findall(name)]


def _type_from_words(words: list[str]) -> str | None:
    if any(w.startswith("master") for w in words):
        return "master"
    kinds = {_NAME_TYPES[w] for w in words if w in _NAME_TYPES}
    if "darkflat" in kinds or {"dark", "flat"} <= kinds:
        return "darkflat"
    return kinds.pop() if len(kinds) == 1 else None


# --------------------------------------------------------------------------- exposure


def _exposure(cards: _Cards, problems: list[str], sources: dict[str, str]) -> float | None:
    """Seconds. Clean EXPTIME/EXPOSURE first, then EXPOINUS/EXPOINMS (ZWO), then a
    repaired decimal-comma value, then DWARF's EXP."""
    clean: list[tuple[str, float]] = []
    repaired: list[tuple[str, float]] = []
    for key, scale in (*((k, 1.0) for k in _EXPOSURE_KEYS), ("EXPOINUS", 1e-6),
                       ("EXPOINMS", 1e-3), ("EXP", 1.0)):  # fmt: skip
        raw = cards.get(key)
        if raw is None:
            continue
        number, fixed = _to_float(raw)
        if number is None:
            problems.append(f"{key} '{raw}' is not a number")
        elif fixed or key in cards.broken:
            repaired.append((key, number * scale))
        else:
            clean.append((key, number * scale))
    if not clean and not repaired:
        return None  # whether that matters depends on the frame type

    key, value = (clean or repaired)[0]
    source = key
    if key in ("EXPOINUS", "EXPOINMS"):
        source += f" ({'microseconds' if key == 'EXPOINUS' else 'milliseconds'})"
    broken = [k for k, _ in repaired]
    if clean and broken:
        source += f"; {'/'.join(broken)} card unreadable ({cards.get(broken[0])})"
    elif not clean:
        source += " (decimal comma repaired)"
    sources["exptime"] = source

    for other, other_value in clean + repaired:
        if other != key and abs(other_value - value) > 0.01 * max(abs(value), abs(other_value)):
            problems.append(
                f"{key} ({value:g} s) and {other} ({other_value:g} s) disagree by more than "
                f"1 %; using {key}"
            )
            break
    if value < 0:
        problems.append(f"negative exposure time ({key} = {value:g})")
        return None
    return value


# --------------------------------------------------------------------------- filter


class _AliasTable:
    """Filter name -> canonical name, from the ``filter_aliases`` configuration."""

    def __init__(self, filter_aliases: Mapping[str, Sequence[str]] | None) -> None:
        self.exact: dict[str, str] = {}  # one-letter names: case matters (r vs R)
        self.folded: dict[str, str] = {}
        for canonical, names in (filter_aliases or {}).items():
            names = [names] if isinstance(names, str) else list(names)
            for name in (canonical, *names):
                name = " ".join(str(name).split())
                if len(name) == 1:
                    self.exact.setdefault(name, canonical)
                elif name:
                    self.folded.setdefault(name.casefold(), canonical)

    def lookup(self, name: str) -> str | None:
        if len(name) == 1:
            return self.exact.get(name)
        return self.folded.get(name.casefold())

    def __contains__(self, word: str) -> bool:
        return word in self.exact or word.casefold() in self.folded


def _filter(
    cards: _Cards,
    where: PurePath | None,
    aliases: _AliasTable,
    problems: list[str],
    sources: dict[str, str],
) -> tuple[str | None, str | None]:
    """``(filter, wheel)``; ``wheel`` names a filter wheel the header mentions while it
    has no filter keyword at all (a flat or light then lacks its filter)."""
    for key in _FILTER_KEYS:
        if cards.has(key):
            value = _one_filter(cards.get(key), key, aliases, problems)
            if value:
                sources["filter"] = key
            return value, None
    if cards.has("FILTER1") or cards.has("FILTER2"):  # two wheels
        parts = [_one_filter(cards.get(k), k, aliases, problems) for k in ("FILTER1", "FILTER2")]
        named = [p for p in parts if p]
        if named:
            sources["filter"] = "FILTER1/FILTER2"
        return "+".join(named) or None, None

    # No filter keyword at all: a one-shot-colour camera, or a file named after it.
    if where is not None:
        for token in re.split(r"[_\-\s.]+", _stem(where)):
            if len(token) > 1 and token in aliases:
                sources["filter"] = "filename"
                return aliases.lookup(token), None
    wheel = next((k for k in _WHEEL_KEYS if cards.text(k)), None)
    return None, (f"{wheel} '{cards.text(wheel)}'" if wheel else None)


def _one_filter(raw: object, key: str, aliases: _AliasTable, problems: list[str]) -> str | None:
    if raw is None:
        return None
    number, _ = _to_float(raw)
    if number is not None:  # a wheel position or code, e.g. SAAO FILTERS = 48
        code = f"{number:g}"
        canonical = aliases.lookup(code)
        if canonical is None:
            problems.append(
                f"filter given only as a wheel code ({key} = {code}): name it in the filter aliases"
            )
        return canonical or code
    name = " ".join(str(raw).split())
    if name.casefold() in _NO_FILTER:
        return None
    return aliases.lookup(name) or name


# --------------------------------------------------------------------------- target


def _normalise_target(name: str | None) -> str | None:
    """``'m-51'`` -> ``'M 51'``, ``'ngc6946'`` -> ``'NGC 6946'``; other names as written."""
    if not name:
        return None
    name = " ".join(name.split())
    match = _DESIGNATION_FULL.fullmatch(name)
    return _designation(match) if match else name


def _designation(match: re.Match[str]) -> str:
    prefix = _CATALOGUES[re.sub(r"\s", "", match.group(1).lower())]
    number = str(int(match.group(2))) + match.group(3).upper()
    return f"Sh2-{number}" if prefix == "Sh2" else f"{prefix} {number}"


def _target_from_path(where: PurePath, aliases: _AliasTable, sources: dict[str, str]) -> str | None:
    """A light with no OBJECT: a catalogue designation in the file name, else the
    nearest folder (of three) whose name is not generic (type, date, filter...)."""
    match = _DESIGNATION_IN_NAME.search(_stem(where))
    if match:
        sources["target"] = "filename"
        return _designation(match)
    for folder in list(where.parents)[:3]:
        name = folder.name
        if not name:
            break
        match = _DESIGNATION_IN_NAME.search(name)
        if match:
            sources["target"] = "folder"
            return _designation(match)
        words = _words(name)
        generic = all(len(w) == 1 or w in _GENERIC_WORDS or w in aliases for w in words)
        if not generic:
            sources["target"] = "folder"
            return _normalise_target(name)
    return None


# --------------------------------------------------------------------------- dates


def _date_obs(
    cards: _Cards, zone: ZoneInfo, problems: list[str], sources: dict[str, str]
) -> datetime | None:
    """UTC start of the exposure, from the most trustworthy card present."""
    raw = cards.text("DATE-OBS")
    if raw:
        parsed = _parse_date(raw)
        if parsed is None:
            problems.append(f"DATE-OBS '{raw}' is not a date")
        else:
            when, has_time, tz = parsed
            if has_time:
                sources["date_obs"] = "DATE-OBS"
                return when.replace(tzinfo=tz or UTC).astimezone(UTC)
            for key in _TIME_KEYS:
                clock = _parse_time(cards.text(key))
                if clock is not None:
                    sources["date_obs"] = f"DATE-OBS + {key}"
                    return (when + clock).replace(tzinfo=UTC)
            problems.append(f"DATE-OBS '{raw}' has no time of day and no TIME-OBS/UT card")

    for key in ("DATE-LOC", "LOCALTIM"):
        local = cards.text(key)
        parsed = _parse_date(local) if local else None
        if parsed and parsed[1]:
            when, _, tz = parsed
            if tz is None:
                sources["date_obs"] = f"{key} (local time, read in {zone.key})"
                return when.replace(tzinfo=zone).astimezone(UTC)
            sources["date_obs"] = key
            return when.replace(tzinfo=tz).astimezone(UTC)

    for key, days_to_mjd in (("MJD-OBS", 0.0), ("JD-OBS", -2400000.5)):
        day = cards.number(key)
        if day is not None and day + days_to_mjd > 0:
            sources["date_obs"] = key
            return _MJD0 + timedelta(days=day + days_to_mjd)

    written = cards.text("DATE")
    parsed = _parse_date(written) if written else None
    if parsed and parsed[1]:
        sources["date_obs"] = "DATE (when the file was written, not the exposure start)"
        when, _, tz = parsed
        return when.replace(tzinfo=tz or UTC).astimezone(UTC)

    if not raw:
        problems.append("no observation date (DATE-OBS)")
    return None


def _parse_date(text: str) -> tuple[datetime, bool, fixed_offset | None] | None:
    """``(naive datetime, has a time of day, explicit UTC offset or None)``."""
    match = _ISO_DATE.fullmatch(text.strip())
    if match:
        year, month, day, hour, minute, second, fraction, offset = match.groups()
        try:
            when = datetime(int(year), int(month), int(day))
        except ValueError:
            return None
        if hour is None:
            return when, False, None
        clock = _clock(hour, minute, second, fraction)
        if clock is None:
            return None
        return when + clock, True, _offset(offset)
    match = _OLD_DATE.fullmatch(text.strip())
    if match:  # FITS says 19YY; PinPoint and MaxIm write 20YY: pivot at 70
        day, month, year = (int(g) for g in match.groups())
        try:
            return datetime(year + (1900 if year >= 70 else 2000), month, day), False, None
        except ValueError:
            return None
    return None


def _parse_time(text: str | None) -> timedelta | None:
    match = _TIME.fullmatch(text.strip()) if text else None
    return _clock(*match.groups()) if match else None


def _clock(hour: str, minute: str, second: str | None, fraction: str | None) -> timedelta | None:
    h, m, s = int(hour), int(minute), min(int(second or 0), 59)  # 60: leap second
    if h > 23 or m > 59:
        return None
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    return timedelta(hours=h, minutes=m, seconds=s, microseconds=micro)


def _offset(text: str | None) -> fixed_offset | None:
    if not text:
        return None
    if text.upper() == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    return fixed_offset(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))


# --------------------------------------------------------------------------- setup


def _shape(
    cards: _Cards,
    shape: tuple[int, ...] | None,
    problems: list[str],
    sources: dict[str, str],
) -> tuple[int, int] | None:
    if shape is not None and len(shape) >= 2:
        sources["shape"] = "argument"
        if len(shape) > 2 and math.prod(shape[:-2]) > 1:
            problems.append(f"the data are a cube {tuple(shape)}, not a single 2-D frame")
        return int(shape[-2]), int(shape[-1])
    prefix = "ZNAXIS" if cards.has("ZNAXIS") else "NAXIS"
    naxis = cards.number(prefix)
    if naxis is None:
        return None
    if naxis < 2:
        problems.append(f"no image data ({prefix} = {naxis:g}): not a frame")
        return None
    nx, ny = cards.number(f"{prefix}1"), cards.number(f"{prefix}2")
    if nx is None or ny is None:
        return None
    depth = cards.number(f"{prefix}3") if naxis > 2 else None
    if depth is not None and depth > 1:
        problems.append(f"the data are a cube ({prefix}3 = {depth:g}), not a single 2-D frame")
    sources["shape"] = f"{prefix}1/{prefix}2"
    return int(ny), int(nx)


def _binning(cards: _Cards, sources: dict[str, str]) -> str:
    for xkey, ykey in (("XBINNING", "YBINNING"), ("CCDXBIN", "CCDYBIN")):
        x = cards.number(xkey)
        if x is not None:
            y = cards.number(ykey)
            sources["binning"] = f"{xkey}/{ykey}"
            return f"{int(x)}x{int(y if y is not None else x)}"
    for key in ("BINNING", "CCDSUM"):  # '2*2' (DWARF), '2x2', '2 2' (CCDSUM), '2'
        digits = re.findall(r"\d+", cards.text(key) or "")
        if digits:
            sources["binning"] = key
            return f"{int(digits[0])}x{int(digits[-1])}"
    sources["binning"] = "default"
    return "1x1"


def _gains(cards: _Cards, sources: dict[str, str]) -> tuple[float | None, float | None]:
    """``(egain e-/ADU, gain setting)``; an IRAF-style GAIN in e-/ADU is an egain."""
    egain = cards.number("EGAIN")
    if egain is not None:
        sources["egain"] = "EGAIN"
    gain = cards.number("GAIN")
    if gain is not None and _EGAIN_COMMENT.search(cards.comment("GAIN")):
        if egain is None:
            egain = gain
            sources["egain"] = "GAIN (its comment says e-/ADU)"
        gain = None
    if gain is not None:
        sources["gain"] = "GAIN"
    return egain, gain


def _set_temp(cards: _Cards, sources: dict[str, str]) -> float | None:
    value = _first_number(cards, ("SET-TEMP", "SETTEMP", "CCD-TSET"), "set_temp", sources)
    return None if value is None else round(value, 1)


def _ccd_temp(cards: _Cards, sources: dict[str, str]) -> float | None:
    keys = ("CCD-TEMP", "CCD_TEMP", "CCDTEMP", "TEMPERAT", "DET-TEMP", "DETTEMP")
    value = _first_number(cards, keys, "ccd_temp", sources)
    if value is not None and value > 100:  # no sensor runs at 100 C: kelvin (SAAO)
        sources["ccd_temp"] += f" ({value:g}, read as kelvin)"
        value = round(value - 273.15, 2)
    return value


def _bayer(cards: _Cards, sources: dict[str, str]) -> str | None:
    for key in ("BAYERPAT", "CFAIMAGE", "COLORTYP"):  # COLORTYP is often 'RAW16': skip it
        value = cards.text(key)
        if value and value.upper() in _BAYER_PATTERNS:
            sources["bayer"] = key
            return value.upper()
    return None


def _first_number(
    cards: _Cards, keys: Sequence[str], fact: str, sources: dict[str, str]
) -> float | None:
    for key in keys:
        value = cards.number(key)
        if value is not None:
            sources[fact] = key
            return value
    return None


def _first_text(
    cards: _Cards, keys: Sequence[str], fact: str, sources: dict[str, str]
) -> str | None:
    for key in keys:
        value = cards.text(key)
        if value:
            sources[fact] = key
            return value
    return None


# --------------------------------------------------------------------------- provenance


def _calstat(cards: _Cards, sources: dict[str, str]) -> str | None:
    stated = cards.text("CALSTAT")
    if stated:
        sources["calstat"] = "CALSTAT"
        return stated.upper()
    letters: set[str] = set()
    found: list[str] = []
    for key, letter in (("SUBBIAS", "B"), ("ZEROCOR", "B"), ("SUBDARK", "D"),
                        ("DARKCOR", "D"), ("FLATCOR", "F")):  # fmt: skip
        if cards.has(key):
            letters.add(letter)
            found.append(key)
    history = cards.history()
    for pattern, letter in ((_HIST_BIAS, "B"), (_HIST_DARK, "D"), (_HIST_FLAT, "F")):
        if _mentions(history, pattern):
            letters.add(letter)
            if "HISTORY" not in found:
                found.append("HISTORY")
    if letters:
        sources["calstat"] = "/".join(found)
        return "".join(letter for letter in "BDF" if letter in letters)
    if _mentions(history, _HIST_CALIBRATED):
        sources["calstat"] = "HISTORY"
        return "C"
    if cards.number("PEDESTAL") and cards.has("SWMODIFY"):
        sources["calstat"] = "PEDESTAL/SWMODIFY"
        return "C"
    return None


def _mentions(lines: list[str], pattern: re.Pattern[str]) -> bool:
    """Whether a line matches; a substring test first, as ``re`` is slow on long text."""
    needles = _HIST_NEEDLES[pattern]
    return any(pattern.search(line) for line in lines if any(n in line for n in needles))


def _has_wcs(cards: _Cards) -> bool:
    """A celestial WCS is present: CTYPE pair, CRVAL pair and a scale (CD, PC or CDELT)."""
    ctype1, ctype2 = cards.text("CTYPE1"), cards.text("CTYPE2")
    if not ctype1 or not ctype2:
        return False
    axes = {ctype1[:4].upper(), ctype2[:4].upper()}
    if len(axes) != 2 or not axes <= _CELESTIAL:
        return False
    if cards.number("CRVAL1") is None or cards.number("CRVAL2") is None:
        return False
    if any(cards.number(key) for key in _WCS_MATRIX):
        return True
    return bool(cards.number("CDELT1")) and bool(cards.number("CDELT2"))


# --------------------------------------------------------------------------- consistency


def _check_consistency(
    ftype: str,
    exptime: float | None,
    target: str | None,
    filt: str | None,
    wheel: str | None,
    problems: list[str],
) -> None:
    """What each frame type needs, and what contradicts it; the type is kept."""
    if exptime is None and ftype in ("light", "dark", "darkflat", "flat"):
        problems.append("no exposure time (EXPTIME/EXPOSURE/EXPOINUS)")
    if exptime is not None:
        if ftype == "bias" and exptime > 1.0:
            problems.append(f"a bias frame with a {exptime:g} s exposure: is it a dark?")
        elif ftype in ("dark", "darkflat") and exptime == 0:
            problems.append(f"a {ftype} frame with zero exposure: is it a bias?")
        elif ftype in ("light", "flat") and exptime == 0:
            problems.append(f"a {ftype} frame with zero exposure")
    if ftype == "light" and not target:
        problems.append("no OBJECT, and the file and folder names do not name the target")
    if ftype in ("light", "flat") and filt is None and wheel:
        problems.append(f"a filter wheel is named ({wheel}) but the header has no FILTER")


def _pointing(cards: _Cards) -> tuple[float, float] | None:
    """Where the telescope pointed (deg): RA/DEC in degrees or sexagesimal, OBJCTRA/OBJCTDEC
    (hours), else the WCS reference point. Good to a few arcseconds at best: enough to
    notice a pointing jump, never used for astrometry."""
    for ra_key, dec_key, hours in (("RA", "DEC", None), ("OBJCTRA", "OBJCTDEC", True),
                                   ("CRVAL1", "CRVAL2", False)):  # fmt: skip
        ra, dec = cards.get(ra_key), cards.get(dec_key)
        if ra is None or dec is None:
            continue
        try:
            ra_deg = _angle(ra, hours if hours is not None else isinstance(ra, str))
            dec_deg = _angle(dec, False)
        except ValueError:
            continue
        if 0 <= ra_deg < 360 and -90 <= dec_deg <= 90:
            return ra_deg, dec_deg
    return None


def _angle(value: object, hours: bool) -> float:
    if isinstance(value, int | float):
        return float(value)
    parts = str(value).replace(":", " ").replace("h", " ").replace("d", " ").replace("m", " ")
    parts = parts.replace("s", " ").replace("'", " ").replace('"', " ").split()
    if not parts:
        raise ValueError(value)
    sign = -1.0 if parts[0].startswith("-") else 1.0
    numbers = [abs(float(parts[0]))] + [float(p) for p in parts[1:3]]
    degrees = sum(n / 60**i for i, n in enumerate(numbers))
    return sign * degrees * (15.0 if hours else 1.0)


def _pixel_scale(cards: _Cards) -> float | None:
    """arcsec/px from XPIXSZ (um, binning included as MaxIm and N.I.N.A. write it) and
    FOCALLEN (mm), else from a WCS scale (CDELT or CD)."""
    size, focal = cards.number("XPIXSZ"), cards.number("FOCALLEN")
    if size and focal and size > 0 and focal > 0:
        return 206.264806 * size / focal
    for keys in (("CDELT1",), ("CD1_1", "CD1_2")):
        values = [cards.number(k) for k in keys]
        if all(v is not None for v in values) and any(values):
            return 3600.0 * math.hypot(*values)
    return None

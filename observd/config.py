"""TOML configuration -> frozen dataclasses, every key checked.

An operator edits one file at the telescope; a typo must stop observd with a message
that names the file, the key and what was expected, not surface as a crash at 3 a.m.
Relative paths are taken relative to the config file's folder.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG_PATH",
    "find_config_file",
    "load_config",
    "config_from_dict",
    "to_toml",
]

DEFAULT_CONFIG_PATH = Path("/etc/observd/observd.toml")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, key and expectation."""


DEFAULT_FILTER_ALIASES: Mapping[str, tuple[str, ...]] = {
    "U": ("Johnson U", "U-Bessel"),
    "B": ("Blue", "Johnson B", "B-Bessel", "Bessel B"),
    "V": ("Johnson V", "V-Bessel", "Bessel V", "Vis", "Visual"),
    "R": ("Red", "Rc", "R_c", "Cousins R", "R-Bessel", "Bessel R"),
    "I": ("Ic", "I_c", "Cousins I", "I-Bessel"),
    "G": ("Green",),
    "L": ("Lum", "Luminance", "Clear", "CLR"),
    "Ha": ("H-alpha", "Halpha", "H_alpha", "HA", "H-a"),
    "OIII": ("O3", "O-III", "O III"),
    "SII": ("S2", "S-II", "S II"),
    "u'": ("up", "sdss u", "u_sdss"),
    "g'": ("gp", "sdss g", "g_sdss"),
    "r'": ("rp", "sdss r", "r_sdss"),
    "i'": ("ip", "sdss i", "i_sdss"),
    "z'": ("zp", "sdss z", "z_sdss"),
}


@dataclass(frozen=True)
class PathsConfig:
    """Where frames come from and where observd writes."""

    incoming: tuple[Path, ...] = ()
    """Watched camera folders, recursive. Read-only for observd."""
    products: Path = Path("/var/lib/observd/products")
    """Masters, stacks, quick-looks and summaries."""
    catalog: Path = Path("/var/lib/observd/observd.sqlite")
    """The SQLite catalog of every frame and decision."""
    logs: Path | None = None
    """Folder of the rotating log file; default: beside the catalog."""


@dataclass(frozen=True)
class SiteConfig:
    """The observatory: local time decides which night a frame belongs to."""

    name: str = ""
    timezone: str = "UTC"
    latitude: float | None = None
    longitude: float | None = None
    elevation: float = 0.0


@dataclass(frozen=True)
class WebConfig:
    """The dome monitor."""

    host: str = "127.0.0.1"
    port: int = 8470


@dataclass(frozen=True)
class HeadersConfig:
    """How header values map onto observd's names."""

    filter_aliases: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_FILTER_ALIASES)
    )
    """Canonical filter name -> names the camera software may write (case-insensitive)."""


@dataclass(frozen=True)
class IngestConfig:
    """Which files in the camera folder are frames."""

    extensions: tuple[str, ...] = (
        ".fits",
        ".fit",
        ".fts",
        ".fits.fz",
        ".fit.fz",
        ".fits.gz",
        ".fit.gz",
        ".fits.bz2",
        ".fit.bz2",
    )
    ignore: tuple[str, ...] = ("*.tmp", "*.part", "*.partial", "~*", ".*", "*.crdownload")
    """Glob patterns of temporary names written by capture software before a rename."""


@dataclass(frozen=True)
class WatchConfig:
    """Watching the camera folder (used by ``observd run``)."""

    mode: Literal["auto", "inotify", "polling"] = "auto"
    settle_seconds: float = 2.0
    poll_seconds: float = 2.0
    rescan_seconds: float = 300.0
    incomplete_seconds: float = 60.0
    """A file still changing after this long is reported; one unchanged but structurally
    incomplete for this long is handed on anyway (and rejected with its reason)."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Master calibrations: how they are combined, judged and chosen."""

    warmup: int = 5
    """Bias/dark frames combined jointly before the master runs incrementally."""
    clip_sigma: float = 5.0
    """Pixel rejection against the running master, in sigma of the noise model."""
    dark_temperature_tolerance: float = 0.5
    """Darks whose sensor is further than this (C) from its set point are rejected."""
    saturation: float = 65535.0
    """ADU at which the camera saturates (flats near it are rejected)."""
    flat_min_snr: float = 50.0
    """Flats fainter than this per-pixel SNR are rejected."""
    flat_max_banding: float = 0.01
    """Flats whose rows vary by more than this against the other flats are rejected."""
    bias_max_age_days: float = 30.0
    dark_max_age_days: float = 30.0
    flat_max_age_days: float = 7.0
    """How old a master from another night may be to calibrate a light."""
    flat_change_warn: float = 0.01
    flat_change_alarm: float = 0.02
    """A flat that changed this much since the previous night raises a warning / alarm."""
    cache_masters: int = 8
    """Master images kept in memory (a 4096 px master is 64 MB)."""


@dataclass(frozen=True)
class StackConfig:
    """The running coadds and their products."""

    warmup: int = 3
    """Frames combined jointly before outliers are judged against the running mean."""
    clip_sigma: float = 5.0
    """Outlier threshold, in sigma of the noise model (beyond the PSF-mismatch margin)."""
    checkpoint_frames: int = 5
    """Frames between checkpoints of a coadd: a crash loses at most these (redone)."""
    publish_seconds: float = 10.0
    """Products are rewritten after an accepted frame, at most this often."""
    png_max_size: int = 2048
    """Largest side of quick-look and colour PNGs, px."""


@dataclass(frozen=True)
class DaemonConfig:
    """``observd run``: the worker's rhythm, rebuilds and when a night is over."""

    queue_size: int = 256
    """Settled files waiting for the worker; the watcher holds the rest (back-pressure)."""
    burst: int = 64
    """Settled files taken at once and put in DATE-OBS order."""
    state_seconds: float = 2.0
    """How often the daemon's state file and systemd status are written."""
    rebuild_delay_seconds: float = 60.0
    """Quiet time after the last calibration frame before stacks whose masters have
    been superseded (dawn flats, more darks) are rebuilt from the raw frames."""
    finish_quiet_seconds: float = 1800.0
    """No new frame for this long (and past dawn when the site is known) ends the night:
    waiting lights are processed with what exists and the summary is written."""
    serve_web: bool = True
    """Serve the dome page from ``observd run``."""


@dataclass(frozen=True)
class SummaryConfig:
    """The morning summary: when the night is over, and what is worth a warning."""

    quiet_minutes: float = 60.0
    """The night counts as over once no frame has arrived for this long (or at dawn)."""
    dawn_altitude: float = -18.0
    """Sun altitude (deg) that ends the night: -18 astronomical, -12 nautical dawn."""
    fallback_dawn: str = "06:00"
    """Local time that ends the night when [site] latitude/longitude are not set."""
    gap_minutes: float = 30.0
    """A silence between frames longer than this (and than 3 x the night's usual cadence)
    while the sky is dark is reported as a gap."""
    zero_point: Mapping[str, float] = field(default_factory=dict)
    """Filter -> magnitude of a source giving 1 ADU/s in the stacks (depth in magnitudes)."""
    new_hot_pixels_warn: int = 10
    new_hot_pixels_fraction: float = 0.05
    """New hot pixels (not in the previous night's map) warn above the larger of this count
    and this fraction of the previous night's hot pixels."""
    dark_current_warn: float = 1.25
    """Dark current this many times the previous night's raises a warning."""
    disk_warn_gb: float = 5.0
    """Free space below this (GB) on the products or camera disk raises a warning."""
    history_nights: int = 14
    """Earlier nights shown in the camera-health table."""


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    web: WebConfig = field(default_factory=WebConfig)
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    source: Path | None = None
    """The file this config was read from (None: built-in defaults)."""

    @property
    def log_dir(self) -> Path:
        return self.paths.logs or self.paths.catalog.parent


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use: ``--config``, then ``$OBSERVD_CONFIG``, then /etc/observd."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("OBSERVD_CONFIG")
    if env:
        return Path(env)
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH
    return None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file.

    Parameters
    ----------
    path
        The TOML file; None means built-in defaults.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        With the file, the key and what was expected.
    """
    if path is None:
        return config_from_dict({}, source=None)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(data, source=path)


def config_from_dict(data: Mapping[str, Any], *, source: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML, validating every key."""
    where = str(source) if source else "<config>"
    base = source.resolve().parent if source else Path.cwd()
    values = _build(Config, data, where, base, prefix="", skip={"source"})
    config = Config(**values, source=source)
    _check_semantics(config, where)
    return config


def _build(cls: type, table: Any, where: str, base: Path, prefix: str, skip=frozenset()):
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [{prefix}] must be a table, got {_show(table)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name not in skip}
    for key in table:
        if key not in known:
            section = f"[{prefix}] " if prefix else ""
            raise ConfigError(
                f"{where}: unknown key {section}{key!r}; expected one of: "
                + ", ".join(sorted(known))
            )
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip or f.name not in table:
            continue
        hint = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(hint):
            values[f.name] = hint(**_build(hint, table[f.name], where, base, key))
        else:
            values[f.name] = _convert(table[f.name], hint, where, key, base)
    return values


def _convert(value: Any, hint: Any, where: str, key: str, base: Path) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where, key, base)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: {key} must be one of {', '.join(map(repr, args))}, got {_show(value)}"
            )
        return value
    if origin is tuple:
        if isinstance(value, str) and args[0] is Path:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {_show(value)}")
        return tuple(_convert(v, args[0], where, f"{key}[{i}]", base) for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} must be a table, got {_show(value)}")
        return {str(k): _convert(v, args[1], where, f"{key}.{k}", base) for k, v in value.items()}
    if hint is Path:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {key} must be a path (a string), got {_show(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key} must be a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {_show(value)}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported setting type {hint}")  # pragma: no cover


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind_name = kind.get(type(value), "a table" if isinstance(value, Mapping) else "a list")
    return f"{kind_name} ({value!r})" if not isinstance(value, Mapping) else kind_name


def _check_semantics(config: Config, where: str) -> None:
    """Checks that need more than a type: a real timezone, sane paths and numbers."""
    try:
        ZoneInfo(config.site.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{where}: site.timezone must be an IANA timezone name such as "
            f"'America/Los_Angeles', got {config.site.timezone!r}"
        ) from None
    for i, folder in enumerate(config.paths.incoming):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{where}: paths.incoming[{i}] must be a folder, {folder} is a file")
    if config.paths.products.exists() and not config.paths.products.is_dir():
        raise ConfigError(
            f"{where}: paths.products must be a folder, {config.paths.products} is a file"
        )
    if config.paths.catalog.is_dir():
        raise ConfigError(
            f"{where}: paths.catalog must be a file path, {config.paths.catalog} is a folder"
        )
    lat, lon = config.site.latitude, config.site.longitude
    if lat is not None and not -90 <= lat <= 90:
        raise ConfigError(f"{where}: site.latitude must be within -90..90 degrees, got {lat}")
    if lon is not None and not -180 <= lon <= 360:
        raise ConfigError(f"{where}: site.longitude must be within -180..360 degrees, got {lon}")
    if not 0 < config.web.port < 65536:
        raise ConfigError(f"{where}: web.port must be within 1..65535, got {config.web.port}")
    for name in ("settle_seconds", "poll_seconds", "rescan_seconds", "incomplete_seconds"):
        if getattr(config.watch, name) <= 0:
            raise ConfigError(f"{where}: watch.{name} must be > 0")
    daemon = config.daemon
    for name in ("queue_size", "burst"):
        if getattr(daemon, name) < 1:
            raise ConfigError(f"{where}: daemon.{name} must be >= 1")
    for name in ("state_seconds", "rebuild_delay_seconds", "finish_quiet_seconds"):
        if getattr(daemon, name) <= 0:
            raise ConfigError(f"{where}: daemon.{name} must be > 0")
    cal = config.calibration
    for name in ("clip_sigma", "saturation", "flat_min_snr", "dark_temperature_tolerance"):
        if getattr(cal, name) <= 0:
            raise ConfigError(f"{where}: calibration.{name} must be > 0")
    if cal.warmup < 1:
        raise ConfigError(f"{where}: calibration.warmup must be >= 1")
    for name in ("bias_max_age_days", "dark_max_age_days", "flat_max_age_days"):
        if getattr(cal, name) < 0:
            raise ConfigError(f"{where}: calibration.{name} must be >= 0")
    _check_summary(config.summary, where)
    seen: dict[str, str] = {}
    for canonical, aliases in config.headers.filter_aliases.items():
        for name in (canonical, *aliases):
            # as in headers.describe: one-letter names are case-sensitive (Sloan r vs R)
            other = seen.setdefault(name if len(name) == 1 else name.casefold(), canonical)
            if other != canonical:
                raise ConfigError(
                    f"{where}: headers.filter_aliases: {name!r} is listed for both "
                    f"{other!r} and {canonical!r}"
                )


def _check_summary(summary: SummaryConfig, where: str) -> None:
    for name in ("quiet_minutes", "gap_minutes", "dark_current_warn"):
        if getattr(summary, name) <= 0:
            raise ConfigError(f"{where}: summary.{name} must be > 0")
    for name in ("new_hot_pixels_warn", "new_hot_pixels_fraction", "disk_warn_gb",
                 "history_nights"):  # fmt: skip
        if getattr(summary, name) < 0:
            raise ConfigError(f"{where}: summary.{name} must be >= 0")
    if not -30 <= summary.dawn_altitude <= 0:
        raise ConfigError(
            f"{where}: summary.dawn_altitude must be within -30..0 degrees, "
            f"got {summary.dawn_altitude}"
        )
    if not re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", summary.fallback_dawn):
        raise ConfigError(
            f"{where}: summary.fallback_dawn must be a local time HH:MM such as '06:00', "
            f"got {summary.fallback_dawn!r}"
        )
    for filt, zp in summary.zero_point.items():
        if not 0 < zp < 40:
            raise ConfigError(
                f"{where}: summary.zero_point.{filt} must be a magnitude within 0..40, got {zp}"
            )


def to_toml(config: Config) -> str:
    """The effective config as TOML (what ``observd config`` prints)."""
    lines = [f"# effective configuration (from {config.source or 'built-in defaults'})"]
    for section in fields(config):
        if section.name == "source":
            continue
        lines.append(f"\n[{section.name}]")
        sub = getattr(config, section.name)
        nested: list[str] = []
        for f in fields(sub):
            value = getattr(sub, f.name)
            if value is None:
                lines.append(f"# {f.name} = (not set)")
            elif isinstance(value, Mapping):
                nested.append(f"\n[{section.name}.{f.name}]")
                nested += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines += nested
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover

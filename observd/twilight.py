"""When the night ends: the sun's altitude from a closed formula, dusk and dawn offline.

The dome PC has no network and must not need one: the sun's position comes from the
NOAA / Meeus low-precision solar formulae (about 0.01 deg, i.e. well under a minute of
time at twilight), not from astropy's ephemerides and IERS tables (which want fresh
downloads for recent dates). Refraction is ignored (it is nil at -18 deg).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["sun_altitude", "twilight"]

_J2000 = 2451545.0
_UNIX_JD = 2440587.5


def sun_altitude(when: ArrayLike, latitude: float, longitude: float) -> NDArray[np.float64]:
    """Geometric altitude of the sun's centre (deg) at UNIX times ``when`` (s, UTC).

    Parameters
    ----------
    when
        Seconds since 1970-01-01 UTC (scalar or array).
    latitude, longitude
        Site, degrees (longitude east-positive).
    """
    t = np.asarray(when, dtype=np.float64)
    jd = t / 86400.0 + _UNIX_JD
    c = (jd - _J2000) / 36525.0  # Julian centuries (UT ~ TT to a minute: 0.0005 deg)
    l0 = np.radians((280.46646 + c * (36000.76983 + c * 0.0003032)) % 360.0)
    m = np.radians(357.52911 + c * (35999.05029 - 0.0001537 * c))
    e = 0.016708634 - c * (0.000042037 + 0.0000001267 * c)
    centre = (
        np.sin(m) * (1.914602 - c * (0.004817 + 0.000014 * c))
        + np.sin(2 * m) * (0.019993 - 0.000101 * c)
        + np.sin(3 * m) * 0.000289
    )
    omega = np.radians(125.04 - 1934.136 * c)
    lam = np.radians(np.degrees(l0) + centre - 0.00569 - 0.00478 * np.sin(omega))
    eps0 = 23.0 + (26.0 + (21.448 - c * (46.815 + c * (0.00059 - c * 0.001813))) / 60.0) / 60.0
    eps = np.radians(eps0 + 0.00256 * np.cos(omega))
    decl = np.arcsin(np.sin(eps) * np.sin(lam))
    y = np.tan(eps / 2) ** 2
    eqt = 4.0 * np.degrees(  # equation of time, minutes
        y * np.sin(2 * l0)
        - 2 * e * np.sin(m)
        + 4 * e * y * np.sin(m) * np.cos(2 * l0)
        - 0.5 * y * y * np.sin(4 * l0)
        - 1.25 * e * e * np.sin(2 * m)
    )
    minutes = (t % 86400.0) / 60.0
    solar = (minutes + eqt + 4.0 * longitude) % 1440.0
    hour_angle = np.radians(solar / 4.0 - 180.0)
    lat = math.radians(latitude)
    sin_alt = math.sin(lat) * np.sin(decl) + math.cos(lat) * np.cos(decl) * np.cos(hour_angle)
    return np.degrees(np.arcsin(np.clip(sin_alt, -1.0, 1.0)))


def twilight(
    night: str | date,
    latitude: float,
    longitude: float,
    timezone: str,
    altitude: float = -18.0,
) -> tuple[datetime | None, datetime | None]:
    """Dusk and dawn of a night: when the sun crosses ``altitude`` (UTC datetimes).

    The night runs from local noon of its date to local noon of the next day. Where the
    sun never gets that low (a summer night far north) both are None; where it never
    gets that high (polar night), dusk is the first noon and dawn the second.

    Parameters
    ----------
    night
        Local date of the evening, ``YYYY-MM-DD``.
    latitude, longitude
        Site, degrees (longitude east-positive).
    timezone
        IANA name of the site's timezone (which noon to start from).
    altitude
        Sun altitude, deg (-18 astronomical, -12 nautical, -6 civil twilight).

    Returns
    -------
    (dusk, dawn)
        Aware UTC datetimes, to about a second of the formula.
    """
    day = date.fromisoformat(night) if isinstance(night, str) else night
    tz = ZoneInfo(timezone)
    start = datetime.combine(day, time(12, 0), tz).timestamp()
    end = datetime.combine(day + timedelta(days=1), time(12, 0), tz).timestamp()
    grid = np.arange(start, end + 1.0, 60.0)
    alt = sun_altitude(grid, latitude, longitude) - altitude
    below = alt < 0
    if not below.any():
        return None, None
    if below.all():
        return _utc(start), _utc(end)
    down = np.flatnonzero(~below[:-1] & below[1:])
    up = np.flatnonzero(below[:-1] & ~below[1:])
    dusk = _refine(grid[down[0]], latitude, longitude, altitude) if down.size else start
    dawn = _refine(grid[up[-1]], latitude, longitude, altitude) if up.size else end
    return _utc(dusk), _utc(dawn)


def _refine(t0: float, latitude: float, longitude: float, altitude: float) -> float:
    """Bisect the crossing within the minute that starts at ``t0``."""
    lo, hi = t0, t0 + 60.0
    f_lo = float(sun_altitude(lo, latitude, longitude)) - altitude
    for _ in range(12):  # 60 s / 2**12: 15 ms
        mid = 0.5 * (lo + hi)
        f_mid = float(sun_altitude(mid, latitude, longitude)) - altitude
        if (f_mid < 0) == (f_lo < 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(round(ts, 3), UTC)

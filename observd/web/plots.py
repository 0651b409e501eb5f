"""The night's timeline as inline SVG: frames over time, FWHM, background, transparency.

Drawn on the server so the page needs no plotting library and no script to show it;
colours come from CSS classes (``f-<filter>``, ``t-<type>``, ``rej``), so the red night
mode restyles the plots like the rest of the page.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape
from typing import Any

__all__ = ["timeline_svg"]

WIDTH = 1600
LEFT = 130
RIGHT = 20
PANEL = 95
TICKS = 40


def _time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _css(text: str | None) -> str:
    return "".join(c if c.isalnum() else "_" for c in (text or "none"))


def timeline_svg(frames: list[dict[str, Any]]) -> str:
    """One SVG with four panels sharing the time axis (UTC hours).

    Parameters
    ----------
    frames
        ``data.frames_data`` rows: ``date_obs``, ``type``, ``filter``, ``status`` and the
        light quality numbers.

    Returns
    -------
    str
        ``<svg>`` markup, or an empty string when no frame has a time.
    """
    timed = [(t, f) for f in frames if (t := _time(f.get("date_obs"))) is not None]
    if not timed:
        return ""
    t0 = min(t for t, _ in timed)
    t1 = max(t for t, _ in timed)
    span = max(t1 - t0, 60.0)
    t0 -= 0.02 * span
    span *= 1.04
    plot_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + plot_w * (t - t0) / span

    panels = [
        ("frames", None),
        ("FWHM px", "fwhm"),
        ("sky ADU/s", "background"),
        ("transparency", "transparency"),
    ]
    height = TICKS + PANEL * (len(panels) - 1) + 40
    out = [
        f'<svg class="timeline" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="the night\'s timeline" xmlns="http://www.w3.org/2000/svg">'
    ]
    y = 0.0
    for label, key in panels:
        h = TICKS if key is None else PANEL
        top, bottom = y + 6, y + h - 8
        if key is None:  # the frame ticks: label in the margin
            out.append(f'<text class="lbl" x="8" y="{(top + bottom) / 2 + 10:.0f}">{label}</text>')
        else:  # a plot: label inside, top left; the margin holds the values
            out.append(f'<text class="lbl" x="{LEFT + 10}" y="{top + 22:.0f}">{label}</text>')
        out.append(f'<line class="axis" x1="{LEFT}" y1="{bottom:.0f}" x2="{WIDTH - RIGHT}" '
                   f'y2="{bottom:.0f}"/>')  # fmt: skip
        if key is None:
            for t, f in timed:
                cls = f"t-{_css(f.get('type'))} f-{_css(f.get('filter'))}"
                if f.get("status") in ("rejected", "failed"):
                    cls += " rej"
                out.append(f'<line class="tick {cls}" x1="{x(t):.1f}" y1="{top:.0f}" '
                           f'x2="{x(t):.1f}" y2="{bottom:.0f}"><title>'
                           f'{escape(str(f.get("path", "")).rsplit("/", 1)[-1])} '
                           f'{escape(str(f.get("status")))}</title></line>')  # fmt: skip
        else:
            pts = [(t, f, float(f[key])) for t, f in timed if _finite(f.get(key))]
            if pts:
                vals = sorted(v for _, _, v in pts)
                lo, hi = vals[0], vals[-1]
                if hi - lo < 1e-9:
                    lo, hi = lo - 1, hi + 1
                pad = 0.08 * (hi - lo)
                lo, hi = lo - pad, hi + pad

                def yy(v: float, lo: float = lo, hi: float = hi, top: float = top,
                       bottom: float = bottom) -> float:  # fmt: skip
                    return bottom - (bottom - top) * (v - lo) / (hi - lo)

                for v in (lo + pad, hi - pad):
                    out.append(f'<text class="val" x="{LEFT - 6}" y="{yy(v) + 7:.0f}" '
                               f'text-anchor="end">{v:.3g}</text>')  # fmt: skip
                for t, f, v in pts:
                    rej = f.get("verdict") == "rejected" or f.get("status") == "rejected"
                    cls = f"pt f-{_css(f.get('filter'))}" + (" rej" if rej else "")
                    out.append(
                        f'<circle class="{cls}" cx="{x(t):.1f}" cy="{yy(v):.1f}" r="7">'
                        f"<title>{escape(str(f.get('filter')))} {v:.3g}</title></circle>"
                    )
        y += h
    # hour marks
    first_hour = math.ceil(t0 / 3600) * 3600
    step = 3600 if span < 14 * 3600 else 7200
    for h in range(int(first_hour), int(t0 + span) + 1, step):
        label = datetime.fromtimestamp(h, UTC).strftime("%H:%M")
        out.append(f'<line class="grid" x1="{x(h):.1f}" y1="0" x2="{x(h):.1f}" y2="{y:.0f}"/>')
        out.append(f'<text class="val" x="{x(h):.1f}" y="{y + 30:.0f}" '
                   f'text-anchor="middle">{label}</text>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)

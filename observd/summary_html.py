"""Drawing the morning summary: its HTML page (with matplotlib plots) and its Markdown.

Takes the plain data of :func:`observd.summary.summary_data` and nothing else; plots and
thumbnails are embedded as PNG data URIs so the page needs no network and no folder
beside it. Files linked (full-size PNGs, FITS) are relative to the page.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import matplotlib

matplotlib.use("Agg")

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from loguru import logger  # noqa: E402

__all__ = ["markdown", "render"]

_THUMB_PX = 240
_COLOURS = {"R": "#d62728", "V": "#2ca02c", "G": "#2ca02c", "B": "#1f77b4", "L": "#555555",
            "Ha": "#8c1c13", "OIII": "#17becf", "SII": "#ff7f0e", "I": "#9467bd"}  # fmt: skip

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
background:#fafafa;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:left;font-size:.92em}th{background:#eee}td.n{text-align:right}
.warn{background:#fff4d6;border-left:5px solid #e0a800;padding:.4em .8em;margin:.3em 0}
.alarm{background:#ffe1e1;border-left:5px solid #c00}
.ok{background:#e6f6e6;border-left:5px solid #3a3;padding:.4em .8em}
.stacks{display:flex;flex-wrap:wrap;gap:1em}.stack{background:#fff;border:1px solid #ddd;
padding:.5em}.stack img{display:block;max-width:240px}figure{margin:.5em 0}
img.plot{max-width:100%;border:1px solid #ddd;background:#fff}
img.broken{outline:4px solid #c00}small,.muted{color:#666}
details{margin:.3em 0}
"""

# marks broken images on the page itself (and tells a headless browser how many loaded)
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), bad = 0;
  imgs.forEach(function (im) {
    if (!(im.complete && im.naturalWidth > 0)) { bad++; im.classList.add('broken'); }
  });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-broken', bad);
});
"""


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(path: str | Path, size: int = _THUMB_PX) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            return buf.getvalue()
    except (OSError, ValueError) as exc:
        logger.warning("summary: no thumbnail of {}: {}", path, exc)
        return None


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _local(text: str | None, tz: ZoneInfo) -> str:
    t = _time(text)
    return t.astimezone(tz).strftime("%H:%M") if t else "-"


def _num(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


# ------------------------------------------------------------------------------- plots


def _conditions_plot(target: dict[str, Any], tz: ZoneInfo) -> bytes | None:
    """FWHM and sky background through the night, per filter; rejected frames as x."""
    series = [(f["filter"], s) for f in target["filters"] for s in f["series"]]
    if not series:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.6), sharex=True, layout="constrained")
    arcsec = all(s.get("fwhm_arcsec") for _, s in series)
    for fe in target["filters"]:
        colour = _COLOURS.get(fe["filter"], "#444")
        for used, marker in ((True, "o"), (False, "x")):
            pts = [s for s in fe["series"] if s["used"] == used and s["date_obs"]]
            if not pts:
                continue
            t = [_time(s["date_obs"]) for s in pts]
            fw = [s["fwhm_arcsec"] if arcsec else s["fwhm"] for s in pts]
            label = f"{fe['filter']}" + ("" if used else " rejected")
            ax1.plot(t, fw, marker, color=colour, label=label, ms=5)
            ax2.plot(t, [s["background"] for s in pts], marker, color=colour, ms=5)
    ax1.set_ylabel("FWHM (arcsec)" if arcsec else "FWHM (px)")
    ax2.set_ylabel("sky (ADU/s/px)")
    sky = [s.get("background") or 0 for _, s in series]
    if min(sky) > 0 and max(sky) > 5 * min(sky):  # twilight and moon: decades apart
        ax2.set_yscale("log")
    _mark_flip(target, (ax1, ax2))
    ax1.legend(fontsize=7, ncol=4, loc="best")
    _time_axis(ax2, [_time(s["date_obs"]) for _, s in series if s["date_obs"]], tz)
    ax1.set_title(f"{target['target']}: seeing and sky", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _fig_png(fig)


def _tracking_plot(target: dict[str, Any], tz: ZoneInfo) -> bytes | None:
    """Offsets on the target grid and field rotation against time, the flip marked."""
    tr = target.get("tracking")
    if not tr or len(tr["points"]) < 2:
        return None
    pts = tr["points"]
    t = [_time(p["date_obs"]) for p in pts]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.2), sharex=True, layout="constrained")
    ax1.plot(t, [p["dx"] for p in pts], "o-", ms=4, label="dx")
    ax1.plot(t, [p["dy"] for p in pts], "s-", ms=4, label="dy")
    ax1.set_ylabel("offset on grid (px)")
    ax1.legend(fontsize=7)
    ax2.plot(t, [p["rotation_field"] for p in pts], "o-", ms=4, color="#9467bd")
    ax2.set_ylabel("field rotation (deg)")
    _mark_flip(target, (ax1, ax2))
    _time_axis(ax2, t, tz)
    drift = tr.get("drift_px_min")
    ax1.set_title(
        f"{target['target']}: tracking"
        + (f" (drift {drift:.2f} px/min)" if drift is not None else ""),
        fontsize=10,
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _fig_png(fig)


def _time_axis(ax, times: list[datetime], tz: ZoneInfo) -> None:
    """Local clock time; seconds shown when the lights span less than half an hour."""
    span = (max(times) - min(times)).total_seconds() if times else 0.0
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span < 1800 else "%H:%M",
                                                      tz=tz))  # fmt: skip
    ax.set_xlabel(f"local time ({tz.key})")


def _mark_flip(target: dict[str, Any], axes) -> None:
    flip = (target.get("tracking") or {}).get("flip")
    if flip:
        for ax in axes:
            ax.axvline(_time(flip), color="k", ls="--", lw=1)
        axes[0].annotate("meridian flip", (_time(flip), 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8)  # fmt: skip


# -------------------------------------------------------------------------------- html


def render(data: dict[str, Any]) -> str:
    """The summary page."""
    tz = ZoneInfo(data["site"]["timezone"])
    site = data["site"]["name"] or "observd"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Night {_e(data['night'])} - {_e(site)}</title>",
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>Night of {_e(data['night'])}</h1>",
        f"<p class='muted'>{_e(site)} &middot; dark from {_local(data['dusk'], tz)} to "
        f"{_local(data['dawn'], tz)} local &middot; written {_e(data['generated'])} by observd "
        f"{_e(data['observd'])}</p>",
    ]
    parts.append(_overview(data))
    for target in data["targets"]:
        parts.append(_target_html(target, tz))
    parts.append(_masters_html(data))
    parts.append(_camera_html(data))
    parts.append(_problems_html(data, tz))
    parts.append("</body></html>")
    return "\n".join(parts)


def _overview(data: dict[str, Any]) -> str:
    t = data["totals"]
    out = ["<h2>Overview</h2>"]
    status = ", ".join(f"{n} {s}" for s, n in sorted(t["lights_by_status"].items()))
    out.append(
        f"<p>{t['files']} files ({', '.join(f'{n} {k}' for k, n in sorted(t['by_type'].items()))})"
        f"; {t['lights']} lights: {_e(status) or 'none'}; "
        f"<b>{t['exposure_s'] / 60:.1f} min</b> of exposure stacked.</p>"
    )
    if data["warnings"]:
        for w in data["warnings"]:
            cls = "warn alarm" if "ALARM" in w else "warn"
            out.append(f"<div class='{cls}'>{_e(w)}</div>")
    else:
        out.append("<div class='ok'>No warnings.</div>")
    rows = ["<table><tr><th>target</th><th>filter</th><th>used</th><th>rejected</th>"
            "<th>exposure</th><th>FWHM</th><th>5&sigma; limit</th></tr>"]  # fmt: skip
    for target in data["targets"]:
        for fe in target["filters"]:
            fw = fe["fwhm_arcsec"] or fe["fwhm"]
            unit = '"' if fe["fwhm_arcsec"] else " px"
            rows.append(
                f"<tr><td>{_e(target['target'])}</td><td>{_e(fe['filter'])}</td>"
                f"<td class=n>{fe['used']}</td><td class=n>{fe['rejected']}</td>"
                f"<td class=n>{fe['exposure_s'] / 60:.1f} min</td>"
                f"<td class=n>{_num(fw and fw['median'])}{unit if fw else ''}</td>"
                f"<td class=n>{_depth_text(fe['depth'])}</td></tr>"
            )
    rows.append("</table>")
    return "\n".join(out + rows)


def _depth_text(depth: dict[str, Any] | None) -> str:
    if not depth or depth.get("limit_adu_s") is None:
        return "-"
    text = f"{depth['limit_adu_s']:.3g} ADU/s"
    if depth.get("limit_mag") is not None:
        text = f"{depth['limit_mag']:.2f} mag ({text})"
    return text


def _target_html(target: dict[str, Any], tz: ZoneInfo) -> str:
    out = [f"<h2 id='{_e(target['slug'])}'>{_e(target['target'])}</h2>"]
    out.append(f"<p>{target['exposure_s'] / 60:.1f} min stacked in "
               f"{len(target['filters'])} filters.</p>")  # fmt: skip
    out.append("<div class='stacks'>")
    if target.get("rgb"):
        thumb = _thumbnail(target["rgb_file"])
        if thumb:
            out.append(
                f"<div class='stack'><a href='{_e(target['rgb'])}'><img alt='colour composite of "
                f"{_e(target['target'])}' src='{_uri(thumb)}'></a><b>colour</b></div>"
            )
    for fe in target["filters"]:
        stack = fe["stack"]
        if not stack:
            continue
        img = ""
        if stack.get("png"):
            thumb = _thumbnail(stack["png_file"])
            if thumb:
                img = (f"<a href='{_e(stack['png'])}'><img alt='stack {_e(target['target'])} "
                       f"{_e(fe['filter'])}' src='{_uri(thumb)}'></a>")  # fmt: skip
        out.append(
            f"<div class='stack'>{img}<b>{_e(fe['filter'])}</b>: {stack.get('ncombine')} frames, "
            f"{(stack.get('exptime') or 0) / 60:.1f} min &middot; "
            f"<a href='{_e(stack['fits'])}'>FITS</a></div>"
        )
    out.append("</div>")
    for fe in target["filters"]:
        out.append(_filter_html(target, fe, tz))
    plot = _conditions_plot(target, tz)
    if plot:
        out.append(f"<figure><img class='plot' alt='seeing and sky of {_e(target['target'])}' "
                   f"src='{_uri(plot)}'></figure>")  # fmt: skip
    out.append(_tracking_html(target, tz))
    return "\n".join(out)


def _filter_html(target: dict[str, Any], fe: dict[str, Any], tz: ZoneInfo) -> str:
    d = fe["depth"] or {}
    lines = [
        f"<h3>{_e(target['target'])} {_e(fe['filter'])}</h3>",
        f"<p>{fe['lights']} lights: <b>{fe['used']} used</b>, {fe['rejected']} rejected"
        + (f", {fe['pending']} not stacked yet" if fe["pending"] else "")
        + f"; {fe['exposure_s'] / 60:.1f} min. FWHM median "
        f"{_num((fe['fwhm_arcsec'] or {}).get('median'))}\" "
        f"({_num((fe['fwhm'] or {}).get('median'))} px); sky median "
        f"{_num((fe['background'] or {}).get('median'), '{:.3g}')} ADU/s/px.</p>",
    ]
    if d:
        lines.append(
            f"<p>Depth: background noise {d['noise_adu_s']:.3g} ADU/s/px in the stack "
            f"({d['frame_noise_adu_s']:.3g} in one frame"
            + (f"; measured on the stack {d['noise_measured_adu_s']:.3g}"
               if d.get("noise_measured_adu_s") else "")
            + f"); 5&sigma; point source {_depth_text(d)}"
            + ("" if d.get("zero_point") is not None else
               " (set [summary.zero_point] for magnitudes)")
            + ".</p>"
        )  # fmt: skip
    if fe["frames_rejected"]:
        rows = "".join(
            f"<tr><td>{_e(r['file'])}</td><td>{_local(r['date_obs'], tz)}</td>"
            f"<td>{_e(r['status'])}</td><td>{_e(r['reason'])}</td></tr>"
            for r in fe["frames_rejected"]
        )
        lines.append(
            "<table><tr><th>rejected</th><th>time</th><th>status</th><th>reason</th></tr>"
            f"{rows}</table>"
        )
    if fe["frames_used"]:
        rows = "".join(
            f"<tr><td>{_e(r['file'])}</td><td>{_local(r['date_obs'], tz)}</td>"
            f"<td class=n>{_num(r['exptime'], '{:g}')} s</td>"
            f"<td class=n>{_num(r['weight'], '{:.3g}')}</td></tr>"
            for r in fe["frames_used"]
        )
        lines.append(
            f"<details><summary>{fe['used']} frames used</summary><table><tr><th>file</th>"
            f"<th>time</th><th>exposure</th><th>weight</th></tr>{rows}</table></details>"
        )
    return "\n".join(lines)


def _tracking_html(target: dict[str, Any], tz: ZoneInfo) -> str:
    tr = target.get("tracking")
    if not tr:
        return ""
    out = ["<h3>Tracking</h3><table><tr><th>pier</th><th>frames</th><th>drift x</th><th>drift y"
           "</th><th>drift</th><th>field rotation</th><th>re-centred</th></tr>"]  # fmt: skip
    for s in tr["segments"]:
        out.append(
            f"<tr><td>{_e(s['pier'])}</td><td class=n>{s['frames']}</td>"
            f"<td class=n>{_num(s['drift_x_px_min'])} px/min</td>"
            f"<td class=n>{_num(s['drift_y_px_min'])} px/min</td>"
            f"<td class=n>{_num(s['drift_px_min'])} px/min</td>"
            f"<td class=n>{_num(s['rotation_deg_h'], '{:.3f}')} deg/h</td>"
            f"<td class=n>{s.get('recentred', 0)}</td></tr>"
        )
    out.append("</table>")
    if tr.get("flip"):
        out.append(f"<p>Meridian flip before the frame at {_local(tr['flip'], tz)}.</p>")
    plot = _tracking_plot(target, tz)
    if plot:
        out.append(f"<figure><img class='plot' alt='tracking of {_e(target['target'])}' "
                   f"src='{_uri(plot)}'></figure>")  # fmt: skip
    return "\n".join(out)


def _masters_html(data: dict[str, Any]) -> str:
    out = ["<h2>Masters used</h2>"]
    if not data["masters"]:
        return out[0] + "<p>No light was calibrated.</p>"
    out.append("<table><tr><th>kind</th><th>filter / exposure</th><th>night</th><th>version</th>"
               "<th>frames</th><th>lights</th><th>file</th></tr>")  # fmt: skip
    for m in data["masters"]:
        what = m["filter"] or (f"{m['exptime']:g} s" if m["exptime"] else "")
        link = f"<a href='{_e(m['file'])}'>FITS</a>" if m["file"] else "(deleted)"
        out.append(
            f"<tr><td>{_e(m['kind'])}</td><td>{_e(what)}</td><td>{_e(m['night'])}</td>"
            f"<td class=n>v{m['version']}</td><td class=n>{m['n_frames']}</td>"
            f"<td class=n>{m['lights']}</td><td>{link}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _camera_html(data: dict[str, Any]) -> str:
    out = ["<h2>Camera health</h2>"]
    cam = data["camera"]
    if not cam["setups"]:
        return out[0] + "<p>No calibration frames.</p>"
    for setup in cam["setups"]:
        out.append(f"<h3>{_e(setup['setup'])}</h3>")
        for w in setup["warnings"]:
            cls = "warn alarm" if w.startswith("ALARM") else "warn"
            out.append(f"<div class='{cls}'>{_e(w)}</div>")
        if not setup["history"]:
            out.append("<p>No calibration frames of this setup yet.</p>")
            continue
        out.append(
            "<table><tr><th>night</th><th>bias ADU</th><th>col rms</th><th>read noise e-</th>"
            "<th>gain e-/ADU</th><th>dark e-/s</th><th>hot px</th><th>flat change (peak)</th>"
            "</tr>"
        )
        for row in reversed(setup["history"]):
            change = ", ".join(
                f"{f} {100 * c['peak']:.1f} %" + (f" {c['status']}" if c["status"] != "ok" else "")
                for f, c in sorted(row["flat_change"].items())
            )
            bold = row["night"] == data["night"]
            night = f"<b>{_e(row['night'])}</b>" if bold else _e(row["night"])
            out.append(
                f"<tr><td>{night}</td><td class=n>{_num(row['bias_level'], '{:.1f}')}</td>"
                f"<td class=n>{_num(row['bias_col_rms'])}</td>"
                f"<td class=n>{_num(row['read_noise_e'])}</td>"
                f"<td class=n>{_num(row['gain'], '{:.3f}')}</td>"
                f"<td class=n>{_num(row['dark_current_e'], '{:.4f}')}</td>"
                f"<td class=n>{_num(row['hot_pixels'], '{:d}')}</td><td>{_e(change) or '-'}</td>"
                "</tr>"
            )
        out.append("</table>")
        hot = setup.get("hot_pixels")
        if hot:
            out.append(f"<p>Hot pixels: {hot['now']} tonight, {hot['new']} new and {hot['gone']} "
                       f"gone since {_e(hot['previous_night'])}.</p>")  # fmt: skip
    return "\n".join(out)


def _problems_html(data: dict[str, Any], tz: ZoneInfo) -> str:
    p = data["problems"]
    out = ["<h2>Problems</h2>"]
    if p["failed"]:
        out.append("<table><tr><th>file</th><th>type</th><th>status</th><th>why</th></tr>")
        out += [
            f"<tr><td>{_e(f['file'])}</td><td>{_e(f['type'])}</td><td>{_e(f['status'])}</td>"
            f"<td>{_e(f['reason'])}</td></tr>"
            for f in p["failed"]
        ]
        out.append("</table>")
    else:
        out.append("<p>No file failed.</p>")
    if p["uncalibrated"]:
        out.append("<p>Lights without a full calibration:</p><ul>")
        out += [f"<li>{len(files)} lights with no {_e(missing)}: {_e(_files(files))}</li>"
                for missing, files in _uncalibrated(p)]  # fmt: skip
        out.append("</ul>")
    else:
        out.append("<p>Every light was calibrated with bias, dark and flat.</p>")
    gaps = p["gaps"]
    if gaps["gaps"]:
        out.append("<p>Gaps while the sky was dark:</p><ul>")
        out += [f"<li>{_local(g['start'], tz)} - {_local(g['end'], tz)}: {g['minutes']:.0f} min "
                "without a frame</li>" for g in gaps["gaps"]]  # fmt: skip
        out.append("</ul>")
    else:
        out.append(f"<p>No gap longer than {gaps['threshold_minutes']:.0f} min while the sky "
                   "was dark.</p>")  # fmt: skip
    out.append("<p>Disk: " + "; ".join(
        f"{_e(d['what'])} {_e(d['path'])}: "
        + (f"{d['free_gb']:.1f} GB free" + (f" of {d['total_gb']:.0f} GB" if d["total_gb"]
           else "") if d["free_gb"] is not None else _e(d.get("error")))
        for d in p["disk"]) + ".</p>")  # fmt: skip
    return "\n".join(out)


def _uncalibrated(problems: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Uncalibrated lights grouped by what they lacked."""
    groups: dict[str, list[str]] = {}
    for u in problems["uncalibrated"]:
        groups.setdefault(", ".join(u["missing"]), []).append(u["file"])
    return sorted(groups.items())


def _files(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# ---------------------------------------------------------------------------- markdown


def markdown(data: dict[str, Any]) -> str:
    """The summary in Markdown: tables and warnings, no images."""
    tz = ZoneInfo(data["site"]["timezone"])
    t = data["totals"]
    lines = [
        f"# Night {data['night']}",
        "",
        f"Dark {_local(data['dusk'], tz)}-{_local(data['dawn'], tz)} local; {t['files']} files, "
        f"{t['lights']} lights, {t['exposure_s'] / 60:.1f} min stacked.",
        "",
    ]
    if data["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in data["warnings"]] + [""]
    lines += [
        "## Targets",
        "",
        "| target | filter | used | rejected | exposure (min) | FWHM | 5-sigma limit |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for target in data["targets"]:
        for fe in target["filters"]:
            fw = fe["fwhm_arcsec"] or fe["fwhm"]
            unit = '"' if fe["fwhm_arcsec"] else " px"
            lines.append(
                f"| {target['target']} | {fe['filter']} | {fe['used']} | {fe['rejected']} | "
                f"{fe['exposure_s'] / 60:.1f} | {_num(fw and fw['median'])}{unit} | "
                f"{_depth_text(fe['depth'])} |"
            )
    lines.append("")
    rejected = [(tg["target"], fe["filter"], r) for tg in data["targets"]
                for fe in tg["filters"] for r in fe["frames_rejected"]]  # fmt: skip
    if rejected:
        lines += ["## Rejected lights", ""]
        lines += [f"- {name} {filt} `{r['file']}`: {r['reason']}" for name, filt, r in rejected]
        lines.append("")
    tracking = [tg for tg in data["targets"] if tg.get("tracking")]
    if tracking:
        lines += ["## Tracking", ""]
        for tg in tracking:
            tr = tg["tracking"]
            flip = f", meridian flip at {_local(tr['flip'], tz)}" if tr.get("flip") else ""
            rot = _num(tr["rotation_deg_h"], "{:.3f}")
            lines.append(f"- {tg['target']}: drift {_num(tr['drift_px_min'])} px/min, field "
                         f"rotation {rot} deg/h{flip}")  # fmt: skip
        lines.append("")
    for setup in data["camera"]["setups"]:
        this = next((r for r in setup["history"] if r["night"] == data["night"]), None)
        if this:
            lines += [
                f"## Camera {setup['setup']}",
                "",
                f"bias {_num(this['bias_level'], '{:.1f}')} ADU, read noise "
                f"{_num(this['read_noise_e'])} e-, gain {_num(this['gain'], '{:.3f}')} e-/ADU, "
                f"dark {_num(this['dark_current_e'], '{:.4f}')} e-/s, "
                f"{_num(this['hot_pixels'], '{:d}')} hot pixels",
                "",
            ]
    p = data["problems"]
    if p["failed"] or p["uncalibrated"] or p["gaps"]["gaps"]:
        lines += ["## Problems", ""]
        lines += [f"- {f['file']} ({f['type']}): {f['status']}: {f['reason']}" for f in p["failed"]]
        lines += [f"- {len(files)} lights with no {missing}: {_files(files)}"
                  for missing, files in _uncalibrated(p)]  # fmt: skip
        lines += [f"- gap {_local(g['start'], tz)}-{_local(g['end'], tz)} ({g['minutes']:.0f} min)"
                  for g in p["gaps"]["gaps"]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)

"""observd against the notebook, ccdproc + astroalign and Siril: one command, one run.

Usage::

    python bench/run.py                       # the default run (< 10 min on 2 cores)
    python bench/run.py --size 4096 --frames 30 --compare-size 2048 --compare-frames 20
    python bench/run.py --scaling             # light 10 vs light 200, RSS 20 vs 200
    python bench/run.py --profile             # observd's per-light stages, 2048 and 4096 px
    python bench/run.py --results /tmp/R.md   # write the results elsewhere

What it does (see bench/README.md):

1. simulates a *latency night* (``--size`` px, ``--frames`` lights of one target in one
   filter, biases, darks, flats) and drives ``observd.pipeline.Pipeline.process`` over its
   files in DATE-OBS order, timing each light from settled file to updated coadd;
2. simulates a *comparison night* (``--compare-size`` px, ``--compare-frames`` lights,
   exact WCS in every light so the notebook can reproject) and runs on the same files:
   observd (driven per file, and end to end with ``python -m observd ingest``), the
   notebook's method, ccdproc + astroalign, and Siril (when ``siril-cli`` is installed);
   each in its own subprocess, whose peak RSS is read from ``wait4``;
3. grades every stack against the simulator's truth the same way (:mod:`grade`);
4. times the master bias refresh of the 1st and the 30th bias;
5. prints the table and writes it, with the machine and library versions, to
   ``--results`` (default ``bench/RESULTS.md``).

The numbers are wall times on whatever else the machine is doing: compare tools within
one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

TARGET, FILTER = "M 51", "V"
TOOLS = ("observd", "notebook", "ccdproc+astroalign", "siril")

# --------------------------------------------------------------------------------------
# Nights
# --------------------------------------------------------------------------------------


def simulate(folder: Path, size: int, n_light: int, *, n_bias: int = 5, n_dark: int = 3,
             n_flat: int = 5, defects: bool = True) -> float:  # fmt: skip
    """A night of one target in one filter, exact WCS in every light; seconds taken.

    A night already simulated there (``--keep``) is reused: same inputs, same bytes.
    """
    from observd.simulate import CameraModel, NightPlan, simulate_night

    if (folder / "truth" / "truth.json").exists():
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)

    plan = NightPlan(n_bias=n_bias, dark_exptimes=(60.0,), n_dark=n_dark, filters=(FILTER,),
                     n_flat=n_flat, targets=(TARGET,), n_light=n_light, wcs="exact",
                     meridian_flip=False, defects=defects, warm_dark=False)  # fmt: skip
    t0 = time.perf_counter()
    simulate_night(folder, plan, CameraModel(size=size), truth_images=False)
    return time.perf_counter() - t0


def night_files(night: Path) -> dict[str, list[Path]]:
    """The night's raw files per kind, in DATE-OBS order (the first light is the
    reference of every tool)."""
    from observd.simulate import load_truth

    truth = load_truth(night)
    files: dict[str, list[Path]] = {}
    for f in sorted(truth.files, key=lambda f: f.date_obs or ""):
        files.setdefault(f.type, []).append(truth.path(f))
    return files


def observd_config(work: Path, camera: Path) -> Path:
    """A TOML config for a fresh catalog and products under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    toml = work / "observd.toml"
    toml.write_text(
        f'[paths]\nincoming = ["{camera}"]\nproducts = "{work / "products"}"\n'
        f'catalog = "{work / "observd.sqlite"}"\n[site]\ntimezone = "America/Los_Angeles"\n'
    )
    return toml


# --------------------------------------------------------------------------------------
# Workers: each tool in its own process
# --------------------------------------------------------------------------------------


def _rss_kb() -> tuple[int, int, int]:
    """(VmRSS, VmHWM) of this process and the heap's blocks in use, in kB (the RSS is
    flat from the first frame, where the pipeline reserves its working memory: a leak
    would show in the heap in use)."""
    from observd.memory import heap_in_use

    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, v = line.split(":")
                values[key] = int(v.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0), (heap_in_use() or 0) // 1024


STAGES: dict[str, list[tuple[str, str]]] = {
    "read": [("observd/rawio.py", "read_raw")],
    "calibrate": [("observd/reduce.py", "calibrate"), ("observd/reduce.py", "prepare")],
    "measure": [("observd/quality.py", "measure")],
    "align": [("observd/register.py", "align")],
    "warp": [("observd/register.py", "warp")],
    "accumulate": [("observd/coadds.py", "add")],
    "publish": [("observd/coadds.py", "_publish"), ("observd/coadds.py", "_checkpoint")],
}


def _stage_times(prof: cProfile.Profile) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Cumulative seconds per stage, and the top functions by own time."""
    st = pstats.Stats(prof)
    out = {}
    for stage, keys in STAGES.items():
        total = 0.0
        for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
            if any(file.endswith(f) and name == n for f, n in keys):
                total += ct
        out[stage] = total
    # publish happens inside add: keep the stages disjoint
    out["accumulate"] = max(0.0, out["accumulate"] - out["publish"])
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]
    tops = [(f"{Path(file).name}:{line}({name})", tt) for (file, line, name), (_, _, tt, _, _)
            in top]  # fmt: skip
    return out, tops


def worker_observd(night: Path, work: Path, profile: str | None) -> dict[str, Any]:
    """Every file of the night through Pipeline.process, in DATE-OBS order."""
    from astropy.io import fits

    from observd.catalog import Catalog
    from observd.config import config_from_dict
    from observd.ingest import find_frame_files, in_time_order
    from observd.logs import setup_logging
    from observd.pipeline import Pipeline
    from observd.products import Products
    from observd.simulate import load_truth

    setup_logging("ERROR")
    truth = load_truth(night)
    config = config_from_dict({
        "paths": {"products": str(work / "products"), "catalog": str(work / "o.sqlite")},
        "site": {"timezone": truth.plan.timezone},
    })  # fmt: skip
    clock = time.process_time if profile == "cpu" else time.perf_counter
    prof = cProfile.Profile(clock) if profile else None
    lights: list[float] = []
    cpu: list[float] = []
    rss: list[tuple[int, int]] = []
    calib = 0.0
    t_start = time.perf_counter()
    with Catalog(config.paths.catalog) as catalog:
        pipeline = Pipeline(config, catalog)
        for path in in_time_order(find_frame_files([truth.camera_dir], config), config):
            is_light = truth.file(path).type == "light"
            if prof is not None and is_light:
                prof.enable()
            t0, c0 = time.perf_counter(), time.process_time()
            pipeline.process(path)
            dt = time.perf_counter() - t0
            if prof is not None and is_light:
                prof.disable()
            if is_light:
                lights.append(dt)
                cpu.append(time.process_time() - c0)
                rss.append(_rss_kb())
            else:
                calib += dt
        t0 = time.perf_counter()
        pipeline.finish()
        t_finish = time.perf_counter() - t0
        statuses = {}
        for f in catalog.frames("type = 'light'"):
            statuses[f["status"]] = statuses.get(f["status"], 0) + 1
    stack = Products(config.paths.products).stack(truth.plan.night, TARGET, FILTER)
    used = fits.getheader(stack).get("NCOMBINE") if stack.exists() else None
    result = {"masters_s": calib, "light_times": lights, "light_cpu": cpu,
              "lights_s": sum(lights) + t_finish, "finish_s": t_finish,
              "reserve_s": pipeline.reserve_seconds,
              "wall_s": time.perf_counter() - t_start, "rss": rss,
              "frames_used": used, "statuses": statuses,
              "stack": str(stack) if stack.exists() else None}  # fmt: skip
    if prof is not None:
        result["stages"], result["top"] = _stage_times(prof)
    return result


def worker(args: argparse.Namespace) -> None:
    """``--worker TOOL``: run one tool on a night and write its JSON."""
    import peers

    night, work = Path(args.night), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker == "observd":
        result = worker_observd(night, work, args.profile_clock if args.profile else None)
    else:
        files = night_files(night)
        out = work / "stack.fits"
        if args.worker == "notebook":
            result = peers.notebook(files, out)
        elif args.worker == "ccdproc+astroalign":
            result = peers.ccdproc_astroalign(files, out)
        elif args.worker == "siril":
            result = peers.siril(files, out, work / "siril")
        else:
            raise SystemExit(f"unknown worker {args.worker}")
    Path(args.json).write_text(json.dumps(result))


@dataclass
class Run:
    """One subprocess: its exit, wall time, peak RSS and the JSON it wrote."""

    rc: int
    wall: float
    peak_mb: float
    cpu: float = float("nan")
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def run_measured(cmd: list[str], json_path: Path | None = None, env=None) -> Run:
    """Run ``cmd``; its peak RSS (its children included) from wait4's rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    run = Run(proc.returncode, wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)
    if proc.returncode != 0:
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        run.error = lines[-1] if lines else f"exit {proc.returncode}"
    elif json_path is not None and json_path.exists():
        run.data = json.loads(json_path.read_text())
    return run


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_tool(tool: str, night: Path, work: Path, *, profile: str | None = None) -> Run:
    json_path = work / f"{tool}.json"
    shutil.rmtree(work / tool, ignore_errors=True)
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--night",
           str(night), "--work", str(work / tool), "--json", str(json_path)]  # fmt: skip
    if profile:
        cmd += ["--profile", "--profile-clock", profile]
    return run_measured(cmd, json_path, env=_env())


def run_ingest(night: Path, work: Path) -> Run:
    """End to end: ``python -m observd ingest`` of the night's camera folder."""
    shutil.rmtree(work / "ingest", ignore_errors=True)
    toml = observd_config(work / "ingest", night / "camera")
    cmd = [sys.executable, "-m", "observd", "ingest", str(night / "camera"), "--config",
           str(toml), "--quiet"]  # fmt: skip
    return run_measured(cmd, env=_env())


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


#: Lights of one target and filter before its coadd runs: the first defines the grid (and
#: is held as the provisional flux reference), the next three fill the warm-up, whose
#: joint combination the fourth pays for.
WARMUP_LIGHTS = 4


def latency(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "max": float(a.max()), "n": int(a.size)}  # fmt: skip


def refresh_cost(folder: Path, size: int, n: int = 30) -> dict[str, Any]:
    """Master bias refresh: wall time of each of ``n`` biases through the pipeline."""
    from calibration_refresh import run_once

    from observd.simulate import CameraModel, NightPlan, simulate_night

    plan = NightPlan(n_bias=n, dark_exptimes=(), n_dark=0, filters=(), n_flat=0, targets=(),
                     n_light=0, defects=False)  # fmt: skip
    folder = folder / f"{size}px-{n}"
    if not (folder / "sim" / "truth" / "truth.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        simulate_night(folder / "sim", plan, CameraModel(size=size), truth_images=False)
    for old in folder.glob("o0.sqlite*"):  # a kept folder: a fresh catalog
        old.unlink()
    times = run_once(folder, 0)
    return {"size": size, "times": times, "first": times[0], "last": times[-1],
            "early": statistics.median(times[1:5]), "late": statistics.median(times[-4:])}


def grade_run(run: Run, night: Path) -> dict[str, Any]:
    from astropy.io import fits
    from grade import grade_stack

    from observd.simulate import load_truth

    if not run.data.get("stack"):
        return {"note": "no stack"}
    truth = load_truth(night)
    with fits.open(run.data["stack"]) as hdul:
        image = np.asarray(hdul[0].data, dtype=np.float64)
    return grade_stack(image, truth, TARGET, FILTER).to_dict()


def single_frame_fwhm(night: Path) -> float:
    """Median true seeing of the night's clear lights (the truth's reference FWHM)."""
    from observd.simulate import load_truth

    return float(load_truth(night).targets[TARGET].fwhm_ref or np.nan)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0, 0, 0)
    return {"cores": os.cpu_count(), "memory_mb": mem, "cpu": model,
            "python": platform.python_version(), "load": [round(v, 2) for v in load]}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("observd", "numpy", "scipy", "astropy", "sep", "opencv-python-headless",
                "reproject", "ccdproc", "astroalign"):  # fmt: skip
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    exe = shutil.which("siril-cli")
    if exe:
        try:
            text = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()  # fmt: skip
            out["siril"] = text.removeprefix("siril ") or "?"
        except (OSError, subprocess.SubprocessError):
            out["siril"] = "?"
    else:
        out["siril"] = "not installed"
    git = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True)  # fmt: skip
    out["observd commit"] = git.stdout.strip()[:80] or "?"
    return out


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return format(v, spec)


def tool_rows(runs: dict[str, Run], grades: dict[str, dict], n_lights: int) -> list[list[str]]:
    rows = []
    for tool in TOOLS:
        run = runs.get(tool)
        if run is None:
            continue
        if run.rc != 0 or not run.data:
            rows.append([tool, "failed: " + (run.error or "?")[:70]] + [""] * (len(HEAD) - 2))
            continue
        d, g = run.data, grades.get(tool, {})
        per_light = d["lights_s"] / n_lights
        rows.append([tool, fmt(per_light), fmt(60 / per_light, ".1f"), fmt(d["masters_s"], ".1f"),
                     fmt(run.wall, ".1f"), fmt(run.cpu, ".1f"), fmt(run.peak_mb, ".0f"),
                     fmt(g.get("fwhm")), fmt(g.get("noise"), ".4f"), fmt(g.get("phot_scatter")),
                     f"{d.get('frames_used')}/{n_lights}", g.get("note", "")])  # fmt: skip
    return rows


HEAD = ["tool", "s/light", "lights/min", "masters s", "wall s", "CPU s", "peak RSS MB", "FWHM px",
        "noise", "phot scatter %", "frames used", "note"]  # fmt: skip


def table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------


def default_run(args: argparse.Namespace, tmp: Path) -> str:
    out: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        out.append(text)

    t_all = time.perf_counter()
    # 1. the latency night
    lat_night = tmp / f"night-{args.size}px-{args.frames}"
    same = args.size == args.compare_size and args.frames == args.compare_frames
    t_sim = simulate(lat_night, args.size, args.frames)
    print(f"simulated the latency night: {args.frames} lights of {args.size} px "
          f"in {t_sim:.0f} s", flush=True)  # fmt: skip
    lat = run_tool("observd", lat_night, tmp / "lat")
    if lat.rc != 0:
        raise SystemExit(f"observd failed on the latency night: {lat.error}")
    lat_stats = latency(lat.data["light_times"])
    # 2. the comparison night
    if same:
        cmp_night = lat_night
    else:
        cmp_night = tmp / f"night-{args.compare_size}px-{args.compare_frames}"
        t_sim = simulate(cmp_night, args.compare_size, args.compare_frames)
        print(f"simulated the comparison night: {args.compare_frames} lights of "
              f"{args.compare_size} px in {t_sim:.0f} s", flush=True)  # fmt: skip
    runs: dict[str, Run] = {"observd": lat} if same else {}
    skipped = []
    for tool in TOOLS:
        if tool in runs or tool in args.skip:
            continue
        if tool == "siril" and not shutil.which("siril-cli"):
            print("siril: skipped (siril-cli not installed; apt-get install -y siril)")
            skipped.append("siril (not installed)")
            continue
        if tool == "ccdproc+astroalign" and not _importable("ccdproc", "astroalign"):
            print("ccdproc+astroalign: skipped (pip install ccdproc astroalign)")
            skipped.append("ccdproc+astroalign (not installed)")
            continue
        print(f"running {tool} on the comparison night ...", flush=True)
        runs[tool] = run_tool(tool, cmp_night, tmp / "cmp")
        if runs[tool].rc != 0:
            print(f"  {tool} failed: {runs[tool].error}")
    ingest = run_ingest(cmp_night, tmp / "cmp") if not args.no_ingest else None
    grades = {tool: grade_run(run, cmp_night) for tool, run in runs.items() if run.rc == 0}
    # 3. master refresh
    refresh = None
    if args.refresh_frames >= 2:
        refresh = refresh_cost(tmp / "refresh", args.refresh_size, args.refresh_frames)

    # report
    n_cmp = args.compare_frames
    say(f"## observd per light, {args.size} px, {args.frames} lights (settled file -> "
        "coadd updated)")  # fmt: skip
    say()
    rss_mb = lat.data["rss"][-1][1] / 1024 if lat.data["rss"] else float("nan")
    say(f"- latency: median {lat_stats['median']:.3f} s, p95 {lat_stats['p95']:.3f} s, "
        f"mean {lat_stats['mean']:.3f} s over {lat_stats['n']} lights "
        f"(target: median <= 0.5 s, p95 <= 0.8 s)")  # fmt: skip
    times = lat.data["light_times"]
    warm = WARMUP_LIGHTS
    if len(times) > warm + 2:
        after = latency(times[warm:])
        slow = ", ".join(f"{t:.2f}" for t in times[:warm])
        say(f"- the same after the coadd's start (lights {warm + 1}-{len(times)}): median "
            f"{after['median']:.3f} s, p95 {after['p95']:.3f} s, max {after['max']:.3f} s; "
            f"the first {warm} (the grid, the provisional reference and the warm-up's joint "
            f"combination): {slow} s")  # fmt: skip
    cpu = latency(lat.data["light_cpu"])
    say(f"- CPU time per light (all threads; less sensitive to a shared machine): median "
        f"{cpu['median']:.3f} s, p95 {cpu['p95']:.3f} s")  # fmt: skip
    say(f"- throughput: {60 / lat_stats['mean']:.1f} lights/min; end of run (finish) "
        f"{lat.data['finish_s']:.2f} s")  # fmt: skip
    say(f"- peak RSS: {lat.peak_mb:.0f} MB (process), {rss_mb:.0f} MB high-water after the "
        "last light")  # fmt: skip
    say(f"- calibration frames: {lat.data['masters_s']:.1f} s in total, of which "
        f"{lat.data.get('reserve_s', 0.0):.1f} s reserving the night's working memory at "
        f"the first frame (observd.memory); light statuses {lat.data['statuses']}")  # fmt: skip
    say()
    say(f"## Side by side: {n_cmp} lights of {args.compare_size} px, same files, same run")
    say()
    say(table(tool_rows(runs, grades, n_cmp), HEAD))
    say()
    say(f"- s/light: the light phase (calibrate, register, stack; the final combine "
        f"included) / {n_cmp} lights; masters timed apart. observd's light phase is its "
        "Pipeline.process calls on lights plus finish().")  # fmt: skip
    say(f"- truth seeing (median of the clear lights): "
        f"{single_frame_fwhm(cmp_night):.2f} px FWHM. FWHM: 2-D Moffat fits on isolated, "
        "unsaturated true stars; noise: sky noise per pixel from 4x4-binned blocks, in the "
        "stars' flux scale (lower is deeper); phot scatter: robust scatter of aperture flux "
        "/ true flux.")  # fmt: skip
    if ingest is None:
        pass
    elif ingest.rc == 0:
        say(f"- `observd ingest` end to end on the same {len(night_files(cmp_night).get('light', []))}"  # noqa: E501
            f" lights + calibrations: {ingest.wall:.1f} s wall, peak RSS "
            f"{ingest.peak_mb:.0f} MB")  # fmt: skip
    else:
        say(f"- `observd ingest` failed: {ingest.error}")
    base = runs.get("observd")
    if base and base.rc == 0:
        ours = base.data["lights_s"] / n_cmp
        for tool in ("notebook", "siril", "ccdproc+astroalign"):
            r = runs.get(tool)
            if r and r.rc == 0:
                g0, g1 = grades.get("observd", {}), grades.get(tool, {})
                say(f"- observd is {r.data['lights_s'] / n_cmp / ours:.1f}x faster per light "
                    f"than {tool}; quality observd/{tool}: FWHM "
                    f"{_ratio(g0, g1, 'fwhm')}, noise {_ratio(g0, g1, 'noise')}, phot "
                    f"scatter {_ratio(g0, g1, 'phot_scatter')} (<= 1: observd as good or "
                    "better)")  # fmt: skip
    if skipped:
        say(f"- skipped: {', '.join(skipped)}")
    if refresh is not None:
        report_refresh(refresh, say)
    say()
    say(f"(harness wall time {time.perf_counter() - t_all:.0f} s)")
    return "\n".join(out)


def _ratio(a: dict, b: dict, key: str) -> str:
    x, y = a.get(key), b.get(key)
    if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)) or y == 0:
        return "—"
    return f"{x / y:.2f}"


def report_refresh(refresh: dict[str, Any], say) -> None:
    say()
    say(f"## Master bias refresh ({refresh['size']} px, {len(refresh['times'])} biases)")
    say()
    say(f"- 1st bias {1000 * refresh['first']:.0f} ms, {len(refresh['times'])}th "
        f"{1000 * refresh['last']:.0f} ms: ratio {refresh['last'] / refresh['first']:.2f} "
        f"(target <= 1.2); biases 2-5 median {1000 * refresh['early']:.0f} ms, last 4 "
        f"{1000 * refresh['late']:.0f} ms")  # fmt: skip


def scaling_run(args: argparse.Namespace, tmp: Path) -> str:
    out: list[str] = []
    night = tmp / f"scaling-{args.scaling_size}px-{args.scaling_frames}"
    n = args.scaling_frames
    t_sim = simulate(night, args.scaling_size, n, defects=False)
    print(f"simulated {n} lights of {args.scaling_size} px in {t_sim:.0f} s", flush=True)
    run = run_tool("observd", night, tmp / "scal")
    if run.rc != 0:
        raise SystemExit(f"observd failed: {run.error}")
    times, rss = run.data["light_times"], run.data["rss"]
    k_early, k_late = min(10, n), n

    def around(k: int) -> float:  # median of the 10 lights ending at light k
        return statistics.median(times[max(0, k - 10):k])

    t10, t200 = around(k_early), around(k_late)
    cpu = run.data["light_cpu"]
    c10 = statistics.median(cpu[max(0, k_early - 10):k_early])
    c200 = statistics.median(cpu[max(0, k_late - 10):k_late])
    k20 = min(20, n)
    hwm20, hwm_n = rss[k20 - 1][1] / 1024, rss[-1][1] / 1024
    rss20, rss_n = rss[k20 - 1][0] / 1024, rss[-1][0] / 1024
    out.append(f"## Scaling: {n} lights of {args.scaling_size} px, one target and filter")
    out.append("")
    out.append(f"- light {k_early} costs {1000 * t10:.0f} ms, light {k_late} "
               f"{1000 * t200:.0f} ms (medians of the 10 lights up to each): ratio "
               f"{t200 / t10:.2f} (target <= 1.1); CPU time {1000 * c10:.0f} -> "
               f"{1000 * c200:.0f} ms: ratio {c200 / c10:.2f}")  # fmt: skip
    use20, use_n = rss[k20 - 1][2] / 1024, rss[-1][2] / 1024
    out.append(f"- peak RSS after {k20} lights {hwm20:.0f} MB, after {n} {hwm_n:.0f} MB: "
               f"ratio {hwm_n / hwm20:.2f} (target <= 1.10); current RSS {rss20:.0f} -> "
               f"{rss_n:.0f} MB; heap in use {use20:.0f} -> {use_n:.0f} MB")  # fmt: skip
    deciles = [float(np.median(part)) for part in np.array_split(times, min(10, n))]
    out.append("- median ms per tenth of the night: "
               + " ".join(f"{1000 * v:.0f}" for v in deciles))  # fmt: skip
    text = "\n".join(out)
    print(text)
    return text


def profile_run(args: argparse.Namespace, tmp: Path) -> str:
    out = [f"## Profile of observd's per-light path (cProfile, {args.profile_clock} clock, "
           "cumulative per stage)", ""]
    stages = list(STAGES)
    rows, tops = [], {}
    for size in args.profile_sizes:
        night = tmp / f"profile-{size}px-{args.profile_frames}"
        simulate(night, size, args.profile_frames, n_bias=3, n_dark=3, n_flat=3, defects=False)
        plain = run_tool("observd", night, tmp / f"plain{size}")
        run = run_tool("observd", night, tmp / f"prof{size}w", profile=args.profile_clock)
        if run.rc != 0 or plain.rc != 0:
            raise SystemExit(f"observd failed at {size} px: {run.error or plain.error}")
        n = len(run.data["light_times"])
        st = run.data["stages"]
        key = "light_cpu" if args.profile_clock == "cpu" else "light_times"
        total = sum(run.data[key]) / n
        other = total - sum(st.values()) / n
        per = [1000 * st[s] / n for s in stages]
        rows.append([str(size), f"{1000 * statistics.median(plain.data['light_times']):.0f}",
                     f"{1000 * total:.0f}"] + [f"{v:.0f}" for v in per]
                    + [f"{1000 * other:.0f}"])  # fmt: skip
        tops[size] = run.data["top"]
    head = ["px", "median ms (no profiler)", f"mean {args.profile_clock} ms (profiled)"]
    head += [f"{s} ms" for s in stages]
    out.append(table(rows, head + ["other ms"]))
    out.append("")
    out.append(f"Per light, mean over {args.profile_frames} lights of one filter (the first "
               "light defines the grid). Stages: read = rawio.read_raw; calibrate = "
               "reduce.calibrate/prepare; measure = quality.measure; align = register.align; "
               "warp = register.warp; accumulate = Coadds.add without publish; publish = "
               "product writes and checkpoints; other = ingest (hash, header, catalog), "
               "judge, transparency. cProfile inflates Python-heavy stages.")  # fmt: skip
    for size, top in tops.items():
        out.append("")
        out.append(f"Top functions by own time at {size} px (s over all lights):")
        out.append("")
        out += [f"    {name:<60} {tt:7.2f}" for name, tt in top]
    text = "\n".join(out)
    print(text)
    return text


def _importable(*names: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(n) is not None for n in names)


def write_results(path: Path, body: str, args: argparse.Namespace) -> None:
    m, v = machine(), versions()
    head = [
        "# observd benchmark results",
        "",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Command: "
        f"`python bench/run.py {' '.join(args.argv)}`".rstrip(),
        "",
        f"Machine: {m['cores']} cores, {m['memory_mb'] / 1024:.1f} GiB, {m['cpu']}; Python "
        f"{m['python']}; load average at the end {m['load']} (a shared machine: compare "
        "tools within this run, not across runs).",
        "",
        "Libraries: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head) + "\n" + body + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="latency night, px (4096)")
    p.add_argument("--frames", type=int, default=30, help="latency night, lights (30)")
    p.add_argument("--compare-size", type=int, default=2048, help="comparison night px (2048)")
    p.add_argument("--compare-frames", type=int, default=20, help="comparison lights (20)")
    p.add_argument("--skip", nargs="*", default=[], choices=TOOLS[1:], help="peers to skip")
    p.add_argument("--refresh-size", type=int, default=2048, help="bias refresh px (2048)")
    p.add_argument("--refresh-frames", type=int, default=30, help="0: no refresh timing")
    p.add_argument("--no-ingest", action="store_true", help="skip `observd ingest`")
    p.add_argument("--scaling", action="store_true", help="light 10 vs 200, RSS 20 vs 200")
    p.add_argument("--scaling-size", type=int, default=1024)
    p.add_argument("--scaling-frames", type=int, default=200)
    p.add_argument("--profile", action="store_true", help="observd's per-light stages")
    p.add_argument("--profile-sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--profile-frames", type=int, default=8)
    p.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                   help="cProfile's clock: wall (a quiet machine) or cpu (a shared one)")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--keep", type=Path, help="keep the nights and stacks in this folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--night", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.worker:
        worker(args)
        return
    from observd.logs import setup_logging

    setup_logging("ERROR")
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = args.keep
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="observd-bench-")))
        parts = []
        if args.scaling:
            parts.append(scaling_run(args, tmp))
        if args.profile:
            parts.append(profile_run(args, tmp))
        if not (args.scaling or args.profile):
            parts.append(default_run(args, tmp))
    body = "\n\n".join(parts)
    write_results(args.results, body, args)
    print(f"\nresults written to {args.results}")


if __name__ == "__main__":
    main()

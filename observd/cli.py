"""The ``observd`` command line: thin wrappers that parse arguments and call the modules."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from observd import __version__
from observd.catalog import Catalog, CatalogError, json_text
from observd.config import Config, ConfigError, find_config_file, load_config, to_toml
from observd.ingest import find_frame_files, in_time_order
from observd.logs import setup_logging
from observd.pipeline import Pipeline
from observd.status import (
    camera_data,
    format_camera,
    format_status,
    read_daemon_state,
    status_data,
)

__all__ = ["main"]


class CommandError(Exception):
    """A one-line reason for a non-zero exit."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CatalogError, CommandError) as exc:
        print(f"observd {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"observd {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $OBSERVD_CONFIG, then /etc/observd/observd.toml)",
    )
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug lines")

    parser = argparse.ArgumentParser(
        prog="observd",
        description="Unattended observatory pipeline: every frame cataloged, masters "
        "refreshed, lights calibrated and stacked as the night goes on.",
    )
    parser.add_argument("--version", action="version", version=f"observd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="the daemon: watch, process, stack, serve")
    p.add_argument("--no-web", action="store_true", help="do not serve the dome page")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ingest", parents=[common], help="record existing files (backfill, re-run)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders, recursive")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "restack", parents=[common], help="rebuild a night's stacks with the best masters now"
    )
    p.add_argument("--night", metavar="YYYY-MM-DD", required=True)
    p.add_argument("--target", metavar="NAME", help="only this target (e.g. 'M 51')")
    p.set_defaults(func=cmd_restack)

    p = sub.add_parser("status", parents=[common], help="what the catalog holds")
    p.add_argument("--night", metavar="YYYY-MM-DD", help="only this night")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("camera", parents=[common], help="camera health and current masters")
    p.add_argument("--night", metavar="YYYY-MM-DD", help="only this night")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_camera)

    p = sub.add_parser("summary", parents=[common], help="the morning summary of a night")
    p.add_argument("--night", metavar="YYYY-MM-DD", help="default: the latest night")
    p.add_argument(
        "--format",
        choices=("html", "json", "md"),
        default="html",
        help="html: write summary/<night>/index.html + summary.json; json, md: print",
    )
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("simulate", parents=[common], help="write a synthetic night")
    p.add_argument("out", metavar="OUT", help="folder: OUT/camera (frames) and OUT/truth")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=1024, metavar="PX", help="frame size (256-4096)")
    p.add_argument("--dialect", choices=("maxim", "nina"), default="maxim")
    p.add_argument("--lights", type=int, metavar="N", help="lights per target and filter")
    p.add_argument("--live", action="store_true", help="write files over time, in chunks")
    p.add_argument("--speed", type=float, default=600.0, help="live: simulated s per real s")
    p.add_argument("--junk", action="store_true", help="live: add camera-PC junk files")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "demo", parents=[common], help="a simulated night, written live and run by the daemon"
    )
    p.add_argument("--out", metavar="DIR", help="where to write (default: a new temp folder)")
    p.add_argument("--size", type=int, default=256, metavar="PX", help="frame size")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--speed", type=float, default=800.0, help="simulated s per real s")
    p.add_argument("--lights", type=int, default=6, metavar="N", help="per target and filter")
    p.add_argument(
        "--keep-serving", action="store_true", help="keep the dome page up after the night"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", parents=[common], help="serve the dome page (foreground)")
    p.add_argument("--host", metavar="H", help="address to bind (default: [web] host)")
    p.add_argument("--port", type=int, metavar="P", help="port (default: [web] port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", parents=[common], help="print the effective configuration")
    p.set_defaults(func=cmd_config)
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load_config(find_config_file(args.config))


def _log_level(args: argparse.Namespace) -> str:
    return "DEBUG" if args.verbose else "WARNING" if args.quiet else "INFO"


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(_config(args)), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from observd.web import serve_forever

    config = _config(args)
    setup_logging(_log_level(args), config.log_dir)
    if args.port is not None and not 0 <= args.port < 65536:
        raise CommandError(f"--port must be within 0..65535, got {args.port}")
    host = args.host or config.web.host
    port = config.web.port if args.port is None else args.port
    print(f"observd serve: the dome page at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    serve_forever(config, host, port)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging(_log_level(args), config.log_dir, tqdm_safe=True)
    roots = [Path(p) for p in args.paths]
    for root in roots:
        if not root.exists():
            raise CommandError(f"no such file or folder: {root}")
        if root.is_dir() and not _listable(root):
            raise CommandError(f"cannot read folder {root}: permission denied")
    with Catalog(config.paths.catalog) as catalog:
        _ingest(Pipeline(config, catalog), roots, config)
    return 0


def _listable(folder: Path) -> bool:
    try:
        next(iter(folder.iterdir()), None)
    except PermissionError:
        return False
    return True


def _ingest(pipeline: Pipeline, roots: list[Path], config: Config) -> dict[str, int]:
    files = in_time_order(find_frame_files(roots, config), config)
    counts: dict[str, int] = {}
    t0 = time.monotonic()
    for path in tqdm(files, desc="ingest", unit="file", disable=None, file=sys.stderr):
        result = pipeline.process(path)
        key = "vanished" if result is None else result.status if result.new else "unchanged"
        counts[key] = counts.get(key, 0) + 1
    pipeline.finish()
    logger.info(
        "ingest: {} files in {:.1f} s: {}",
        len(files),
        time.monotonic() - t0,
        ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing",
    )
    return counts


def cmd_restack(args: argparse.Namespace) -> int:
    from observd.headers import slugify

    config = _config(args)
    setup_logging(_log_level(args), config.log_dir)
    with Catalog(config.paths.catalog) as catalog:
        pipeline = Pipeline(config, catalog)
        n = pipeline.restack(args.night, slugify(args.target) if args.target else None)
    print(f"restacked {n} lights of {args.night}" + (f" ({args.target})" if args.target else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _report(args, status_data, format_status)


def cmd_camera(args: argparse.Namespace) -> int:
    return _report(args, camera_data, format_camera)


def _report(args: argparse.Namespace, collect, render) -> int:
    """A read-only report of the catalog, as text or JSON."""
    config = _config(args)
    try:
        catalog = Catalog(config.paths.catalog, readonly=True)
    except CatalogError as exc:
        raise CommandError(str(exc)) from None
    with catalog:
        data = collect(catalog, args.night)
    if collect is status_data:
        data["daemon"] = read_daemon_state(config.paths.products)
    if args.json:
        json.dump(data, sys.stdout, indent=1, default=str)
        print()
    else:
        print(render(data))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from observd.summary import format_markdown, summary_data, write_summary

    config = _config(args)
    setup_logging(_log_level(args))
    try:
        catalog = Catalog(config.paths.catalog, readonly=True)
    except CatalogError as exc:
        raise CommandError(str(exc)) from None
    with catalog:
        nights = catalog.nights()
        if not nights:
            raise CommandError("the catalog holds no night yet")
        night = args.night or nights[-1]
        if night not in nights:
            raise CommandError(
                f"no frames of night {night!r} in the catalog; nights: "
                + ", ".join(nights[-5:])
            )
        if args.format == "html":
            print(write_summary(config, catalog, night))
            return 0
        data = summary_data(config, catalog, night)
    if args.format == "json":
        print(json_text(data))
    else:
        print(format_markdown(data))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from observd.simulate import CameraModel, NightPlan, simulate_night

    setup_logging(_log_level(args))
    plan = NightPlan(seed=args.seed, dialect=args.dialect)
    if args.lights is not None:
        plan = replace(plan, n_light=args.lights)
    out = Path(args.out)
    truth = simulate_night(
        out, plan, CameraModel(size=args.size), live=args.live, speed=args.speed, junk=args.junk
    )
    print(f"wrote {len(truth.files)} files to {out / 'camera'} (truth in {out / 'truth'})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from observd.daemon import Daemon

    path = find_config_file(args.config)
    config = load_config(path)
    setup_logging(_log_level(args), config.log_dir)
    daemon = Daemon(path, serve_web=False if args.no_web else None)
    daemon.install_signal_handlers()
    return daemon.run()


def cmd_demo(args: argparse.Namespace) -> int:
    """Write a night live into a temp folder while the daemon processes and serves it."""
    import threading

    from observd.daemon import Daemon
    from observd.simulate import CameraModel, NightPlan, simulate_night

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="observd-demo-"))
    (out / "camera").mkdir(parents=True, exist_ok=True)
    config_path = out / "observd.toml"
    config_path.write_text(
        "# written by `observd demo`\n"
        "[paths]\n"
        'incoming = ["camera"]\n'
        'products = "products"\n'
        'catalog = "observd.sqlite"\n'
        "[site]\n"
        'timezone = "America/Los_Angeles"\n'
        "latitude = 34.22\n"
        "longitude = -118.06\n"
        "[web]\n"
        f"port = {_free_port()}\n"
        "[watch]\n"
        "settle_seconds = 0.5\n"
        "poll_seconds = 0.5\n"
        "incomplete_seconds = 10.0\n"
        "[stack]\n"
        "publish_seconds = 2.0\n"
        "[daemon]\n"
        "rebuild_delay_seconds = 3.0\n"
        "finish_quiet_seconds = 600.0\n",
        encoding="utf-8",
    )
    config = load_config(config_path)
    setup_logging("DEBUG" if args.verbose else "WARNING", config.log_dir)
    plan = NightPlan(
        seed=args.seed, n_bias=7, n_dark=5, n_flat=5, n_light=args.lights, dawn_flats=True
    )
    daemon = Daemon(config_path)
    daemon.install_signal_handlers()
    failure: list[BaseException] = []

    def write_night() -> None:
        try:
            simulate_night(
                out, plan, CameraModel(size=args.size), live=True, speed=args.speed, junk=True
            )
        except BaseException as exc:  # reported below; the daemon must still end
            failure.append(exc)
        daemon.request_finish(then_stop=not args.keep_serving)

    print(f"observd demo: a night of {args.size} px frames, written live into {out / 'camera'}")
    print(f"  (dusk calibrations, 2 targets x 3 filters x {args.lights} lights, dawn flats,")
    print(f"   junk files; {args.speed:.0f} simulated seconds per second)")
    t0 = time.monotonic()
    writer = threading.Thread(target=write_night, name="demo-camera", daemon=True)
    progress = threading.Thread(
        target=_demo_progress, args=(config, daemon, writer, t0), name="demo-progress", daemon=True
    )
    daemon_started = threading.Event()

    def start_writer() -> None:
        daemon_started.wait()
        writer.start()
        progress.start()

    threading.Thread(target=start_writer, daemon=True).start()
    daemon.on_ready = daemon_started.set
    daemon.run()
    if failure:
        raise CommandError(f"the simulated camera failed: {failure[0]}")
    print(f"\n  night done in {time.monotonic() - t0:.0f} s\n")
    with Catalog(config.paths.catalog, readonly=True) as catalog:
        print(format_status(status_data(catalog)))
        print("\nstacks:")
        for row in catalog.db["coadds"].rows_where(order_by="target, filter"):
            frames = f"{row['n_frames']:>3} frames"
            print(f"  {row['target']:<10} {row['filter']:<4} {frames}  {row['fits']}")
    for rgb in sorted(config.paths.products.glob("stacks/*/*/*_rgb.png")):
        print(f"  colour           {rgb}")
    for summary in sorted(config.paths.products.glob("summary/*/index.html")):
        print(f"morning summary: {summary}")
    print(
        f"\nconfig   {config_path}\ncatalog  {config.paths.catalog}\n"
        f"products {config.paths.products}\ntruth    {out / 'truth'}\n"
        f"logs     {config.log_dir / 'observd.log'}\n"
        f"try:     observd status --config {config_path}\n"
        f"page:    observd serve --config {config_path}   (then open "
        f"http://{config.web.host}:{config.web.port}/)"
    )
    return 0


def _demo_progress(config: Config, daemon, writer, t0: float) -> None:
    """A line every few seconds while the demo night runs (its own catalog connection)."""
    if daemon.web is not None:
        print(f"  dome page: {daemon.web.url}  (open it now to watch the night)")
    while writer.is_alive() or daemon.state_name == "running":
        time.sleep(5.0)
        state = read_daemon_state(config.paths.products)
        if state.get("state") != "running":
            continue
        event = state.get("last_event") or {}
        name = Path(event.get("path", "")).name
        print(
            f"  {time.monotonic() - t0:5.0f} s  {state['processed']:>4} files"
            f"  queue {state['queue']:>3}  last: {name} {event.get('what', '')}"[:110]
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



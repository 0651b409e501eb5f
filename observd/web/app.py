"""The dome monitor: a read-only Starlette app over the catalog and the products.

Routes
------
``/``                  the page (``?night=YYYY-MM-DD``, ``?mode=night|day``)
``/parts``             the page's sections as JSON ``{name: html}``, for live updates
``/events``            server-sent events: ``change`` whenever the catalog, the daemon's
                       state or the night's PNGs change (polled every 0.5 s)
``/api/status``        night, counts, stacks, daemon health, warnings (JSON)
``/api/frames``        every frame of a night: ``observd status`` keys + quality numbers
``/products/<path>``   a product file (``?w=N``: a PNG shrunk to N px wide, as JPEG)
``/frame/<id>.png``    quick look of a frame, calibrated as the pipeline did (``?w=N``;
                       ``.jpg`` the same as JPEG, lighter for the page)
``/stack/<id>.png``    a coadd re-stretched (``?stretch=asinh|linear|sqrt|zscale&q=..``)
``/static/...``        the page's CSS and script

Only files under the products folder are served; anything else is 404, and a request
with a malformed value is 400 with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import jinja2
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from observd.catalog import Catalog, CatalogError
from observd.config import Config
from observd.products import Products
from observd.web import data, images
from observd.web.plots import timeline_svg

__all__ = ["BadRequest", "create_app"]

HERE = Path(__file__).resolve().parent
PARTS = ("summary", "latest", "stacks", "composites", "timeline", "health", "daemon", "recent")
POLL_SECONDS = 0.5
STATE_SECONDS = 1.0  # the current signature is repeated this often (see events())
THUMB_WIDTH = 360  # stack thumbnails
COLOUR_WIDTH = 480  # colour composites
FRAME_WIDTH = 900  # the latest frame
SERVED_SUFFIXES = {".png", ".fits", ".fit", ".json", ".html", ".txt"}
CONTENT_TYPES = {".fits": "application/fits", ".fit": "application/fits"}


class BadRequest(ValueError):
    """A malformed request: answered 400 with this reason."""


# ---------------------------------------------------------------------- query values


def _night(request: Request) -> str | None:
    value = request.query_params.get("night")
    if value is None or value == "":
        return None
    try:
        return data.parse_night(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise BadRequest(f"{name} must be an integer within {lo}..{hi}, got {value[:20]!r}")
    return int(value)


def _float(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and lo <= number <= hi):
        raise BadRequest(f"{name} must be a number within {lo}..{hi}, got {value[:20]!r}")
    return number


def _choice(request: Request, name: str, choices: tuple[str, ...], default: str | None) -> Any:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}, got {value[:20]!r}")
    return value


# ---------------------------------------------------------------------- product paths


def safe_product_path(root: Path, rel: str, raw_path: bytes = b"") -> Path | None:
    """The file ``rel`` names under ``root``, or None when it may not be served.

    Refused: empty or absolute names, ``..`` or empty segments, backslashes, NUL and
    other control characters, anything still percent-encoded (double encoding), hidden
    files (temporary writes), suffixes that are not products, and any path whose real
    location (symlinks followed) is outside ``root``.
    """
    if not rel or rel.startswith("/") or "\\" in rel or "%" in rel:
        return None
    if b"%25" in raw_path.lower() or any(ord(c) < 32 or c == "\x7f" for c in rel):
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    if Path(parts[-1]).suffix.lower() not in SERVED_SUFFIXES:
        return None
    try:
        real_root = root.resolve(strict=True)
        real = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(real_root) or not real.is_file():
        return None
    return real


# ---------------------------------------------------------------------- the app


class DomeApp:
    """The state behind the routes: config, templates, the image cache."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.products = Products(config.paths.products)
        self.catalog_path = Path(config.paths.catalog)
        self.cache = images.ImageCache()
        self.closing = False  # set when the server stops: live streams end themselves
        self.generation = 0  # bumped when the warm-up made something new (in the signature)
        self._warm_lock = threading.Lock()
        self._warm_wanted: set[str | None] = set()
        self._warm_running = False
        self._warm_seen: dict[str | None, tuple] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["num"] = _num
        self.env.filters["hms"] = _hms
        self.env.filters["duration"] = _duration
        self.env.globals.update(thumb_w=THUMB_WIDTH, colour_w=COLOUR_WIDTH, frame_w=FRAME_WIDTH)
        self.env.filters["gib"] = lambda b: f"{b / 2**30:.1f} GiB" if b is not None else "-"

    # -- data -------------------------------------------------------------------

    def catalog(self) -> Catalog | None:
        try:
            return Catalog(self.catalog_path, readonly=True)
        except CatalogError:
            return None

    def view(self, night: str | None, *, measure: bool = False) -> dict[str, Any]:
        catalog = self.catalog()
        if catalog is None:
            view: dict[str, Any] = {"night": night, "nights": [], "frames": [], "stacks": [],
                                    "composites": [], "masters": [], "camera": [],
                                    "warnings": [], "latest": None, "counts": {},
                                    "no_catalog": True}  # fmt: skip
        else:
            with catalog:
                view = data.night_view(catalog, self.products, night, measure=measure)
        view["daemon"] = data.daemon_health(self.products)
        view["requested_night"] = night
        return view

    def parts(self, view: dict[str, Any]) -> dict[str, str]:
        module = self.env.get_template("parts.html").make_module({"timeline_svg": timeline_svg})
        return {name: str(getattr(module, name)(view)) for name in PARTS}

    def signature(self, night: str | None) -> tuple:
        if night is None:
            catalog = self.catalog()
            if catalog is not None:
                with catalog:
                    nights = catalog.nights()
                night = nights[-1] if nights else None
        up = data.daemon_health(self.products)["up"]
        files = data.signature(self.catalog_path, self.products, night)
        if self._warm_seen.get(night) != files:
            self._warm_seen[night] = files
            self.warm(night)
        return (night, up, self.generation, files)

    # -- warm-up: pictures and noise made before a browser asks --------------------

    def warm(self, night: str | None) -> None:
        """Make the night's thumbnails, latest frame and stack noise in the background.

        On a 4k night these take a second or more; made here when the catalog or the
        products change, the browser then finds them cached. When something new was
        made, ``generation`` changes, so the live pages fetch the numbers it measured.
        """
        with self._warm_lock:
            self._warm_wanted.add(night)
            if self._warm_running:
                return
            self._warm_running = True
        threading.Thread(target=self._warm_loop, name="observd-web-warm", daemon=True).start()

    def _warm_loop(self) -> None:
        while True:
            with self._warm_lock:
                if not self._warm_wanted or self.closing:
                    self._warm_running = False
                    return
                night = self._warm_wanted.pop()
            try:
                if self._warm_night(night):
                    self.generation += 1
            except Exception:  # a half-written product, a vanished file: next time
                logger.opt(exception=True).debug("dome page: warm-up of {} failed", night)

    def _warm_night(self, night: str | None) -> bool:
        """Make what the page of ``night`` will ask for; True when a number is new."""
        catalog = self.catalog()
        if catalog is None:
            return False
        new = False
        with catalog:
            view = data.night_view(catalog, self.products, night, measure=False)
            for stack in view["stacks"]:
                if stack["fits_path"] and stack["noise"] is None:
                    new |= data.sky_noise(stack["fits_path"]) is not None
                if stack["png_path"]:
                    _quietly(images.thumbnail_jpeg, self.cache, stack["png_path"], THUMB_WIDTH)
            for colour in view["composites"]:
                _quietly(images.thumbnail_jpeg, self.cache, colour["png_path"], COLOUR_WIDTH)
            latest = view["latest"]
            if latest and latest["image"]:
                _quietly(images.frame_png, self.cache, catalog, latest["id"], FRAME_WIDTH, "jpeg")
        return new

    # -- routes -----------------------------------------------------------------

    def page(self, request: Request) -> Response:
        night = _night(request)
        mode = _choice(request, "mode", ("day", "night"), None)
        view = self.view(night)
        self.warm(night)
        html = self.env.get_template("index.html").render(
            view=view, parts=self.parts(view), mode=mode, night_param=night or ""
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def parts_json(self, request: Request) -> Response:
        night = _night(request)
        before = self.signature(night)  # before the view: never newer than it
        view = self.view(night)
        # changed while the view was made: the parts may show a state newer than
        # ``before``, and if it changes back (a daemon state file written, then removed)
        # the stream's signature would equal ``before`` again and the page would keep
        # the newer parts for good. No signature: the page asks again at the next event.
        sig = _sig_hash(before) if self.signature(night) == before else None
        return JSONResponse(
            {"night": view["night"], "sig": sig, "parts": self.parts(view)},
            headers={"Cache-Control": "no-store"},
        )

    def api_status(self, request: Request) -> Response:
        view = self.view(_night(request), measure=True)
        for stack in view["stacks"]:  # server paths are no business of the API's
            stack.pop("fits_path", None)
            stack.pop("png_path", None)
        for colour in view["composites"]:
            colour.pop("png_path", None)
        body = {k: view.get(k) for k in ("night", "nights", "counts", "totals", "stacks",
                                         "composites", "masters", "camera", "warnings",
                                         "latest", "daemon")}  # fmt: skip
        body["frames"] = len(view["frames"])
        return _json(body)

    def api_frames(self, request: Request) -> Response:
        night = _night(request)
        catalog = self.catalog()
        if catalog is None:
            return _json({"night": night, "frames": []})
        with catalog:
            if night is None:
                nights = catalog.nights()
                night = nights[-1] if nights else None
            frames = data.frames_data(catalog, night) if night else []
        return _json({"night": night, "frames": frames})

    def product(self, request: Request) -> Response:
        width = _int(request, "w", 0, 16, 4096) if "w" in request.query_params else None
        path = safe_product_path(
            self.products.root, request.path_params["path"], request.scope.get("raw_path", b"")
        )
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        if width is not None:
            if path.suffix.lower() != ".png":
                raise BadRequest("w= applies to PNG files only")
            jpeg = images.thumbnail_jpeg(self.cache, str(path), width)
            return Response(jpeg, media_type="image/jpeg", headers=_cache_headers(request))
        return FileResponse(
            path,
            media_type=CONTENT_TYPES.get(path.suffix.lower()),
            headers=_cache_headers(request),
        )

    def frame(self, request: Request, fmt: str) -> Response:
        width = _int(request, "w", FRAME_WIDTH, 16, 4096)
        catalog = self.catalog()
        if catalog is None:
            return PlainTextResponse("not found", status_code=404)
        with catalog:
            try:
                body = images.frame_png(self.cache, catalog, request.path_params["id"], width, fmt)
            except LookupError as exc:
                return PlainTextResponse(f"not found: {exc}", status_code=404)
        return Response(body, media_type=f"image/{fmt}", headers={"Cache-Control": "max-age=60"})

    def stack(self, request: Request) -> Response:
        stretch = _choice(request, "stretch", images.STRETCHES, "asinh")
        q = _float(request, "q", 0.15, 0.01, 0.9)
        width = _int(request, "w", 1600, 16, 8192)
        catalog = self.catalog()
        if catalog is None:
            return PlainTextResponse("not found", status_code=404)
        with catalog:
            rows = list(catalog.db["coadds"].rows_where("id = ?", [request.path_params["id"]]))
        fits_path = rows[0].get("fits") if rows else None
        if not fits_path or not os.path.isfile(fits_path):
            return PlainTextResponse("not found", status_code=404)
        png = images.stack_png(self.cache, fits_path, stretch, q, width)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-cache"})

    async def events(self, request: Request) -> Response:
        """Server-sent events: ``hello`` on connect, ``change`` when the signature
        changed (polled every 0.5 s), and ``state`` every second repeating it.

        Each carries the signature's hash; ``/parts`` returns the hash it was rendered
        at. A page compares the two and fetches the parts again when they differ, so a
        page that fetched between two polls (and saw a state this stream never saw)
        still converges within a second.
        """
        night = _night(request)

        async def stream():
            yield "retry: 1000\n\n"
            last = None
            quiet = 0.0
            while not self.closing and not await request.is_disconnected():
                sig = await anyio.to_thread.run_sync(self.signature, night)
                if sig != last or quiet >= STATE_SECONDS:
                    kind = "hello" if last is None else "change" if sig != last else "state"
                    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
                    body = {"night": sig[0], "sig": _sig_hash(sig), "at": stamp}
                    yield f"event: {kind}\ndata: {json.dumps(body)}\n\n"
                    last, quiet = sig, 0.0
                await asyncio.sleep(POLL_SECONDS)
                quiet += POLL_SECONDS

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


def create_app(config: Config) -> Starlette:
    """The dome page as an ASGI app (serve it with uvicorn, or :class:`WebServer`).

    Parameters
    ----------
    config
        The effective configuration: ``paths.catalog`` and ``paths.products`` are read.

    Returns
    -------
    starlette.applications.Starlette
    """
    dome = DomeApp(config)

    def sync(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await anyio.to_thread.run_sync(handler, request)
            except BadRequest as exc:
                return PlainTextResponse(f"bad request: {exc}", status_code=400)

        return endpoint

    async def events(request: Request) -> Response:
        try:
            return await dome.events(request)
        except BadRequest as exc:
            return PlainTextResponse(f"bad request: {exc}", status_code=400)

    routes = [
        Route("/", sync(dome.page)),
        Route("/parts", sync(dome.parts_json)),
        Route("/events", events),
        Route("/api/status", sync(dome.api_status)),
        Route("/api/frames", sync(dome.api_frames)),
        Route("/products/{path:path}", sync(dome.product)),
        Route("/frame/{id:int}.png", sync(lambda r: dome.frame(r, "png"))),
        Route("/frame/{id:int}.jpg", sync(lambda r: dome.frame(r, "jpeg"))),
        Route("/stack/{id:int}.png", sync(dome.stack)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.dome = dome
    return app


# ---------------------------------------------------------------------- helpers


def _sig_hash(sig: tuple) -> str:
    return hashlib.sha1(repr(sig).encode()).hexdigest()[:16]


def _quietly(make: Callable[..., object], *args: Any) -> None:
    """Make a picture ahead of time; a file that vanished or is half-written waits."""
    with contextlib.suppress(OSError, LookupError, ValueError):
        make(*args)


def _json(body: Any) -> Response:
    text = json.dumps(_clean(body), default=str, allow_nan=False)
    return Response(text, media_type="application/json", headers={"Cache-Control": "no-store"})


def _clean(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _cache_headers(request: Request) -> dict[str, str]:
    """Versioned product URLs (``?v=mtime``) never change; others are revalidated."""
    if "v" in request.query_params:
        return {"Cache-Control": "public, max-age=86400, immutable"}
    return {"Cache-Control": "no-cache"}


def _num(value: Any, fmt: str = "{:.2f}", missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _hms(value: str | None) -> str:
    """ISO time -> ``HH:MM:SS`` UTC."""
    if not value:
        return "–"
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return value
    if t.tzinfo is not None:
        t = t.astimezone(UTC)
    return t.strftime("%H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

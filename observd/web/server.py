"""Serving the dome page: uvicorn in a background thread (daemon) or the foreground."""

from __future__ import annotations

import threading
import time

import uvicorn

from observd.config import Config
from observd.web.app import create_app

__all__ = ["WebServer", "serve_forever"]


class _Server(uvicorn.Server):
    """uvicorn, telling the live-update streams to end when it is asked to stop (a
    stream cut by the graceful-shutdown timeout would be logged as an error)."""

    def handle_exit(self, sig: int, frame: object) -> None:
        self.config.app.state.dome.closing = True
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        self.config.app.state.dome.closing = True
        self.should_exit = True


def _uvicorn_config(config: Config, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,  # live-update streams never end by themselves
    )


class WebServer:
    """The dome page served from a background thread.

    Parameters
    ----------
    config
        The effective configuration.
    host, port
        Override ``[web] host`` and ``port``; port 0 picks a free port.

    Examples
    --------
    >>> server = WebServer(config, port=0)   # doctest: +SKIP
    >>> server.start(); print(server.url); server.stop()   # doctest: +SKIP
    """

    def __init__(self, config: Config, host: str | None = None, port: int | None = None) -> None:
        self.config = config
        self.host = host or config.web.host
        self.port = config.web.port if port is None else port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> WebServer:
        """Start listening; returns once the socket is open.

        Raises
        ------
        RuntimeError
            When the server cannot listen (port taken, bad host) within ``timeout``.
        """
        if self._thread is not None:
            return self
        server = _Server(_uvicorn_config(self.config, self.host, self.port))
        thread = threading.Thread(target=server.run, name="observd-web", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dome page: cannot listen on {self.host}:{self.port}")
            time.sleep(0.02)
        server.config.app.state.dome.warm(None)  # the latest night's pictures, before asked
        if self.port == 0:
            for s in server.servers:
                for sock in s.sockets:
                    self.port = sock.getsockname()[1]
                    break
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait for the thread (open event streams are cut)."""
        if self._server is not None:
            self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server, self._thread = None, None

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (``observd serve``)."""
    _Server(
        _uvicorn_config(config, host or config.web.host, config.web.port if port is None else port)
    ).run()

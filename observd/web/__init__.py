"""The dome monitor: a live, read-only web page over the catalog and the products."""

from observd.web.app import create_app
from observd.web.server import WebServer, serve_forever

__all__ = ["WebServer", "create_app", "serve_forever"]

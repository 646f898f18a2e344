"""A loopback HTTP server for the tests that fetch images over http (no network needed)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Loopback:
    """Serves `handler` on 127.0.0.1 from a daemon thread. `stop` is set on close, so that a handler that
    stalls on purpose (waiting on it) lets the server shut down."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

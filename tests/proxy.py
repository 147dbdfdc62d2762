"""A tiny HTTP proxy in front of the test registry: counts requests, records Range headers, and
can lie about blobs or stall half-way through one.

Used as a registry mirror (config ``mirrors``) so tests can prove "one download" and can play a
registry that serves bytes not matching their digest. Loopback only; stopped by its fixture.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import requests


class Proxy:
    def __init__(self, upstream: str, mutate: Optional[Callable[[str, bytes], bytes]] = None, delay: float = 0.0,
                 delay_if: Callable[[str], bool] = lambda path: True):
        self.upstream = upstream.rstrip("/")
        self.mutate = mutate
        self.delay = delay
        self.delay_if = delay_if
        self.requests: Counter = Counter()
        self.ranges: list = []  # (path, Range header) of every request that had one
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self, method: str):
                with proxy._lock:
                    proxy.requests[(method, self.path)] += 1
                    if self.headers.get("Range"):
                        proxy.ranges.append((self.path, self.headers["Range"]))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                resp = requests.request(method, proxy.upstream + self.path, headers=headers, timeout=30,
                                        allow_redirects=False, stream=False)
                body = resp.content
                if method == "GET" and proxy.mutate is not None:
                    body = proxy.mutate(self.path, body)
                self.send_response(resp.status_code)
                for key, value in resp.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    if proxy.delay and proxy.delay_if(self.path):
                        half = len(body) // 2
                        self.wfile.write(body[:half])
                        self.wfile.flush()
                        threading.Event().wait(proxy.delay)
                        self.wfile.write(body[half:])
                    else:
                        self.wfile.write(body)

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def blob_gets(self, digest: str) -> int:
        return sum(n for (method, path), n in self.requests.items()
                   if method == "GET" and path.endswith(f"/blobs/{digest}"))

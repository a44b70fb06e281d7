"""Shared fixtures: a random checkpoint in the official layout and the model loaded from it."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

from tests.official_npz import random_checkpoint, write_npz
from tests.reference_bit import reference_forward

R50 = (3, 4, 6, 3)


@pytest.fixture(scope="module", autouse=True)
def _settled_heap():
    """After each test module, what it left on the heap is frozen out of Python's garbage collection: otherwise
    every later full collection walks the models and traced functions of all earlier modules (one test took 52 s
    late in a run and 4 s alone), and collecting them for real costs tens of seconds of TensorFlow finalizers."""
    yield
    import gc

    gc.freeze()


@pytest.fixture(scope="session")
def r50_params():
    return random_checkpoint(R50, width=1, num_classes=1000, seed=0)


@pytest.fixture(scope="session")
def r50_npz(r50_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "BiT-M-R50x1-random.npz"
    write_npz(path, r50_params)
    return str(path)


@pytest.fixture(scope="session")
def small_params():
    return random_checkpoint((2, 2, 2, 2), width=0.5, num_classes=10, seed=1)


@pytest.fixture(scope="session")
def small_npz(small_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "R26x0.5-random.npz"
    write_npz(path, small_params)
    return str(path)


class LocalHTTPServer:
    """A real ThreadingHTTPServer on 127.0.0.1 serving ``routes``; counts GETs per path, records User-Agents."""

    def __init__(self):
        import collections
        import http.server
        import threading

        self.routes = {}  # path -> (body, announced Content-Length)
        self.counts = collections.Counter()
        self.user_agents = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.counts[self.path] += 1
                server.user_agents.append(self.headers.get("User-Agent"))
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, length = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, path, body, length=None):
        """Serve ``body`` at ``path`` (announcing ``length`` bytes if given); returns its URL."""
        self.routes[path] = (bytes(body), len(body) if length is None else length)
        return self.base + path


@pytest.fixture
def http_server():
    """A `LocalHTTPServer`, shut down after the test."""
    s = LocalHTTPServer()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(timeout=5)


@pytest.fixture(scope="session")
def small_images():
    return np.random.default_rng(7).uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def small_reference(small_params, small_images):
    """The float64 reference outputs of the small checkpoint on `small_images`."""
    return reference_forward(small_params, small_images, block_units=(2, 2, 2, 2), width=0.5)

"""Tests for bit_keras.download against a local HTTP server on 127.0.0.1."""

import contextlib
import hashlib
import http.server
import os
import pathlib
import re
import threading
import time

import pytest

from bit_keras.models import download
from bit_keras.models.download import DownloadError, cached_path, default_cache_dir, fetch

pytestmark = pytest.mark.timeout(10)

PAYLOAD = bytes(range(256)) * 4099  # > 1 MiB, so the download takes several chunks


def leftovers(directory):
    return [p.name for p in pathlib.Path(directory).iterdir() if ".tmp-" in p.name]


class SlowServer:
    """A real server on 127.0.0.1 that announces 1000 bytes, sends 10, then one every 0.2 s for ``trickle_s`` seconds
    and nothing after that."""

    def __init__(self, trickle_s):
        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                end = time.monotonic() + trickle_s
                with contextlib.suppress(ConnectionError):  # the client gave up
                    self.wfile.write(b"x" * 10)
                    while not stop.wait(0.2):
                        if time.monotonic() < end:
                            self.wfile.write(b"x")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/bit_models/slow.npz"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(params=[1000, 1.5], ids=["trickle", "stall"])
def slow_server(request):
    server = SlowServer(request.param)
    yield server
    server.close()


def test_cached_path_layout(tmp_path):
    url = "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"
    assert cached_path(url, str(tmp_path)) == os.path.join(
        str(tmp_path), "storage.googleapis.com", "bit_models", "BiT-M-R50x1.npz"
    )
    assert cached_path("gs://bucket/dir/R50x1_224.npz", str(tmp_path)) == os.path.join(
        str(tmp_path), "bucket", "dir", "R50x1_224.npz"
    )
    assert cached_path("http://127.0.0.1:8000/a.txt", str(tmp_path)) == os.path.join(
        str(tmp_path), "127.0.0.1_8000", "a.txt"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/../../etc/passwd",
        "http://example.com/bit_models/%2e%2e/%2e%2e/x.npz",
        "gs://bucket/a/../../../x.npz",
        "http://example.com/",
    ],
)
def test_rejects_paths_outside_cache(tmp_path, url):
    with pytest.raises(ValueError):
        cached_path(url, str(tmp_path))
    with pytest.raises(ValueError):
        fetch(url, cache_dir=str(tmp_path), progress=False)


def test_download_lands_at_cached_path(http_server, tmp_path):
    url = http_server.add("/bit_models/BiT-M-R50x1.npz", PAYLOAD)
    path = fetch(url, cache_dir=str(tmp_path), progress=False)
    assert path == cached_path(url, str(tmp_path))
    assert pathlib.Path(path).read_bytes() == PAYLOAD
    assert http_server.user_agents == ["bit_keras"]
    assert leftovers(os.path.dirname(path)) == []


def test_second_fetch_uses_cache_and_force_downloads_again(http_server, tmp_path):
    url = http_server.add("/bit_models/labels.txt", b"tench\ngoldfish\n")
    first = fetch(url, cache_dir=str(tmp_path), progress=False)
    assert http_server.counts["/bit_models/labels.txt"] == 1
    assert fetch(url, cache_dir=str(tmp_path), progress=False) == first
    assert http_server.counts["/bit_models/labels.txt"] == 1

    http_server.add("/bit_models/labels.txt", b"new contents\n")
    assert fetch(url, cache_dir=str(tmp_path), progress=False, force=True) == first
    assert http_server.counts["/bit_models/labels.txt"] == 2
    assert pathlib.Path(first).read_bytes() == b"new contents\n"


def test_http_404(http_server, tmp_path):
    url = http_server.base + "/bit_models/missing.npz"
    with pytest.raises(DownloadError, match="404") as info:
        fetch(url, cache_dir=str(tmp_path), progress=False)
    assert url in str(info.value)
    assert "\n" not in str(info.value)
    dest = cached_path(url, str(tmp_path))
    assert not os.path.exists(dest)
    assert leftovers(os.path.dirname(dest)) == []


def test_truncated_download_leaves_nothing(http_server, tmp_path):
    url = http_server.add("/bit_models/short.npz", PAYLOAD[:1000], length=len(PAYLOAD))
    with pytest.raises(DownloadError, match=f"truncated: got 1000 of {len(PAYLOAD)} bytes") as info:
        fetch(url, cache_dir=str(tmp_path), progress=False)
    assert url in str(info.value)
    dest = cached_path(url, str(tmp_path))
    assert not os.path.exists(dest)
    assert leftovers(os.path.dirname(dest)) == []


def test_connection_refused(tmp_path):
    probe = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = probe.server_port
    probe.server_close()  # nothing listens on this port any more
    url = f"http://127.0.0.1:{port}/x.npz"
    with pytest.raises(DownloadError, match="connection error") as info:
        fetch(url, cache_dir=str(tmp_path), progress=False)
    assert url in str(info.value)
    assert not os.path.exists(cached_path(url, str(tmp_path)))


def test_interrupted_download_leaves_nothing(http_server, tmp_path, monkeypatch):
    class InterruptingBar:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "tqdm", InterruptingBar)
    url = http_server.add("/bit_models/big.npz", PAYLOAD)
    with pytest.raises(KeyboardInterrupt):
        fetch(url, cache_dir=str(tmp_path), progress=False)
    dest = cached_path(url, str(tmp_path))
    assert not os.path.exists(dest)
    assert leftovers(os.path.dirname(dest)) == []


def test_cache_env_var(http_server, tmp_path, monkeypatch):
    cache = tmp_path / "env_cache"
    monkeypatch.setenv(download.CACHE_ENV, str(cache))
    assert default_cache_dir() == str(cache)
    url = http_server.add("/bit_models/env.txt", b"x" * 10)
    path = fetch(url, progress=False)
    assert path == os.path.join(str(cache), f"127.0.0.1_{http_server.httpd.server_port}", "bit_models", "env.txt")
    assert pathlib.Path(path).read_bytes() == b"x" * 10


def test_default_cache_dir_without_env(tmp_path, monkeypatch):
    monkeypatch.delenv(download.CACHE_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "kh"), "bit_keras")
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "home"), ".keras", "bit_keras")


def test_local_path_and_file_url_used_in_place(tmp_path):
    local = tmp_path / "weights.npz"
    local.write_bytes(b"local")
    cache = tmp_path / "cache"
    assert fetch(str(local), cache_dir=str(cache)) == str(local)
    assert fetch(local.as_uri(), cache_dir=str(cache)) == str(local)
    assert not cache.exists()


def test_missing_local_path(tmp_path):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fetch(missing, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fetch(pathlib.Path(missing).as_uri(), cache_dir=str(tmp_path))


def test_gfile_copy(tmp_path):
    """gs:// goes through tf.io.gfile; TensorFlow's real in-memory filesystem (ram://) stands in for GCS."""
    import tensorflow as tf

    good = "ram://bit_models/R50x1.npz"
    with tf.io.gfile.GFile(good, "wb") as f:
        f.write(PAYLOAD)
    path = fetch(good, cache_dir=str(tmp_path), progress=False)
    assert path == os.path.join(str(tmp_path), "bit_models", "R50x1.npz")
    assert pathlib.Path(path).read_bytes() == PAYLOAD

    with pytest.raises(DownloadError, match="NotFoundError") as info:
        fetch("ram://bit_models/missing.npz", cache_dir=str(tmp_path), progress=False)
    assert "ram://bit_models/missing.npz" in str(info.value)
    assert sorted(os.listdir(tmp_path / "bit_models")) == ["R50x1.npz"]


def test_deadline_stops_a_slow_download(slow_server, tmp_path):
    """A byte every 0.2 s never trips the per-read timeout; a stall after 1.5 s is cut at the deadline (2 s), not
    after a full read timeout (the 2 s the download began with, or TIMEOUT_S)."""
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(slow_server.url, cache_dir=str(tmp_path), progress=False, deadline_s=2)
    assert time.monotonic() - start < 3
    message = str(info.value)
    received = re.search(r"not complete within the 2 s deadline \((\d+) bytes received\)", message)
    assert received and 10 <= int(received.group(1)) < 1000
    assert message.startswith(slow_server.url) and "\n" not in message
    assert "deadline_s=" in message and download.DEADLINE_ENV in message
    dest = cached_path(slow_server.url, str(tmp_path))
    assert not os.path.exists(dest)
    assert leftovers(os.path.dirname(dest)) == []


def test_deadline_from_environment(http_server, tmp_path, monkeypatch):
    url = http_server.add("/bit_models/env_deadline.txt", b"tench\n")
    monkeypatch.setenv(download.DEADLINE_ENV, "0.5")
    slow = SlowServer(1000)
    try:
        with pytest.raises(DownloadError, match=r"0.5 s deadline"):
            fetch(slow.url, cache_dir=str(tmp_path), progress=False)
    finally:
        slow.close()
    assert pathlib.Path(fetch(url, cache_dir=str(tmp_path), progress=False)).read_bytes() == b"tench\n"
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(download.DEADLINE_ENV, bad)
        with pytest.raises(ValueError, match=f"^{download.DEADLINE_ENV}='{bad}': expected a positive number"):
            fetch(url, cache_dir=str(tmp_path), progress=False, force=True)
    with pytest.raises(ValueError, match="^deadline_s=0: expected a positive number of seconds$"):
        fetch(url, cache_dir=str(tmp_path), progress=False, force=True, deadline_s=0)
    assert fetch(url, cache_dir=str(tmp_path), progress=False, force=True, deadline_s=5)  # the argument wins


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def test_sha256_mismatch_removes_the_download(http_server, tmp_path):
    url = http_server.add("/bit_models/checked.npz", PAYLOAD)
    wrong = sha256(b"other")
    with pytest.raises(DownloadError) as info:
        fetch(url, cache_dir=str(tmp_path), progress=False, sha256=wrong)
    assert str(info.value) == f"{url}: SHA-256 mismatch: expected {wrong}, got {sha256(PAYLOAD)}"
    dest = cached_path(url, str(tmp_path))
    assert not os.path.exists(dest)
    assert leftovers(os.path.dirname(dest)) == []
    assert fetch(url, cache_dir=str(tmp_path), progress=False, sha256=sha256(PAYLOAD).upper()) == dest
    with pytest.raises(ValueError, match="not a hex SHA-256 digest"):
        fetch(url, cache_dir=str(tmp_path), progress=False, sha256="abc")


def test_corrupted_cache_is_fetched_again_once(http_server, tmp_path):
    path = "/bit_models/cached.npz"
    url = http_server.add(path, PAYLOAD)
    dest = fetch(url, cache_dir=str(tmp_path), progress=False)
    pathlib.Path(dest).write_bytes(b"\0" * len(PAYLOAD))  # e.g. a disk error
    assert fetch(url, cache_dir=str(tmp_path), progress=False, sha256=sha256(PAYLOAD)) == dest
    assert http_server.counts[path] == 2
    assert pathlib.Path(dest).read_bytes() == PAYLOAD
    assert fetch(url, cache_dir=str(tmp_path), progress=False, sha256=sha256(PAYLOAD)) == dest
    assert http_server.counts[path] == 2  # a cached copy with the right digest is used

    pathlib.Path(dest).write_bytes(b"\0" * len(PAYLOAD))
    http_server.add(path, b"\1" * len(PAYLOAD))  # the server is wrong too
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        fetch(url, cache_dir=str(tmp_path), progress=False, sha256=sha256(PAYLOAD))
    assert http_server.counts[path] == 3
    assert not os.path.exists(dest)
    assert leftovers(os.path.dirname(dest)) == []


def test_sha256_of_a_local_file_is_checked_and_the_file_kept(tmp_path):
    local = tmp_path / "weights.npz"
    local.write_bytes(b"local")
    assert fetch(str(local), sha256=sha256(b"local")) == str(local)
    with pytest.raises(DownloadError, match=f"^{local}: SHA-256 mismatch: expected {sha256(b'x')}, got"):
        fetch(str(local), sha256=sha256(b"x"))
    assert local.read_bytes() == b"local"


def test_check_reachable_probes_the_host_or_its_proxy(http_server, monkeypatch):
    """A host that answers passes; a closed port fails at once naming the host, and through a proxy, the proxy."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    download.check_reachable([http_server.base + "/a.npz", http_server.base + "/b.npz"], "x", "y")
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        download.check_reachable(["http://127.0.0.1:1/a.npz"], "a", "use b")
    assert time.monotonic() - start < download.PROBE_S
    assert str(info.value) == "a: 127.0.0.1:1 does not answer (Connection refused); offline, use b"
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:1")
    with pytest.raises(ConnectionError, match=r"^x: 127\.0\.0\.1:1 \(the proxy for https://example\.org\) does not"):
        download.check_reachable(["https://example.org/bit_models/a.npz"], "x", "y")

"""Download BiT checkpoints and label files into a local cache.

URLs (``http(s)://``, and ``gs://`` or any other scheme ``tf.io.gfile`` reads) are fetched once into
``<cache_dir>/<host>/<url path>``; local paths and ``file://`` URLs are used in
place. Downloads go to a temporary file that is renamed into place only once
complete, so an interrupted or truncated download is never picked up later. A
whole download must finish within a deadline (``DEADLINE_S``, or
``$BIT_KERAS_DOWNLOAD_DEADLINE`` seconds, or ``deadline_s=``), not only each read.
"""

import hashlib
import http.client
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

from bit_keras import files

CACHE_ENV = "BIT_KERAS_CACHE"
CHUNK_SIZE = 1 << 20
TIMEOUT_S = 60  # the longest one read may wait
DEADLINE_ENV = "BIT_KERAS_DOWNLOAD_DEADLINE"
DEADLINE_S = 3600  # the longest a whole download may take
USER_AGENT = "bit_keras"
PROBE_S = 5  # a host that accepts no connection within this many seconds is unreachable
_HTTP_SCHEMES = ("http", "https")


class DownloadError(OSError):
    """A download failed; the message names the URL and the problem."""


def default_cache_dir():
    """``$BIT_KERAS_CACHE`` if set, else ``$KERAS_HOME/bit_keras`` or ``~/.keras/bit_keras``."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    keras_home = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    return os.path.join(os.path.expanduser(keras_home), "bit_keras")


def cached_path(url, cache_dir=None):
    """Where ``url`` is cached: ``<cache_dir>/<host>/<url path>``.

    For ``gs://bucket/path`` the host is the bucket; a non-default port is kept
    as ``<host>_<port>``. Query and fragment are ignored. Raises ValueError for
    URLs that are not http(s)/gs, lack a file path, or contain ``.``/``..``
    segments (which could escape the cache directory).
    """
    parsed = urllib.parse.urlsplit(url)
    if not _is_remote(parsed.scheme):
        raise ValueError(f"{url!r} is not a URL (http(s)://, gs://, ...)")
    host = parsed.hostname or "" if parsed.scheme.lower() in _HTTP_SCHEMES else parsed.netloc
    if parsed.port is not None:
        host = f"{host}_{parsed.port}"
    parts = [p for p in urllib.parse.unquote(parsed.path).split("/") if p]
    if host in ("", ".", "..") or not parts or any(p in (".", "..") or "\\" in p for p in parts):
        raise ValueError(f"{url!r} does not map to a file inside the cache directory")
    return os.path.join(cache_dir or default_cache_dir(), host, *parts)


def fetch(url_or_path, cache_dir=None, progress=True, force=False, *, sha256=None, deadline_s=None):
    """Return a local path for ``url_or_path``, downloading it if needed.

    Local paths are returned unchanged and ``file://`` URLs as their local
    path, after checking they exist (FileNotFoundError otherwise) and are regular
    files (a one-line ValueError for a FIFO or device). Remote URLs
    are returned from the cache without network access when already there
    (unless ``force``); otherwise they are streamed to a temporary file (``bit_keras.files``)
    beside the cache path, checked against the announced size and renamed into
    place. On any failure the partial file is removed and DownloadError (or the
    original exception, e.g. KeyboardInterrupt) is raised; with ``force``, a
    previously cached copy is left untouched.

    With ``sha256`` (hex), a file whose digest differs is refused: a download
    is removed, a cached copy is removed and downloaded again, a local file is
    left in place. ``deadline_s`` bounds the whole download (default
    ``$BIT_KERAS_DOWNLOAD_DEADLINE``, else ``DEADLINE_S``).
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256={sha256!r} is not a hex SHA-256 digest (64 characters)")
    expected = sha256.lower() if sha256 is not None else None
    parsed = urllib.parse.urlsplit(url_or_path)
    scheme = parsed.scheme.lower()
    if not _is_remote(scheme):
        path = url_or_path
        if scheme == "file":
            path = urllib.request.url2pathname(parsed.path)
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", path)
        files.check_regular(path, "a model or label file")
        _check_digest(path, path, expected)
        return path

    dest = cached_path(url_or_path, cache_dir)
    if os.path.exists(dest) and not force:
        if expected is None or _digest(dest) == expected:
            return dest
        os.remove(dest)  # a corrupted cached copy: download it again
    seconds = _deadline_seconds(deadline_s)
    copy = _copy_http if scheme in _HTTP_SCHEMES else _copy_gfile
    with files.replacing(dest) as tmp:
        with open(tmp, "wb") as out:
            deadline = _Deadline(url_or_path, seconds, out)
            size, total = copy(url_or_path, out, progress, os.path.basename(dest), deadline)
        if total is not None and size != total:
            raise DownloadError(f"{url_or_path}: truncated: got {size} of {total} bytes")
        _check_digest(tmp, url_or_path, expected)
    return dest


def check_reachable(urls, what, offline):
    """A one-line `ConnectionError` "WHAT: HOST does not answer (REASON); offline, OFFLINE" unless every host of `urls`
    (or the proxy the environment names for it, as `requests` would use) accepts a connection within `PROBE_S`
    seconds: an unreachable network fails in seconds, before anything else is done."""
    import requests

    origins = {urllib.parse.urlsplit(url)._replace(path="", query="", fragment="").geturl() for url in urls}
    for origin in sorted(origins):
        proxy = requests.utils.select_proxy(origin, requests.utils.get_environ_proxies(origin))
        address = urllib.parse.urlsplit(proxy or origin)
        port = address.port or {"http": 80, "ftp": 21}.get(address.scheme, 443)
        try:
            socket.create_connection((address.hostname, port), timeout=PROBE_S).close()
        except OSError as err:
            host = f"{address.hostname}:{port}" + (f" (the proxy for {origin})" if proxy else "")
            reason = err.strerror or err
            raise ConnectionError(f"{what}: {host} does not answer ({reason}); offline, {offline}") from None


def is_url(url_or_path):
    """Whether ``fetch`` downloads ``url_or_path`` into the cache (http(s), gs, ...), rather than using it in place."""
    return _is_remote(urllib.parse.urlsplit(url_or_path).scheme)


def _is_remote(scheme):
    """http(s), or a filesystem scheme for tf.io.gfile (gs, s3, hdfs, ram); not file:// or a drive letter."""
    return len(scheme) > 1 and scheme.lower() != "file"


def _deadline_seconds(deadline_s):
    """``deadline_s``, else ``$BIT_KERAS_DOWNLOAD_DEADLINE``, else ``DEADLINE_S``; a positive number of seconds."""
    name, value = ("deadline_s", deadline_s) if deadline_s is not None else (DEADLINE_ENV, os.environ.get(DEADLINE_ENV))
    if value is None or value == "":
        return DEADLINE_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"{name}={value!r}: expected a positive number of seconds")
    return seconds


class _Deadline:
    """When a download into ``out`` must be complete."""

    def __init__(self, url, seconds, out):
        self.url, self.seconds, self.out = url, seconds, out
        self.end = time.monotonic() + seconds

    def timeout(self):
        """The time the next read may wait: TIMEOUT_S, never past the deadline; DownloadError once it has passed."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise DownloadError(
                f"{self.url}: not complete within the {self.seconds:g} s deadline ({self.out.tell()} bytes received); "
                f"raise it with deadline_s= or ${DEADLINE_ENV}"
            )
        return min(TIMEOUT_S, left)


def _digest(path):
    """The hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(path, name, expected):
    """DownloadError naming ``name`` unless ``path``'s SHA-256 is ``expected`` (or that is None)."""
    if expected is not None and (actual := _digest(path)) != expected:
        raise DownloadError(f"{name}: SHA-256 mismatch: expected {expected}, got {actual}")


def _copy_chunks(read, out, total, progress, desc, deadline):
    """Copy ``read(CHUNK_SIZE, timeout)`` chunks to ``out`` until EOF or the deadline; return the byte count."""
    size = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
        while chunk := read(CHUNK_SIZE, deadline.timeout()):
            out.write(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return size


def _copy_http(url, out, progress, desc, deadline):
    """Stream an http(s) URL into ``out``; return (bytes read, Content-Length or None)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=deadline.timeout()) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None

            def read(n, timeout):
                if response.fp is not None:  # None once the body is complete
                    response.fp.raw._sock.settimeout(timeout)  # urllib keeps no public handle on the socket
                return response.read1(n)  # returns what has arrived, so the deadline is checked between reads

            return _copy_chunks(read, out, total, progress, desc, deadline), total
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        deadline.timeout()  # a read the deadline cut short is reported as such
        if isinstance(e, urllib.error.URLError):
            raise DownloadError(f"{url}: connection error: {e.reason}") from e
        raise DownloadError(f"{url}: {type(e).__name__}: {e}") from e


def _copy_gfile(url, out, progress, desc, deadline):
    """Copy a gs:// (or other tf.io.gfile) object into ``out``; return (bytes read, object size)."""
    import tensorflow as tf

    try:
        total = tf.io.gfile.stat(url).length
        with tf.io.gfile.GFile(url, "rb") as f:
            return _copy_chunks(lambda n, _: f.read(n), out, total, progress, desc, deadline), total
    except tf.errors.OpError as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {e.message}") from e

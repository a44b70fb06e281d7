"""Download BiT checkpoints and label files into a local cache.

URLs (``http(s)://``, and ``gs://`` or any other scheme ``tf.io.gfile`` reads) are fetched once into
``<cache_dir>/<host>/<url path>``; local paths and ``file://`` URLs are used in
place. Downloads go to a temporary file that is renamed into place only once
complete, so an interrupted or truncated download is never picked up later.
"""

import contextlib
import http.client
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

CACHE_ENV = "BIT_KERAS_CACHE"
CHUNK_SIZE = 1 << 20
TIMEOUT_S = 60
USER_AGENT = "bit_keras"
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


def fetch(url_or_path, cache_dir=None, progress=True, force=False):
    """Return a local path for ``url_or_path``, downloading it if needed.

    Local paths are returned unchanged and ``file://`` URLs as their local
    path, after checking they exist (FileNotFoundError otherwise). Remote URLs
    are returned from the cache without network access when already there
    (unless ``force``); otherwise they are streamed to ``<name>.part-<random>``
    beside the cache path, checked against the announced size and renamed into
    place. On any failure the partial file is removed and DownloadError (or the
    original exception, e.g. KeyboardInterrupt) is raised; with ``force``, a
    previously cached copy is left untouched.
    """
    parsed = urllib.parse.urlsplit(url_or_path)
    scheme = parsed.scheme.lower()
    if not _is_remote(scheme):
        path = url_or_path
        if scheme == "file":
            path = urllib.request.url2pathname(parsed.path)
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", path)
        return path

    dest = cached_path(url_or_path, cache_dir)
    if os.path.exists(dest) and not force:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.part-{secrets.token_hex(6)}"
    copy = _copy_http if scheme in _HTTP_SCHEMES else _copy_gfile
    try:
        with open(tmp, "wb") as out:
            size, total = copy(url_or_path, out, progress, os.path.basename(dest))
        if total is not None and size != total:
            raise DownloadError(f"{url_or_path}: truncated: got {size} of {total} bytes")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return dest


def _is_remote(scheme):
    """http(s), or a filesystem scheme for tf.io.gfile (gs, s3, hdfs, ram); not file:// or a drive letter."""
    return len(scheme) > 1 and scheme.lower() != "file"


def _copy_chunks(read, out, total, progress, desc):
    """Copy ``read(CHUNK_SIZE)`` chunks to ``out`` until EOF; return the byte count."""
    size = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
        while chunk := read(CHUNK_SIZE):
            out.write(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return size


def _copy_http(url, out, progress, desc):
    """Stream an http(s) URL into ``out``; return (bytes read, Content-Length or None)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            return _copy_chunks(response.read, out, total, progress, desc), total
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: connection error: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {e}") from e


def _copy_gfile(url, out, progress, desc):
    """Copy a gs:// (or other tf.io.gfile) object into ``out``; return (bytes read, object size)."""
    import tensorflow as tf

    try:
        total = tf.io.gfile.stat(url).length
        with tf.io.gfile.GFile(url, "rb") as f:
            return _copy_chunks(f.read, out, total, progress, desc), total
    except tf.errors.OpError as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {e.message}") from e

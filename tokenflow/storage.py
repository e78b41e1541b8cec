"""fsspec helpers: every path in the pipeline is a URL (local path, file://, memory://, s3://, ...)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


_IN_PROCESS = {None, "file", "local", "memory"}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving ``url`` and the path within it. Object stores get no listings
    cache: other processes (Ray workers, other nodes) write the objects this one checks for.
    Endpoints and credentials come from the environment (``AWS_ENDPOINT_URL``, ...) or fsspec's
    own configuration, never from code."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol in _IN_PROCESS:
        return fsspec.core.url_to_fs(url)
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def pyarrow_filesystem(url: str) -> tuple[Any, str]:
    """``url`` as a pyarrow filesystem and path, served by the same fsspec filesystem (so Ray
    Train and Ray Data see the endpoint and credentials every other reader here sees)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem as ArrowLocal, PyFileSystem

    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return ArrowLocal(), path
    return PyFileSystem(FSSpecHandler(fs)), path


def is_local(url: str) -> bool:
    """True when ``url`` is on this machine's filesystem (a path or file://)."""
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join URL segments with '/'."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


CACHE_ROOT = "/tmp/tokenflow-cache"


def local_path(url: str, cache_root: str | Path = CACHE_ROOT) -> Path:
    """A local path for a file or (small) directory URL: itself when local, else a copy
    downloaded once per node under ``cache_root``, keyed by the URL and the objects' versions (an
    object rewritten in place is fetched again) and renamed into place whole (an interrupted
    download never looks complete)."""
    fs, path = filesystem(url)
    if is_local(url):
        return Path(path)
    key = hashlib.sha256(json.dumps([url, _versions(fs, path)], default=str).encode()).hexdigest()[:16]
    target = Path(cache_root) / key / basename(url)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        else:
            fs.get(path, str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this node finished first
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            if not target.exists():
                raise
    return target


def object_version(info: dict[str, Any]) -> str:
    """An object's version marker from its fsspec metadata: its ETag, else its modification time
    (names differ between filesystems)."""
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")


def _versions(fs: fsspec.AbstractFileSystem, path: str) -> list[list[Any]]:
    """Name, size and version marker of every object at ``path``."""
    infos = fs.find(path, detail=True).values() if fs.isdir(path) else [fs.info(path)]
    return sorted([i["name"], i.get("size"), object_version(i)] for i in infos)


def file_sizes(url: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``url`` (one listing), leaving out the
    top-level entries named in ``exclude`` and temp files of interrupted writes."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    if not fs.exists(root):
        return {}
    sizes = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) + 1:]
        if rel.split("/", 1)[0] not in exclude and ".tmp-" not in basename(rel):
            sizes[rel] = int(info["size"])
    return sizes


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text_bounded(url: str, max_bytes: int, what: str) -> str:
    """The UTF-8 text (a leading BOM dropped) of the file at ``url``, checked before it is read:
    ``FileNotFoundError`` when it is not a file, ``ValueError`` when it has more than
    ``max_bytes`` bytes or is not UTF-8. ``what`` names the file in the messages."""
    fs, path = filesystem(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{what} not found: {url}")
    if (size := fs.size(path)) > max_bytes:
        raise ValueError(f"{url}: {size} bytes exceed the {max_bytes} a {what} may have")
    try:
        return read_bytes(url).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{url}: not UTF-8 text ({exc})") from None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so readers see either nothing or the whole file.

    Local filesystems: write a uniquely named temp file beside the target, then rename. Object
    stores (and memory://) publish an object only when its upload completes, so they are written
    in place.
    """
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def remove_stale_temps(url: str) -> int:
    """Delete temp files a killed writer left under ``url``; returns how many."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.find(path) if ".tmp-" in basename(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)


def remove_tree(url: str) -> None:
    """Delete ``url`` and everything under it (nothing when it does not exist)."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_length: int = 96) -> str:
    """One file or object name made from untrusted text (a sample key): letters, digits, ``.``,
    ``_`` and ``-`` only, no leading dot, at most ``max_length`` characters. Text that had to
    change gets a digest of the original appended, so two keys never share a name."""
    clean = _UNSAFE_NAME_CHARS.sub("_", text).lstrip(".")
    if clean == text and 0 < len(clean) <= max_length:
        return clean
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{clean[: max_length - len(digest) - 1]}-{digest}"


def write_json_atomic(url: str, value: Any) -> None:
    """Atomically write ``value`` as indented JSON with sorted keys (stable bytes)."""
    write_bytes_atomic(url, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


# Conditional writes: the primitives a lease needs. Local filesystems create with a hard link
# and compare-and-swap under an exclusive lock on a sibling ``<name>.lock`` file, replacing the
# object by an atomic rename (a crash never leaves it half-written); S3 (and S3-compatible
# stores) use If-None-Match / If-Match on PUT. The version of an object is its ETag there and the
# sha256 of its bytes here.

_READ_ATTEMPTS = 20


def _is_precondition_failure(exc: OSError) -> bool:
    """A conditional write that lost: the object exists / changed (412), or another conditional
    write to it was in flight (409 ConditionalRequestConflict)."""
    text = str(exc).lower().replace("-", "")
    return isinstance(exc, FileExistsError) or "precondition" in text or "conditionalrequestconflict" in text


def _conditional_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """(filesystem, path, is local) for a URL that supports conditional writes, else an error."""
    fs, path = filesystem(url)
    local = isinstance(fs, LocalFileSystem)
    if not local and "s3" not in fs.protocol:
        raise NotImplementedError(f"{url}: conditional writes need a local filesystem or an S3-compatible "
                                  "object store (If-None-Match / If-Match)")
    return fs, path, local


def _local_temp(path: str, data: bytes) -> str:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def create_exclusive(url: str, data: bytes) -> bool:
    """Create the object ``url`` holding ``data`` unless it exists; True when this call created it."""
    fs, path, local = _conditional_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if local:  # a complete temp file hard-linked into place: readers never see a partial one
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links (some FUSE and SMB mounts)
            raise NotImplementedError(f"{url}: no hard links here ({exc}), so no create-exclusive") from exc
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except OSError as exc:
        if _is_precondition_failure(exc):
            return False
        raise
    return True


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """The object's bytes and version token (for :func:`replace_if`), or None when it is absent."""
    fs, path, local = _conditional_fs(url)
    try:
        if local:
            with open(path, "rb") as f:  # replaced by rename only: always a whole version
                data = f.read()
            return data, hashlib.sha256(data).hexdigest()
        for _ in range(_READ_ATTEMPTS):
            try:
                with fs.open(path, "rb") as f:  # s3fs reads the ranges If-Match the ETag it opened
                    return f.read(), f.details["ETag"]
            except OSError as exc:  # replaced between the HEAD and the GET: read the new one
                if exc.errno != errno.EBUSY:
                    raise
                fs.invalidate_cache(path)
        raise OSError(errno.EBUSY, f"{url} kept changing while being read ({_READ_ATTEMPTS} attempts)")
    except FileNotFoundError:
        return None


def replace_if(url: str, data: bytes, version: str) -> bool:
    """Overwrite the object with ``data`` if it is still at ``version``; True when it was."""
    import fcntl

    fs, path, local = _conditional_fs(url)
    if local:
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() != version:
                        return False
            except FileNotFoundError:
                return False
            os.replace(_local_temp(path, data), path)
            return True
    try:
        fs.pipe_file(path, data, IfMatch=version)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if _is_precondition_failure(exc):
            return False
        raise
    return True

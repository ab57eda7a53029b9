"""A small S3-compatible object server on loopback that keeps objects as files: durable storage for tansu.

tansu's ``s3://`` engine (the ``object_store`` crate's AWS client, path-style requests) uses:
PUT (plain; ``If-None-Match: *`` to create; ``If-Match: <etag>`` to update — its optimistic
concurrency, so a failed condition must answer 412), GET/HEAD (``If-None-Match`` revalidates a
cached object: 304), ListObjectsV2 (prefix, delimiter, continuation), DELETE and multi-object
delete. That is what this serves; anything else answers 501 rather than being half done.

An object is a file ``<root>/<bucket>/<key segments>~``, written to a temporary file, fsynced
and renamed over the old one, so a ``kill -9`` at any moment leaves the old object or the new
one, never a torn one; leftovers of interrupted writes are removed at start. ETags are MD5
content hashes (as S3's for single-part uploads). Authentication headers are ignored: the server
listens on loopback only. Run it as ``python -m processors.embedded.s3store --root DIR --port N``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import email.utils
import fcntl
import hashlib
import http.client
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

from processors.embedded.broker import free_port
from processors.embedded.httpd import Server, reply
from processors.embedded.procs import ManagedProcess, spawn
from processors.errors import BrokerError

log = logging.getLogger("closeloop.s3store")

BUCKET = "tansu"
READY_TIMEOUT_S = 15.0
MAX_KEYS = 1000
CHUNK = 1 << 20
OBJECT_SUFFIX = "~"  # object files end with it; directories and segments never contain it (encoded)
TMP_SUFFIX = ".tmp"  # <segment>~<random>.tmp: an unfinished write
LOCK_STRIPES = 64
S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Error(Exception):
    """An S3 error response: HTTP status, S3 error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _precondition_failed() -> S3Error:
    return S3Error(
        412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold"
    )


def encode_segment(segment: str) -> str:
    """A key segment as a file name: percent-encoded, with no ``~`` and never ``""``, ``.`` or ``..``."""
    if segment == "":
        return "%"  # quote() never yields a lone %
    name = quote(segment, safe="").replace("~", "%7E")
    return {".": "%2E", "..": "%2E%2E"}.get(name, name)


def decode_segment(name: str) -> str:
    return "" if name == "%" else unquote(name)


def etag_matches(header: str, etag: str | None) -> bool:
    """Whether an ``If-Match``/``If-None-Match`` value names ``etag`` (``*``: any existing object)."""
    if etag is None:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/").strip('"') == etag.strip('"'):
            return True
    return False


@dataclass(slots=True)
class ObjectInfo:
    size: int
    mtime_ns: int
    etag: (
        str | None
    )  # None until first needed after a restart (hashing every file at start is slow)


@dataclass
class ListPage:
    keys: list[tuple[str, ObjectInfo]]
    prefixes: list[str]
    next_token: str | None


class BucketStore:
    """Buckets of objects as files under ``root``, with an in-memory sorted index of keys.

    Writes to one key are serialized (a striped lock): the condition of a conditional PUT is
    checked and the new file renamed into place under that lock, so of two racing writers
    holding the same ETag exactly one succeeds. ``fsync`` makes an acknowledged write survive a
    power loss too (a ``kill -9`` needs no fsync: the kernel keeps what was written).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        root.mkdir(parents=True, exist_ok=True)
        # One server per folder: a second would keep its own index and remove the other's writes
        # in progress. The kernel drops the lock when the process dies, kill -9 included.
        self._lock_file = open(root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise BrokerError(f"another S3 server already serves {root}") from None
        self._index_lock = threading.Lock()
        self._key_locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._keys: dict[str, list[str]] = {}
        self._info: dict[tuple[str, str], ObjectInfo] = {}
        self._dirs: set[Path] = set()
        for entry in os.scandir(root):
            if entry.is_dir() and BUCKET_NAME.match(entry.name):
                self._load_bucket(entry.name)

    def close(self) -> None:
        self._lock_file.close()

    # -- index -----------------------------------------------------------------------------
    def _load_bucket(self, bucket: str) -> None:
        keys: list[str] = []

        def walk(folder: str, prefix: str) -> None:
            for entry in os.scandir(folder):
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, prefix + decode_segment(entry.name) + "/")
                elif entry.name.endswith(OBJECT_SUFFIX):
                    key = prefix + decode_segment(entry.name[: -len(OBJECT_SUFFIX)])
                    st = entry.stat()
                    keys.append(key)
                    self._info[(bucket, key)] = ObjectInfo(st.st_size, st.st_mtime_ns, None)
                elif OBJECT_SUFFIX in entry.name:  # a write that never finished
                    os.unlink(entry.path)

        walk(str(self.root / bucket), "")
        keys.sort()
        self._keys[bucket] = keys

    def _path(self, bucket: str, key: str) -> Path:
        *dirs, name = key.split("/")
        parts = [encode_segment(s) for s in dirs] + [encode_segment(name) + OBJECT_SUFFIX]
        if any(len(p.encode()) > 250 for p in parts):
            raise S3Error(
                400, "KeyTooLongError", "a segment of the key is too long for a file name"
            )
        return self.root.joinpath(bucket, *parts)

    def _lock(self, bucket: str, key: str) -> threading.Lock:
        return self._key_locks[hash((bucket, key)) % LOCK_STRIPES]

    def _require_bucket(self, bucket: str) -> list[str]:
        keys = self._keys.get(bucket)
        if keys is None:
            raise S3Error(404, "NoSuchBucket", f"The specified bucket {bucket!r} does not exist")
        return keys

    # -- buckets ---------------------------------------------------------------------------
    def create_bucket(self, bucket: str) -> bool:
        """Create ``bucket``; False if it was there already."""
        if not BUCKET_NAME.match(bucket):
            raise S3Error(400, "InvalidBucketName", f"The specified bucket {bucket!r} is not valid")
        with self._index_lock:
            if bucket in self._keys:
                return False
            self._ensure_dir(self.root / bucket)
            self._keys[bucket] = []
            return True

    # -- objects ---------------------------------------------------------------------------
    def put(
        self,
        bucket: str,
        key: str,
        body: BinaryIO,
        length: int,
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> str:
        """Store ``length`` bytes read from ``body`` as ``key``; its ETag. 412 when a condition fails."""
        keys = self._require_bucket(bucket)
        if not key:
            raise S3Error(400, "InvalidArgument", "an object key must not be empty")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise S3Error(501, "NotImplemented", "If-None-Match on PUT supports only *")
        path = self._path(bucket, key)
        self._ensure_dir(path.parent)
        tmp = path.with_name(f"{path.name}{uuid.uuid4().hex}{TMP_SUFFIX}")
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            with open(tmp, "wb") as f:
                left = length
                while left:
                    chunk = body.read(min(left, CHUNK))
                    if not chunk:
                        raise S3Error(
                            400, "IncompleteBody", "the body ended before its Content-Length"
                        )
                    md5.update(chunk)
                    f.write(chunk)
                    left -= len(chunk)
                f.flush()
                if self.fsync:
                    os.fdatasync(f.fileno())
            etag = f'"{md5.hexdigest()}"'
            with self._lock(bucket, key):
                current = self._info.get((bucket, key))
                current_etag = self._etag_of(bucket, key, current) if current is not None else None
                if if_none_match is not None and current is not None:
                    raise _precondition_failed()
                if if_match is not None and not etag_matches(if_match, current_etag):
                    raise _precondition_failed()
                os.replace(tmp, path)
                info = ObjectInfo(length, path.stat().st_mtime_ns, etag)
                with self._index_lock:
                    if current is None:
                        bisect.insort(keys, key)
                    self._info[(bucket, key)] = info
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir(path.parent)
        return etag

    def open_object(self, bucket: str, key: str) -> tuple[ObjectInfo, IO[bytes]]:
        """The object's info and an open file of exactly that version (the caller closes it)."""
        self._require_bucket(bucket)
        with self._lock(bucket, key):
            info = self._info.get((bucket, key))
            if info is None:
                raise S3Error(404, "NoSuchKey", "The specified key does not exist.")
            f = open(self._path(bucket, key), "rb")
            if info.etag is None:
                info.etag = self._hash(f)
        return info, f

    def delete(self, bucket: str, key: str) -> None:
        """Remove ``key`` (removing a missing key is not an error, as in S3)."""
        keys = self._require_bucket(bucket)
        path = self._path(bucket, key)
        with self._lock(bucket, key):
            if self._info.get((bucket, key)) is None:
                return
            path.unlink()
            with self._index_lock:
                del self._info[(bucket, key)]
                del keys[bisect.bisect_left(keys, key)]
        self._sync_dir(path.parent)

    def list_page(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        max_keys: int = MAX_KEYS,
        token: str | None = None,
        start_after: str = "",
    ) -> ListPage:
        """One page of ListObjectsV2: keys under ``prefix``, grouped at ``delimiter`` into prefixes."""
        keys = self._require_bucket(bucket)
        out: list[tuple[str, ObjectInfo]] = []
        prefixes: list[str] = []
        with self._index_lock:
            i = bisect.bisect_left(keys, prefix)
            if token is not None:
                kind, last = _decode_token(token)
                i = max(
                    i,
                    bisect.bisect_right(keys, last)
                    if kind == "k"
                    else bisect.bisect_left(keys, _after(last)),
                )
            if start_after:
                i = max(i, bisect.bisect_right(keys, start_after))
            last_kind, last_name = "", ""
            while i < len(keys) and keys[i].startswith(prefix):
                if len(out) + len(prefixes) >= max_keys:
                    return ListPage(
                        self._with_etags(bucket, out), prefixes, _encode_token(last_kind, last_name)
                    )
                key = keys[i]
                cut = key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:
                    group = key[: cut + len(delimiter)]
                    prefixes.append(group)
                    last_kind, last_name = "p", group
                    i = bisect.bisect_left(keys, _after(group), i)
                else:
                    out.append((key, self._info[(bucket, key)]))
                    last_kind, last_name = "k", key
                    i += 1
        return ListPage(self._with_etags(bucket, out), prefixes, None)

    def check_bucket(self, bucket: str) -> None:
        """Raise NoSuchBucket unless ``bucket`` exists."""
        self._require_bucket(bucket)

    # -- helpers ---------------------------------------------------------------------------
    def _with_etags(
        self, bucket: str, entries: list[tuple[str, ObjectInfo]]
    ) -> list[tuple[str, ObjectInfo]]:
        """``entries`` with their ETags known (hashing files not hashed since the start)."""
        out = []
        for key, info in entries:
            if info.etag is None:
                with self._lock(bucket, key):
                    current = self._info.get(
                        (bucket, key)
                    )  # replaced or removed since it was listed?
                    if current is None:
                        continue
                    info = current
                    self._etag_of(bucket, key, info)
            out.append((key, info))
        return out

    def _etag_of(self, bucket: str, key: str, info: ObjectInfo) -> str:
        if info.etag is None:
            with open(self._path(bucket, key), "rb") as f:
                info.etag = self._hash(f)
        return info.etag

    @staticmethod
    def _hash(f: IO[bytes]) -> str:
        md5 = hashlib.md5(usedforsecurity=False)
        while chunk := f.read(CHUNK):
            md5.update(chunk)
        f.seek(0)
        return f'"{md5.hexdigest()}"'

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._dirs:
            return
        if not folder.is_dir():
            self._ensure_dir(folder.parent)
            with contextlib.suppress(FileExistsError):  # a concurrent writer made it
                folder.mkdir()
            self._sync_dir(folder.parent)
        self._dirs.add(folder)

    def _sync_dir(self, folder: Path) -> None:
        """Make a rename or unlink in ``folder`` durable."""
        if not self.fsync:
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _after(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _encode_token(kind: str, name: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}{name}".encode()).decode()


def _decode_token(token: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raw = ""
    if raw[:1] not in ("k", "p") or len(raw) < 2:
        raise S3Error(400, "InvalidArgument", "The continuation token provided is incorrect")
    return raw[0], raw[1:]


def _iso(mtime_ns: int) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime_ns // 10**9))
        + f".{mtime_ns // 10**6 % 1000:03d}Z"
    )


def list_xml(
    bucket: str,
    page: ListPage,
    *,
    prefix: str,
    delimiter: str,
    max_keys: int,
    token: str | None,
    start_after: str,
) -> bytes:
    """The ListObjectsV2 response document."""
    parts = [
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{S3_NS}">',
        f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
        f"<KeyCount>{len(page.keys) + len(page.prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
        f"<IsTruncated>{'true' if page.next_token else 'false'}</IsTruncated>",
    ]
    if delimiter:
        parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
    if token is not None:
        parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
    if page.next_token:
        parts.append(f"<NextContinuationToken>{page.next_token}</NextContinuationToken>")
    if start_after:
        parts.append(f"<StartAfter>{escape(start_after)}</StartAfter>")
    for key, info in page.keys:
        parts.append(
            f"<Contents><Key>{escape(key)}</Key><LastModified>{_iso(info.mtime_ns)}</LastModified>"
            f"<ETag>{escape(info.etag or '')}</ETag><Size>{info.size}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
        )
    for p in page.prefixes:
        parts.append(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def error_xml(e: S3Error, resource: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{e.code}</Code>'
        f"<Message>{escape(e.message)}</Message><Resource>{escape(resource)}</Resource>"
        f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
    ).encode()


class _Body:
    """A request body: reads stop at its Content-Length; ``left`` says how much is unread."""

    def __init__(self, f: BinaryIO, length: int) -> None:
        self.f = f
        self.left = length

    def read(self, n: int) -> bytes:
        chunk = self.f.read(min(n, self.left))
        self.left -= len(chunk)
        return chunk


class S3Server(Server):
    def __init__(self, store: BucketStore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: tansu's client pools connections
    # Headers and body go out in two writes; with Nagle the body waits for the client's delayed
    # ACK of the headers (~40 ms a response).
    disable_nagle_algorithm = True
    server: S3Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would dwarf the broker's own log; errors are logged below

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._body_read = False
        split = urlsplit(self.path)
        path = unquote(split.path)
        bucket, _, key = path[1:].partition("/")
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        store = self.server.store
        try:
            m = self.command
            if not bucket:
                raise S3Error(501, "NotImplemented", "listing buckets is not supported")
            if not key and m == "PUT" and not query:
                self._read_body()
                store.create_bucket(bucket)
                self._send(200, headers={"Location": f"/{bucket}"})
            elif not key and m == "HEAD" and not query:
                store.check_bucket(bucket)
                self._send(200)
            elif not key and m == "GET" and query.get("list-type") == "2":
                self._list(bucket, query)
            elif not key and m == "POST" and "delete" in query:
                self._delete_many(bucket)
            elif not key or query or "x-amz-copy-source" in self.headers:
                raise S3Error(
                    501, "NotImplemented", f"{m} {self.path} is not supported by this server"
                )
            elif m == "PUT":
                self._put(bucket, key)
            elif m in ("GET", "HEAD"):
                self._get(bucket, key)
            elif m == "DELETE":
                store.delete(bucket, key)
                self._send(204)
            else:
                raise S3Error(501, "NotImplemented", f"{m} on an object is not supported")
        except S3Error as e:
            self._error(e, path)
        except ConnectionError:
            self.close_connection = True  # the client went away
        except OSError as e:
            log.exception("%s %s failed", self.command, self.path)
            self._error(S3Error(500, "InternalError", f"{type(e).__name__}: {e}"), path)

    def _length(self) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            raise S3Error(
                411, "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
        if not value.isdigit():
            raise S3Error(400, "InvalidArgument", f"bad Content-Length {value!r}")
        return int(value)

    def _read_body(self) -> bytes:
        data = self.rfile.read(self._length())
        self._body_read = True
        return data

    def _put(self, bucket: str, key: str) -> None:
        body = _Body(self.rfile, self._length())
        try:
            etag = self.server.store.put(
                bucket,
                key,
                body,
                body.left,
                if_match=self.headers.get("If-Match"),
                if_none_match=self.headers.get("If-None-Match"),
            )
        finally:
            self._body_read = body.left == 0  # else the connection closes after the error
        self._send(200, headers={"ETag": etag})

    def _get(self, bucket: str, key: str) -> None:
        info, f = self.server.store.open_object(bucket, key)
        with f:
            if_match, if_none_match = (
                self.headers.get("If-Match"),
                self.headers.get("If-None-Match"),
            )
            if if_match is not None and not etag_matches(if_match, info.etag):
                raise _precondition_failed()
            headers = {
                "ETag": str(info.etag),
                "Accept-Ranges": "bytes",
                "Last-Modified": email.utils.formatdate(info.mtime_ns / 1e9, usegmt=True),
            }
            if if_none_match is not None and etag_matches(if_none_match, info.etag):
                self._send(304, headers=headers)
                return
            headers["Content-Type"] = "application/octet-stream"
            self._send(200, headers=headers, length=info.size)
            if self.command == "GET":
                self.connection.sendfile(f)

    def _list(self, bucket: str, query: dict[str, str]) -> None:
        try:
            max_keys = min(int(query.get("max-keys", MAX_KEYS)), MAX_KEYS)
        except ValueError:
            raise S3Error(400, "InvalidArgument", "max-keys must be an integer") from None
        if max_keys < 0:
            raise S3Error(400, "InvalidArgument", "max-keys must not be negative")
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        token, start_after = query.get("continuation-token"), query.get("start-after", "")
        page = self.server.store.list_page(
            bucket,
            prefix=prefix,
            delimiter=delimiter,
            max_keys=max_keys,
            token=token,
            start_after=start_after,
        )
        self._send(
            200,
            list_xml(
                bucket,
                page,
                prefix=prefix,
                delimiter=delimiter,
                max_keys=max_keys,
                token=token,
                start_after=start_after,
            ),
            {"Content-Type": "application/xml"},
        )

    def _delete_many(self, bucket: str) -> None:
        try:
            doc = ET.fromstring(self._read_body())
        except ET.ParseError:
            raise S3Error(400, "MalformedXML", "The XML you provided was not well-formed") from None
        local = {el: el.tag.rsplit("}", 1)[-1] for el in doc.iter()}
        quiet = any(
            name == "Quiet" and (el.text or "").strip() == "true" for el, name in local.items()
        )
        keys = [(el.text or "") for el, name in local.items() if name == "Key"]
        out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns="{S3_NS}">']
        for key in keys:
            try:
                self.server.store.delete(bucket, key)
                if not quiet:
                    out.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
            except S3Error as e:
                if e.code == "NoSuchBucket":
                    raise
                out.append(
                    f"<Error><Key>{escape(key)}</Key><Code>{e.code}</Code>"
                    f"<Message>{escape(e.message)}</Message></Error>"
                )
        out.append("</DeleteResult>")
        self._send(200, "".join(out).encode(), {"Content-Type": "application/xml"})

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        request_id = {"x-amz-request-id": uuid.uuid4().hex[:16]}
        reply(self, status, body, {**(headers or {}), **request_id}, length=length)

    def _error(self, e: S3Error, resource: str) -> None:
        if e.status >= 500:
            log.warning("%s %s: %s", self.command, self.path, e)
        if self.command in ("PUT", "POST") and not self._body_read:
            self.close_connection = True  # the unread body would be taken for the next request
        self._send(
            e.status,
            b"" if self.command == "HEAD" else error_xml(e, resource),
            {
                "Content-Type": "application/xml",
                **({"Connection": "close"} if self.close_connection else {}),
            },
        )


def serve(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    buckets: tuple[str, ...] = (BUCKET,),
    fsync: bool = True,
) -> S3Server:
    """A server on ``host:port`` over ``root`` with ``buckets`` created; call ``serve_forever()``."""
    store = BucketStore(root, fsync=fsync)
    for b in buckets:
        store.create_bucket(b)
    try:
        return S3Server(store, host, port)
    except OSError:
        store.close()
        raise


@dataclass
class LocalS3(ManagedProcess):
    """The S3 server as a child process on a loopback port, its data in ``root``."""

    root: Path
    port: int = 0
    host: str = "127.0.0.1"
    bucket: str = BUCKET
    log_dir: Path | None = None
    fsync: bool = True

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        """tansu's ``--storage-engine`` for this server's bucket."""
        return f"s3://{self.bucket}/"

    def client_env(self) -> dict[str, str]:
        """The settings tansu's object_store client reads from the environment to use this server."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
            # unsigned requests: nothing to sign for on loopback, and no payload hashing in tansu
            "AWS_SKIP_SIGNATURE": "true",
            "AWS_ACCESS_KEY_ID": "closeloop",
            "AWS_SECRET_ACCESS_KEY": "closeloop",
            "NO_PROXY": self.host,
            "no_proxy": self.host,
        }  # a proxy set for the web must not get these

    def start(self) -> LocalS3:
        """Start (or, after a crash, restart on the same port) and wait until the bucket answers."""
        if self.port == 0:
            self.port = free_port(self.host)
        out = self._output(self.log_dir / "broker-s3.log" if self.log_dir is not None else None)
        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "processors.embedded.s3store",
                "--root",
                str(self.root),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--bucket",
                self.bucket,
            ]
            + ([] if self.fsync else ["--no-fsync"]),
            stdout=out,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parent.parent)]
                    + [p for p in [os.environ.get("PYTHONPATH")] if p]
                ),
            },
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
            try:
                conn.request("HEAD", f"/{self.bucket}")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        code = self.proc.poll()
        self.stop()
        where = f"; see {self.log_dir / 'broker-s3.log'}" if self.log_dir else ""
        raise BrokerError(
            f"the broker's S3 server on {self.endpoint} did not come up"
            + (f" (exit code {code})" if code is not None else "")
            + where
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path, help="folder holding the buckets")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    ap.add_argument(
        "--no-fsync", action="store_true", help="skip fsync (survives kill -9, not power loss)"
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = serve(a.root, host=a.host, port=a.port, buckets=tuple(a.bucket), fsync=not a.no_fsync)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("serving %s on http://%s:%d", a.root, *server.server_address[:2])
    server.serve_forever()
    server.server_close()
    server.store.close()


if __name__ == "__main__":
    main()

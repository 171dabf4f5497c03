"""A small disk-backed S3-compatible server: the storage of the embedded broker with
CHATPIPE_DEV_BROKER_STORAGE=disk (Tansu 0.6.0's `--storage-engine s3://BUCKET/` pointed at it).

    python -m chatpipe.objectstore --port P --dir DIR [--bucket NAME ...] [--no-fsync] [--log-requests]

It serves what Tansu 0.6.0's s3 engine uses, with S3's semantics, on loopback only:

- PutObject (`PUT /bucket/key`), unconditional, or conditional: `If-None-Match: *` (412 PreconditionFailed
  when the key exists), `If-Match: "etag"` (412 when the current ETag differs, 404 NoSuchKey when there is
  none). Conditional writes of one key are serialised, so exactly one of two racing creates wins;
- GetObject (`GET /bucket/key`), plain or with `If-None-Match: "etag"` (304 when it matches) or
  `If-Match` (412 when it does not); 404 NoSuchKey for a missing key;
- ListObjectsV2 (`GET /bucket?list-type=2`): prefix, delimiter (CommonPrefixes), max-keys (at most 1000),
  continuation-token (opaque) and start-after paging, encoding-type=url;
- DeleteObjects (`POST /bucket?delete`) and DeleteObject; CreateBucket (`PUT /bucket`, `--bucket` at start).

Anything else (multipart, HEAD, Range, ListObjects v1, aws-chunked bodies) is answered 501 NotImplemented,
so a Tansu that starts to use more shows at once. Signatures are not checked (loopback, dev only).

On disk: an object is the file DIR/bucket/key (each segment of the key percent-encoded, a leading dot
too, so every name starting with a dot is the server's own). A write goes to a temporary file in the
target folder, which gets the object's LastModified as its mtime, then fsync, rename over the key, fsync of
the folder (new folders: of their parent too): an acknowledged write survives kill -9 of the server and,
with fsync (the default; `--no-fsync` leaves flushing to the kernel), a crash of the machine. A
half-written object is never visible: the rename is the commit, and leftover temporary files are
removed at start.

LastModified has millisecond resolution and is strictly increasing over all writes (Tansu's ListOffsets
"latest" takes the record batch with the greatest LastModified), across restarts too: the clock starts
after the greatest mtime on disk and after DIR/.clock, which holds the last value at deletes and at stop.
ETags are the MD5 of the content, as S3's for single-part uploads (computed on a key's first use after a
start). A sorted index of the keys is kept in memory and built from the folder at start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import os
import re
import signal
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

from aiohttp import web

log = logging.getLogger(__name__)

READY_FILE_ENV = "CHATPIPE_READY_FILE"
#: the bucket `chatpipe dev` gives Tansu (`--storage-engine s3://chatpipe/`)
DEFAULT_BUCKET = "chatpipe"
MAX_KEYS = 1000
MAX_KEY_BYTES = 1024
MAX_OBJECT_BYTES = 256 * 1024 * 1024
#: the largest DeleteObjects request S3 takes
MAX_DELETE = 1000
TMP_PREFIX = ".tmp-"
CLOCK_FILE = ".clock"
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MESSAGES = {
    "NoSuchKey": "The specified key does not exist.",
    "NoSuchBucket": "The specified bucket does not exist.",
    "PreconditionFailed": "At least one of the pre-conditions you specified did not hold.",
    "NotImplemented": "A header or query you provided implies functionality that is not implemented.",
    "InvalidArgument": "Invalid argument.",
    "InvalidBucketName": "The specified bucket is not valid.",
    "KeyTooLongError": "Your key is too long.",
    "MalformedXML": "The XML you provided was not well-formed or did not validate against our schema.",
    "EntityTooLarge": "Your proposed upload exceeds the maximum allowed object size.",
    "InternalError": "We encountered an internal error. Please try again.",
}


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "", resource: str = "") -> None:
        super().__init__(f"{status} {code}: {message or _MESSAGES.get(code, '')}")
        self.status, self.code, self.message, self.resource = status, code, message, resource

    def response(self, request_id: str) -> web.Response:
        body = (
            f"{_XML_HEAD}<Error><Code>{self.code}</Code>"
            f"<Message>{escape(self.message or _MESSAGES.get(self.code, ''))}</Message>"
            + (f"<Resource>{escape(self.resource)}</Resource>" if self.resource else "")
            + f"<RequestId>{request_id}</RequestId></Error>"
        )
        return web.Response(status=self.status, body=body.encode(), content_type="application/xml")


# ---------------------------------------------------------------------------------------------- keys on disk
def encode_segment(segment: str) -> str:
    """A key segment as a file name: percent-encoded, a leading dot too (names with a dot are ours)."""
    name = quote(segment, safe="-_.~=+,@")
    return "%2E" + name[1:] if name.startswith(".") else name


def decode_segment(name: str) -> str:
    return unquote(name)


def check_key(key: str) -> None:
    """Keys this server can keep as files: no empty, "." or ".." segments, at most 1024 bytes."""
    if len(key.encode()) > MAX_KEY_BYTES:
        raise S3Error(400, "KeyTooLongError", resource=key)
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise S3Error(400, "InvalidArgument", f"key segment {seg!r} is not supported here", key)
        if len(encode_segment(seg).encode()) > 255:
            raise S3Error(400, "KeyTooLongError", "a key segment is too long for a file name", key)


def iso_ms(ms: int) -> str:
    """LastModified as S3 writes it in XML: 2026-11-10T16:31:10.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def parse_etags(header: str) -> list[str]:
    """The ETags of an If-Match / If-None-Match header ("*" stays "*"), without quotes or W/."""
    out = []
    for part in header.split(","):
        part = part.strip()
        if part.startswith("W/"):
            part = part[2:]
        out.append(part.strip('"'))
    return [p for p in out if p]


def _matches(etags: list[str], current: str | None) -> bool:
    return current is not None and ("*" in etags or current in etags)


# ---------------------------------------------------------------------------------------------- the store
@dataclass(slots=True)
class Entry:
    size: int
    ms: int  # LastModified, ms since the epoch (also the file's mtime)
    etag: str | None = None  # MD5 hex; None until first needed after a start


class Bucket:
    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        self.keys: list[str] = []  # sorted
        self.entries: dict[str, Entry] = {}

    def add(self, key: str, entry: Entry) -> None:
        if key not in self.entries:
            bisect.insort(self.keys, key)
        self.entries[key] = entry

    def remove(self, key: str) -> bool:
        if self.entries.pop(key, None) is None:
            return False
        del self.keys[bisect.bisect_left(self.keys, key)]
        return True

    def path(self, key: str) -> Path:
        return self.root.joinpath(*(encode_segment(s) for s in key.split("/")))


class KeyLocks:
    """One asyncio lock per key while it is in use: writes of a key are serialised, reads wait for them."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    def busy(self, name: tuple[str, str]) -> bool:
        return name in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, name: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[name]


class Store:
    """The objects of every bucket under `root`, an index in memory, writes made durable (see module)."""

    def __init__(self, root: Path, fsync: bool = True, io_threads: int = 8) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.buckets: dict[str, Bucket] = {}
        self.last_ms = 0
        self.locks = KeyLocks()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="objectstore-io")
        self._tmp_names = itertools.count()
        self._known_dirs: set[Path] = set()

    # --- start and stop ------------------------------------------------------------------------
    def load(self) -> None:
        """Index every bucket folder of `root`; remove leftover temporary files; start the clock."""
        self.root.mkdir(parents=True, exist_ok=True)
        clock = self.root / CLOCK_FILE
        with contextlib.suppress(OSError, ValueError):
            self.last_ms = int(clock.read_text().strip() or 0)
        for bdir in sorted(self.root.iterdir()):
            if bdir.name.startswith(".") or not bdir.is_dir():
                continue
            bucket = Bucket(bdir.name, bdir)
            keys: list[str] = []
            for dirpath, dirnames, filenames in os.walk(bdir):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(bdir).parts
                prefix = "/".join(decode_segment(p) for p in rel)
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    if name.startswith(TMP_PREFIX):
                        os.unlink(path)  # a write that was never acknowledged
                        continue
                    if name.startswith("."):
                        continue
                    st = os.stat(path)
                    key = f"{prefix}/{decode_segment(name)}" if prefix else decode_segment(name)
                    ms = st.st_mtime_ns // 1_000_000
                    bucket.entries[key] = Entry(st.st_size, ms)
                    self.last_ms = max(self.last_ms, ms)
                    keys.append(key)
            keys.sort()
            bucket.keys = keys
            self.buckets[bucket.name] = bucket

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._save_clock()

    def _save_clock(self) -> None:
        self._atomic_write(self.root / CLOCK_FILE, str(self.last_ms).encode(), None)

    def next_ms(self) -> int:
        """LastModified of a new write: wall-clock ms, but always after the previous one."""
        self.last_ms = max(self.last_ms + 1, time.time_ns() // 1_000_000)
        return self.last_ms

    # --- file system ---------------------------------------------------------------------------
    def _fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: Path) -> None:
        if path in self._known_dirs:
            return
        missing = []
        p = path
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d)  # NotADirectoryError: an object is in the way (see `put`)
            if self.fsync:
                self._fsync_dir(d.parent)
        self._known_dirs.add(path)

    def _atomic_write(self, path: Path, body: bytes, ms: int | None) -> None:
        """Temporary file (mtime = ms), fsync, rename over `path`, fsync of the folder. Runs in a thread."""
        folder = path.parent
        self._ensure_dir(folder)
        tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{next(self._tmp_names)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            if ms is not None:
                os.utime(fd, ns=(ms * 1_000_000, ms * 1_000_000))
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            self._fsync_dir(folder)

    def _unlink(self, bucket: Bucket, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if self.fsync:
            self._fsync_dir(path.parent)
        # empty folders go too, up to the bucket's
        folder = path.parent
        while folder != bucket.root:
            try:
                folder.rmdir()
            except OSError:
                break
            self._known_dirs.discard(folder)
            folder = folder.parent

    # --- operations ----------------------------------------------------------------------------
    def bucket(self, name: str) -> Bucket:
        bucket = self.buckets.get(name)
        if bucket is None:
            raise S3Error(404, "NoSuchBucket", resource=name)
        return bucket

    def create_bucket(self, name: str) -> None:
        if not _BUCKET_RE.match(name):
            raise S3Error(400, "InvalidBucketName", resource=name)
        if name not in self.buckets:
            path = self.root / name
            self._ensure_dir(path)
            self.buckets[name] = Bucket(name, path)

    def _etag(self, bucket: Bucket, key: str, entry: Entry, body: bytes | None = None) -> str:
        if entry.etag is None:
            if body is None:
                body = bucket.path(key).read_bytes()
            entry.etag = hashlib.md5(body).hexdigest()
        return entry.etag

    async def put(
        self, bucket_name: str, key: str, body: bytes, if_match: str | None, if_none_match: str | None
    ) -> Entry:
        bucket = self.bucket(bucket_name)
        check_key(key)
        async with self.locks.hold((bucket_name, key)):
            cur = bucket.entries.get(key)
            current = None if cur is None else self._etag(bucket, key, cur)
            if if_none_match is not None and _matches(parse_etags(if_none_match), current):
                raise S3Error(412, "PreconditionFailed", resource=key)
            if if_match is not None:
                if cur is None:
                    raise S3Error(404, "NoSuchKey", resource=key)
                if not _matches(parse_etags(if_match), current):
                    raise S3Error(412, "PreconditionFailed", resource=key)
            ms = self.next_ms()
            path = bucket.path(key)
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._pool, self._atomic_write, path, body, ms)
            except (NotADirectoryError, IsADirectoryError, FileExistsError):
                why = "the key and another key's prefix cannot both be objects here"
                raise S3Error(400, "InvalidArgument", why, key) from None
            entry = Entry(len(body), ms, hashlib.md5(body).hexdigest())
            bucket.add(key, entry)
            return entry

    async def get(self, bucket_name: str, key: str) -> tuple[Entry, str, bytes]:
        bucket = self.bucket(bucket_name)
        if self.locks.busy((bucket_name, key)):
            async with self.locks.hold((bucket_name, key)):
                pass  # a write of it is under way: answer what it leaves
        entry = bucket.entries.get(key)
        if entry is None:
            raise S3Error(404, "NoSuchKey", resource=key)
        body = bucket.path(key).read_bytes()
        return entry, self._etag(bucket, key, entry, body), body

    async def delete(self, bucket_name: str, keys: Iterable[str]) -> list[str]:
        """Delete `keys` (missing ones count as deleted, as on S3); returns them."""
        bucket = self.bucket(bucket_name)
        done = []
        for key in keys:
            async with self.locks.hold((bucket_name, key)):
                if key in bucket.entries:
                    await asyncio.get_running_loop().run_in_executor(
                        self._pool, self._unlink, bucket, bucket.path(key)
                    )
                    bucket.remove(key)
            done.append(key)
        self._save_clock()  # the greatest LastModified may have been a deleted object's
        return done

    def list_v2(
        self,
        bucket_name: str,
        prefix: str = "",
        delimiter: str = "",
        max_keys: int = MAX_KEYS,
        token: str | None = None,
        start_after: str = "",
    ) -> tuple[list[tuple[str, Entry]], list[str], str | None]:
        """(objects, common prefixes, next continuation token or None) of one page."""
        bucket = self.bucket(bucket_name)
        keys = bucket.keys
        i = bisect.bisect_left(keys, prefix)
        if token is not None:
            after = _decode_token(token)
            j = bisect.bisect_right(keys, after)
            if delimiter and after.endswith(delimiter) and after.startswith(prefix):
                j = _past_prefix(keys, after, j)
            i = max(i, j)
        elif start_after:
            i = max(i, bisect.bisect_right(keys, start_after))
        objects: list[tuple[str, Entry]] = []
        prefixes: list[str] = []
        last = None
        n = len(keys)
        while i < n and len(objects) + len(prefixes) < max_keys:
            key = keys[i]
            if not key.startswith(prefix):
                break
            if delimiter:
                d = key.find(delimiter, len(prefix))
                if d >= 0:
                    common = key[: d + len(delimiter)]
                    prefixes.append(common)
                    last = common
                    i = _past_prefix(keys, common, i)
                    continue
            objects.append((key, bucket.entries[key]))
            last = key
            i += 1
        more = i < n and keys[i].startswith(prefix) and last is not None
        for key, entry in objects:
            self._etag(bucket, key, entry)
        return objects, prefixes, _encode_token(last) if more and last is not None else None


def _past_prefix(keys: list[str], prefix: str, i: int) -> int:
    """The index of the first key from `i` on that does not start with `prefix` (keys are sorted)."""
    i = max(i, bisect.bisect_left(keys, prefix + "\U0010ffff"))
    while i < len(keys) and keys[i].startswith(prefix):
        i += 1
    return i


def _encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise S3Error(400, "InvalidArgument", "The continuation token provided is incorrect") from None


# ---------------------------------------------------------------------------------------------- HTTP
def _list_xml(
    bucket: str,
    prefix: str,
    delimiter: str,
    max_keys: int,
    token: str | None,
    start_after: str,
    url_encode: bool,
    page: tuple[list[tuple[str, Entry]], list[str], str | None],
) -> bytes:
    objects, prefixes, next_token = page

    def enc(s: str) -> str:
        return escape(quote(s, safe="/") if url_encode else s)

    out = [
        f'{_XML_HEAD}<ListBucketResult xmlns="{XMLNS}"><Name>{escape(bucket)}</Name>',
        f"<Prefix>{enc(prefix)}</Prefix>",
    ]
    if delimiter:
        out.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
    out.append(f"<MaxKeys>{max_keys}</MaxKeys><KeyCount>{len(objects) + len(prefixes)}</KeyCount>")
    if url_encode:
        out.append("<EncodingType>url</EncodingType>")
    if token is not None:
        out.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
    if start_after:
        out.append(f"<StartAfter>{enc(start_after)}</StartAfter>")
    out.append(f"<IsTruncated>{'true' if next_token else 'false'}</IsTruncated>")
    if next_token:
        out.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
    for key, e in objects:
        out.append(
            f"<Contents><Key>{enc(key)}</Key><LastModified>{iso_ms(e.ms)}</LastModified>"
            f"<ETag>&quot;{e.etag}&quot;</ETag><Size>{e.size}</Size><StorageClass>STANDARD</StorageClass>"
            "</Contents>"
        )
    for p in prefixes:
        out.append(f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>")
    out.append("</ListBucketResult>")
    return "".join(out).encode()


def _delete_keys(body: bytes) -> tuple[list[str], bool]:
    """The keys and the Quiet flag of a DeleteObjects body."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise S3Error(400, "MalformedXML") from None
    keys: list[str] = []
    quiet = False
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Key":
            keys.append(el.text or "")
        elif tag == "Quiet":
            quiet = (el.text or "").strip().lower() == "true"
    if not keys or len(keys) > MAX_DELETE:
        raise S3Error(400, "MalformedXML", f"between 1 and {MAX_DELETE} keys")
    return keys, quiet


def _headers(entry: Entry, etag: str) -> dict[str, str]:
    return {"ETag": f'"{etag}"', "Last-Modified": formatdate(entry.ms / 1000, usegmt=True)}


def create_app(store: Store, log_requests: bool = False) -> web.Application:
    app = web.Application(client_max_size=MAX_OBJECT_BYTES)

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id = uuid.uuid4().hex[:16].upper()
        try:
            response = await dispatch(request)
        except S3Error as exc:
            response = exc.response(request_id)
        except Exception:
            log.exception("%s %s failed", request.method, request.path_qs)
            response = S3Error(500, "InternalError").response(request_id)
        response.headers["x-amz-request-id"] = request_id
        if log_requests:
            cond = {h: request.headers[h] for h in ("If-Match", "If-None-Match") if h in request.headers}
            log.info("%s %s %s -> %d", request.method, request.raw_path, cond or "", response.status)
        return response

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path.lstrip("/")
        bucket, _, raw_key = path.partition("/")
        bucket, key = unquote(bucket), unquote(raw_key)
        q = request.rel_url.query
        method = request.method
        if not bucket:
            raise S3Error(501, "NotImplemented", "ListBuckets")
        if "uploads" in q or "uploadId" in q or "Range" in request.headers:
            raise S3Error(501, "NotImplemented", "multipart uploads and ranges are not served")
        if not key:
            if method == "PUT":
                store.create_bucket(bucket)
                return web.Response(headers={"Location": f"/{bucket}"})
            if method == "GET" and q.get("list-type") == "2":
                return list_objects(bucket, q)
            if method == "POST" and "delete" in q:
                keys, quiet = _delete_keys(await request.read())
                done = await store.delete(bucket, keys)
                body = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in ([] if quiet else done))
                return web.Response(
                    body=f'{_XML_HEAD}<DeleteResult xmlns="{XMLNS}">{body}</DeleteResult>'.encode(),
                    content_type="application/xml",
                )
            raise S3Error(501, "NotImplemented", f"{method} on a bucket")
        if method == "PUT":
            if request.headers.get("x-amz-content-sha256", "").startswith("STREAMING-"):
                raise S3Error(501, "NotImplemented", "aws-chunked uploads are not served")
            if "x-amz-copy-source" in request.headers:
                raise S3Error(501, "NotImplemented", "CopyObject")
            body = await request.read()
            entry = await store.put(
                bucket, key, body, request.headers.get("If-Match"), request.headers.get("If-None-Match")
            )
            return web.Response(headers={"ETag": f'"{entry.etag}"'})
        if method == "GET":
            entry, etag, body = await store.get(bucket, key)
            headers = _headers(entry, etag)
            if "If-Match" in request.headers and not _matches(parse_etags(request.headers["If-Match"]), etag):
                raise S3Error(412, "PreconditionFailed", resource=key)
            inm = request.headers.get("If-None-Match")
            if inm is not None and _matches(parse_etags(inm), etag):
                return web.Response(status=304, headers=headers)
            return web.Response(body=body, headers=headers, content_type="application/octet-stream")
        if method == "DELETE":
            await store.delete(bucket, [key])
            return web.Response(status=204)
        raise S3Error(501, "NotImplemented", f"{method} of an object")

    def list_objects(bucket: str, q: object) -> web.Response:
        get = q.get  # type: ignore[attr-defined]
        try:
            max_keys = min(MAX_KEYS, int(get("max-keys", MAX_KEYS)))
        except ValueError:
            raise S3Error(400, "InvalidArgument", "max-keys is not a number") from None
        if max_keys < 0:
            raise S3Error(400, "InvalidArgument", "max-keys must not be negative")
        prefix, delimiter = get("prefix", ""), get("delimiter", "")
        token, start_after = get("continuation-token"), get("start-after", "")
        page = store.list_v2(bucket, prefix, delimiter, max_keys, token, start_after)
        url = get("encoding-type") == "url"
        body = _list_xml(bucket, prefix, delimiter, max_keys, token, start_after, url, page)
        return web.Response(body=body, content_type="application/xml")

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(
    store: Store, host: str, port: int, ready_file: str | None, log_requests: bool = False
) -> None:
    runner = web.AppRunner(create_app(store, log_requests), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    objects = sum(len(b.keys) for b in store.buckets.values())
    log.info(
        "listening on http://%s:%d, %d objects in %s (fsync %s)",
        host, port, objects, store.root, "on" if store.fsync else "off",
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready_file:  # whole or not at all: a reader never sees it empty
        path = Path(ready_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, path)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chatpipe.objectstore", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True, type=Path, help="folder of the buckets")
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket at start (repeatable)")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false", help="do not fsync writes")
    ap.add_argument("--log-requests", action="store_true", help="log every request and its answer")
    args = ap.parse_args(argv)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            ap.error(f"--host {args.host}: only loopback addresses are served")
    except ValueError:
        ap.error(f"--host {args.host}: not an IP address")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s objectstore: %(message)s")
    store = Store(args.dir, fsync=args.fsync)
    store.load()
    for name in args.bucket:
        store.create_bucket(name)
    try:
        asyncio.run(serve(store, args.host, args.port, os.environ.get(READY_FILE_ENV), args.log_requests))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

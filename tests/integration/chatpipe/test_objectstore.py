"""chatpipe.objectstore, the disk-backed S3 server of the persistent embedded broker: real HTTP against the
real server process, with the requests (and the exact conditional headers) Tansu 0.6.0's s3 engine sends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from chatpipe.broker import free_port
from chatpipe.objectstore import decode_segment, encode_segment

pytestmark = pytest.mark.integration

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
BUCKET = "chatpipe"


class Server:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root, self.fsync = root, fsync
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = self.root.parent / f"objectstore-{self.port}.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "chatpipe.objectstore", "--port", str(self.port),
                "--dir", str(self.root),
                "--bucket", BUCKET, *([] if self.fsync else ["--no-fsync"])]  # fmt: skip
        log = open(self.root.parent / "objectstore.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(argv, env={**os.environ, "CHATPIPE_READY_FILE": str(ready)}, stdout=log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        try:
            while not ready.exists():
                assert self.proc.poll() is None, (self.root.parent / "objectstore.log").read_text()
                assert time.monotonic() < deadline, "objectstore not ready in 20 s"
                time.sleep(0.02)
            assert int(ready.read_text()) == self.proc.pid
        except BaseException:
            self.proc.kill()  # no server left behind by a test that failed here
            self.proc.wait(10)
            raise

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", fsync=False)
    s.start()
    yield s
    s.stop()


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def put(c: httpx.Client, key: str, body: bytes, **headers: str) -> httpx.Response:
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    return c.put(f"/{BUCKET}/{key}", content=body, headers=sent)


def error_code(r: httpx.Response) -> str:
    root = ET.fromstring(r.content)
    assert root.tag == "Error", r.text
    return root.findtext("Code") or ""


def list_page(c: httpx.Client, **params: str) -> ET.Element:
    r = c.get(f"/{BUCKET}", params={"list-type": "2", **params})
    assert r.status_code == 200, r.text
    root = ET.fromstring(r.content)
    assert root.tag == f"{NS}ListBucketResult"
    return root


def list_all(c: httpx.Client, **params: str) -> tuple[list[str], list[str], int]:
    """Every key and common prefix through continuation tokens; and how many pages it took."""
    keys: list[str] = []
    prefixes: list[str] = []
    pages = 0
    token = None
    while True:
        root = list_page(c, **params, **({"continuation-token": token} if token else {}))
        pages += 1
        page_keys = [e.findtext(f"{NS}Key") or "" for e in root.iter(f"{NS}Contents")]
        page_prefixes = [e.findtext(f"{NS}Prefix") or "" for e in root.iter(f"{NS}CommonPrefixes")]
        assert int(root.findtext(f"{NS}KeyCount") or -1) == len(page_keys) + len(page_prefixes)
        keys += page_keys
        prefixes += page_prefixes
        if root.findtext(f"{NS}IsTruncated") == "true":
            token = root.findtext(f"{NS}NextContinuationToken")
            assert token
        else:
            assert root.find(f"{NS}NextContinuationToken") is None
            return keys, prefixes, pages


def last_modified(c: httpx.Client, prefix: str) -> dict[str, datetime]:
    out = {}
    root = list_page(c, prefix=prefix)
    for e in root.iter(f"{NS}Contents"):
        out[e.findtext(f"{NS}Key") or ""] = datetime.strptime(
            e.findtext(f"{NS}LastModified") or "", "%Y-%m-%dT%H:%M:%S.%f%z"
        )
    return out


def test_put_if_none_match_star_creates_once_then_412(http: httpx.Client) -> None:
    key = "clusters/c/topics/t/partitions/0000000000/records/00000000000000000000.batch"
    first = put(http, key, b"batch-1", If_None_Match="*")
    assert first.status_code == 200 and first.headers["ETag"].startswith('"')
    again = put(http, key, b"batch-2", If_None_Match="*")
    assert again.status_code == 412 and error_code(again) == "PreconditionFailed"
    assert http.get(f"/{BUCKET}/{key}").content == b"batch-1"  # the loser changed nothing


def test_put_if_match_needs_the_current_etag(http: httpx.Client) -> None:
    key = "clusters/c/topics/t/partitions/0000000000/watermark.json"
    etag = put(http, key, b'{"low":0,"high":1}', If_None_Match="*").headers["ETag"]
    second = put(http, key, b'{"low":0,"high":2}', If_Match=etag)
    assert second.status_code == 200 and second.headers["ETag"] != etag
    stale = put(http, key, b'{"low":0,"high":3}', If_Match=etag)
    assert stale.status_code == 412 and error_code(stale) == "PreconditionFailed"
    assert http.get(f"/{BUCKET}/{key}").content == b'{"low":0,"high":2}'
    assert put(http, key, b"x", If_Match=second.headers["ETag"]).status_code == 200
    missing = put(http, "no/such/key.json", b"x", If_Match=etag)
    assert missing.status_code == 404 and error_code(missing) == "NoSuchKey"
    # unconditional writes (consumer offset commits) always win
    assert put(http, key, b"plain").status_code == 200
    assert http.get(f"/{BUCKET}/{key}").content == b"plain"


def test_racing_conditional_writes_of_one_key_have_exactly_one_winner(server: Server) -> None:
    key = "clusters/c/groups/consumers/g.json"
    statuses: list[int] = []
    start = threading.Barrier(16)

    def create(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            start.wait()
            statuses.append(put(c, key, f"writer-{i}".encode(), If_None_Match="*").status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(statuses) == [200] + [412] * 15
    with httpx.Client(base_url=server.url) as c:
        etag = c.get(f"/{BUCKET}/{key}").headers["ETag"]
        statuses.clear()

        def update(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=10) as c2:
                statuses.append(put(c2, key, f"update-{i}".encode(), If_Match=etag).status_code)

        threads = [threading.Thread(target=update, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(statuses) == [200] + [412] * 7


def test_get_answers_304_for_the_current_etag_and_404_for_a_missing_key(http: httpx.Client) -> None:
    key = "clusters/c/meta.json"
    etag = put(http, key, b"{}", If_None_Match="*").headers["ETag"]
    r = http.get(f"/{BUCKET}/{key}", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == etag
    put(http, key, b'{"v":2}', If_Match=etag)
    r = http.get(f"/{BUCKET}/{key}", headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.content == b'{"v":2}' and r.headers["ETag"] != etag
    missing = http.get(f"/{BUCKET}/clusters/c/nothing.json")
    assert missing.status_code == 404 and error_code(missing) == "NoSuchKey"
    assert missing.headers["Content-Type"].startswith("application/xml")
    nobucket = http.get("/elsewhere/x")
    assert nobucket.status_code == 404 and error_code(nobucket) == "NoSuchBucket"


def test_listing_pages_past_1000_keys_in_key_order(http: httpx.Client) -> None:
    prefix = "clusters/c/topics/t/partitions/0000000000/records/"
    keys = [f"{prefix}{i:020d}.batch" for i in range(2345)]
    for k in reversed(keys):  # written out of order: the index sorts
        assert put(http, k, b"b", If_None_Match="*").status_code == 200
    put(http, "clusters/c/topics/t/partitions/0000000001/records/00000000000000000000.batch", b"other")
    listed, prefixes, pages = list_all(http, prefix=prefix)
    assert listed == keys and prefixes == [] and pages == 3
    first = list_page(http, prefix=prefix)
    assert first.findtext(f"{NS}MaxKeys") == "1000" and len(list(first.iter(f"{NS}Contents"))) == 1000
    small, _, pages = list_all(http, prefix=prefix, **{"max-keys": "400"})
    assert small == keys and pages == 6
    after, _, _ = list_all(http, prefix=prefix, **{"start-after": keys[2000]})
    assert after == keys[2001:]


def test_delimiter_listing_gives_common_prefixes_and_pages_over_them(http: httpx.Client) -> None:
    for topic in ("alpha", "beta", "gamma"):
        for p in range(3):
            put(http, f"clusters/c/topics/{topic}/partitions/{p:010d}/watermark.json", b"{}")
    put(http, "clusters/c/topics/readme.txt", b"x")
    keys, prefixes, _ = list_all(http, prefix="clusters/c/topics/", delimiter="/")
    assert keys == ["clusters/c/topics/readme.txt"]
    assert prefixes == [f"clusters/c/topics/{t}/" for t in ("alpha", "beta", "gamma")]
    keys, prefixes, pages = list_all(http, prefix="clusters/c/topics/", delimiter="/", **{"max-keys": "1"})
    assert pages == 4 and len(prefixes) == 3 and keys == ["clusters/c/topics/readme.txt"]
    root = list_page(http, prefix="clusters/c/topics/beta/partitions/", delimiter="/")
    assert root.findtext(f"{NS}Delimiter") == "/"
    assert [e.findtext(f"{NS}Prefix") for e in root.iter(f"{NS}CommonPrefixes")] == [
        f"clusters/c/topics/beta/partitions/{p:010d}/" for p in range(3)
    ]


def test_delete_objects_removes_the_keys(http: httpx.Client, server: Server) -> None:
    keys = [f"clusters/c/topics/gone/partitions/0000000000/records/{i:020d}.batch" for i in range(5)]
    for k in keys:
        put(http, k, b"b")
    put(http, "clusters/c/topics/kept/meta.json", b"{}")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        + "".join(f"<Object><Key>{k}</Key></Object>" for k in [*keys[:3], "never/there"])
        + "</Delete>"
    )
    r = http.post(f"/{BUCKET}", params={"delete": ""}, content=body.encode())
    assert r.status_code == 200, r.text
    deleted = [e.findtext(f"{NS}Key") for e in ET.fromstring(r.content).iter(f"{NS}Deleted")]
    assert deleted == [*keys[:3], "never/there"]
    assert list_all(http, prefix="clusters/c/topics/")[0] == [*keys[3:], "clusters/c/topics/kept/meta.json"]
    assert http.get(f"/{BUCKET}/{keys[0]}").status_code == 404
    quiet = body.replace("<Object>", "<Quiet>true</Quiet><Object>", 1).replace(keys[0], keys[3])
    r = http.post(f"/{BUCKET}", params={"delete": ""}, content=quiet.encode())
    assert r.status_code == 200 and not list(ET.fromstring(r.content).iter(f"{NS}Deleted"))
    assert list_all(http, prefix="clusters/c/topics/gone/")[0] == keys[4:]
    assert not (server.root / BUCKET / "clusters/c/topics/gone/partitions/0000000000/records/0").exists()
    bad = http.post(f"/{BUCKET}", params={"delete": ""}, content=b"<Delete><Object>")
    assert bad.status_code == 400 and error_code(bad) == "MalformedXML"


def test_last_modified_has_milliseconds_and_strictly_increases_across_writes_and_restarts(
    tmp_path: Path,
) -> None:
    s = Server(tmp_path / "data", fsync=False)
    s.start()
    try:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            # many writes within one wall-clock millisecond would tie on a plain clock
            keys = [f"p/{i:04d}" for i in range(300)]
            for k in keys:
                put(c, k, b"x")
            put(c, keys[10], b"rewritten")  # a rewrite is the latest write
            times = last_modified(c, "p/")
            order = keys[:10] + keys[11:] + [keys[10]]
            stamps = [times[k] for k in order]
            assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
            assert any(t.microsecond % 1000 == 0 and t.microsecond for t in stamps)  # ms, not whole seconds
        s.kill9()
        s.start()
        with httpx.Client(base_url=s.url, timeout=10) as c:
            assert last_modified(c, "p/") == times  # kept across the restart, to the millisecond
            put(c, "p/9999", b"after")
            assert last_modified(c, "p/")["p/9999"] > max(times.values())
    finally:
        s.stop()


def test_acknowledged_objects_survive_kill_9_of_the_server(tmp_path: Path) -> None:
    s = Server(tmp_path / "data", fsync=True)
    s.start()
    written: dict[str, tuple[bytes, str]] = {}
    try:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            for i in range(200):
                key = f"clusters/c/topics/t/partitions/{i % 2:010d}/records/{i:020d}.batch"
                body = os.urandom(64 + i)
                r = put(c, key, body, If_None_Match="*")
                assert r.status_code == 200
                written[key] = (body, r.headers["ETag"])
            wm_key = "clusters/c/topics/t/partitions/0000000000/watermark.json"
            wm = put(c, wm_key, b"1", If_None_Match="*")
            put(c, wm_key, b"2", If_Match=wm.headers["ETag"])
        s.kill9()
        # a write that was cut off leaves a temporary file: it is never an object
        leftover = s.root / BUCKET / "clusters" / "c" / ".tmp-1-1"
        leftover.write_bytes(b"half")
        s.start()
        with httpx.Client(base_url=s.url, timeout=10) as c:
            for key, (body, etag) in written.items():
                r = c.get(f"/{BUCKET}/{key}")
                assert r.status_code == 200 and r.content == body and r.headers["ETag"] == etag
            assert c.get(f"/{BUCKET}/{wm_key}").content == b"2"
            keys, _, _ = list_all(c, prefix="clusters/")
            assert sorted(written) == [k for k in keys if k.endswith(".batch")]
            assert not leftover.exists()
            # the conditional semantics hold against what was reloaded
            some = next(iter(written))
            assert put(c, some, b"again", If_None_Match="*").status_code == 412
            assert c.get(f"/{BUCKET}/{some}", headers={"If-None-Match": written[some][1]}).status_code == 304
    finally:
        s.stop()


def test_keys_with_any_characters_round_trip(http: httpx.Client, server: Server) -> None:
    keys = ["odd/.hidden", "odd/a b+c%d", "odd/ü/é.json", "odd/.tmp-looks-internal"]
    for k in keys:
        assert put(http, k, k.encode()).status_code == 200
    assert list_all(http, prefix="odd/")[0] == sorted(keys)
    for k in keys:
        assert http.get(f"/{BUCKET}/{k}").content == k.encode()
    names = {p.name for p in (server.root / BUCKET / "odd").iterdir()}
    assert not any(n.startswith(".") for n in names)
    assert decode_segment(encode_segment(".x%2E/")) == ".x%2E/"
    bad = put(http, "a//b", b"x")
    assert bad.status_code == 400 and error_code(bad) == "InvalidArgument"


def test_what_tansu_does_not_use_is_refused_not_half_served(http: httpx.Client) -> None:
    put(http, "k", b"0123456789")
    r = http.get(f"/{BUCKET}/k", headers={"Range": "bytes=0-3"})
    assert r.status_code == 501 and error_code(r) == "NotImplemented"
    assert http.post(f"/{BUCKET}/k", params={"uploads": ""}).status_code == 501
    assert http.get(f"/{BUCKET}").status_code == 501  # ListObjects v1
    assert http.head(f"/{BUCKET}/k").status_code == 501


def test_only_loopback_addresses_are_served() -> None:
    r = subprocess.run([sys.executable, "-m", "chatpipe.objectstore", "--host", "0.0.0.0", "--port", "1",
                        "--dir", "/nonexistent"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "loopback" in r.stderr

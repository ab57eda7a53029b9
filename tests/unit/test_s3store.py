"""The broker's S3-compatible server, spoken to in plain HTTP as tansu's object_store client does."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from processors.embedded.s3store import (
    BucketStore,
    LocalS3,
    S3Server,
    decode_segment,
    encode_segment,
    serve,
)
from processors.errors import BrokerError

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def __call__(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        where, _, query = path.partition("?")
        try:
            conn.request(
                method,
                quote(where) + (f"?{query}" if query else ""),
                body=body,
                headers={k.replace("_", "-"): v for k, v in headers.items()},
            )
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def list(self, query: str) -> ET.Element:
        status, _, body = self("GET", f"/tansu?list-type=2&{query}")
        assert status == 200, body
        return ET.fromstring(body)

    def all_keys(self, query: str, max_keys: int) -> tuple[list[str], list[str], int]:
        """Follow continuation tokens to the end: keys, common prefixes, pages."""
        keys: list[str] = []
        prefixes: list[str] = []
        token, pages = "", 0
        while True:
            doc = self.list(
                f"{query}&max-keys={max_keys}" + (f"&continuation-token={token}" if token else "")
            )
            pages += 1
            keys += [e.text or "" for e in doc.iter(f"{NS}Key")]
            prefixes += [e.text or "" for e in doc.findall(f"{NS}CommonPrefixes/{NS}Prefix")]
            assert int(doc.findtext(f"{NS}KeyCount") or -1) <= max_keys
            if doc.findtext(f"{NS}IsTruncated") == "false":
                return keys, prefixes, pages
            token = doc.findtext(f"{NS}NextContinuationToken") or ""
            assert token


def _start(root: Path) -> S3Server:
    server = serve(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server: S3Server) -> None:
    server.shutdown()
    server.server_close()
    server.store.close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[Client]:
    server = _start(tmp_path / "s3")
    yield Client(server.server_address[1])
    _stop(server)


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def test_etag_is_the_content_hash_and_get_head_return_it(s3: Client) -> None:
    status, h, _ = s3("PUT", "/tansu/a/b.json", b"hello")
    assert status == 200 and h["etag"] == md5_etag(b"hello")
    status, h, body = s3("GET", "/tansu/a/b.json")
    assert (status, body, h["etag"], h["content-length"]) == (
        200,
        b"hello",
        md5_etag(b"hello"),
        "5",
    )
    assert "last-modified" in h
    status, h, body = s3("HEAD", "/tansu/a/b.json")
    assert (status, body, h["etag"], h["content-length"]) == (200, b"", md5_etag(b"hello"), "5")
    status, _, body = s3("GET", "/tansu/a/missing")
    assert status == 404 and ET.fromstring(body).findtext("Code") == "NoSuchKey"


def test_create_only_put_refuses_an_existing_key(s3: Client) -> None:
    assert s3("PUT", "/tansu/k", b"one", If_None_Match="*")[0] == 200
    status, _, body = s3("PUT", "/tansu/k", b"two", If_None_Match="*")
    assert status == 412 and ET.fromstring(body).findtext("Code") == "PreconditionFailed"
    assert s3("GET", "/tansu/k")[2] == b"one"
    assert s3("PUT", "/tansu/k", b"two", If_None_Match='"abc"')[0] == 501  # S3 allows only *


def test_update_put_needs_the_current_etag(s3: Client) -> None:
    etag1 = s3("PUT", "/tansu/k", b"v1")[1]["etag"]
    status, h, _ = s3("PUT", "/tansu/k", b"v2", If_Match=etag1)
    assert status == 200 and h["etag"] == md5_etag(b"v2")
    assert s3("PUT", "/tansu/k", b"v3", If_Match=etag1)[0] == 412  # stale
    assert s3("PUT", "/tansu/other", b"v1", If_Match=etag1)[0] == 412  # no such object
    assert s3("GET", "/tansu/k")[2] == b"v2"
    assert s3("GET", "/tansu/other")[0] == 404


def test_get_revalidation_answers_304_when_unchanged(s3: Client) -> None:
    etag = s3("PUT", "/tansu/k", b"v1")[1]["etag"]
    status, h, body = s3("GET", "/tansu/k", If_None_Match=etag)
    assert (status, body, h["etag"]) == (304, b"", etag)
    assert s3("GET", "/tansu/k", If_None_Match=md5_etag(b"other"))[2] == b"v1"
    assert s3("GET", "/tansu/k", If_Match=md5_etag(b"other"))[0] == 412


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
def test_of_racing_conditional_puts_exactly_one_wins(s3: Client, header: str) -> None:
    condition = s3("PUT", "/tansu/race", b"base")[1]["etag"] if header == "If-Match" else "*"
    with ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(
                lambda i: s3("PUT", "/tansu/race", f"w{i}".encode(), **{header: condition})[0],
                range(32),
            )
        )
    assert sorted(set(statuses)) == [200, 412] and statuses.count(200) == 1
    winner = statuses.index(200)
    assert s3("GET", "/tansu/race")[2] == f"w{winner}".encode()


def test_listing_by_prefix_delimiter_and_continuation(s3: Client) -> None:
    keys = [
        f"t/{t}/p/{p:010d}/records/{o:020d}.batch"
        for t in ("a", "b")
        for p in range(3)
        for o in range(7)
    ]
    keys += ["t/a.json", "t/b.json", "u/x"]
    for k in keys:
        assert s3("PUT", f"/tansu/{k}", k.encode())[0] == 200

    got, prefixes, pages = s3.all_keys("prefix=t/a/", 5)
    assert got == sorted(k for k in keys if k.startswith("t/a/")) and prefixes == [] and pages == 5

    got, prefixes, pages = s3.all_keys("prefix=t/&delimiter=/", 2)
    assert got == ["t/a.json", "t/b.json"] and prefixes == ["t/a/", "t/b/"] and pages == 2

    got, prefixes, _ = s3.all_keys("delimiter=/", 1000)
    assert got == [] and prefixes == ["t/", "u/"]

    got, _, _ = s3.all_keys(
        f"prefix=t/b/p/0000000002/records/&start-after=t/b/p/0000000002/records/{4:020d}.batch",
        1000,
    )
    assert got == [f"t/b/p/0000000002/records/{o:020d}.batch" for o in (5, 6)]

    doc = s3.list("prefix=t/a/p/0000000000/records/")
    first = doc.find(f"{NS}Contents")
    assert first is not None
    assert first.findtext(f"{NS}ETag") == md5_etag(
        f"t/a/p/0000000000/records/{0:020d}.batch".encode()
    )
    assert first.findtext(f"{NS}Size") == str(len(f"t/a/p/0000000000/records/{0:020d}.batch"))
    assert (first.findtext(f"{NS}LastModified") or "").endswith("Z")
    assert s3("GET", "/tansu?list-type=2&continuation-token=bogus")[0] == 400


def test_delete_and_multi_delete(s3: Client) -> None:
    for k in ("g/1", "g/2", "g/3", "h"):
        s3("PUT", f"/tansu/{k}", b"x")
    assert s3("DELETE", "/tansu/h")[0] == 204
    assert s3("DELETE", "/tansu/h")[0] == 204  # deleting a missing key is not an error
    doc = (
        b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Object><Key>g/1</Key></Object>'
        b"<Object><Key>g/3</Key></Object></Delete>"
    )
    status, _, body = s3("POST", "/tansu?delete", doc, Content_MD5="ignored")
    assert status == 200
    assert [e.text for e in ET.fromstring(body).iter(f"{NS}Key")] == ["g/1", "g/3"]
    assert s3.all_keys("", 1000)[0] == ["g/2"]


@pytest.mark.parametrize("segment", ["", ".", "..", "~x~", "a b", "é/ü", "%41", "x~"])
def test_key_segments_round_trip_through_file_names(segment: str) -> None:
    name = encode_segment(segment)
    assert decode_segment(name) == segment
    assert "~" not in name and "/" not in name and name not in ("", ".", "..")


def test_objects_and_etags_survive_a_restart(tmp_path: Path) -> None:
    keys = [
        "a//b",
        "./x",
        "../y",
        "c~/d~",
        "café/naïve",
        "z",
        "z/inner",
    ]  # "z" is an object and a folder
    server = _start(tmp_path / "s3")
    s3 = Client(server.server_address[1])
    etags = {k: s3("PUT", f"/tansu/{k}", k.encode())[1]["etag"] for k in keys}
    _stop(server)

    server = _start(tmp_path / "s3")
    s3 = Client(server.server_address[1])
    try:
        assert s3.all_keys("", 3)[0] == sorted(keys)
        for k in keys:
            status, h, body = s3("GET", f"/tansu/{k}")
            assert (status, body, h["etag"]) == (200, k.encode(), etags[k])
        assert (
            s3("PUT", "/tansu/z", b"new", If_Match=etags["z"])[0] == 200
        )  # the ETag is still valid
    finally:
        _stop(server)


def test_unsupported_requests_answer_501_and_unknown_buckets_404(s3: Client) -> None:
    assert s3("POST", "/tansu/big?uploads")[0] == 501  # multipart upload
    assert s3("PUT", "/tansu/copy", b"", x_amz_copy_source="/tansu/k")[0] == 501
    assert s3("PUT", "/nope/k", b"x")[0] == 404
    assert s3("HEAD", "/nope")[0] == 404
    assert s3("PUT", "/other")[0] == 200 and s3("HEAD", "/other")[0] == 200
    assert s3("PUT", "/Bad_Name")[0] == 400


def test_an_error_before_the_body_is_read_does_not_desync_a_kept_alive_connection(
    s3: Client,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", s3.port, timeout=10)
    conn.request("PUT", "/nope/k", body=b"GET /tansu/evil HTTP/1.1\r\n\r\n")
    r = conn.getresponse()
    r.read()
    assert r.status == 404
    conn.request("PUT", "/tansu/k", body=b"fine")  # http.client reconnects if the server closed
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    conn.close()
    assert s3("GET", "/tansu/k")[2] == b"fine"


def test_one_server_per_folder(tmp_path: Path) -> None:
    store = BucketStore(tmp_path / "s3")
    try:
        with pytest.raises(BrokerError, match="already serves"):
            BucketStore(tmp_path / "s3")
    finally:
        store.close()


def test_a_write_killed_half_way_leaves_the_old_object_whole(tmp_path: Path) -> None:
    root = tmp_path / "s3"
    server = LocalS3(root).start()
    try:
        s3 = Client(server.port)
        old = os.urandom(1000)
        assert s3("PUT", "/tansu/topic/batch", old)[0] == 200
        size = 8 << 20
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(
            f"PUT /tansu/topic/batch HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        sock.sendall(
            os.urandom(size // 2)
        )  # half the body: the server is part way through its write
        folder = root / "tansu" / "topic"

        def partial() -> list[Path]:
            return [p for p in folder.iterdir() if p.name.endswith(".tmp") and p.stat().st_size > 0]

        deadline = time.monotonic() + 30
        while not partial() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL mid-write
        sock.close()
        assert partial(), "the interrupted write left its temporary file behind"

        server.start()
        s3 = Client(server.port)
        assert s3("GET", "/tansu/topic/batch")[2] == old
        assert not partial() and sorted(p.name for p in folder.iterdir()) == ["batch~"]
        assert s3.all_keys("", 1000)[0] == ["topic/batch"]
    finally:
        server.stop()

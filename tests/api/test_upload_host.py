"""The upload host under hostile use (issue 9 items 4, 5): refusals before the file is read, a bounded number
of uploads in flight, a policy bound to a few objects, stored bytes capped per key, revoked keys refused."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.api.conftest import LiveServer, live_server
from ting.store.db import upload_data

DEADLINE_S = 60.0
BOUNDARY = "ting-test-boundary"


def get_policy(server: LiveServer, token: str = "sk-test") -> dict[str, Any]:
    r = httpx.get(
        server.url + "/api/v1/uploads",
        params={"action": "getPolicy", "model": "qwen-audio-turbo"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    return r.json()["data"]


def fields(cert: dict[str, Any], name: str, **override: str) -> dict[str, str]:
    """The SDK's form fields, in the SDK's order (the file comes last)."""
    values = {
        "OSSAccessKeyId": cert["oss_access_key_id"],
        "Signature": cert["signature"],
        "policy": cert["policy"],
        "key": f"{cert['upload_dir']}/{name}",
        "x-oss-object-acl": "private",
        "x-oss-forbid-overwrite": "true",
        "success_action_status": "200",
    }
    values.update(override)
    return values


def upload(cert: dict[str, Any], name: str, data: bytes, **override: str) -> httpx.Response:
    return httpx.post(
        cert["upload_host"], data=fields(cert, name, **override), files={"file": (name, data)}, timeout=DEADLINE_S
    )


def form_head(values: dict[str, str], name: str) -> bytes:
    """A multipart body up to (and including) the file part's headers."""
    out = b""
    for key, value in values.items():
        out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n').encode()
    out += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return out


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


class RawUpload:
    """An upload over a raw socket that declares `file_bytes` and sends only what the test says."""

    def __init__(self, server: LiveServer, values: dict[str, str], name: str, file_bytes: int) -> None:
        self.head = form_head(values, name)
        length = len(self.head) + file_bytes + len(FORM_TAIL)
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)
        self.sock.sendall(
            (
                f"POST /api/v1/uploads/oss HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {length}\r\n\r\n"
            ).encode()
            + self.head
        )
        self.sent = 0

    def send_file_bytes(self, n: int) -> None:
        self.sock.sendall(bytes(n))
        self.sent += n

    def finish(self) -> None:
        self.sock.sendall(FORM_TAIL)

    def response(self) -> tuple[int, bytes, bytes]:
        """Status, headers and body; read until the server closes or the body is in."""
        data = b""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"content-length: " in head.lower():
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
        head, _, body = data.partition(b"\r\n\r\n")
        assert head, "no answer from the server before the deadline"
        return int(head.split(b" ")[1]), head, body

    def close(self) -> None:
        self.sock.close()


def spooled(home: Path) -> list[Path]:
    root = home / "uploads"
    return list(root.iterdir()) if root.exists() else []


def kept(server: LiveServer, home: Path) -> int:
    """Objects kept: files in the uploads directory (SQLite) and rows of upload_data (PostgreSQL)."""
    return len(spooled(home)) + len(server.run(server.runtime.store.db.read(sa.select(upload_data.c.object_key))))


# --- item 4: refusals before the file is read; uploads in flight are bounded -----------------------------------


@pytest.mark.parametrize("forgery", ["signature", "policy", "key", "missing"])
def test_a_forged_upload_is_refused_before_its_file_is_read(engine: Any, tmp_path: Path, forgery: str) -> None:
    """A 50 MiB upload with a bad signature: the answer comes after a few KiB of the file, and nothing is kept."""
    with live_server(engine, tmp_path) as s:
        cert = get_policy(s)
        values = fields(cert, "big.wav")
        if forgery == "signature":
            values["Signature"] = "AAAA" + values["Signature"][4:]
        elif forgery == "policy":
            values["policy"] = values["policy"][:-4] + "AAA="
        elif forgery == "key":
            values["key"] = "dashscope-instant/someone-else/big.wav"
        else:
            del values["Signature"]
        raw = RawUpload(s, values, "big.wav", file_bytes=50 * 1024 * 1024)
        try:
            raw.send_file_bytes(64 * 1024)
            status, head, body = raw.response()  # while 49.9 MiB are still unsent
        finally:
            raw.close()
        assert status == 403 and json.loads(body)["code"] in ("SignatureDoesNotMatch", "AccessDenied")
        assert b"connection: close" in head.lower()
        assert raw.sent == 64 * 1024
        assert spooled(tmp_path) == []  # no temporary file, no object


def test_uploads_in_flight_are_bounded_and_the_refusal_is_cheap(engine: Any, tmp_path: Path) -> None:
    with live_server(engine, tmp_path, max_concurrent_uploads=1) as s:
        first = RawUpload(s, fields(get_policy(s), "a.wav"), "a.wav", file_bytes=200_000)
        try:
            first.send_file_bytes(100_000)
            deadline = time.monotonic() + DEADLINE_S
            while s.runtime.uploads_in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            second = RawUpload(s, fields(get_policy(s), "b.wav"), "b.wav", file_bytes=10 * 1024 * 1024)
            try:
                status, _, body = second.response()  # refused with 10 MiB unsent
            finally:
                second.close()
            assert status == 503 and json.loads(body)["code"] == "ServiceUnavailable"
            first.send_file_bytes(100_000)
            first.finish()
            assert first.response()[0] == 200
        finally:
            first.close()
        assert s.runtime.uploads_in_flight == 0
        assert upload(get_policy(s), "c.wav", b"RIFF" * 100).status_code == 200  # the slot was given back


# --- item 5: storage bounds ----------------------------------------------------------------------------------


def test_a_policy_uploads_a_few_objects_only(engine: Any, tmp_path: Path, database_url: str) -> None:
    with live_server(engine, tmp_path, database=database_url, max_audio_items=2) as s:
        cert = get_policy(s)
        assert upload(cert, "a.wav", b"RIFF" * 10).status_code == 200
        assert upload(cert, "b.wav", b"RIFF" * 10).status_code == 200
        third = upload(cert, "c.wav", b"RIFF" * 10)
        assert third.status_code == 403 and "at most 2" in third.json()["message"]
        assert upload(get_policy(s), "c.wav", b"RIFF" * 10).status_code == 200  # a new policy, a new object


def test_stored_bytes_are_capped_per_key(engine: Any, tmp_path: Path, database_url: str) -> None:
    with live_server(engine, tmp_path, database=database_url, upload_quota_bytes=100_000) as s:
        assert upload(get_policy(s, "sk-alice"), "a.wav", bytes(60_000)).status_code == 200
        over = upload(get_policy(s, "sk-alice"), "b.wav", bytes(60_000))
        assert over.status_code == 403 and over.json()["code"] == "QuotaExceeded"
        assert upload(get_policy(s, "sk-bob"), "b.wav", bytes(60_000)).status_code == 200  # per key
        assert kept(s, tmp_path) == 2


def test_a_revoked_keys_policy_no_longer_uploads(engine: Any, tmp_path: Path, database_url: str) -> None:
    with live_server(engine, tmp_path, database=database_url) as s:
        key, info = s.run(s.runtime.store.keys.create(name="alice"))
        cert = get_policy(s, key)
        assert upload(cert, "a.wav", b"RIFF" * 10).status_code == 200
        s.run(s.runtime.store.keys.revoke(info.id))
        r = upload(cert, "b.wav", b"RIFF" * 10)
        assert r.status_code == 403 and r.json()["code"] == "InvalidAccessKeyId"
        assert kept(s, tmp_path) == 1

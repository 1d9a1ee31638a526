"""Open by accident (issue 9): file modes, DNS rebinding and cross-site requests, secrets in logs, /docs."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import httpx

from tests.api.conftest import live_server


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_database_and_uploads_are_private(engine: Any, tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    with live_server(engine, home) as s:
        r = httpx.get(
            s.url + "/api/v1/uploads",
            params={"action": "getPolicy", "model": "qwen-audio-turbo"},
            headers={"Authorization": "Bearer sk-test"},
        )
        cert = r.json()["data"]
        fields = {
            "OSSAccessKeyId": cert["oss_access_key_id"],
            "Signature": cert["signature"],
            "policy": cert["policy"],
            "key": f"{cert['upload_dir']}/a.wav",
            "success_action_status": "200",
        }
        assert httpx.post(cert["upload_host"], data=fields, files={"file": ("a.wav", b"RIFF0000")}).status_code == 200
        assert mode(home) == 0o700
        assert mode(home / "ting.db") == 0o600
        assert mode(home / "uploads") == 0o700
        stored = [p for p in (home / "uploads").iterdir()]
        assert stored and all(mode(p) == 0o600 for p in stored)
        for sibling in ("ting.db-wal", "ting.db-shm", "ting.db.lock"):
            if (home / sibling).exists():
                assert mode(home / sibling) == 0o600, sibling


def test_an_existing_database_file_is_made_private(engine: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / "ting.db").touch(mode=0o644)
    (tmp_path / "ting.db").chmod(0o644)
    with live_server(engine, tmp_path) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        assert mode(tmp_path / "ting.db") == 0o600


def test_nothing_is_loaded_from_a_public_cdn(engine: Any, tmp_path: Path) -> None:
    with live_server(engine, tmp_path) as s:
        assert httpx.get(s.url + "/docs").status_code == 404
        assert httpx.get(s.url + "/openapi.json").json()["info"]["title"] == "Ting"
        page = httpx.get(s.url + "/playground/").text
        assert not re.search(r"(src|href)=\"(https?:)?//", page)  # every asset from this server
    with live_server(engine, tmp_path / "docs", docs=True) as s:  # asked for: Swagger UI, from its CDN
        assert "swagger-ui" in httpx.get(s.url + "/docs").text


# --- item 14: DNS rebinding and cross-site requests on an open server -------------------------------------------

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"
CHAT = "/v1/chat/completions"
TRANSCRIPTIONS = "/v1/audio/transcriptions"


def chat_body() -> dict[str, Any]:
    return {"model": "qwen-audio-turbo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def dashscope_body() -> dict[str, Any]:
    return {
        "model": "qwen-audio-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        "parameters": {"max_tokens": 2},
    }


def test_an_open_server_answers_only_to_loopback_host_names(engine: Any, tmp_path: Path) -> None:
    with live_server(engine, tmp_path, public_url="https://ting.example.com", allowed_hosts=("ting.lan",)) as s:
        for host in ("evil.example", f"evil.example:{s.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            r = httpx.post(s.url + GENERATION, json=dashscope_body(), headers={"Host": host}, timeout=60)
            assert r.status_code == 403, host
            assert r.json()["code"] == "AccessDenied" and "DNS-rebinding" in r.json()["message"]
            assert r.json()["request_id"] == r.headers["x-request-id"]
            o = httpx.post(s.url + CHAT, json=chat_body(), headers={"Host": host}, timeout=60)
            assert o.status_code == 403 and o.json()["error"]["code"] == "access_denied", host
            assert httpx.get(s.url + "/health", headers={"Host": host}).status_code == 403
        for host in (
            f"localhost:{s.port}",
            "127.0.0.1",
            f"[::1]:{s.port}",
            "app.localhost",
            "10.1.2.3:80",
            "ting.example.com",
            "TING.LAN:8000",
        ):
            r = httpx.post(s.url + GENERATION, json=dashscope_body(), headers={"Host": host}, timeout=60)
            assert r.status_code == 200, (host, r.text)


def test_an_open_server_refuses_cross_site_browser_requests(engine: Any, tmp_path: Path, corpus) -> None:  # type: ignore[no-untyped-def]
    wav = corpus["wav_8k_en"].path.read_bytes()
    with live_server(engine, tmp_path, cors_origins=("https://app.example",)) as s:
        # a cross-site multipart form POST (no preflight needed) is refused before it is processed
        r = httpx.post(
            s.url + TRANSCRIPTIONS,
            data={"model": "qwen-audio-turbo"},
            files={"file": ("a.wav", wav)},
            headers={"Origin": "https://evil.example"},
            timeout=60,
        )
        assert r.status_code == 403 and "Cross-origin" in r.json()["error"]["message"]
        for origin in ("https://evil.example", "null", f"http://localhost:{s.port}.evil.example"):
            r = httpx.post(s.url + GENERATION, json=dashscope_body(), headers={"Origin": origin}, timeout=60)
            assert r.status_code == 403, origin
        # same origin (the playground) and the configured CORS origin are served
        for origin in (s.url, "https://app.example"):
            r = httpx.post(s.url + CHAT, json=chat_body(), headers={"Origin": origin}, timeout=60)
            assert r.status_code == 200, (origin, r.text)
        assert httpx.post(s.url + CHAT, json=chat_body(), timeout=60).status_code == 200  # no Origin: curl, SDKs


def test_with_a_key_the_host_and_origin_checks_step_aside(engine: Any, tmp_path: Path) -> None:
    with live_server(engine, tmp_path, api_key=("sk-good",)) as s:  # e.g. behind a proxy that forwards its Host
        r = httpx.post(
            s.url + CHAT,
            json=chat_body(),
            timeout=60,
            headers={
                "Host": "ting.example.org",
                "Origin": "https://elsewhere.example",
                "Authorization": "Bearer sk-good",
            },
        )
        assert r.status_code == 200, r.text
        r = httpx.post(s.url + CHAT, json=chat_body(), headers={"Host": "ting.example.org"}, timeout=60)
        assert r.status_code == 401

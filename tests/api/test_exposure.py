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
        r = httpx.get(s.url + "/api/v1/uploads", params={"action": "getPolicy", "model": "qwen-audio-turbo"},
                      headers={"Authorization": "Bearer sk-test"})
        cert = r.json()["data"]
        fields = {"OSSAccessKeyId": cert["oss_access_key_id"], "Signature": cert["signature"],
                  "policy": cert["policy"], "key": f"{cert['upload_dir']}/a.wav", "success_action_status": "200"}
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

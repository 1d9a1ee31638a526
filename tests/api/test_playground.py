"""The web playground: served by the app, same-origin only."""

from __future__ import annotations

import httpx

from tests.api.conftest import LiveServer


def test_the_playground_is_served_with_a_strict_policy(server: LiveServer) -> None:
    root = httpx.get(server.url + "/")
    assert root.status_code in (302, 307) and root.headers["location"] == "/playground/"
    page = httpx.get(server.url + "/playground/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for element in ('id="chat-file"', 'id="record"', 'id="question"', 'id="transcribe-form"', 'src="app.js"'):
        assert element in page.text
    script = httpx.get(server.url + "/playground/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/api/v1/services/aigc/multimodal-generation/generation" in script.text and "/v1/audio/" in script.text
    assert httpx.get(server.url + "/playground/style.css").status_code == 200
    missing = httpx.get(server.url + "/playground/nope.js")
    assert missing.status_code == 404 and missing.json()["code"] == "NotFound"

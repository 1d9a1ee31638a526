"""The web playground in a real browser (headless Chromium driven by Playwright) against the live server."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests import corpus as C
from tests.api.conftest import LiveServer
from ting.audio import billed_audio_tokens
from ting.audio.decode import decode_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (scripts/install --dev installs it)")
USAGE = re.compile(r"audio (\d+) \+ input (\d+) \+ output (\d+) tokens")


# Locators and selectors only: the page's Content-Security-Policy (no eval) holds for the test's scripts too.
@pytest.fixture
def page(server: LiveServer):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # As root in a container: no sandbox; a small /dev/shm would crash tabs.
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        page = browser.new_page()
        page.problems = []  # type: ignore[attr-defined]
        page.on("pageerror", lambda e: page.problems.append(str(e)))  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))  # type: ignore[attr-defined]
        page.set_default_timeout(30_000)
        page.goto(server.url + "/")
        yield page
        browser.close()


def test_a_file_a_question_a_streamed_answer_and_a_follow_up_about_the_same_audio(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    speech = C.speak("en", tmp_path / "hello.wav")
    page.locator("#model option").first.wait_for(state="attached")
    page.locator("#status", has_text=" on cpu ").wait_for()
    page.set_input_files("#chat-file", str(speech))  # uploaded through the DashScope policy flow
    page.fill("#question", "What is said?")
    page.fill("#max-tokens", "6")
    page.click("#send")
    first = page.wait_for_selector(".turn.assistant .meta")
    audio, text_in, out = map(int, USAGE.search(first.inner_text()).groups())  # type: ignore[union-attr]
    assert audio == billed_audio_tokens(len(decode_bytes(speech.read_bytes()).samples)) and out == 6
    page.fill("#question", "And who says it?")
    page.click("#send")
    second = page.locator(".turn.assistant .meta").nth(1)
    second.wait_for()
    second = second.inner_text()
    audio2, text_in2, _ = map(int, USAGE.search(second).groups())  # type: ignore[union-attr]
    assert audio2 == audio and text_in2 > text_in  # the same recording, the conversation so far, the new question
    assert [t.inner_text() for t in page.query_selector_all(".turn.user")] == ["🎧 What is said?", "And who says it?"]
    assert not page.query_selector(".turn.error") and page.problems == []


def test_transcribing_a_file_to_subtitles(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    speech = C.speak("zh", tmp_path / "你好.wav")
    page.click("button[data-tab=transcribe]")
    page.set_input_files("#tr-file", str(speech))
    page.select_option("#tr-format", "srt")
    page.click("#transcribe-form button[type=submit]")
    page.locator("#tr-result", has_text="-->").wait_for()
    srt = page.inner_text("#tr-result")
    assert re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d{3}\n", srt), srt
    assert page.problems == []


def test_an_error_is_shown_in_the_servers_words(page) -> None:  # type: ignore[no-untyped-def]
    page.fill("#chat-url", "http://169.254.169.254/latest/meta-data")  # the server refuses to fetch it
    page.fill("#question", "What is this?")
    page.click("#send")
    error = page.wait_for_selector(".turn.error").inner_text()
    assert error.startswith("400 InvalidURL: ") and "destination is not allowed" in error, error
    assert not page.query_selector(".turn.assistant")

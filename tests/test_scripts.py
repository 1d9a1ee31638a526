"""scripts/serve, the first command a new user runs: the offline tiny model unless --model names another.

The script runs as it is, from a copy of scripts/ whose `install` step (pip, apt) is replaced by one that does
nothing and whose .venv is this test run's environment; the `ting serve` it starts is the real one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.test_serve import free_port

ROOT = Path(__file__).resolve().parent.parent
NOTICE = "scripts/serve: serving the offline test model"


def checkout(tmp: Path) -> Path:
    """A copy of scripts/serve beside an install step that does nothing and a .venv that is this interpreter's."""
    root = tmp / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "serve", root / "scripts" / "serve")
    install = root / "scripts" / "install"
    install.write_text("#!/usr/bin/env bash\nexit 0\n")
    install.chmod(0o755)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ting").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m ting "$@"\n')
    (bin_dir / "ting").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return root


def environment(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TING_MODEL"}
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    return {**env, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}


def test_any_arguments_without_model_serve_the_offline_model_and_say_so(tmp_path: Path) -> None:
    root, port = checkout(tmp_path), free_port()
    err = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [str(root / "scripts" / "serve"), "--port", str(port), "--home", str(tmp_path / "home")],
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=environment(tmp_path),
    )
    try:
        deadline = time.monotonic() + 300
        health: dict[str, object] = {}
        while not health:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
            assert time.monotonic() < deadline, "scripts/serve did not become ready"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                health = r.json() if r.status_code == 200 else {}
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert health["model"] == "tiny" and health["status"] == "ok"
        log = (tmp_path / "stderr").read_text()
        assert NOTICE in log and "--model Qwen/Qwen2-Audio-7B-Instruct" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def test_with_model_it_serves_that_model_and_stops_offline_when_it_is_absent(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    out = subprocess.run(
        [str(root / "scripts" / "serve"), "--model", "Qwen/Qwen2-Audio-7B-Instruct", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=environment(tmp_path),
        timeout=120,
    )
    assert out.returncode == 1 and NOTICE not in out.stderr
    assert "not in the local Hugging Face cache" in out.stderr

"""The rules of the house (docs: architecture.md), checked as import-linter contracts, and the CLI's help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_imports_point_down_and_heavy_things_have_one_home() -> None:
    code = "import sys, importlinter.cli as c; sys.exit(c.lint_imports(config_filename='pyproject.toml'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 5 kept, 0 broken." in out.stdout


def test_every_command_explains_itself() -> None:
    for args in (
        ["--help"],
        ["serve", "--help"],
        ["tiny-model", "--help"],
        ["keys", "--help"],
        ["keys", "create", "--help"],
    ):
        out = subprocess.run([sys.executable, "-m", "ting", *args], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "usage: ting" in out.stdout, (args, out.stderr)


def test_the_code_is_lint_clean() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_code_type_checks_strictly() -> None:
    """mypy --strict, with the project's own configuration (pyproject.toml [tool.mypy])."""
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout


def test_the_code_is_formatted() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "src", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr

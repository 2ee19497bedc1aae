"""The wheel built from the tracked sources holds all four top-level packages and the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("git ls-files failed")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_wheel_from_clean_tree_contains_every_package(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"
    for name in _tracked_files():          # a clean clone: tracked files only
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                             "--outdir", str(tmp_path / "dist"), str(src)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("sppnet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("data", "detection", "proposals", "svm"):
        assert f"{package}/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sppnet = detection.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

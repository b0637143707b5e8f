"""The docs build is a test: the HTML pages and the pages' doctests build with warnings as errors.

Both builds run offline: intersphinx uses local inventories only (see docs/conf.py), so the
environment variable that would download them is removed here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _sphinx(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "INFLATE_DOCS_INTERSPHINX"}
    cmd = [sys.executable, "-m", "sphinx", *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-20000:]}\n--- stderr ---\n{result.stderr[-20000:]}"
    )


def test_html_build_has_no_warnings(tmp_path):
    out = tmp_path / "html"
    _sphinx(tmp_path, "-W", "--keep-going", "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(out))
    assert (out / "index.html").is_file() and (out / "api.html").is_file()


def test_doctests_in_the_pages_pass(tmp_path):
    out = tmp_path / "doctest"
    _sphinx(tmp_path, "-W", "-b", "doctest", "-d", str(tmp_path / "doctrees"), str(DOCS), str(out))
    report = (out / "output.txt").read_text()
    assert "tests in default" in report and " 0 failures in tests" in report, report  # found, run, passed

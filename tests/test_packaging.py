"""setup.py is a shim: everything it reports comes from pyproject.toml (the source of truth)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_reports_pyproject_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = subprocess.run(
        [sys.executable, "setup.py", "--name", "--version"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[-2:] == [project["name"], project["version"]]


def test_setup_py_declares_nothing_of_its_own():
    tree = ast.parse((ROOT / "setup.py").read_text())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    # Only the import and a bare setup(): any metadata here would drift from pyproject.toml.
    assert [ast.unparse(node) for node in body] == ["from setuptools import setup", "setup()"]

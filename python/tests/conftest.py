"""Shared fixtures: the repository root and the `vbackup` command line the Python results are
compared with."""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def vbackup_cli():
    """The CLI binary: $VBACKUP_BIN, else target/release/vbackup (built here when missing)."""
    path = os.environ.get("VBACKUP_BIN") or str(REPO / "target" / "release" / "vbackup")
    if not os.path.exists(path):
        subprocess.run(
            ["cargo", "build", "--release", "--bin", "vbackup"], cwd=REPO, check=True
        )
    return path

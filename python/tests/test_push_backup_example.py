"""The example drives a real qemu-storage-daemon through the engine: checkpoint create, a full
and an incremental push backup, each checked with qemu-img compare. It needs qemu-utils 10 and
fails (never skips) without it."""

import os
import re
import shutil
import subprocess
import sys

from conftest import REPO

EXAMPLE = REPO / "python" / "examples" / "push_backup.py"


def test_push_backup_example_against_qemu_storage_daemon(tmp_path):
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
        assert shutil.which(tool), f"{tool} is missing: install qemu-utils 10"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "checkpoints: c0 c1 c2" in out
    assert "OK: full and incremental backups match the disk" in out
    assert "file: create-exclusive" in out and "file: sync" in out
    # The example kills the daemon by its pid and reaps it.
    pid = re.search(r"qemu-storage-daemon pid (\d+)", out).group(1)
    assert not os.path.exists(f"/proc/{pid}"), f"qemu-storage-daemon {pid} still runs"

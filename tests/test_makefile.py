"""`make install` says when the disk is too small for the pinned stack, before pip starts."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(tmp_path, free_mb, *targets):
    # A `df` that reports `free_mb` free, in POSIX format, ahead of the real one on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    df = bin_dir / "df"
    df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                  f"echo '/dev/x 99999999 1 {free_mb * 1024} 1% /'\n")
    df.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["make", "--no-print-directory", "-C", REPO, *targets,
                           f"VENV={tmp_path / 'venv'}", f"PYTHON={sys.executable}"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("free_mb, ok", [(1200, False), (4000, True)])
def test_check_space_refuses_a_first_install_on_a_small_disk(tmp_path, free_mb, ok):
    (tmp_path / "venv").mkdir()
    result = make(tmp_path, free_mb, "check-space")
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert f"needs about 4000 MB free for {tmp_path / 'venv'}, but only 1200 MB are free" in result.stderr


def test_an_installed_venv_is_not_checked(tmp_path):
    (tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "tensorflow").mkdir(parents=True)
    assert make(tmp_path, 10, "check-space").returncode == 0


def test_install_stops_before_pip_when_the_disk_is_too_small(tmp_path):
    result = make(tmp_path, 1200, "install")
    assert result.returncode != 0
    assert "only 1200 MB are free" in result.stderr
    assert "installing the pinned" not in result.stdout
    assert not (tmp_path / "venv" / "install.log").exists()

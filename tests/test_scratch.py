"""A run's temporary files stay in its scratch directory and go when the run ends (pipeline/scratch.py)."""
import os
import subprocess
import sys
import tempfile

import pytest

from pipeline.scratch import scratch_directory


def test_temporary_files_of_the_process_and_its_children_land_in_scratch_and_go(tmp_path):
    before = (tempfile.gettempdir(), os.environ.get("TMPDIR"))
    scratch = tmp_path / "run" / "tmp"
    scratch.mkdir(parents=True)
    (scratch / "left-by-a-killed-run").write_text("x")
    with scratch_directory(str(scratch)) as path:
        assert os.listdir(path) == []
        assert os.path.dirname(tempfile.mkdtemp()) == path
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp())"],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert os.path.dirname(child) == path
    assert not scratch.exists()
    assert (tempfile.gettempdir(), os.environ.get("TMPDIR")) == before


def test_scratch_goes_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with scratch_directory(str(tmp_path / "tmp")):
            tempfile.mkdtemp()
            raise RuntimeError("step failed")
    assert not (tmp_path / "tmp").exists()


def test_tfx_package_of_itself_for_a_beam_step_goes_with_the_scratch(tmp_path):
    # What every Beam step of a local run does before it starts (BaseBeamExecutor.__init__).
    from tfx.utils import dependency_utils

    with scratch_directory(str(tmp_path / "tmp")) as path:
        args = dependency_utils.make_beam_dependency_flags(["--direct_num_workers=1"])
        package = args[-1].split("=", 1)[1]
        assert package.startswith(path + os.sep) and os.path.isfile(package)
    assert not os.path.exists(package)

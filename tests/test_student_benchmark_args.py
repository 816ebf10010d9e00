"""The Home Depot benchmark's command line: which models `--race-only` races, and the refusals."""
import pytest

from benchmarks import student_homedepot as sh


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "train_dev.csv"
    path.write_text("id,product_uid,product_title,search_term,relevance\n", encoding="latin-1")
    return str(path)


def _args(data_file, *extra):
    return sh.parse_args(["--input", data_file, *extra])


def _error(capsys, data_file, *extra):
    with pytest.raises(SystemExit) as exit_info:
        _args(data_file, *extra)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_race_only_takes_a_pushed_berm_o_and_any_teacher(data_file, tmp_path):
    berm, teacher = tmp_path / "serving" / "relkd" / "1796395876", tmp_path / "teacher"
    berm.mkdir(parents=True)
    teacher.mkdir()
    args = _args(data_file, "--race-only", "--work-dir", str(tmp_path / "work"),
                 "--berm-model", str(berm), "--teacher-model", str(teacher))
    assert (args.race_only, args.berm_model, args.teacher_model) == (True, str(berm), str(teacher))
    # Without --berm-model the race takes the work dir's student of --berm-order.
    assert _args(data_file, "--race-only", "--work-dir", str(tmp_path)).berm_model is None


def test_berm_model_is_refused_outside_the_race_or_when_missing(capsys, data_file, tmp_path):
    assert "--berm-model is for --race-only" in _error(
        capsys, data_file, "--berm-model", str(tmp_path))
    assert "--berm-model: no such folder" in _error(
        capsys, data_file, "--race-only", "--work-dir", str(tmp_path),
        "--berm-model", str(tmp_path / "nope"))
    assert "--race-only needs the --work-dir" in _error(capsys, data_file, "--race-only")

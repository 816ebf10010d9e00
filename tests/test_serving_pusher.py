"""The Pusher's executor (components/serving_pusher.py): what the newest version holds is not pushed again."""
import os
import time

from tfx.proto import pusher_pb2
from tfx.types import standard_artifacts
from tfx.utils import proto_utils

from components import serving_pusher


def write_model(directory, weights: bytes):
    """A model artifact's directory in the Trainer's layout; only the bytes matter here."""
    serving = os.path.join(directory, "Format-Serving")
    os.makedirs(os.path.join(serving, "variables"))
    with open(os.path.join(serving, "saved_model.pb"), "wb") as f:
        f.write(b"graph")
    with open(os.path.join(serving, "variables", "variables.data-00000-of-00001"), "wb") as f:
        f.write(weights)
    return directory


def push(tmp_path, model_dir, blessed=True):
    model = standard_artifacts.Model()
    model.uri = model_dir
    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(tmp_path / "blessing")
    blessing.set_int_custom_property("blessed", int(blessed))
    pushed = standard_artifacts.PushedModel()
    pushed.uri = str(tmp_path / "pushed" / str(time.monotonic_ns()))
    destination = pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=str(tmp_path / "serving")))
    serving_pusher.Executor().Do(
        {"model": [model], "model_blessing": [blessing]}, {"pushed_model": [pushed]},
        {"push_destination": proto_utils.proto_to_json(destination)})
    return {"pushed": pushed.get_int_custom_property("pushed"),
            "version": pushed.get_string_custom_property("pushed_version"),
            "destination": pushed.get_string_custom_property("pushed_destination"),
            "already_served": pushed.get_int_custom_property(serving_pusher.ALREADY_SERVED_KEY)}


def versions(tmp_path):
    return sorted(os.listdir(tmp_path / "serving"), key=int)


def test_the_newest_versions_model_is_not_pushed_again_and_others_are(tmp_path):
    a = write_model(str(tmp_path / "a"), b"weights of a")
    b = write_model(str(tmp_path / "b"), b"weights of b")  # the same files and sizes, other bytes

    first = push(tmp_path, a)
    [v1] = versions(tmp_path)
    assert first == {"pushed": 1, "version": v1, "destination": str(tmp_path / "serving" / v1),
                     "already_served": 0}

    # The same model blessed again (a --resume that changed nothing): recorded, not copied.
    again = push(tmp_path, a)
    assert again == {**first, "already_served": 1}
    assert versions(tmp_path) == [v1]

    time.sleep(1.1)  # TFX's versions are Unix seconds
    other = push(tmp_path, b)
    assert other["pushed"] == 1 and not other["already_served"]
    [_, v2] = versions(tmp_path)
    assert other["version"] == v2
    with open(tmp_path / "serving" / v2 / "variables" / "variables.data-00000-of-00001", "rb") as f:
        assert f.read() == b"weights of b"

    # A model that only an older version holds is pushed: that is a roll-back to it.
    time.sleep(1.1)
    back = push(tmp_path, a)
    assert back["pushed"] == 1 and not back["already_served"]
    assert versions(tmp_path)[-1] == back["version"] and len(versions(tmp_path)) == 3


def test_a_model_not_blessed_is_not_pushed(tmp_path):
    a = write_model(str(tmp_path / "a"), b"weights of a")
    push(tmp_path, a)
    assert push(tmp_path, a, blessed=False)["pushed"] == 0
    assert len(versions(tmp_path)) == 1


def test_same_model_compares_every_file_and_its_bytes(tmp_path):
    a = os.path.join(write_model(str(tmp_path / "a"), b"1234"), "Format-Serving")
    b = os.path.join(write_model(str(tmp_path / "b"), b"1234"), "Format-Serving")
    assert serving_pusher.same_model(a, b)
    with open(os.path.join(b, "variables", "variables.data-00000-of-00001"), "wb") as f:
        f.write(b"1235")
    assert not serving_pusher.same_model(a, b)
    c = os.path.join(write_model(str(tmp_path / "c"), b"1234"), "Format-Serving")
    with open(os.path.join(c, "extra"), "wb") as f:
        f.write(b"")
    assert not serving_pusher.same_model(a, c)
    assert serving_pusher.newest_version(str(tmp_path / "nowhere")) is None

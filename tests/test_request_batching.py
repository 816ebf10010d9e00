"""RequestBatcher (`relkd serve --batching`): who gets merged, who gets which rows, and failures."""
import threading

import numpy as np
import pytest

from pipeline.request_batching import RequestBatcher


class Recorder:
    """A model that doubles `x` and remembers the row counts of its calls."""

    def __init__(self, fail_on=None, scalar=False):
        self.calls, self.fail_on, self.scalar = [], fail_on, scalar

    def __call__(self, inputs):
        self.calls.append(len(inputs["x"]))
        if self.fail_on is not None and self.fail_on in inputs["x"]:
            raise RuntimeError(f"cannot score {self.fail_on}")
        out = {"y": inputs["x"] * 2}
        if self.scalar:
            out["count"] = np.array(len(inputs["x"]))
        return out


def submit_together(batcher, requests):
    """Submits (key, model, inputs) requests from one thread each; returns results or errors."""
    results = [None] * len(requests)

    def run(i, key, model, inputs):
        try:
            results[i] = batcher.submit(key, model, inputs)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,) + r) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.fixture
def batcher():
    running = RequestBatcher(max_batch_size=10, timeout_seconds=0.5)
    yield running
    running.stop()


def test_concurrent_requests_of_one_key_share_a_call_and_get_their_own_rows(batcher):
    model = Recorder()
    inputs = [{"x": np.arange(3) + 10 * i} for i in range(3)]
    results = submit_together(batcher, [("k", model, x) for x in inputs])
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result["y"], x["x"] * 2)
    assert model.calls == [9] and batcher.model_calls == 1 and batcher.requests == 3


def test_keys_never_mix_and_the_row_limit_holds(batcher):
    model = Recorder()
    results = submit_together(batcher, [("a", model, {"x": np.arange(4)}), ("b", model, {"x": np.arange(4)}),
                                        ("a", model, {"x": np.arange(4)}), ("a", model, {"x": np.arange(4)}),
                                        ("b", model, {"x": np.arange(12)})])
    assert all(np.array_equal(r["y"], 2 * np.arange(len(r["y"]))) for r in results)
    # Two of the three 4-row requests for "a" fit under 10 rows, the third runs next; "b"'s 4 rows
    # and 12 rows do not fit together, and 12 rows run alone.
    assert sorted(model.calls) == [4, 4, 8, 12]


def test_a_failing_call_fails_its_requests_and_the_batcher_goes_on(batcher):
    model = Recorder(fail_on=99)
    results = submit_together(batcher, [("k", model, {"x": np.array([1, 2])}),
                                        ("k", model, {"x": np.array([99])})])
    assert all(isinstance(r, RuntimeError) and "cannot score 99" in str(r) for r in results)
    assert batcher.submit("k", model, {"x": np.array([5])})["y"].tolist() == [10]


def test_outputs_without_a_row_per_input_row_are_answered_one_request_at_a_time(batcher):
    model = Recorder(scalar=True)
    results = submit_together(batcher, [("k", model, {"x": np.arange(2)}), ("k", model, {"x": np.arange(3)})])
    assert sorted(int(r["count"]) for r in results) == [2, 3]
    assert sorted(model.calls) == [2, 3, 5]  # the merged call, then each alone


def test_without_a_timeout_an_idle_batcher_runs_a_request_at_once():
    quick = RequestBatcher(max_batch_size=10, timeout_seconds=0.0)
    try:
        model = Recorder()
        assert quick.submit("k", model, {"x": np.arange(2)})["y"].tolist() == [0, 2]
        assert model.calls == [2]
    finally:
        quick.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        quick.submit("k", model, {"x": np.arange(2)})


def test_settings_and_inputs_are_checked():
    with pytest.raises(ValueError):
        RequestBatcher(max_batch_size=0)
    with pytest.raises(ValueError):
        RequestBatcher(timeout_seconds=-1)
    running = RequestBatcher()
    try:
        with pytest.raises(ValueError, match="one batch size"):
            running.submit("k", Recorder(), {"x": np.arange(2), "z": np.arange(3)})
    finally:
        running.stop()


def test_requests_whose_inputs_cannot_be_merged_fail_instead_of_hanging(batcher):
    model = Recorder()
    results = submit_together(batcher, [("k", model, {"x": np.arange(2)}),
                                        ("k", model, {"x": np.arange(4).reshape(2, 2)})])
    assert all(isinstance(r, ValueError) for r in results)  # 1-D and 2-D rows do not concatenate
    assert batcher.submit("k", model, {"x": np.arange(1)})["y"].tolist() == [0]

"""`relkd serve`, the gRPC client and the batch scorer, driven through TF Serving's own API stubs.

The server runs on a real loopback socket and is only ever reached through
`tensorflow_serving.apis` stubs (or the client built on them); the model is a real BERM-O export
of a tiny student (trainer/student.py, trainer/berm_serving.py; conftest's `tiny_berm_o`).
"""
import csv
import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)

from pipeline import batch_scorer, model_server, scoring_client

MODEL = "relkd"
QUERIES = ["cordless drill", "garden hose", "red paint", "a query nobody typed"]
ITEMS = [("P1", "DEWALT 20V cordless drill kit"), ("P2", "50 ft garden hose"),
         ("P3", "Behr red exterior paint 1 gal"), ("P4", "Some Title 3ml")]


def _string(values):
    return tf.make_tensor_proto(np.array([v.encode() for v in values], dtype=object), dtype=tf.string)


def own_scores(path, queries, item_ids, titles):
    model = tf.saved_model.load(path)
    return model.signatures["serve_raw"](query=tf.constant(queries), item_id=tf.constant(item_ids),
                                         item_title=tf.constant(titles))["score"].numpy()


@pytest.fixture
def server(tmp_path, tiny_berm_o):
    base = tmp_path / "serving" / MODEL
    shutil.copytree(tiny_berm_o, base / "1")
    running = model_server.ModelServer(str(base), port=0, poll_seconds=0.2).start()
    yield running, base
    running.stop()


def stubs(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel))


def raw_request(queries, item_ids, titles, name=MODEL, version=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serve_raw"
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["query"].CopyFrom(_string(queries))
    request.inputs["item_id"].CopyFrom(_string(item_ids))
    request.inputs["item_title"].CopyFrom(_string(titles))
    return request


def test_predictions_equal_the_saved_models_own_outputs(server, tiny_berm_o):
    running, _ = server
    predict, models = stubs(running.port)
    ids, titles = [i for i, _ in ITEMS], [t for _, t in ITEMS]
    response = predict.Predict(raw_request(QUERIES, ids, titles), timeout=30)
    assert response.model_spec.version.value == 1 and response.model_spec.signature_name == "serve_raw"
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["score"]),
                               own_scores(tiny_berm_o, QUERIES, ids, titles), rtol=0, atol=1e-6)

    metadata = predict.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": MODEL}, metadata_field=["signature_def"]), timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    assert sorted(signatures.signature_def["serve_raw"].inputs) == ["item_id", "item_title", "query"]
    assert "serving_default" in signatures.signature_def

    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": MODEL}), timeout=30)
    [version] = status.model_version_status
    assert version.version == 1 and version.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_with_batching_concurrent_requests_share_calls_and_each_gets_its_own_scores(tmp_path,
                                                                                   tiny_berm_o):
    base = tmp_path / "serving" / MODEL
    shutil.copytree(tiny_berm_o, base / "1")
    # A long wait for company, so that the four requests surely meet in the queue.
    running = model_server.ModelServer(str(base), port=0, batching=True, max_batch_size=100,
                                       batch_timeout_seconds=0.5).start()
    try:
        predict, _ = stubs(running.port)
        ids, titles = [i for i, _ in ITEMS], [t for _, t in ITEMS]
        requests = [([query] * (k + 1), ids[:k + 1], titles[:k + 1]) for k, query in enumerate(QUERIES)]
        answers = [None] * len(requests)

        def send(k):
            answers[k] = tf.make_ndarray(predict.Predict(raw_request(*requests[k]), timeout=60)
                                         .outputs["score"])

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for request, answer in zip(requests, answers):
            assert answer is not None and answer.shape == (len(request[0]),)
            np.testing.assert_allclose(answer, own_scores(tiny_berm_o, *request), rtol=0, atol=1e-6)
        assert running.batcher.requests == 4 and running.batcher.model_calls < 4
        # A bad request is refused before it reaches the batcher, which carries on.
        with pytest.raises(grpc.RpcError) as refused:
            predict.Predict(raw_request(["q", "q2"], ["i"], ["t"]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert predict.Predict(raw_request(["q"], ["i"], ["t"]), timeout=30).outputs["score"].float_val
    finally:
        running.stop()


def _bad_requests():
    missing = raw_request(["q"], ["i"], ["t"])
    del missing.inputs["item_id"]
    wrong_dtype = raw_request(["q"], ["i"], ["t"])
    wrong_dtype.inputs["query"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    empty = raw_request([], [], [])
    huge = raw_request(["x" * (10 * 1024 * 1024)], ["i"], ["t"])
    ragged = raw_request(["q", "q2"], ["i"], ["t"])
    return [
        ("missing input", missing, grpc.StatusCode.INVALID_ARGUMENT, "missing ['item_id']"),
        ("wrong dtype", wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "must be string"),
        ("empty batch", empty, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
        ("10 MB string", huge, grpc.StatusCode.INVALID_ARGUMENT, "the limit is 65536"),
        ("batch sizes differ", ragged, grpc.StatusCode.INVALID_ARGUMENT, "different batch sizes"),
        ("unknown model", raw_request(["q"], ["i"], ["t"], name="nope"), grpc.StatusCode.NOT_FOUND,
         "'nope' is not served here"),
        ("unknown version", raw_request(["q"], ["i"], ["t"], version=7), grpc.StatusCode.NOT_FOUND,
         "no version 7"),
    ]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server):
    running, _ = server
    predict, models = stubs(running.port)
    for label, request, code, message in _bad_requests():
        with pytest.raises(grpc.RpcError) as caught:
            predict.Predict(request, timeout=30)
        assert caught.value.code() == code, label
        assert message in caught.value.details(), (label, caught.value.details())
        # ... and a good request right after still works.
        ok = predict.Predict(raw_request(["q"], ["i"], ["t"]), timeout=30)
        assert tf.make_ndarray(ok.outputs["score"]).shape == (1,)
    with pytest.raises(grpc.RpcError) as caught:
        models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"}))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_new_version_is_picked_up_while_clients_run_without_a_failed_request(server, tiny_berm_o):
    running, base = server
    predict, models = stubs(running.port)
    failures, versions, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                response = predict.Predict(raw_request(QUERIES, ["P1"] * 4, ["drill"] * 4), timeout=30)
                versions.append(response.model_spec.version.value)
            except grpc.RpcError as e:
                failures.append(e.details())

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    shutil.copytree(tiny_berm_o, base / "2")  # what the Pusher does: copy into a new numbered folder
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and 2 not in versions[-8:]:
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert versions[0] == 1 and versions[-1] == 2, versions[-10:]
    # Both versions stay loaded (max_versions=2): a request may still name the old one.
    old = predict.Predict(raw_request(["q"], ["i"], ["t"], version=1), timeout=30)
    assert old.model_spec.version.value == 1
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}))
    assert [v.version for v in status.model_version_status] == [1, 2]


def test_client_ranks_items_and_explains_errors(server):
    running, _ = server
    with scoring_client.ScoringClient(f"127.0.0.1:{running.port}", MODEL) as client:
        ranked = client.rank("cordless drill", ITEMS)
        scores = client.score(["cordless drill"] * 4, [i for i, _ in ITEMS], [t for _, t in ITEMS])
    assert [r.rank for r in ranked] == [1, 2, 3, 4]
    assert [r.score for r in ranked] == sorted(scores.tolist(), reverse=True)
    assert {r.item_id for r in ranked} == {i for i, _ in ITEMS}

    # A list longer than one request may hold goes as several, the later ones naming the version
    # that answered the first (the server's newest when the client names none).
    with scoring_client.ScoringClient(f"127.0.0.1:{running.port}", MODEL, max_pairs_per_request=3) as client:
        sent, call = [], client._call
        client._call = lambda method, request: (sent.append(request), call(method, request))[1]
        split = client.score(["cordless drill"] * 4, [i for i, _ in ITEMS], [t for _, t in ITEMS])
    np.testing.assert_allclose(split, scores, atol=1e-6)
    predicts = [r for r in sent if r.DESCRIPTOR.name == "PredictRequest"]
    assert [len(r.inputs["query"].string_val) for r in predicts] == [3, 1]
    assert not predicts[0].model_spec.HasField("version") and predicts[1].model_spec.version.value == 1

    with scoring_client.ScoringClient(f"127.0.0.1:{running.port}", "nope") as client:
        with pytest.raises(scoring_client.ScoringError, match="does not have that model"):
            client.rank("q", ITEMS)
    with scoring_client.ScoringClient(f"127.0.0.1:{running.port}", MODEL, version=9) as client:
        with pytest.raises(scoring_client.ScoringError, match="no version 9"):
            client.rank("q", ITEMS)
    with socket_nobody_listens_on() as port:
        with scoring_client.ScoringClient(f"127.0.0.1:{port}", MODEL, timeout=2, retries=1,
                                          backoff=0.05) as client:
            with pytest.raises(scoring_client.ScoringError, match="cannot reach a model server"):
                client.rank("q", ITEMS)


class socket_nobody_listens_on:
    def __enter__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_batch_scorer_streams_a_file_and_matches_the_model(tmp_path, tiny_berm_o):
    base = tmp_path / "serving" / MODEL
    shutil.copytree(tiny_berm_o, base / "3")
    rows = [(f"r{k}", QUERIES[k % 4], ITEMS[k % 4][0], ITEMS[(k * 3) % 4][1]) for k in range(2500)]
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_title", "id", "query", "item_id", "extra"])  # any column order
        for r in rows:
            writer.writerow([r[3], r[0], r[1], r[2], "ignored"])
    expected = own_scores(tiny_berm_o, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    # One call at a time, and several in flight (more batches than calls, so the output's order
    # is the input's only if the writer keeps it).
    for workers, batch_size in ((1, 1000), (3, 170)):
        out = tmp_path / "scores" / f"workers_{workers}.csv"  # a folder that does not exist yet
        messages = []
        result = batch_scorer.score_file(str(base.parent / MODEL), str(pairs), str(out),
                                         batch_size=batch_size, echo=messages.append,
                                         progress_seconds=0, workers=workers)
        assert result["rows"] == 2500 and result["model"].endswith(os.path.join(MODEL, "3"))
        assert result["empty_query"] == result["empty_item_title"] == 0
        assert not any(m.startswith("Warning") for m in messages)
        assert result["workers"] == workers and f"{workers} call(s) at a time" in messages[0]
        with open(out) as f:
            scored = list(csv.DictReader(f))
        assert [r["id"] for r in scored] == [r[0] for r in rows]
        np.testing.assert_allclose([float(r["score"]) for r in scored], expected, atol=1e-6)
        assert any("pairs scored" in m for m in messages) and "2,500 pairs" in messages[-1]
    with pytest.raises(batch_scorer.ScoringInputError, match="--workers must be at least 1"):
        batch_scorer.score_file(str(base), str(pairs), str(tmp_path / "never.csv"), workers=0)

    # The command, in a fresh process, so the threads per op can still be set.
    out = tmp_path / "scores_cli.csv"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "score", "--model-dir", str(base),
                             "--input", str(pairs), "--output", str(out), "--batch-size", "400",
                             "--workers", "2", "--intra-op-threads", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "2 call(s) at a time, threads per op: 1" in result.stdout
    with open(out) as f:
        np.testing.assert_allclose([float(r["score"]) for r in csv.DictReader(f)], expected, atol=1e-6)

    # Rows with no words on one side are scored (every id keeps its row) and counted aloud.
    blanks = tmp_path / "blanks.csv"
    blanks.write_text("id,query,item_id,item_title\na,,i1,drill\nb,drill, i2,\nc, ,i3,\nd,drill,i4,drill\n")
    messages = []
    result = batch_scorer.score_file(str(base), str(blanks), str(tmp_path / "blanks_scored.csv"),
                                     echo=messages.append)
    assert (result["rows"], result["empty_query"], result["empty_item_title"]) == (4, 2, 2)
    assert messages[-1] == ("Warning: 2 pair(s) with an empty item_title and 2 pair(s) with an "
                            "empty query, scored without any words on that side: check the input")

    bad = tmp_path / "bad.csv"
    bad.write_text("id,query,title\n1,q,t\n")
    with pytest.raises(batch_scorer.ScoringInputError, match="column\\(s\\) item_id, item_title missing"):
        batch_scorer.score_file(str(base), str(bad), str(tmp_path / "never.csv"))
    assert not os.path.exists(tmp_path / "never.csv") and not os.path.exists(tmp_path / "never.csv.partial")
    # A folder where the scores should go, or the pairs should come from, is refused before the
    # model loads, not after every pair was scored.
    with pytest.raises(batch_scorer.ScoringInputError, match="is a folder; give the path of a file"):
        batch_scorer.score_file(str(base), str(pairs), str(tmp_path / "scores"))
    with pytest.raises(batch_scorer.ScoringInputError, match="is a folder; give the CSV file of pairs"):
        batch_scorer.score_file(str(base), str(tmp_path), str(tmp_path / "never.csv"))
    assert not os.path.exists(tmp_path / "scores.partial")


def test_cli_score_online_against_relkd_serve(tmp_path, tiny_berm_o):
    base = tmp_path / "serving" / MODEL
    shutil.copytree(tiny_berm_o, base / "1")
    items = tmp_path / "items.csv"
    with open(items, "w", newline="", encoding="utf-8-sig") as f:  # with a BOM, as spreadsheets save
        writer = csv.writer(f)
        writer.writerow(["item_id", "item_title"])
        writer.writerows(ITEMS)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model-base", str(base),
                               "--port", "0", "--batching", "--max-batch-size", "500",
                               "--batch-timeout-ms", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        port, threads, batching = None, None, None
        for line in server.stdout:
            if "on 127.0.0.1:" in line:
                port = int(line.split("on 127.0.0.1:")[1].split()[0])
            if line.startswith("TensorFlow threads:"):
                threads = line
            if line.startswith("Batching:"):
                batching = line
                break
        assert port, "relkd serve did not report its address"
        assert "up to 500 rows per call, waiting up to 1 ms" in batching
        # One thread per op by default (BERM-O's ops are small; see --intra-op-threads).
        assert threads.startswith("TensorFlow threads: 1 per op (intra-op), TensorFlow's choice for")
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "score", "--target",
                                 f"127.0.0.1:{port}", "--model", MODEL, "--query", "cordless drill",
                                 "--items", str(items)], capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert lines[0].split() == ["rank", "score", "item_id", "item_title"]
        scores = [float(line.split()[1]) for line in lines[1:]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)

        missing = subprocess.run([sys.executable, "-m", "pipeline.cli", "score", "--target",
                                  f"127.0.0.1:{port}", "--model", "other", "--query", "q", "--items",
                                  str(items)], capture_output=True, text=True, timeout=300, env=env)
        assert missing.returncode == 1 and "does not have that model" in missing.stderr
        assert "Traceback" not in missing.stderr

        # SIGTERM (what Kubernetes sends) stops it cleanly, with the batcher's totals.
        server.terminate()
        farewell = server.communicate(timeout=60)[0]
        assert server.returncode == 0, farewell
        assert "Batching: 1 request in 1 model call (1.00 per call)" in farewell
        assert farewell.rstrip().endswith("Stopped.")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


def test_relkd_serve_refuses_batching_and_thread_settings_it_cannot_use(tmp_path, capsys):
    from pipeline import cli

    for flags, message in ((["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
                           (["--batch-timeout-ms", "-1"], "--batch-timeout-ms >= 0"),
                           (["--intra-op-threads", "-1"], "must be >= 0 (0: TensorFlow's choice)"),
                           (["--inter-op-threads", "-2"], "must be >= 0 (0: TensorFlow's choice)")):
        assert cli.main(["serve", "--model-base", str(tmp_path), "--batching"] + flags) == 2
        assert message in capsys.readouterr().err


def test_a_second_server_on_a_port_in_use_is_refused_rather_than_sharing_its_requests(server, capsys):
    # With gRPC's default SO_REUSEPORT both would listen, and the old one would keep answering
    # a share of the new one's clients.
    from pipeline import cli

    running, base = server
    with pytest.raises(OSError, match="the port is in use"):
        model_server.ModelServer(str(base), port=running.port)
    # (Threads left to TensorFlow: this process has run ops, so they can no longer be set.)
    assert cli.main(["serve", "--model-base", str(base), "--port", str(running.port),
                     "--intra-op-threads", "0"]) == 2
    assert f"cannot listen on 127.0.0.1:{running.port}: the port is in use" in capsys.readouterr().err
    prediction, _ = stubs(running.port)
    assert prediction.Predict(raw_request(["q"], ["i"], ["t"]), timeout=30).outputs["score"].float_val


# --- Production serving manifests (kubeflow/serving/) ----------------------------------------

SERVING_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kubeflow", "serving")


def test_tf_serving_manifests_are_valid_and_consistent():
    import yaml
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(SERVING_DIR, "models.config")) as f:
        models_config = f.read()
    config = text_format.Parse(models_config, model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert model.name == MODEL and model.model_platform == "tensorflow"
    assert model.base_path.endswith("/relkd/serving/relkd")  # kubeflow.serving_base + model name
    assert model.model_version_policy.latest.num_versions == 2

    with open(os.path.join(SERVING_DIR, "deployment.yaml")) as f:
        config_map, deployment = list(yaml.safe_load_all(f))
    with open(os.path.join(SERVING_DIR, "service.yaml")) as f:
        service = yaml.safe_load(f)
    with open(os.path.join(SERVING_DIR, "batching_parameters.txt")) as f:
        batching = f.read()
    strip = lambda text: [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]  # noqa: E731
    # The ConfigMap carries the same settings as the files next to it.
    assert strip(config_map["data"]["models.config"]) == strip(models_config)
    assert strip(config_map["data"]["batching_parameters.txt"]) == strip(batching)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"tensorflow/serving:{tf.__version__}"
    assert "--model_config_file=/config/models.config" in container["args"]
    assert "--enable_batching=true" in container["args"]
    # One thread per op, as `relkd serve` defaults to.
    from pipeline import cli

    serve_default = cli.build_parser().parse_args(["serve", "--model-base", "."]).intra_op_threads
    assert serve_default == 1
    assert f"--tensorflow_intra_op_parallelism={serve_default}" in container["args"]
    # The pool of independent ops fits the pod: TensorFlow would count the node's cores.
    cpu_limit = int(container["resources"]["limits"]["cpu"])
    assert f"--tensorflow_inter_op_parallelism={cpu_limit}" in container["args"]
    assert {p["containerPort"] for p in container["ports"]} == {8500, 8501}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {8500, 8501}


def test_relkd_score_says_which_flag_is_empty_rather_than_missing(tmp_path, capsys):
    # `--query "$Q"` with Q unset used to read as a forgotten --query.
    from pipeline import cli

    online = ["score", "--target", "localhost:8500", "--model", "relkd", "--items", str(tmp_path / "i.csv")]
    assert cli.main(online + ["--query", ""]) == 2
    assert "--query is empty: give the search text" in capsys.readouterr().err
    assert cli.main(["score", "--model-dir", " ", "--input", "p.csv", "--output", "s.csv"]) == 2
    assert "--model-dir is empty" in capsys.readouterr().err
    assert cli.main(["score", "--target", "localhost:8500", "--model", "relkd", "--query", "drill"]) == 2
    assert "online scoring needs --target, --model, --query and --items" in capsys.readouterr().err


def test_relkd_score_ranks_a_doubtful_items_file_with_a_warning_and_refuses_a_broken_one(
        server, tmp_path, capsys):
    from pipeline import cli

    running, _ = server
    online = ["score", "--target", f"127.0.0.1:{running.port}", "--model", MODEL, "--query", "drill"]
    items = tmp_path / "items.csv"
    items.write_text("item_id,item_title\nP1,cordless drill\nP1,cordless drill\nP2,\nP3,garden hose\n")
    assert cli.main(online + ["--items", str(items)]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 5  # the header and every row, as given
    assert err.strip() == ("Warning: 1 item(s) with an empty item_title, scored without any words on "
                           "that side; item_id listed more than once: P1 (2 times): check the items file")

    items.write_text("item_id,item_title\nP1,cordless drill\nP4\n")  # used to be a traceback
    assert cli.main(online + ["--items", str(items)]) == 2
    assert f"{items}, line 3: no item_id or item_title in this row" in capsys.readouterr().err

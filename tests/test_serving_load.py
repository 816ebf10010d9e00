"""benchmarks/serving_load.py: the server flags it passes on and the batcher totals it reads back."""
from benchmarks import serving_load
from pipeline import cli


def test_batching_flags_reach_the_server_and_its_totals_come_back():
    args = serving_load.parse_args(["--model-base", ".", "--batching", "--max-batch-size", "500",
                                    "--batch-timeout-ms", "2"])
    assert serving_load.server_flags(args) == ["--batching", "--max-batch-size", "500",
                                               "--batch-timeout-ms", "2"]
    assert serving_load.server_flags(serving_load.parse_args(["--model-base", "."])) == []
    farewell = "...\nBatching: 743 requests in 189 model calls (3.93 per call)\nStopped.\n"
    assert serving_load.server_batching(farewell) == {"requests": 743, "model_calls": 189}
    assert serving_load.server_batching("Batching: 1 request in 1 model call") == {
        "requests": 1, "model_calls": 1}
    assert serving_load.server_batching("Stopped.\n") is None


def test_thread_flags_reach_the_server_as_relkd_serve_reads_them():
    args = serving_load.parse_args(["--model-base", ".", "--intra-op-threads", "0",
                                    "--inter-op-threads", "2"])
    flags = serving_load.server_flags(args)
    assert flags == ["--intra-op-threads=0", "--inter-op-threads=2"]
    serve_args = cli.build_parser().parse_args(["serve", "--model-base", "."] + flags)
    assert (serve_args.intra_op_threads, serve_args.inter_op_threads) == (0, 2)

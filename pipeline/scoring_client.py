"""Scoring a query against items through TF Serving's gRPC PredictionService (or `relkd serve`).

    client = ScoringClient("localhost:8500", model="relkd")
    ranked = client.rank("cordless drill", [("P1", "DEWALT 20V drill"), ("P2", "Garden hose")])

The client asks the server for the model's signatures once (GetModelMetadata), so a model
without the raw-string signature is refused with a clear message before any scoring. Each call
has a deadline; UNAVAILABLE (server restarting, connection refused) is retried with backoff; the
gRPC errors a person meets get sentences that say what to do.
"""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Sequence, Tuple

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

RAW_SIGNATURE = "serve_raw"
RAW_INPUTS = ("query", "item_id", "item_title")
SCORE = "score"


class ScoringError(RuntimeError):
    """A scoring request failed; the message says why and what to check."""


@dataclasses.dataclass(frozen=True)
class Scored:
    rank: int
    score: float
    item_id: str
    item_title: str


def _explain(error: grpc.RpcError, target: str, model: str) -> str:
    code, detail = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"cannot reach a model server at {target}: {detail or 'unavailable'}. Is it running "
                "(`relkd serve --model-base DIR` or the TF Serving deployment), and is the address right?")
    if code == grpc.StatusCode.NOT_FOUND:
        return f"the server at {target} does not have that model or version: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"the server refused the request for model {model!r}: {detail}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {target} within the deadline; raise --timeout or check the server's load"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"the request is too large for {target}: {detail}; send fewer items per request"
    return f"{code.name} from {target}: {detail}"


def _string_tensor(values: Sequence[str]):
    import tensorflow as tf

    return tf.make_tensor_proto(np.array([v.encode("utf-8") for v in values], dtype=object), dtype=tf.string)


class ScoringClient:
    """One model on one server. Thread-safe (a gRPC channel is)."""

    def __init__(self, target: str, model: str, version: Optional[int] = None,
                 signature: str = RAW_SIGNATURE, timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.2, max_message_bytes: int = 32 * 1024 * 1024,
                 max_pairs_per_request: int = 1000):
        if max_pairs_per_request < 1:
            raise ValueError("max_pairs_per_request must be at least 1")
        self.target, self.model, self.version = target, model, version
        self.max_pairs_per_request = max_pairs_per_request
        self.signature, self.timeout, self.retries, self.backoff = signature, timeout, retries, backoff
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._checked = False

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ScoringClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spec(self, message, version: Optional[int] = None) -> None:
        """Names the model and `version`, else the client's (None: the server's newest)."""
        message.model_spec.name = self.model
        version = self.version if version is None else version
        if version is not None:
            message.model_spec.version.value = int(version)

    def _call(self, method, request):
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
                    attempt += 1
                    continue
                raise ScoringError(_explain(e, self.target, self.model)) from e

    def signatures(self) -> dict:
        """{signature name: [input names]} as the server reports them (GetModelMetadata)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request)
        response = self._call(self._stub.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {name: sorted(s.inputs) for name, s in signature_map.signature_def.items()}

    def _check_signature(self) -> None:
        if self._checked:
            return
        signatures = self.signatures()
        if self.signature not in signatures:
            raise ScoringError(f"model {self.model!r} at {self.target} has no signature "
                               f"{self.signature!r} (it has {sorted(signatures)}); is it a BERM-O export?")
        if sorted(signatures[self.signature]) != sorted(RAW_INPUTS):
            raise ScoringError(f"signature {self.signature!r} takes {signatures[self.signature]}, "
                               f"expected {list(RAW_INPUTS)}")
        self._checked = True

    def score(self, queries: Sequence[str], item_ids: Sequence[str], titles: Sequence[str]) -> np.ndarray:
        """Scores aligned (query, item id, title) triples; float32 [N].

        More than `max_pairs_per_request` pairs go as several requests: TF Serving's batching
        refuses a request larger than its max_batch_size (2,000 in kubeflow/serving/) and
        `relkd serve` one over 10,000 pairs. The later requests name the version that answered
        the first, so a version pushed meanwhile cannot mix two models' scores in one answer.
        """
        if not (len(queries) == len(item_ids) == len(titles)):
            raise ValueError("queries, item_ids and titles must have the same length")
        if not queries:
            return np.zeros([0], np.float32)
        self._check_signature()
        import tensorflow as tf

        parts, version = [], self.version
        for start in range(0, len(queries), self.max_pairs_per_request):
            end = start + self.max_pairs_per_request
            request = predict_pb2.PredictRequest()
            self._spec(request, version)
            request.model_spec.signature_name = self.signature
            for name, values in zip(RAW_INPUTS, (queries, item_ids, titles)):
                request.inputs[name].CopyFrom(_string_tensor(values[start:end]))
            request.output_filter.append(SCORE)
            response = self._call(self._stub.Predict, request)
            if version is None and response.model_spec.HasField("version"):
                version = response.model_spec.version.value
            parts.append(tf.make_ndarray(response.outputs[SCORE]).reshape(-1))
        return np.concatenate(parts)

    def rank(self, query: str, items: Sequence[Tuple[str, str]]) -> List[Scored]:
        """One query against (item id, title) pairs, best first (ties keep the input order)."""
        scores = self.score([query] * len(items), [i for i, _ in items], [t for _, t in items])
        order = sorted(range(len(items)), key=lambda k: -float(scores[k]))
        return [Scored(rank + 1, float(scores[k]), items[k][0], items[k][1]) for rank, k in enumerate(order)]

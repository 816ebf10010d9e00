"""`relkd serve`: TF Serving's gRPC API over a pushed model base directory, for machines without TF Serving.

Production runs the real tensorflow/serving container (kubeflow/serving/). This server speaks the
same protocol from `tensorflow_serving.apis` (PredictionService.Predict and GetModelMetadata,
ModelService.GetModelStatus), so clients, tests and benchmarks are written once:

  * The base directory holds numbered version folders (`<base>/<version>/saved_model.pb`), as
    the Pusher writes them. New versions are found by polling and loaded before they are
    served; the newest loaded version answers requests that name none; a request may name any
    loaded version. The newest `max_versions` stay loaded.
  * Requests are checked before the model sees them: model name and version, signature, input
    names, dtypes, shapes (one batch axis, the same length for every input, not empty) and the
    size of each string. A bad request gets INVALID_ARGUMENT or NOT_FOUND with a message, and
    the server carries on.
  * It never loads a path a request names: only the version folders of its own base directory.
  * It binds 127.0.0.1 unless told otherwise, and caps the size of a message.
  * With `batching`, concurrent requests for one version and signature are scored in one call
    (`request_batching.RequestBatcher`, like TF Serving's `--enable_batching`).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import threading
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, status_pb2)

from pipeline import request_batching
from pipeline.tf_threads import set_threads, threads_label

log = logging.getLogger("relkd.serve")

DEFAULT_PORT = 8500
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_STRING_BYTES = 64 * 1024  # one query or title; real ones are under 1 KB
MAX_BATCH = 10_000


class _Version:
    def __init__(self, number: int, path: str):
        self.number = number
        self.path = path
        self.model = tf.saved_model.load(path)
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            self.signature_defs = saved_model_pb2.SavedModel.FromString(f.read()).meta_graphs[0].signature_def
        self.signatures = dict(self.model.signatures)


class ModelVersions:
    """The loaded versions of one model, kept in step with its base directory by a poller."""

    def __init__(self, name: str, base: str, poll_seconds: float = 1.0, max_versions: int = 2):
        import tensorflow_text  # noqa: F401  (BERM-O tokenises in-graph with TF Text's ops)

        self.name = name
        self.base = os.path.abspath(base)
        self.poll_seconds = poll_seconds
        self.max_versions = max_versions
        self._versions: Dict[int, _Version] = {}
        self._failed: Dict[int, str] = {}
        self._seen: Dict[int, Tuple[int, int]] = {}  # version -> (files, bytes) at the last poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _on_disk(self) -> List[int]:
        if not os.path.isdir(self.base):
            return []
        numbers = []
        for entry in os.listdir(self.base):
            path = os.path.join(self.base, entry)
            # The Pusher copies into place; a version counts once its saved_model.pb is there.
            if entry.isdigit() and os.path.exists(os.path.join(path, "saved_model.pb")):
                numbers.append(int(entry))
        return sorted(numbers)[-self.max_versions:]

    def _settled(self, number: int, path: str, first: bool) -> bool:
        """True once a version folder looks the same on two polls in a row.

        The Pusher copies files into the version folder one by one; loading before the copy
        ends would read a half-written model. At start-up, what is there is taken as complete.
        """
        files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
        shape = (len(files), sum(os.path.getsize(f) for f in files if os.path.exists(f)))
        previous = self._seen.get(number)
        self._seen[number] = shape
        return first or previous == shape

    def refresh(self, first: bool = False) -> None:
        """Loads new versions, then retires versions beyond `max_versions` (never the last one)."""
        wanted = self._on_disk()
        for number in wanted:
            if number in self._versions or number in self._failed:
                continue
            path = os.path.join(self.base, str(number))
            if not self._settled(number, path, first):
                continue
            try:
                loaded = _Version(number, path)
            except Exception as e:  # a broken version must not take the server down
                self._failed[number] = f"{type(e).__name__}: {e}"
                log.error("model %s version %d at %s failed to load: %s", self.name, number, path, e)
                continue
            with self._lock:
                self._versions[number] = loaded
            log.info("model %s: version %d loaded from %s", self.name, number, path)
        with self._lock:
            # Retire only once newer versions are loaded, so a request never finds none.
            loaded = sorted(self._versions)
            keep = set(loaded[-self.max_versions:])
            for number in loaded:
                gone = number not in wanted and number != loaded[-1]
                if number not in keep or gone:
                    del self._versions[number]
                    log.info("model %s: version %d unloaded", self.name, number)

    def start(self) -> None:
        self.refresh(first=True)

        def poll():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception:  # keep polling whatever one refresh ran into
                    log.exception("refreshing %s failed", self.base)

        self._thread = threading.Thread(target=poll, name="relkd-version-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def get(self, number: Optional[int]) -> Optional[_Version]:
        with self._lock:
            if not self._versions:
                return None
            return self._versions.get(number if number is not None else max(self._versions))

    def status(self) -> Tuple[List[int], Dict[int, str]]:
        with self._lock:
            return sorted(self._versions), dict(self._failed)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _requested_version(model_spec: model_pb2.ModelSpec) -> Optional[int]:
    if model_spec.HasField("version_label"):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     "version labels are not supported; ask for a version number or none (latest)")
    return model_spec.version.value if model_spec.HasField("version") else None


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer,
                model_service_pb2_grpc.ModelServiceServicer):

    def __init__(self, models: ModelVersions, max_string_bytes: int,
                 batcher: Optional[request_batching.RequestBatcher] = None):
        self.models = models
        self.max_string_bytes = max_string_bytes
        self.batcher = batcher

    def _version(self, model_spec: model_pb2.ModelSpec) -> _Version:
        if model_spec.name != self.models.name:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"model {model_spec.name!r} is not served here; this server serves "
                         f"{self.models.name!r}")
        number = _requested_version(model_spec)
        version = self.models.get(number)
        if version is None:
            available, _ = self.models.status()
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"model {self.models.name!r} has no version {number if number is not None else '(any)'}"
                         f" loaded; loaded versions: {available or 'none yet'}")
        return version

    def _inputs(self, version: _Version, signature_name: str, inputs) -> Dict[str, np.ndarray]:
        signature = version.signatures.get(signature_name)
        if signature is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"signature {signature_name!r} not found; the model has "
                         f"{sorted(version.signatures)}")
        _, expected = signature.structured_input_signature
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"signature {signature_name!r} takes inputs {sorted(expected)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        arrays, batch = {}, None
        for name, spec in expected.items():
            proto = inputs[name]
            if proto.dtype != spec.dtype.as_datatype_enum:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input {name!r} must be {spec.dtype.name}, got "
                             f"{tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else 'no dtype'}")
            try:
                value = tf.make_ndarray(proto)
            except Exception as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r} is not a valid tensor: {e}")
            if value.ndim != 1:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input {name!r} must be a batch (shape [N]), got shape {list(value.shape)}")
            if value.shape[0] == 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r} is an empty batch")
            if value.shape[0] > MAX_BATCH:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"input {name!r} has {value.shape[0]} entries; the limit is {MAX_BATCH}")
            if batch is not None and value.shape[0] != batch:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"inputs have different batch sizes ({batch} and {value.shape[0]} for {name!r})")
            batch = value.shape[0]
            if spec.dtype == tf.string:
                longest = max(len(v) for v in value)
                if longest > self.max_string_bytes:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"input {name!r} holds a string of {longest} bytes; the limit is "
                                 f"{self.max_string_bytes}")
            arrays[name] = value
        return arrays

    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        try:
            version = self._version(request.model_spec)
            signature_name = request.model_spec.signature_name or "serving_default"
            arrays = self._inputs(version, signature_name, request.inputs)
            signature = version.signatures[signature_name]
            specs = signature.structured_input_signature[1]

            def model(inputs):
                outputs = signature(**{name: tf.constant(value, dtype=specs[name].dtype)
                                       for name, value in inputs.items()})
                return {name: value.numpy() for name, value in outputs.items()}

            outputs = (model(arrays) if self.batcher is None else
                       self.batcher.submit((id(version), signature_name), model, arrays))
            wanted = list(request.output_filter) or list(outputs)
            unknown = sorted(set(wanted) - set(outputs))
            if unknown:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"output_filter names {unknown}; outputs are {sorted(outputs)}")
        except _Abort as e:
            context.abort(e.code, e.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.models.name
        response.model_spec.version.value = version.number
        response.model_spec.signature_name = signature_name
        for name in wanted:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
        return response

    def GetModelMetadata(self, request, context):
        try:
            version = self._version(request.model_spec)
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"metadata_field must be ['signature_def'], got {fields}")
        except _Abort as e:
            context.abort(e.code, e.message)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in version.signature_defs.items():
            if not name.startswith("__"):
                signature_map.signature_def[name].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.models.name
        response.model_spec.version.value = version.number
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def GetModelStatus(self, request, context):
        try:
            if request.model_spec.name != self.models.name:
                raise _Abort(grpc.StatusCode.NOT_FOUND,
                             f"model {request.model_spec.name!r} is not served here; this server "
                             f"serves {self.models.name!r}")
            number = _requested_version(request.model_spec)
            available, failed = self.models.status()
            if number is not None and number not in available and number not in failed:
                raise _Abort(grpc.StatusCode.NOT_FOUND,
                             f"model {self.models.name!r} has no version {number}; loaded: {available}")
        except _Abort as e:
            context.abort(e.code, e.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        state = get_model_status_pb2.ModelVersionStatus
        for n in ([number] if number is not None else sorted(set(available) | set(failed))):
            entry = response.model_version_status.add()
            entry.version = n
            if n in available:
                entry.state = state.AVAILABLE
                entry.status.CopyFrom(status_pb2.StatusProto(error_code=0))
            else:
                entry.state = state.END
                entry.status.CopyFrom(status_pb2.StatusProto(error_code=13, error_message=failed[n]))
        return response


class ModelServer:
    """A running server: `start()`, `port`, `stop()`."""

    def __init__(self, model_base: str, model_name: Optional[str] = None, host: str = "127.0.0.1",
                 port: int = DEFAULT_PORT, poll_seconds: float = 1.0, max_versions: int = 2,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, max_string_bytes: int = MAX_STRING_BYTES,
                 workers: int = 8, batching: bool = False, max_batch_size: int = 1000,
                 batch_timeout_seconds: float = 0.0):
        name = model_name or os.path.basename(os.path.abspath(model_base).rstrip("/"))
        self.models = ModelVersions(name, model_base, poll_seconds, max_versions)
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers),
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes),
                     # gRPC's default, SO_REUSEPORT, lets a second server bind a port in use and
                     # take a share of its requests: an old server left running would answer
                     # some of the new one's clients with the old model.
                     ("grpc.so_reuseport", 0)])
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # gRPC >= 1.5x raises where older ones returned 0
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {host}:{port}: the port is in use (another `relkd "
                          "serve` or TF Serving?) or the address is not this machine's; choose "
                          "another --port or --host")
        self.host = host
        # The batcher's thread starts here and stops with the server.
        self.batcher = (request_batching.RequestBatcher(max_batch_size, batch_timeout_seconds)
                        if batching else None)
        servicer = _Servicer(self.models, max_string_bytes, self.batcher)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, self._server)

    def start(self) -> "ModelServer":
        self.models.start()
        self._server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.models.stop()
        self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.stop()

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(model_base: str, model_name: Optional[str], host: str, port: int, poll_seconds: float,
          max_versions: int, echo=print, batching: bool = False, max_batch_size: int = 1000,
          batch_timeout_seconds: float = 0.0, intra_op_threads: int = 1,
          inter_op_threads: int = 0) -> int:
    if not os.path.isdir(model_base):
        raise FileNotFoundError(f"model base directory not found: {model_base} (the Pusher's "
                                "<serving base>/<model name>, holding numbered version folders)")
    set_threads(intra_op_threads, inter_op_threads)
    server = ModelServer(model_base, model_name, host, port, poll_seconds, max_versions,
                         batching=batching, max_batch_size=max_batch_size,
                         batch_timeout_seconds=batch_timeout_seconds).start()
    available, failed = server.models.status()
    echo(f"Serving model {server.models.name!r} from {server.models.base} on {host}:{server.port} "
         f"(gRPC, TF Serving API); versions loaded: {available or 'none yet, waiting for one'}"
         + (f"; failed: {sorted(failed)}" if failed else ""))
    echo(f"TensorFlow threads: {threads_label(intra_op_threads)} per op (intra-op), "
         f"{threads_label(inter_op_threads)} for independent ops (inter-op).")
    if batching:
        echo(f"Batching: concurrent requests for one version and signature are scored together, "
             f"up to {max_batch_size} rows per call, waiting up to {1000 * batch_timeout_seconds:g} "
             "ms for company.")
    echo("New version folders are picked up within "
         f"{poll_seconds:g}s. Ctrl-C (or SIGTERM, as Kubernetes and process managers send) stops "
         "the server.")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    server.stop()
    if server.batcher is not None:
        requests, calls = server.batcher.requests, server.batcher.model_calls
        echo(f"Batching: {requests} request{'s' * (requests != 1)} in {calls} model "
             f"call{'s' * (calls != 1)}" + (f" ({requests / calls:.2f} per call)" if calls else ""))
    echo("Stopped.")
    return 0

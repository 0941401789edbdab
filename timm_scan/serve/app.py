"""The early-exit model behind an HTTP service on Ray Serve: `EarlyExitService` and `run`.

One Ray Serve deployment (FastAPI ingress) per service; Ray runs it on one machine or across a cluster,
with replicas, without code changes. In each replica a `SectionBatcher` batches requests per section:
images from different clients run section 0 together, and the samples that go on past an exit run the
next section together with other requests' survivors (``batcher.py``). It runs the torch model
(`EarlyExitPredictor`'s sections, heads and policy), an `export_onnx` folder (`OnnxEarlyExitPredictor`'s
graphs), or with ``plain=True`` the backbone alone, the same way, for comparison. Routes:

- ``GET /health``: 200 once the replica has loaded the model and run it once;
- ``POST /predict``: one encoded image as the body (``image/png``, ``image/jpeg`` or
  ``application/octet-stream``) → JSON ``label``, ``class_name``, ``exit`` (0-based, as
  ``EarlyExitResult.exit_index``), ``confidence`` and ``top_k``; preprocessing is the model's own data
  config (``eval_transform``), so the answer is `EarlyExitPredictor`'s on the same image. A body that is
  empty, too large, of another content type or not an image the service can decode gets a 4xx with the
  reason; an image the model answers with non-finite logits a 422; a section that fails a 500 for the
  requests in its batch, and the service goes on;
- ``POST /predict_batch``: JSON ``{"images": [base64, ...]}`` (up to 256) → ``{"answers": [...]}``, each
  image answered as ``/predict`` answers it, or ``{"error", "status"}`` in its place;
- ``GET /policy``: what is served (engine, exits), the exit policy in use and what it promises;
- ``GET /metrics``: `ServiceMetrics` in Prometheus' text format (this replica's).

Overload is refused by Ray Serve (``max_queued_requests``: 503) instead of queued without bound.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (``Request``) at
# run time, and through Ray's wrapping of the class it cannot resolve them from strings.

import asyncio
import base64
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from torch import Tensor

from ..deploy.onnx import MANIFEST, OnnxEarlyExitPredictor, session_options
from ..deploy.predictor import EarlyExitPredictor
from ..exit_policy import ExitPolicy
from ..model.multi_exit import MultiExitModel
from ..training.data import eval_transform, to_rgb
from ..training.run_folder import RunFolder
from .batcher import NonFiniteAnswer, SectionBatcher, StagedPredictor
from .metrics import ServiceMetrics

__all__ = ["CONTENT_TYPES", "BackbonePredictor", "EarlyExitService", "Served", "load", "run"]

CONTENT_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what PIL may decode a body as: no format that runs other programs (EPS)
MAX_BODY_BYTES = 20 * 2**20  # an encoded image above this is refused (413)
MAX_PIXELS = 50_000_000  # a decoded image above this is refused (413): PIL's decompression-bomb guard, tighter
MAX_BATCH_IMAGES = 256  # images in one /predict_batch request at most
MAX_BATCH_BYTES = 64 * 2**20  # a /predict_batch body above this is refused (413)

api = FastAPI(title="timm-scan early exit")


class BadRequest(ValueError):
    """A request the service refuses: the HTTP ``status`` and a short ``reason`` for the metrics."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class BackbonePredictor:
    """The backbone alone as one section, its own head the only exit: the model served without early exit
    (``plain=True``), so that a comparison runs the same service, batching and preprocessing."""

    def __init__(self, model: MultiExitModel) -> None:
        self.backbone = model.backbone
        self.policy = ExitPolicy(thresholds=(), fallback="deepest")

    def section_functions(self, image_size: tuple[int, int]) -> tuple[Any, Any]:
        return (lambda k, x: self.backbone.forward_features(x)), (lambda k, h: self.backbone.forward_head(h))


@dataclass
class Served:
    """What a replica serves: the predictor it batches, the data config its images are preprocessed with,
    class names, the modules the exits follow (shallowest first) and the engine, in words."""

    predictor: StagedPredictor
    data_config: dict[str, Any]
    class_names: list[str] | None
    exits: list[str]
    engine: str

    @property
    def num_exits(self) -> int:
        return len(self.predictor.policy.thresholds) + 1


def load(source: str | Path, plain: bool = False, threads: int | None = None) -> Served:
    """What to serve from ``source``: a training run (its ``best/``), a saved folder, ``"hf-hub:owner/name"``,
    or an `export_onnx` folder (run with ONNX Runtime on CPU). It must carry a data config and an exit policy
    with thresholds (``timm-scan search``); ``plain``: its backbone alone (torch only). ``threads``: ONNX
    Runtime's per graph (default: its own choice, a thread per core). Every section and exit runs once on a
    blank image here, so a model that cannot take its own input size fails now."""
    path = Path(source)
    if (path / MANIFEST).is_file():
        if plain:
            raise ValueError(f"{source}: an ONNX export has no graph of the plain backbone; serve the model folder "
                             "it was exported from with plain=True")
        predictor = OnnxEarlyExitPredictor(path, session_options=session_options(threads))
        m = predictor.manifest
        if not m.data_config:
            raise ValueError(f"{source}: the export has no data config, so images cannot be preprocessed as the model "
                             "was trained; export a model that has one (model.data_config)")
        served = Served(predictor, m.data_config, m.class_names, list(m.stages), "onnxruntime (CPU)")
    else:
        if (RunFolder(path).best / "scan_config.json").is_file():
            path = RunFolder(path).best
        model = MultiExitModel.from_pretrained(path if path.exists() else str(source)).eval()
        if not model.data_config:
            raise ValueError(f"{source}: the model has no data config, so images cannot be preprocessed as it was "
                             "trained; serve a training run or a folder it saved")
        if plain:
            served = Served(BackbonePredictor(model), model.data_config, model.class_names, [], "torch, plain backbone")
        else:
            model.policy.check(model.num_exits, needs_thresholds="search them first: timm-scan search RUN")
            served = Served(EarlyExitPredictor(model), model.data_config, model.class_names,
                            [s.module for s in model.exit_stages], "torch")
    input_size = tuple(served.data_config["input_size"])
    section, exit_logits = served.predictor.section_functions(input_size[1:])
    with torch.no_grad():
        h: Any = torch.zeros(1, *input_size)
        for k in range(served.num_exits):
            h = section(k, h)
            exit_logits(k, h)
    return served


def check_body(length: int, content_type: str | None) -> None:
    """`BadRequest` unless a body of ``length`` bytes and this content type may be an image the service takes."""
    kind = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise BadRequest(f"Content-Type {kind!r} is not served; send one encoded image as {', '.join(CONTENT_TYPES)}",
                         415, "content_type")
    if length == 0:
        raise BadRequest("the body is empty; send one encoded image (PNG or JPEG)", 400, "empty")
    if length > MAX_BODY_BYTES:
        raise BadRequest(f"the body has {length:,} bytes, above the {MAX_BODY_BYTES:,} served", 413, "too_large")


def batch_bodies(body: bytes, content_type: str | None) -> list[bytes | BadRequest]:
    """The images of a ``/predict_batch`` body, JSON ``{"images": [base64, ...]}``: each decoded from base64,
    or a `BadRequest` in its place; the whole body refused (`BadRequest`) where it is not such a list."""
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest(f"Content-Type {kind!r} is not served here; send JSON {{\"images\": [base64, ...]}}", 415,
                         "content_type")
    if len(body) > MAX_BATCH_BYTES:
        raise BadRequest(f"the body has {len(body):,} bytes, above the {MAX_BATCH_BYTES:,} served", 413, "too_large")
    try:
        images = json.loads(body)["images"]
        if not isinstance(images, list):
            raise TypeError("images is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise BadRequest(f"the body is not JSON {{\"images\": [base64, ...]}} ({type(exc).__name__}: {exc})", 400,
                         "not_a_batch") from None
    if not images or len(images) > MAX_BATCH_IMAGES:
        raise BadRequest(f"send 1 to {MAX_BATCH_IMAGES} images in one request; got {len(images)}", 413 if images else 400,
                         "batch_size")
    decoded: list[bytes | BadRequest] = []
    for i, image in enumerate(images):
        try:
            decoded.append(base64.b64decode(image, validate=True))
        except (ValueError, TypeError):
            decoded.append(BadRequest(f"images[{i}] is not base64 text", 400, "not_base64"))
    return decoded


def decode(body: bytes, channels: int) -> PIL.Image.Image:
    """The body as a PIL image, upright (its EXIF orientation applied, as ``datasets`` decodes images) and in
    the model's colours (`to_rgb`, then grey for one-channel models), or `BadRequest`."""
    try:
        image = PIL.Image.open(io.BytesIO(body), formats=FORMATS)
        if image.width * image.height > MAX_PIXELS:
            raise BadRequest(f"the image is {image.width}x{image.height}, above the {MAX_PIXELS:,} pixels served", 413,
                             "too_large")
        image.load()
        image = to_rgb(PIL.ImageOps.exif_transpose(image))
    except BadRequest:
        raise
    except PIL.Image.DecompressionBombError as exc:
        raise BadRequest(f"the image is too large to decode ({exc})", 413, "too_large") from None
    except Exception as exc:  # PIL raises several types for bodies that are not (whole) images
        raise BadRequest(f"the body is not an image the service can decode ({type(exc).__name__}: {exc}); send "
                         f"one of {', '.join(FORMATS)}", 400, "not_an_image") from None
    return image if channels == 3 else image.convert("L")


@serve.deployment
@serve.ingress(api)
class EarlyExitService:
    """One replica: what it serves (`load`), its `SectionBatcher`, preprocessing and metrics."""

    def __init__(self, source: str, plain: bool = False, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 top_k: int = 5) -> None:
        cpus = max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU") or 1))
        onnx = (Path(source) / MANIFEST).is_file()
        # this replica's share of the machine: torch's threads, or ONNX Runtime's, with torch's few small ops
        # between the graphs on one thread (idle torch workers would spin on the cores the graphs need)
        torch.set_num_threads(1 if onnx else cpus)
        self.served = load(source, plain, threads=cpus if onnx else None)
        self.transform = eval_transform(self.served.data_config)
        self.input_size = tuple(self.served.data_config["input_size"])
        self.top_k = top_k
        self.metrics = ServiceMetrics(self.served.num_exits)
        self.batcher = SectionBatcher(self.served.predictor, self.input_size[1:], max_batch_size=max_batch_size,
                                      batch_wait_s=batch_wait_ms / 1000, on_batch=self.metrics.batch)

    @api.get("/health")
    def health(self) -> dict[str, str]:
        """200 once this replica has loaded the model and run it once."""
        return {"status": "ok"}

    @api.get("/policy")
    def policy(self) -> dict[str, Any]:
        """What is served (engine, exits), the exit policy in use and what it promises, the data config."""
        policy, served = self.served.predictor.policy, self.served
        promise = ("none: the plain backbone, without early exit" if served.num_exits == 1 else
                   policy.origin.promise if policy.origin is not None else "thresholds set by hand: none")
        return {"engine": served.engine, "exits": served.exits, "policy": policy.to_dict(), "promise": promise,
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in served.data_config.items()}}

    @api.get("/metrics")
    def metrics_text(self) -> PlainTextResponse:
        """This replica's `ServiceMetrics`, in Prometheus' text format."""
        return PlainTextResponse(self.metrics.prometheus(self.batcher.waiting), media_type="text/plain; version=0.0.4")

    @api.post("/predict")
    async def predict(self, request: Request) -> Any:
        """One encoded image → the early-exit answer; a 4xx with the reason for a body it cannot take."""
        started = time.perf_counter()
        body = await request.body()  # Ray Serve's proxy has buffered it whole already
        status, payload = await self.respond(body, request.headers.get("content-type"), started)
        return payload if status == 200 else JSONResponse(payload, status_code=status)

    @api.post("/predict_batch")
    async def predict_batch(self, request: Request) -> Any:
        """Several images in one request, JSON ``{"images": [base64 of an encoded image, ...]}`` → ``{"answers":
        [...]}``, one per image in order: its answer as ``/predict`` gives it, or ``{"error", "status"}`` for an
        image the service cannot take. Each image is batched per section like any other."""
        started = time.perf_counter()
        try:
            images = batch_bodies(await request.body(), request.headers.get("content-type"))
        except BadRequest as exc:
            self.metrics.refuse(exc.reason)
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

        async def one(image: bytes | BadRequest) -> dict[str, Any]:
            if isinstance(image, BadRequest):
                self.metrics.refuse(image.reason)
                return {"error": str(image), "status": image.status}
            status, payload = await self.respond(image, None, started)
            return payload if status == 200 else {**payload, "status": status}

        return {"answers": await asyncio.gather(*(one(image) for image in images))}

    async def respond(self, body: bytes, content_type: str | None, started: float) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON answer for one encoded image (`check_body`, `prepare`, the batcher)."""
        try:
            check_body(len(body), content_type)
            image = await asyncio.to_thread(self.prepare, body)
        except BadRequest as exc:
            self.metrics.refuse(exc.reason)
            return exc.status, {"error": str(exc)}
        try:
            probs, exit_index = await self.batcher(image)
        except NonFiniteAnswer as exc:
            self.metrics.refuse("refused_by_model")
            return 422, {"error": f"the model cannot answer this image: {exc}"}
        except Exception as exc:  # a section that failed (out of memory, a damaged graph): this batch only
            self.metrics.refuse("failed")
            return 500, {"error": f"the model failed on the batch this image ran in ({type(exc).__name__}: {exc}); "
                                  "the service's log has the traceback"}
        answer = self.answer(probs, exit_index)
        self.metrics.answer(time.perf_counter() - started, exit_index, answer["confidence"])
        return 200, answer

    def prepare(self, body: bytes) -> Tensor:
        """The body decoded and preprocessed as the model's data config says (`eval_transform`)."""
        image = decode(body, self.input_size[0])
        try:
            return self.transform(image)
        except Exception as exc:
            raise BadRequest(f"the image cannot be preprocessed ({type(exc).__name__}: {exc})", 400,
                             "not_an_image") from None

    def answer(self, probs: Tensor, exit_index: int) -> dict[str, Any]:
        """The JSON answer from the probabilities ``(C,)`` a sample was answered with at ``exit_index``."""
        names = self.served.class_names

        def name(label: Any) -> str | None:
            return names[int(label)] if names and int(label) < len(names) else None

        top = probs.topk(min(self.top_k, probs.shape[-1]))
        label = int(top.indices[0])
        return {"label": label, "class_name": name(label), "exit": exit_index, "confidence": float(top.values[0]),
                "top_k": [{"label": int(c), "class_name": name(c), "probability": float(p)}
                          for p, c in zip(top.values, top.indices)]}


def run(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, plain: bool = False, replicas: int = 1,
        replica_cpus: float = 1.0, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
        max_ongoing_requests: int | None = None, max_queued_requests: int = 256, top_k: int = 5,
        address: str | None = None, route_prefix: str = "/", blocking: bool = True) -> None:
    """Serve ``source`` (`load`: a run, a folder, an ONNX export or ``"hf-hub:owner/name"``; checked here
    first; ``plain``: its backbone alone) on ``host:port`` with ``replicas`` replicas of ``replica_cpus`` CPUs
    each (torch's threads). Each section runs batches of up to ``max_batch_size`` samples and a sample waits
    at most ``batch_wait_ms`` in a section's queue for a fuller batch; a replica takes ``max_ongoing_requests``
    at once (default ``8 * max_batch_size``: enough survivors to fill the deeper sections' batches), and
    beyond ``max_queued_requests`` waiting for a replica requests are refused (503). Ray starts on this
    machine, unless this process is connected to a cluster already, or ``address`` (or ``RAY_ADDRESS``)
    names one: then a folder must be at the same path on every machine, or give a Hub id. ``route_prefix``:
    where its routes start (``"/"``; serve several models at once under several prefixes).
    ``blocking=False`` returns once the service is deployed (tests; stop it with ``ray.serve.shutdown()``);
    else it serves until Ctrl-C, then shuts down."""
    load(source, plain)  # a bad source fails here, with its reason, not in a replica that Ray restarts
    path = Path(source)
    source = str(path.resolve()) if path.exists() else str(source)  # replicas do not share this working directory
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    app = EarlyExitService.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_ongoing_requests or 8 * max_batch_size, max_queued_requests=max_queued_requests,
    ).bind(source, plain, max_batch_size, batch_wait_ms, top_k)
    serve.run(app, name="timm-scan" + route_prefix.rstrip("/").replace("/", "-"), route_prefix=route_prefix,
              blocking=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    print(f"serving {source}{' (plain backbone)' if plain else ''} on {url} (POST /predict, /predict_batch; GET /health, /policy, "
          "/metrics)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()

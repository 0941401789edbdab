"""The early-exit model behind an HTTP service on Ray Serve: `EarlyExitService` and `run`.

One Ray Serve deployment (FastAPI ingress) per service; Ray runs it on one machine or across a cluster,
with replicas, without code changes. Requests from different clients are batched dynamically
(``@serve.batch``) and each batch runs `EarlyExitPredictor` (SCAN Algorithm 1 with the model folder's
exit policy). Routes:

- ``GET /health``: 200 once the replica has loaded the model;
- ``POST /predict``: one encoded image as the body (``image/png``, ``image/jpeg`` or
  ``application/octet-stream``) → JSON ``label``, ``class_name``, ``exit`` (0-based, as
  ``EarlyExitResult.exit_index``), ``confidence`` and ``top_k``; preprocessing is the model's own data
  config (``eval_transform``), so the answer is `EarlyExitPredictor`'s on the same image. A body that is
  empty, too large, of another content type or not an image the service can decode gets a 4xx with the
  reason;
- ``GET /policy``: the exit policy in use and what it promises;
- ``GET /metrics``: `ServiceMetrics` in Prometheus' text format (this replica's).

Overload is refused by Ray Serve (``max_queued_requests``: 503) instead of queued without bound.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (``Request``) at
# run time, and through Ray's wrapping of the class it cannot resolve them from strings.

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from torch import Tensor

from ..deploy.predictor import EarlyExitPredictor
from ..model.multi_exit import MultiExitModel
from ..training.data import eval_transform, to_rgb
from .metrics import ServiceMetrics

__all__ = ["CONTENT_TYPES", "EarlyExitService", "load_model", "run"]

CONTENT_TYPES = ("image/png", "image/jpeg", "application/octet-stream")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what PIL may decode a body as: no format that runs other programs (EPS)
MAX_BODY_BYTES = 20 * 2**20  # an encoded image above this is refused (413)
MAX_PIXELS = 50_000_000  # a decoded image above this is refused (413): PIL's decompression-bomb guard, tighter

api = FastAPI(title="timm-scan early exit")


class BadRequest(ValueError):
    """A request the service refuses: the HTTP ``status`` and a short ``reason`` for the metrics."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def load_model(source: str | Path) -> MultiExitModel:
    """The model to serve: a training run (its ``best/``), a saved folder, or ``"hf-hub:owner/name"``; it must
    carry a data config and an exit policy with thresholds (``timm-scan search``)."""
    path = Path(source)
    if (path / "best" / "scan_config.json").is_file():
        path = path / "best"
    model = MultiExitModel.from_pretrained(path if path.exists() else str(source)).eval()
    if not model.data_config:
        raise ValueError(f"{source}: the model has no data config, so images cannot be preprocessed as it was "
                         "trained; serve a training run or a folder it saved")
    model.policy.check(model.num_exits, needs_thresholds="search them first: timm-scan search RUN")
    EarlyExitPredictor(model)(torch.zeros(1, *model.data_config["input_size"]))  # its input size fits the model
    return model


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
    """One replica: the model, its predictor and preprocessing, and its metrics."""

    def __init__(self, source: str, max_batch_size: int = 32, batch_wait_ms: float = 5.0, top_k: int = 5) -> None:
        self.model = load_model(source)
        self.predictor = EarlyExitPredictor(self.model)
        self.transform = eval_transform(self.model.data_config)
        self.channels = self.model.data_config["input_size"][0]
        self.top_k = top_k
        self.metrics = ServiceMetrics(self.model.num_exits)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    @api.get("/health")
    def health(self) -> dict[str, str]:
        """200 once this replica has loaded the model."""
        return {"status": "ok"}

    @api.get("/policy")
    def policy(self) -> dict[str, Any]:
        """The exits, the exit policy the model folder carries and what it promises, the data config."""
        policy = self.model.policy
        return {"exits": [s.module for s in self.model.exit_stages], "policy": policy.to_dict(),
                "promise": policy.origin.promise if policy.origin is not None else "thresholds set by hand: none",
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.data_config.items()}}

    @api.get("/metrics")
    def metrics_text(self) -> PlainTextResponse:
        """This replica's `ServiceMetrics`, in Prometheus' text format."""
        return PlainTextResponse(self.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @api.post("/predict")
    async def predict(self, request: Request) -> Any:
        """One encoded image → the early-exit answer; a 4xx with the reason for a body it cannot take."""
        started = time.perf_counter()
        try:
            body = await request.body()  # Ray Serve's proxy has buffered it whole already
            check_body(len(body), request.headers.get("content-type"))
            image = await asyncio.to_thread(self.prepare, body)
        except BadRequest as exc:
            self.metrics.refuse(exc.reason)
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        answer = await self.predict_batch(image)
        if "error" in answer:
            self.metrics.refuse("refused_by_model")
            return JSONResponse(answer, status_code=422)
        self.metrics.answer(time.perf_counter() - started, answer["exit"], answer["confidence"])
        return answer

    def prepare(self, body: bytes) -> Tensor:
        """The body decoded and preprocessed as the model's data config says (`eval_transform`)."""
        image = decode(body, self.channels)
        try:
            return self.transform(image)
        except Exception as exc:
            raise BadRequest(f"the image cannot be preprocessed ({type(exc).__name__}: {exc})", 400,
                             "not_an_image") from None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, images: list[Tensor]) -> list[dict[str, Any]]:
        """The requests that arrived together, run as one batch (off the event loop); one answer each, in
        order. Where the predictor refuses the batch (an image whose logits are not finite), each image
        runs alone, so that only the one refused gets an error."""
        self.metrics.batch(len(images))
        try:
            return self.answers(await asyncio.to_thread(self.predictor, torch.stack(images)))
        except ValueError:
            answers = []
            for image in images:
                try:
                    answers += self.answers(await asyncio.to_thread(self.predictor, image[None]))
                except ValueError as exc:
                    answers.append({"error": f"the model cannot answer this image: {exc}"})
            return answers

    def answers(self, result: Any) -> list[dict[str, Any]]:
        """The JSON answers of an `EarlyExitResult`, one per image."""
        top = result.probs.topk(min(self.top_k, result.probs.shape[-1]), dim=-1)
        names = self.model.class_names

        def name(label: Any) -> str | None:
            return names[int(label)] if names and int(label) < len(names) else None

        return [{"label": int(result.labels[i]), "class_name": name(result.labels[i]),
                 "exit": int(result.exit_index[i]), "confidence": float(result.confidence[i]),
                 "top_k": [{"label": int(c), "class_name": name(c), "probability": float(p)}
                           for p, c in zip(top.values[i], top.indices[i])]}
                for i in range(len(result.labels))]


def run(source: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, max_batch_size: int = 32,
        batch_wait_ms: float = 5.0, max_queued_requests: int = 256, top_k: int = 5, blocking: bool = True) -> None:
    """Serve ``source`` (a run, a folder, or ``"hf-hub:owner/name"``; checked here first) on ``host:port`` with
    ``replicas`` replicas; requests wait at most ``batch_wait_ms`` to fill a batch of ``max_batch_size``, and
    beyond ``max_queued_requests`` waiting ones they are refused (503). Starts Ray on this machine unless
    it is connected to a cluster already (``ray.init(address=...)``, or ``RAY_ADDRESS``; then a folder must be
    at the same path on every machine, or give a Hub id). ``blocking=False`` returns once the service
    answers (tests; stop it with ``ray.serve.shutdown()``); else it serves until Ctrl-C, then shuts down."""
    import ray

    load_model(source)  # a bad source fails here, with its reason, not in a replica that Ray restarts
    path = Path(source)
    source = str(path.resolve()) if path.exists() else str(source)  # replicas do not share this working directory
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    app = EarlyExitService.options(num_replicas=replicas, max_ongoing_requests=2 * max_batch_size,
                                   max_queued_requests=max_queued_requests).bind(
        source, max_batch_size, batch_wait_ms, top_k)
    serve.run(app, name="timm-scan", route_prefix="/", blocking=False)
    print(f"serving {source} on http://{host}:{port} (POST /predict; GET /health, /policy, /metrics)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()

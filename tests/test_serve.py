"""The HTTP service on Ray Serve, started on 127.0.0.1 with a tiny model: its answers are the predictor's,
bad input gets a 4xx with the reason while other requests are answered, and the metrics count them."""

import asyncio
import base64
import concurrent.futures
import io
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from helpers import answer_all, create, sharpen

import timm_scan
from timm_scan.cli import main
import timm_scan.serve
from timm_scan.serve import ServiceMetrics
from timm_scan.training.data import eval_transform, to_rgb

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
               "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}


def encoded(image: PIL.Image.Image, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def images(n: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    shapes = [(32, 32, 3), (40, 56, 3), (64, 48, 3), (20, 20)]  # other sizes and a grey image: the model's transform
    return [PIL.Image.fromarray((rng.random(shapes[i % len(shapes)]) * 255).astype(np.uint8)) for i in range(n)]


def bodies() -> list[bytes]:
    """24 encoded images: PNG and JPEG by turns, the first a JPEG whose EXIF says to turn it."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    return [encoded(p, "JPEG", exif=exif) if i == 0 else encoded(p, "PNG" if i % 2 else "JPEG")
            for i, p in enumerate(images(24))]


def preprocessed(body: bytes) -> torch.Tensor:
    """What the service should make of ``body``: decoded, turned upright, the model's transform."""
    return eval_transform(DATA_CONFIG)(to_rgb(PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(body)))))


def thresholds_with_a_margin(confidence: torch.Tensor) -> float:
    """A threshold near the median with no confidence within 1e-4 of it, so that the few 1e-6 that a batch's
    size changes in the logits cannot move a sample across it."""
    values = confidence.sort().values
    middle = len(values) // 2
    for j in sorted(range(len(values) - 1), key=lambda j: abs(j - middle)):
        if values[j + 1] - values[j] > 2e-4:
            return float(values[j] + values[j + 1]) / 2
    raise AssertionError("no gap between the confidences")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = timm_scan.wrap(create("resnet18", num_classes=3).eval(), check_input_size=(3, 32, 32)).eval()
    model.data_config, model.class_names = DATA_CONFIG, ["cat", "dog", "fox"]
    x = torch.stack([preprocessed(b) for b in bodies()])
    sharpen(model, x)
    with torch.no_grad():
        confidence = [torch.softmax(z, -1).amax(-1) for z in model(x).logits]
    model.policy = timm_scan.ExitPolicy([thresholds_with_a_margin(c) for c in confidence[:-1]], "deepest")
    model.save_pretrained(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)  # logical CPUs: one per replica
    try:
        url = f"http://127.0.0.1:{port}"
        # the model, and the model with room for one request and one waiting
        for prefix, source, options in [("/", folder, {}), ("/tight", folder, {"max_ongoing_requests": 1,
                                                                               "max_queued_requests": 1,
                                                                               "batch_wait_ms": 300})]:
            timm_scan.serve.run(source, host="127.0.0.1", port=port, max_batch_size=8,
                                **{"batch_wait_ms": 20, **options}, route_prefix=prefix, blocking=False)
            for _ in range(600):  # the route may answer a moment after serve.run returns
                if request(f"{url}{prefix.rstrip('/')}/health")[0] == 200:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"{url}{prefix} did not answer /health within 60 s")
        yield url, timm_scan.from_pretrained(folder).eval()
    finally:
        serve.shutdown()
        ray.shutdown()


def request(url: str, body: bytes | None = None, content_type: str = "image/png") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body is not None else {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_answers_equal_the_predictor_s_from_concurrent_clients(service):
    url, model = service
    assert request(f"{url}/health") == (200, b'{"status":"ok"}')
    sent = bodies()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # clients at once: their requests are batched together
        replies = list(pool.map(lambda b: request(f"{url}/predict", b, "image/png"), sent))
    x = torch.stack([preprocessed(b) for b in sent])  # JPEG is lossy: the reference decodes the same bytes
    expected = timm_scan.EarlyExitPredictor(model)(x)
    answers = [json.loads(body) for status, body in replies if status == 200]
    assert len(answers) == len(sent)
    assert [a["label"] for a in answers] == expected.labels.tolist()
    assert [a["exit"] for a in answers] == expected.exit_index.tolist() and len({a["exit"] for a in answers}) > 1
    assert [a["confidence"] for a in answers] == pytest.approx(expected.confidence.tolist(), abs=1e-5)
    assert all(a["class_name"] == model.class_names[a["label"]] and len(a["top_k"]) == 3 for a in answers)
    assert all(a["top_k"][0]["label"] == a["label"] for a in answers)
    metrics = request(f"{url}/metrics")[1].decode()

    def value(prefix: str) -> float:
        return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(prefix)))

    answered, batches = value('timm_scan_requests_total{outcome="answered"}'), value('timm_scan_batches_total{section="0"}')
    assert answered >= 24 and batches < answered  # some requests shared a batch
    ran = [value(f'timm_scan_batched_samples_total{{section="{k}"}}') for k in range(model.num_exits)]
    assert ran[0] == answered and ran == sorted(ran, reverse=True)  # each section runs the samples left from the one before
    assert ran[-1] >= sum(a["exit"] == model.num_exits - 1 for a in answers) and ran[1] < ran[0]
    shares = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("timm_scan_exit_share")]
    assert len(shares) == model.num_exits and sum(shares) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("body, content_type, status, says", [
    (b"", "image/png", 400, "empty"),
    (b"hello", "text/plain", 415, "Content-Type 'text/plain'"),
    (b"not an image at all", "application/octet-stream", 400, "not an image"),
    (None, "image/png", 400, "not an image"),  # a truncated PNG
    (b"\0" * (20 * 2**20 + 1), "image/png", 413, "above the"),
    ("huge", "image/png", 413, "pixels served"),  # a small file of many pixels
    ("eps", "application/octet-stream", 400, "PNG, JPEG"),  # a format the service does not decode
])
def test_bad_input_is_refused_with_its_reason_and_the_service_goes_on(service, body, content_type, status, says):
    url, _ = service
    if body is None:
        body = encoded(images(1)[0])[:100]
    elif body == "huge":
        body = encoded(PIL.Image.new("L", (8000, 7000)))
    elif body == "eps":
        body = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    code, reply = request(f"{url}/predict", body, content_type)
    assert code == status and says in json.loads(reply)["error"]
    assert request(f"{url}/predict", encoded(images(1)[0]))[0] == 200


def test_the_service_says_which_policy_it_runs(service):
    url, model = service
    info = json.loads(request(f"{url}/policy")[1])
    assert info["policy"]["thresholds"] == list(model.policy.thresholds) and info["policy"]["fallback"] == "deepest"
    assert info["exits"] == [s.module for s in model.exit_stages] and "promise" in info


def test_a_model_without_thresholds_is_refused_before_anything_starts(tmp_path):
    pytest.importorskip("ray")
    model = timm_scan.wrap(create("resnet18", num_classes=3).eval(), check_input_size=(3, 32, 32))
    model.data_config = DATA_CONFIG
    model.save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), "--port", "8765"])
    assert "timm-scan serve: error: no thresholds" in str(exit_.value.code)
    assert "search them first: timm-scan search RUN" in str(exit_.value.code)


def test_metrics_over_a_sliding_window():
    metrics = ServiceMetrics(num_exits=2, window=3)
    for exit_index, confidence in [(0, 0.9), (1, 0.5), (0, 0.7), (0, 0.8)]:  # the first leaves the window
        metrics.answer(0.01, exit_index, confidence)
    metrics.refuse("empty")
    metrics.batch(0, 3)
    metrics.batch(1, 2)
    metrics.batch(1, 1)
    text = metrics.prometheus([4, 0])
    assert 'timm_scan_requests_total{outcome="answered"} 4' in text
    assert 'timm_scan_requests_total{outcome="refused",reason="empty"} 1' in text
    assert 'timm_scan_exit_share{exit="0"} 0.6667' in text and 'timm_scan_exit_confidence_mean{exit="0"} 0.7500' in text
    assert 'timm_scan_batch_size_mean{section="0"} 3.000' in text and 'timm_scan_batch_size_mean{section="1"} 1.500' in text
    assert 'timm_scan_batches_total{section="1"} 2' in text and 'timm_scan_section_queue_samples{section="0"} 4' in text
    assert "# HELP timm_scan_exit_share " in text and "# TYPE timm_scan_exit_share gauge" in text
    assert 'timm_scan_request_latency_seconds{quantile="0.5"} 0.010000' in text
    assert "timm_scan_request_latency_seconds_count 4" in text


def test_the_plain_backbone_is_served_the_same_way(tmp_path):
    """What a replica serves with ``plain=True`` (`load`), run by its batcher as the service runs it; without
    Ray's HTTP layer, which the tests above cover (the ONNX export: ``tests/test_onnx.py``)."""
    pytest.importorskip("ray")
    from timm_scan.serve.app import load
    from timm_scan.serve.batcher import SectionBatcher

    torch.manual_seed(0)
    model = timm_scan.wrap(create("test_resnet", num_classes=3).eval(), check_input_size=(3, 32, 32)).eval()
    model.data_config, model.policy = DATA_CONFIG, timm_scan.ExitPolicy([0.5] * (model.num_exits - 1))
    model.save_pretrained(tmp_path)
    x = torch.stack([preprocessed(b) for b in bodies()])
    with torch.no_grad():
        plain = torch.softmax(model.backbone(x), -1)
    backbone = load(tmp_path, plain=True)
    assert backbone.num_exits == 1 and backbone.exits == [] and "plain" in backbone.engine
    got = asyncio.run(answer_all(SectionBatcher(backbone.predictor, (32, 32), max_batch_size=8, batch_wait_s=0.01), x))
    assert {e for _, e in got} == {0}
    torch.testing.assert_close(torch.stack([p for p, _ in got]), plain, rtol=1e-4, atol=1e-5)



def test_overload_is_refused_with_503_and_every_request_gets_an_answer(service):
    url, _ = service  # /tight: one request at a time in the replica, one waiting; each waits 300 ms for a batch
    body = encoded(images(1)[0])
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = [code for code, _ in pool.map(lambda _: request(f"{url}/tight/predict", body), range(12))]
    assert set(codes) == {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 6
    assert request(f"{url}/tight/predict", body)[0] == 200


def test_a_batch_of_images_in_one_request_is_answered_image_by_image(service):
    url, model = service
    sent = bodies()[:6]
    images = [base64.b64encode(b).decode() for b in sent] + ["not base64!", base64.b64encode(b"not an image").decode()]
    code, reply = request(f"{url}/predict_batch", json.dumps({"images": images}).encode(), "application/json")
    answers = json.loads(reply)["answers"]
    expected = timm_scan.EarlyExitPredictor(model)(torch.stack([preprocessed(b) for b in sent]))
    assert code == 200 and len(answers) == 8
    assert [a["label"] for a in answers[:6]] == expected.labels.tolist()
    assert [a["exit"] for a in answers[:6]] == expected.exit_index.tolist()
    assert answers[6]["status"] == 400 and "base64" in answers[6]["error"]
    assert answers[7]["status"] == 400 and "not an image" in answers[7]["error"]
    for body, content_type, status in [(b"[1, 2]", "application/json", 400), (b'{"images": []}', "application/json", 400),
                                       (json.dumps({"images": images[:1] * 257}).encode(), "application/json", 413),
                                       (sent[0], "image/png", 415)]:
        code, reply = request(f"{url}/predict_batch", body, content_type)
        assert code == status and json.loads(reply)["error"]

"""`SectionBatcher` (the service's batching per section, without Ray): every image gets the predictor's answer
whatever batches it ran in, survivors of different requests run together at the deeper sections, and an
image or a batch that fails fails alone."""

import asyncio

import pytest
import torch
from helpers import answer_all, create, sharpen

import timm_scan
from timm_scan import EarlyExitPredictor, ExitPolicy
from timm_scan.deploy.policy import decision_probs
from timm_scan.serve.batcher import SectionBatcher

# a CNN (the sequential runner) and TNT (the traced runner, whose state is two tensors, one of 16 rows a sample)
MODELS = {"resnet18": ({}, 32), "tnt_s_patch16_224": ({"img_size": 64, "depth": 4}, 64)}


def wrapped(name, n):
    """The model, its input size, and ``n`` images it answers with a mix of confidences."""
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = timm_scan.wrap(create(name, **kwargs).eval(), check_input_size=(3, size, size))
    x = torch.randn(n, 3, size, size)
    sharpen(model, x)
    return model, size, x


def separated_thresholds(model, x, rule="own", quantile=0.5):
    """Per shallow exit, a threshold near ``quantile`` of what it decides with, in the widest nearby gap between
    two samples' confidences: float rounding that moves with the batch size cannot move a sample across it."""
    with torch.no_grad():
        probs = [torch.softmax(z, -1) for z in model(x).logits]
    thresholds = []
    for decided in decision_probs(probs, rule)[:-1]:
        values = decided.amax(-1).sort().values
        middle = int(quantile * (len(values) - 1))
        j = max(range(max(0, middle - 3), min(len(values) - 1, middle + 4)), key=lambda j: values[j + 1] - values[j])
        assert values[j + 1] - values[j] > 1e-5
        thresholds.append(float(values[j] + values[j + 1]) / 2)
    return thresholds


@pytest.mark.parametrize("name, fallback, rule", [("resnet18", "ensemble", "own"), ("resnet18", "deepest", "running-mean"),
                                                  ("tnt_s_patch16_224", "ensemble", "running-mean")])
def test_every_image_gets_the_predictors_answer(name, fallback, rule):
    model, size, x = wrapped(name, 40)
    policy = ExitPolicy(separated_thresholds(model, x, rule), fallback, rule=rule)
    predictor = EarlyExitPredictor(model, policy)
    expected = predictor(x)
    batches = []
    batcher = SectionBatcher(predictor, (size, size), max_batch_size=8, batch_wait_s=0.001,
                             on_batch=lambda i, n: batches.append((i, n)))
    answers = asyncio.run(answer_all(batcher, x))
    probs = torch.stack([p for p, _ in answers])
    assert torch.equal(torch.tensor([e for _, e in answers]), expected.exit_index)
    assert torch.equal(probs.argmax(-1), expected.labels)
    torch.testing.assert_close(probs, expected.probs, rtol=1e-4, atol=1e-5)
    assert 0 < (expected.exit_index < model.num_exits - 1).sum() < len(x)  # a real mix of exits
    assert max(n for _, n in batches) <= 8 and sum(n for i, n in batches if i == 0) == len(x)


@pytest.mark.parametrize("fallback, rule", [("deepest", "own"), ("ensemble", "running-mean")])
def test_survivors_of_different_requests_run_together_at_the_deeper_sections(fallback, rule):
    model, size, x = wrapped("resnet18", 64)
    policy = ExitPolicy(separated_thresholds(model, x, rule, quantile=0.6), fallback, rule=rule)
    predictor = EarlyExitPredictor(model, policy)
    expected = predictor(x)
    reached = [(expected.exit_index >= i).sum().item() for i in range(model.num_exits)]
    batches = []
    # no wait runs out: a deeper section runs when it holds a full batch or nothing upstream can join it, so
    # groups of survivors are split to fill batches, and what Algorithm 1 carries for them (the probabilities
    # the ensemble and the running mean need) must follow their rows
    batcher = SectionBatcher(predictor, (size, size), max_batch_size=8, batch_wait_s=60,
                             on_batch=lambda i, n: batches.append((i, n)))
    answers = asyncio.run(answer_all(batcher, x))
    assert reached[-1] < 0.5 * len(x) and reached[-1] > 8  # several requests' survivors at the deepest section
    for i, n in enumerate(reached):  # every batch is full but one: 8 images in, ~3 out of a batch at the end
        sizes = sorted((m for j, m in batches if j == i), reverse=True)
        assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else []), (i, sizes)
    assert [a[1] for a in answers] == expected.exit_index.tolist()
    torch.testing.assert_close(torch.stack([p for p, _ in answers]), expected.probs, rtol=1e-4, atol=1e-5)


def test_callers_that_are_gone_are_not_run_and_a_failing_callback_fails_one_batch():
    model, size, x = wrapped("resnet18", 16)
    predictor = EarlyExitPredictor(model, ExitPolicy(separated_thresholds(model, x), "deepest"))
    expected = predictor(x)
    calls = []

    def on_batch(i, n):
        calls.append((i, n))
        if len(calls) == 1:
            raise RuntimeError("the metrics broke")

    async def run():
        batcher = SectionBatcher(predictor, (size, size), max_batch_size=4, batch_wait_s=0.01, on_batch=on_batch)
        tasks = [asyncio.create_task(batcher(image)) for image in x]
        await asyncio.sleep(0)  # every image is queued
        for task in tasks[4:8]:
            task.cancel()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(ValueError, match="one image"):
            await batcher(x[:2])
        batcher.close()
        return answers

    answers = asyncio.run(run())
    assert all(isinstance(a, RuntimeError) for a in answers[:4])  # the first batch, whose callback failed
    assert all(isinstance(a, asyncio.CancelledError) for a in answers[4:8])
    assert [a[1] for a in answers[8:]] == expected.exit_index[8:].tolist()
    assert sum(n for i, n in calls if i == 0) == 12  # the cancelled four never ran


def test_an_image_with_a_non_finite_answer_fails_alone_and_a_failing_section_fails_its_batch():
    model, size, x = wrapped("resnet18", 12)
    policy = ExitPolicy(separated_thresholds(model, x), "ensemble")
    predictor = EarlyExitPredictor(model, policy)
    expected = predictor(x)
    x[3] = float("nan")
    answers = asyncio.run(answer_all(SectionBatcher(predictor, (size, size), max_batch_size=4), x))
    assert isinstance(answers[3], ValueError) and "non-finite" in str(answers[3])
    for i, answer in enumerate(answers):
        if i != 3:
            assert answer[1] == expected.exit_index[i] and answer[0].argmax() == expected.labels[i]

    section, exit_logits = predictor.section_functions((size, size))

    class FailsOnce:  # the second section fails the first time it runs
        def __init__(self):
            self.policy, self.failed = policy, False

        def section_functions(self, image_size):
            def failing(i, h):
                if i == 1 and not self.failed:
                    self.failed = True
                    raise RuntimeError("out of memory")
                return section(i, h)
            return failing, exit_logits

    async def two_rounds():
        batcher = SectionBatcher(FailsOnce(), (size, size), max_batch_size=12, batch_wait_s=0.01)
        first = await asyncio.gather(*(batcher(image) for image in x[:3]), return_exceptions=True)
        second = await answer_all(batcher, x[4:])
        return first, second

    first, second = asyncio.run(two_rounds())
    survived = expected.exit_index[:3] > 0
    assert all(isinstance(a, RuntimeError) == bool(s) for a, s in zip(first, survived)) and survived.any()
    assert [a[1] for a in second] == expected.exit_index[4:].tolist()


def test_bad_settings_are_refused():
    model, size, _ = wrapped("resnet18", 4)
    predictor = EarlyExitPredictor(model, ExitPolicy([0.5] * (model.num_exits - 1)))
    with pytest.raises(ValueError, match="max_batch_size"):
        SectionBatcher(predictor, (size, size), max_batch_size=0)

"""Dynamic batching per section: early exit behind a service without near-empty deep batches.

A batch that runs Algorithm 1 shrinks as it goes deeper, so a service that batches whole requests runs its
deeper sections on the few samples of each batch that are still undecided. `SectionBatcher`
keeps one queue per section instead. A request's image joins section 0's queue; after each section the
samples that leave are answered and the rest join the next section's queue beside other requests'
survivors. One worker runs one section's batch at a time, off the event loop, and takes the deepest queue
that is ready:

- full (``max_batch_size`` samples),
- or holding a sample that has waited ``batch_wait_s`` in it,
- or, past section 0, with no sample upstream that could still join it.

So under load every section runs full batches, and a request that comes alone waits only section 0's
``batch_wait_s``, as under Ray Serve's ``@serve.batch`` (which forms one function's batches on its own
timer and so cannot hold survivors back for the next batch of another section). Each sample's answer is
`EarlyExitPredictor`'s: the same sections and heads (``predictor.section_functions``) and the same step
(`exit_step`); only the batches differ, which moves the logits by float rounding.

Sections are numbered 0..K-1 from the shallowest, as exits are; section k ends at exit k.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..deploy.policy import leaves
from ..deploy.predictor import ExitCarry, exit_step
from ..exit_policy import ExitPolicy
from ..model.traced import TracedState

__all__ = ["NonFiniteAnswer", "SectionBatcher"]

logger = logging.getLogger(__name__)


class NonFiniteAnswer(ValueError):
    """The model answered an image with non-finite probabilities: that image is refused, not the batch."""


class StagedPredictor(Protocol):
    """What `SectionBatcher` runs: `EarlyExitPredictor`, `OnnxEarlyExitPredictor`, or the plain backbone."""

    policy: ExitPolicy

    def section_functions(self, image_size: tuple[int, int]) -> tuple[Callable[[int, Any], Any], Callable[[int, Any], Tensor]]:
        ...


@dataclass
class _Group:
    """Samples waiting together in one section's queue: their hidden ``state`` (a batch, one row per
    sample), what Algorithm 1 carries for them, the futures their answers go to, and when they joined it."""

    state: Tensor | TracedState
    carry: ExitCarry
    futures: list[asyncio.Future]
    since: float

    def rows(self, rows: list[int]) -> _Group:
        """These samples, as a group that joined when this one did."""
        index = torch.tensor(rows, dtype=torch.int64, device=_device(self.state))
        return _Group(self.state[index], self.carry[index], [self.futures[i] for i in rows], self.since)


def _device(state: Tensor | TracedState) -> torch.device:
    return state.device if isinstance(state, Tensor) else state.batched()[0].device


def _cat(states: Sequence[Tensor | TracedState]) -> Tensor | TracedState:
    if len(states) == 1:
        return states[0]
    return TracedState.cat(states) if isinstance(states[0], TracedState) else torch.cat(states)


class SectionBatcher:
    """``await batcher(image)`` → ``(probs (C,), exit index)``: one preprocessed image ``(C, H, W)`` of
    ``image_size`` answered by ``predictor`` under its policy, batched per section with other callers' images
    (module docstring). The predictor's model must be in eval mode (`timm_scan.serve.app.load` leaves it so).
    An image whose answer is not finite gets `NonFiniteAnswer`; a section that fails passes its exception to
    every caller in its batch, and the next batches run. ``on_batch(section, size)`` is told of each batch
    run. Sections run on one thread of the batcher's own. Use it from one event loop."""

    def __init__(self, predictor: StagedPredictor, image_size: tuple[int, int], *, max_batch_size: int = 32,
                 batch_wait_s: float = 0.005, on_batch: Callable[[int, int], None] | None = None) -> None:
        if max_batch_size < 1 or batch_wait_s < 0:
            raise ValueError(f"max_batch_size must be at least 1 and batch_wait_s at least 0; got {max_batch_size} "
                             f"and {batch_wait_s}")
        self.policy = predictor.policy
        self.num_exits = len(self.policy.thresholds) + 1
        self.image_size = tuple(image_size)
        self.section, self.exit_logits = predictor.section_functions(self.image_size)
        self.max_batch_size, self.batch_wait_s, self.on_batch = max_batch_size, batch_wait_s, on_batch
        self.queues: list[collections.deque[_Group]] = [collections.deque() for _ in range(self.num_exits)]
        self.waiting = [0] * self.num_exits  # samples in each queue
        self._running: list[_Group] = []  # the groups of the batch being run
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="timm-scan-sections")

    async def __call__(self, image: Tensor) -> tuple[Tensor, int]:
        if not isinstance(image, Tensor) or image.ndim != 3 or tuple(image.shape[1:]) != self.image_size:
            got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"the batcher takes one image (C, {self.image_size[0]}, {self.image_size[1]}), "
                             f"preprocessed with the model's transform; got {got}")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._put(0, _Group(image[None], ExitCarry(), [future], time.monotonic()))
        return await future

    def close(self) -> None:
        """Stop the worker; callers still waiting (queued, or in the batch being run) get a ``RuntimeError``."""
        if self._worker is not None:
            self._worker.cancel()
        _fail([*self._running, *(g for queue in self.queues for g in queue)], RuntimeError("the service is shutting down"))
        for queue in self.queues:
            queue.clear()
        self.waiting = [0] * self.num_exits
        self._executor.shutdown(wait=False)

    def _put(self, i: int, group: _Group) -> None:
        self.queues[i].append(group)
        self.waiting[i] += len(group.futures)
        self._arrived.set()

    def _choose(self, now: float) -> tuple[int | None, float | None]:
        """The section to run now, or ``None`` and how long to wait at most (``None``: until a request comes)."""
        wait = None
        for i in reversed(range(self.num_exits)):
            if not self.queues[i]:
                continue
            waited = now - self.queues[i][0].since
            if self.waiting[i] >= self.max_batch_size or waited >= self.batch_wait_s or (i and not any(self.waiting[:i])):
                return i, None
            wait = min(wait, self.batch_wait_s - waited) if wait is not None else self.batch_wait_s - waited
        return None, wait

    def _take(self, i: int) -> None:
        """Up to ``max_batch_size`` samples from section i's queue into ``_running``, oldest first; a group may be
        split, and the samples whose callers are gone (cancelled) are dropped."""
        queue, size = self.queues[i], 0
        while queue and size < self.max_batch_size:
            group = queue.popleft()
            self.waiting[i] -= len(group.futures)
            self._running.append(group)  # from here on a failure fails its callers (`_work`)
            live = [j for j, f in enumerate(group.futures) if not f.done()]
            take = live[:self.max_batch_size - size]
            if len(live) > len(take):
                queue.appendleft(group.rows(live[len(take):]))
                self.waiting[i] += len(live) - len(take)
            if not take:
                self._running.pop()
            elif len(take) < len(group.futures):
                self._running[-1] = group.rows(take)
            size += len(take)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            i, wait = self._choose(time.monotonic())
            if i is None:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                self._take(i)
                if not self._running:
                    continue
                futures = [f for group in self._running for f in group.futures]
                if self.on_batch is not None:
                    self.on_batch(i, len(futures))
                outcome = await loop.run_in_executor(self._executor, self._run, i, self._running)
                self._deliver(i, futures, *outcome)
            except Exception as exc:  # a section that fails fails its batch, not the service
                logger.exception("section %d failed on a batch of %d samples", i, sum(len(g.futures) for g in self._running))
                _fail(self._running, exc)
            finally:
                self._running = []

    @torch.no_grad()
    def _run(self, i: int, groups: list[_Group]) -> tuple[Any, Tensor, ExitCarry, Tensor]:
        """Section i and its exit on the groups' samples as one batch: the state handed on, the probabilities
        each sample decides (or, at the deepest exit, is answered) with, the carry, and which samples leave."""
        state = self.section(i, _cat([g.state for g in groups]))
        carry = ExitCarry.cat([g.carry for g in groups])
        decided, carry = exit_step(self.policy, i, self.num_exits, self.exit_logits(i, state), carry)
        if i == self.num_exits - 1:
            return state, decided, carry, torch.ones(len(decided), dtype=torch.bool, device=decided.device)
        return state, decided, carry, leaves(decided.amax(-1), self.policy.thresholds[i])

    def _deliver(self, i: int, futures: list[asyncio.Future], state: Any, decided: Tensor, carry: ExitCarry,
                 done: Tensor) -> None:
        """Answer the samples that leave at exit i; queue the rest for section i+1."""
        finite = torch.isfinite(decided.amax(-1)).cpu().tolist()
        for future, leaves_here, ok, probs in zip(futures, done.tolist(), finite, decided, strict=True):
            if leaves_here and not future.done():
                if ok:
                    future.set_result((probs.clone(), i))
                else:
                    future.set_exception(NonFiniteAnswer(
                        "the model produced non-finite logits (NaN or infinite) for this image: pixel values far "
                        "outside the normalised range or a damaged model do that"))
        if not done.all():
            stay = (~done).nonzero()[:, 0]
            self._put(i + 1, _Group(state[stay], carry[stay], [futures[j] for j in stay.tolist()], time.monotonic()))


def _fail(groups: Sequence[_Group], exc: BaseException) -> None:
    for group in groups:
        for future in group.futures:
            if not future.done():
                future.set_exception(exc)

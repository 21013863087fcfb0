"""Continuous batching of DiT steps: one engine call per iteration for every clip in flight.

A clip being denoised holds one row (a *slot*) of the engine's resident buffers — its latent,
conditioning, duration and guidance — from its first step to its last. Every iteration gathers
each row's sigma pair (clips sit at different timesteps), makes ONE engine call over rows
``0..B-1`` and advances every clip by one step. A clip that took its last step leaves with its
latent and the last row moves into its slot, so the rows stay contiguous and no gather copy is
needed. The conditioning is loaded once per clip, and the latent stays in the engine's rows between
steps: in host memory for the onnx and Triton engines (the Triton engine sends every row with each
call), on the device for the torch engine.

The loop runs on a thread of its own, next to the engine; asyncio callers hand it clips with
:meth:`StepScheduler.render` and await the latent. Cancelling a clip (``Job.cancel``) takes it
out before the next iteration: at most the step in flight still runs.

Which rows an iteration steps is the *policy*:

- ``all`` — every clip in flight, every iteration (the most rows per call: throughput first;
  offline traffic).
- ``deadline`` — each clip has a deadline (a story's first clip: at once; a later clip: when the
  listener will reach it). An iteration steps the earliest deadlines up to the engine's *knee*
  (the smallest batch that uses it well, from its cost curve), plus every row that would be late
  if left out once more; with nothing late or at risk the batch grows while it costs no row its
  deadline (:func:`choose_rows`). A row left out waits while its deadline comes closer, until it
  is at risk or among the earliest: no clip starves. A clip without a deadline is due when
  submitted.

The chosen rows are swapped to the front (the engine steps rows ``0..B-1``); a row's result does
not depend on its neighbours (from ``min_batch`` 2 up, bit for bit), so the schedule changes when a
clip finishes, never what it renders.

The engines (where the rows live, what runs the step) are in ``step_engines.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import names
from .metrics import BatchMetrics, StageMetrics
from .placement import instance_gpu
from .simulated import CostCurve, SimulatedStepEngine
from .step_engines import OnnxStepEngine, StepEngine, TritonStepEngine

# ------------------------------------------------------------------------------------------------
# The scheduler
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One clip to denoise: ``len(sigmas) - 1`` steps from ``x0``.

    ``done(latent, error)`` is called once, from the scheduler's thread: the final latent
    ``[645, 64]``; ``None`` if the clip was cancelled; or an error.
    """
    x0: np.ndarray
    cond: np.ndarray
    duration: float
    guidance: float
    sigmas: np.ndarray
    done: Callable[[np.ndarray | None, BaseException | None], None]
    key: str = ""
    deadline: float | None = None      # time.time() by which the latent is due; None: at submission
    steps_done: int = 0
    cancelled: bool = field(default=False, repr=False)
    steps_at_cancel: int | None = field(default=None, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def remaining(self) -> int:
        return len(self.sigmas) - 1 - self.steps_done

    @property
    def steps_after_cancel(self) -> int:
        """Steps that ran after :meth:`cancel` (the one in flight then, at most, when the loop
        honours it); 0 for a clip never cancelled."""
        return 0 if self.steps_at_cancel is None else self.steps_done - self.steps_at_cancel

    def cancel(self) -> None:
        if not self.cancelled:
            self.steps_at_cancel = self.steps_done
            self.cancelled = True


@dataclass
class SchedulerStats:
    iterations: int = 0
    rows: int = 0
    engine_s: float = 0.0
    busy_s: float = 0.0          # iterations from gather to scatter, engine included
    waiting_rows: int = 0        # rows in flight that an iteration left out (deadline policy)
    choice_errors: int = 0       # iterations that stepped every row because choosing failed


POLICIES = ("all", "deadline")


@dataclass(frozen=True)
class Choice:
    """One iteration's rows under the deadline policy: ``rows`` (row indices to step, earliest
    deadline first) and ``backlog_s`` (engine seconds to finish the rows that are late or at risk,
    at the engine's best cost per row)."""
    rows: list[int]
    backlog_s: float


def choose_rows(jobs: list[Job], now: float, cost, knee: int, margin_s: float, floor: int = 1) -> Choice:
    """The deadline policy's choice among ``jobs`` (the rows in flight, in row order).

    A row's *pace* is the longest an iteration may take for it to finish in time:
    (deadline − now − margin) / steps left; below 0 it is *late* (a first clip always is: it is
    due at once). Stepped: the ``base`` earliest deadlines (the engine's knee, at least ``floor``
    rows), and every other row *at risk* — not late, but with a pace under the base batch's cost:
    left out once more, it would be late. Late rows beyond the base wait their turn in deadline
    order: they cannot be on time any more, and stepping them all at once would make every one of
    them, and the rows at risk, later still. With no row late or at risk, the batch grows along
    the deadline order while its cost fits every pace in it (spare time buys throughput)."""
    n = len(jobs)
    due = [now if j.deadline is None else j.deadline for j in jobs]
    order = sorted(range(n), key=due.__getitem__)
    pace = [(due[r] - now - margin_s) / max(1, jobs[r].remaining) for r in order]
    base = min(n, max(knee, floor))
    at_base = cost(base)
    risky = [p for p in range(base, n) if 0 <= pace[p] < at_base]
    pressed = [p for p in range(n) if pace[p] < at_base]
    backlog = sum(jobs[order[p]].remaining for p in pressed) * min(cost(b) / b for b in (base, n))
    if risky or min(pace[:base], default=0.0) < 0:
        return Choice([order[p] for p in range(base)] + [order[p] for p in risky], backlog)
    batch, tightest = base, min(pace[:base], default=float("inf"))
    for b in range(base + 1, n + 1):
        tightest = min(tightest, pace[b - 1])
        if cost(b) > tightest:
            break
        batch = b
    return Choice(order[:batch], backlog)


class StepScheduler:
    """Continuous batching over one engine. ``submit`` from any thread; ``render`` from asyncio.

    ``on_batch(rows, engine_s, busy_s)`` is called after every iteration (from the scheduler's
    thread) with the clips stepped, the engine call's seconds and the iteration's (gather, engine,
    scatter): keep it cheap, it is on the loop's critical path.

    ``min_batch``: engine calls carry at least this many rows, a lone clip's row repeated into the
    spare ones. onnxruntime and torch take another kernel path for a batch of one (results differ
    from any larger batch by ~1e-7 relative; from 2 rows up a row's result is bit-identical
    whatever it is batched with), so ``min_batch=2`` makes every clip bit-identical to its render
    in any batch, at the price of a second row while a clip denoises alone.
    """

    def __init__(self, engine: StepEngine, on_batch: Callable[[int, float, float], None] | None = None,
                 name: str = "dit-scheduler", min_batch: int = 1, policy: str = "all", margin_s: float = 0.5,
                 cost: CostCurve | None = None):
        if not 1 <= min_batch <= engine.capacity:
            raise ValueError(f"min_batch must be in [1, {engine.capacity}], got {min_batch}")
        if policy not in POLICIES:
            raise ValueError(f"step policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.engine = engine
        self.min_batch = min_batch
        self.policy = policy
        self.margin_s = margin_s
        # What an iteration costs by its rows: the engine's own curve (the simulated one), else learned.
        self.cost = cost or getattr(engine, "cost", None) or CostCurve()
        self._learn = policy == "deadline" and not self.cost.known
        self._knee = self.cost.knee(engine.capacity) if self.cost.known else 1
        self.backlog_s = 0.0          # deadline policy: engine seconds of rows at risk (admission reads it)
        self.on_batch = on_batch
        self.stats = SchedulerStats()
        self._rows: list[Job] = []                  # row r of the engine holds _rows[r]
        self._pending: list[Job] = []
        self._admitting: list[Job] = []             # taken from _pending, not yet in _rows
        self._wake = threading.Condition()
        self._closed = False
        self._sigma = np.zeros(engine.capacity, np.float32)
        self._sigma_next = np.zeros(engine.capacity, np.float32)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    # -- callers --------------------------------------------------------------------------------
    def submit(self, *jobs: Job) -> None:
        """Hand clips to the loop; clips submitted together start on the same iteration."""
        for job in jobs:
            if job.num_steps < 1:
                raise ValueError(f"a job needs at least one step, got sigmas of length {len(job.sigmas)}")
        now = time.time()
        for job in jobs:
            if job.deadline is None:
                job.deadline = now
        with self._wake:
            if self._closed:
                raise RuntimeError("the step scheduler is closed")
            self._pending.extend(jobs)
            self._wake.notify()

    def render(self, x0, cond, duration, guidance, sigmas, key: str = "",
               deadline: float | None = None) -> tuple[Job, asyncio.Future]:
        """Submit a clip from a coroutine: ``(job, future)``; the future gives the latent or None
        (cancelled) and raises the engine's error."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(latent, error):
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(latent)

        job = Job(x0, cond, float(duration), float(guidance), sigmas,
                  lambda latent, error: loop.call_soon_threadsafe(settle, latent, error), key, deadline)
        self.submit(job)
        return job, fut

    def cancel(self, key: str) -> int:
        """Cancel every clip of ``key`` in flight or waiting; returns how many."""
        if not key:
            return 0
        with self._wake:
            jobs = [j for j in self._rows + self._admitting + self._pending if j.key == key and not j.cancelled]
        for j in jobs:
            j.cancel()
        return len(jobs)

    @property
    def active(self) -> int:
        return len(self._rows)

    def tracked(self) -> dict[str, int]:
        """Clips in the engine's rows and clips waiting to join them."""
        return {"scheduler_rows": len(self._rows), "scheduler_pending": len(self._pending) + len(self._admitting)}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self.thread.join(timeout=10)
        self.engine.close()

    # -- the loop (its own thread) --------------------------------------------------------------
    def _loop(self) -> None:
        engine, rows = self.engine, self._rows
        while True:
            with self._wake:
                while not self._closed and not self._pending and not rows:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._pending[:engine.capacity - len(rows)]
                del self._pending[:len(admitted)]
                # Visible to cancel() while they load: a cancel now is seen before their first step.
                self._admitting = admitted
            for job in admitted:
                if job.cancelled:
                    job.done(None, None)
                    continue
                try:
                    engine.load(len(rows), job.x0, job.cond, job.duration, job.guidance)
                except Exception as e:  # noqa: BLE001 - a bad clip fails alone
                    job.done(None, e)
                    continue
                rows.append(job)
            with self._wake:
                self._admitting = []
            for r in range(len(rows) - 1, -1, -1):
                if rows[r].cancelled:
                    self._remove(r).done(None, None)
            if not rows:
                self.backlog_s = 0.0
                continue
            t0 = time.perf_counter()
            b = len(rows) if self.policy == "all" else self._choose_or_all()
            left_out = len(rows) - b
            for r in range(b):
                job = rows[r]
                self._sigma[r] = job.sigmas[job.steps_done]
                self._sigma_next[r] = job.sigmas[job.steps_done + 1]
            padded = max(b, self.min_batch)
            for r in range(len(rows), padded):  # spare rows (only when fewer clips than min_batch): copies of row 0
                engine.move(0, r)
                self._sigma[r], self._sigma_next[r] = self._sigma[0], self._sigma_next[0]
            te = time.perf_counter()
            try:
                engine.step(padded, self._sigma[:padded], self._sigma_next[:padded])
            except Exception as e:  # noqa: BLE001 - the engine failed: every clip in it fails
                while rows:
                    self._remove(len(rows) - 1).done(None, e)
                continue
            t1 = time.perf_counter()
            for r in range(b - 1, -1, -1):
                job = rows[r]
                job.steps_done += 1
                if job.steps_done == job.num_steps:
                    latent = engine.latent(r)
                    self._remove(r)
                    job.done(latent, None)
            s = self.stats
            busy = time.perf_counter() - t0
            s.iterations += 1
            s.rows += b
            s.engine_s += t1 - te
            s.busy_s += busy
            s.waiting_rows += left_out
            if self._learn:
                self.cost.observe(padded, t1 - te)
                if s.iterations % 64 == 1:
                    try:
                        self._knee = self.cost.knee(self.engine.capacity)
                    except Exception:  # noqa: BLE001 - keep the last knee; the loop must not die
                        s.choice_errors += 1
            if self.on_batch is not None:
                self.on_batch(b, t1 - te, busy)
        for job in rows + self._admitting + self._pending:      # closed: nobody will step these
            job.done(None, RuntimeError("the step scheduler was closed"))

    def _choose_or_all(self) -> int:
        """The deadline policy's rows; should choosing fail, every row (the loop must not die)."""
        try:
            return self._choose()
        except Exception:  # noqa: BLE001 - a scheduling bug costs latency, never the clips
            self.stats.choice_errors += 1
            return len(self._rows)

    def _choose(self) -> int:
        """Deadline policy: bring this iteration's rows to the front; returns how many."""
        rows = self._rows
        pick = choose_rows(rows, time.time(), self.cost, self._knee, self.margin_s, min(self.min_batch, len(rows)))
        self.backlog_s = pick.backlog_s
        wanted = [rows[r] for r in pick.rows]
        where = {id(job): r for r, job in enumerate(rows)}
        for p, job in enumerate(wanted):
            r = where[id(job)]
            if r != p:
                other = rows[p]
                self.engine.swap(p, r)
                rows[p], rows[r] = job, other
                where[id(job)], where[id(other)] = p, r
        return len(wanted)

    def _remove(self, r: int) -> Job:
        """Take row ``r`` out; the last row moves into its place (rows stay contiguous)."""
        rows = self._rows
        job = rows[r]
        last = len(rows) - 1
        if r != last:
            self.engine.move(last, r)
            rows[r] = rows[last]
        rows.pop()
        return job


def scheduler_from_parameters(pb_utils, params, args: dict, on_retry=None):
    """``dit_sampler``'s scheduler over the engine its config names (``dit_engine``), and the
    batch metrics it reports under ``dit_step`` when it runs the step itself (None otherwise: the
    ``dit_step`` model reports its own). ``params``: the model's ``adapter.Parameters``."""
    kind = params.get("dit_engine", "onnx")
    capacity, n = params.int("max_clips_in_flight", 32), params.int("num_tokens", 0)
    batch_metrics = None
    if kind == "onnx":
        engine = OnnxStepEngine(params.require("onnx_path"), capacity, n, params.int("threads", 0), instance_gpu(args))
        batch_metrics = BatchMetrics(StageMetrics(pb_utils, names.DIT_STEP), names.DIT_STEP)
    elif kind == "triton":
        engine = TritonStepEngine(pb_utils, params.get("step_model", names.DIT_STEP), capacity, n,
                                  params.int("step_max_batch", 16), params.float("bls_timeout_s", 30.0),
                                  params.int("bls_attempts", 4), on_retry)
    elif kind == "simulated":
        engine = SimulatedStepEngine(capacity, n)
        batch_metrics = BatchMetrics(StageMetrics(pb_utils, names.DIT_STEP), names.DIT_STEP)
    else:
        raise ValueError(f"{names.SAMPLER}: dit_engine must be onnx, triton or simulated, got {kind!r}")
    on_batch = batch_metrics.add if batch_metrics else None
    scheduler = StepScheduler(engine, on_batch, min_batch=params.int("min_batch", 1),
                              policy=params.get("step_policy", "all"), margin_s=params.float("deadline_margin_s", 0.5))
    return scheduler, batch_metrics

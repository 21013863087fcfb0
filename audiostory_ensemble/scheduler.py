"""Continuous batching of DiT steps: one engine call per iteration for every clip in flight.

A clip being denoised holds one row (a *slot*) of the engine's resident buffers — its latent,
conditioning, duration and guidance — from its first step to its last. Every iteration gathers
each row's sigma pair (clips sit at different timesteps), makes ONE engine call over rows
``0..B-1`` and advances every clip by one step. A clip that took its last step leaves with its
latent and the last row moves into its slot, so the rows stay contiguous and no gather copy is
needed. The conditioning is uploaded once per clip, and the latent stays in the engine's buffer
(on the GPU, for a GPU engine) between steps.

The loop runs on a thread of its own, next to the engine; asyncio callers hand it clips with
:meth:`StepScheduler.render` and await the latent. Cancelling a clip (``Job.cancel``) takes it
out before the next iteration: at most the step in flight still runs.

Engines (``StepEngine`` subclasses) differ only in where the rows live and what runs the step:
``OnnxStepEngine`` (onnxruntime in this process; the cpu profile), ``TritonStepEngine`` (one BLS
request per iteration to the ``dit_step`` model, e.g. a TensorRT plan; the gpu profile),
``TorchStepEngine`` (the PyTorch module on any device; the GPU check and the reference-side loop).
Nothing here imports ``triton_python_backend_utils``: the Triton engine is handed ``pb_utils``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import names
from .config import BRIDGE_DIM, LATENT_CHANNELS, LATENT_FRAMES

DIT_INPUTS = names.DIT_STEP_INPUTS
DIT_OUTPUT = names.DIT_STEP_OUTPUT


# ------------------------------------------------------------------------------------------------
# Engines: resident rows + one batched guided Euler step
# ------------------------------------------------------------------------------------------------

class StepEngine:
    """Rows ``0..capacity-1`` of latents and their per-clip inputs, stepped in place.

    The base class keeps the rows in host memory (numpy); :meth:`_run` is the step itself,
    ``(x, cond, duration, sigma, sigma_next, guidance) -> x_next`` over the first ``B`` rows.
    """

    def __init__(self, capacity: int, num_tokens: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.num_tokens = num_tokens
        self.x = np.zeros((capacity, LATENT_FRAMES, LATENT_CHANNELS), np.float32)
        self.cond = np.zeros((capacity, num_tokens, BRIDGE_DIM), np.float32)
        self.duration = np.zeros(capacity, np.float32)
        self.guidance = np.zeros(capacity, np.float32)

    def load(self, row: int, x: np.ndarray, cond: np.ndarray, duration: float, guidance: float) -> None:
        self.x[row] = x
        self.cond[row] = cond
        self.duration[row] = duration
        self.guidance[row] = guidance

    def move(self, src: int, dst: int) -> None:
        for buf in (self.x, self.cond, self.duration, self.guidance):
            buf[dst] = buf[src]

    def latent(self, row: int) -> np.ndarray:
        return self.x[row].copy()

    def step(self, rows: int, sigma: np.ndarray, sigma_next: np.ndarray) -> None:
        self.x[:rows] = self._run(self.x[:rows], self.cond[:rows], self.duration[:rows], sigma, sigma_next,
                                  self.guidance[:rows])

    def _run(self, x, cond, duration, sigma, sigma_next, guidance) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OnnxStepEngine(StepEngine):
    """The exported ``dit_step.onnx`` on onnxruntime, in this process (CPU, or CUDA EP where the
    onnxruntime build has it: rows then cross to the device at every step)."""

    def __init__(self, path, capacity: int, num_tokens: int, threads: int = 0, device_id: int | None = None):
        from .serving.onnx_runner import ort_session

        super().__init__(capacity, num_tokens)
        self.session = ort_session(path, threads, device_id)
        names = {i.name for i in self.session.get_inputs()}
        if names != set(DIT_INPUTS):
            raise ValueError(f"{path}: inputs {sorted(names)}, expected {sorted(DIT_INPUTS)}")

    def _run(self, x, cond, duration, sigma, sigma_next, guidance):
        return self.session.run([DIT_OUTPUT], dict(zip(DIT_INPUTS, (x, cond, duration, sigma, sigma_next,
                                                                     guidance))))[0]


class TritonStepEngine(StepEngine):
    """One BLS request per iteration (per ``max_batch`` rows) to a Triton ``dit_step`` model —
    whatever its backend: the python/onnxruntime form, or a TensorRT plan on GPU hosts. Chunks of
    one iteration are sent together so that several model instances can work on them."""

    def __init__(self, pb_utils, model: str, capacity: int, num_tokens: int, max_batch: int,
                 timeout_s: float = 30.0):
        super().__init__(capacity, num_tokens)
        self.pb = pb_utils
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.timeout_ms = int(timeout_s * 1000)
        self.pool = ThreadPoolExecutor(max(1, -(-capacity // self.max_batch)), "dit-step-bls")

    def _one(self, arrays: dict) -> np.ndarray:
        pb = self.pb
        inputs = [pb.Tensor(name, np.ascontiguousarray(arrays[name] if arrays[name].ndim > 1
                                                        else arrays[name][:, None])) for name in DIT_INPUTS]
        request = pb.InferenceRequest(model_name=self.model, inputs=inputs, requested_output_names=[DIT_OUTPUT],
                                      timeout=self.timeout_ms * 1000)
        result = request.exec()
        if result.has_error():
            raise RuntimeError(f"{self.model}: {result.error().message()}")
        return pb.get_output_tensor_by_name(result, DIT_OUTPUT).as_numpy()

    def _run(self, x, cond, duration, sigma, sigma_next, guidance):
        arrays = dict(zip(DIT_INPUTS, (x, cond, duration, sigma, sigma_next, guidance)))
        rows = x.shape[0]
        chunks = [{k: v[a:a + self.max_batch] for k, v in arrays.items()} for a in range(0, rows, self.max_batch)]
        if len(chunks) == 1:
            return self._one(chunks[0])
        return np.concatenate(list(self.pool.map(self._one, chunks)), axis=0)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class TorchStepEngine(StepEngine):
    """A ``GuidedEulerStep`` module on its device; the rows are tensors there, so the latent never
    leaves the device between steps. ``cuda_graphs``: replay one captured graph per padded batch
    size (powers of two up to ``capacity``) instead of launching the step's kernels one by one."""

    def __init__(self, module, capacity: int, num_tokens: int, device="cpu", dtype=None, cuda_graphs: bool = False):
        import torch

        self.torch = torch
        self.capacity = capacity
        self.num_tokens = num_tokens
        self.module = module
        self.device = torch.device(device)
        self.dtype = dtype or next(module.parameters()).dtype
        kw = dict(device=self.device, dtype=self.dtype)
        self.x = torch.zeros(capacity, LATENT_FRAMES, LATENT_CHANNELS, **kw)
        self.cond = torch.zeros(capacity, num_tokens, BRIDGE_DIM, **kw)
        self.duration = torch.zeros(capacity, **kw)
        self.guidance = torch.zeros(capacity, **kw)
        self.sigma = torch.zeros(capacity, **kw)
        self.sigma_next = torch.zeros(capacity, **kw)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self._graphs: dict[int, tuple] = {}

    def load(self, row, x, cond, duration, guidance):
        t = self.torch
        self.x[row] = t.as_tensor(np.asarray(x), device=self.device).to(self.dtype)
        self.cond[row] = t.as_tensor(np.asarray(cond), device=self.device).to(self.dtype)
        self.duration[row] = float(duration)
        self.guidance[row] = float(guidance)

    def move(self, src, dst):
        for buf in (self.x, self.cond, self.duration, self.guidance):
            buf[dst] = buf[src]

    def latent(self, row):
        return self.x[row].float().cpu().numpy()

    def _padded(self, rows: int) -> int:
        p = 1
        while p < rows:
            p *= 2
        return min(p, self.capacity)

    def step(self, rows, sigma, sigma_next):
        t = self.torch
        self.sigma[:rows] = t.as_tensor(sigma, device=self.device).to(self.dtype)
        self.sigma_next[:rows] = t.as_tensor(sigma_next, device=self.device).to(self.dtype)
        with t.no_grad():
            if not self.cuda_graphs:
                self.x[:rows] = self.module(self.x[:rows], self.cond[:rows], self.duration[:rows], self.sigma[:rows],
                                            self.sigma_next[:rows], self.guidance[:rows])
                return
            b = self._padded(rows)
            if b not in self._graphs:
                self._graphs[b] = self._capture(b)
            graph, out = self._graphs[b]
            graph.replay()                  # reads rows 0..b-1 of the buffers, writes `out`
            self.x[:rows] = out[:rows]

    def _capture(self, b: int):
        t = self.torch
        args = (self.x[:b], self.cond[:b], self.duration[:b], self.sigma[:b], self.sigma_next[:b], self.guidance[:b])
        stream = t.cuda.Stream()
        stream.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(stream), t.no_grad():
            for _ in range(2):             # warm-up outside the graph (allocations, autotuning)
                self.module(*args)
        t.cuda.current_stream().wait_stream(stream)
        graph = t.cuda.CUDAGraph()
        with t.cuda.graph(graph), t.no_grad():
            out = self.module(*args)
        return graph, out

    def _run(self, *a):  # pragma: no cover - step() is overridden
        raise NotImplementedError


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
    steps_done: int = 0
    cancelled: bool = field(default=False, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class SchedulerStats:
    iterations: int = 0
    rows: int = 0
    engine_s: float = 0.0
    busy_s: float = 0.0          # iterations from gather to scatter, engine included


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
                 name: str = "dit-scheduler", min_batch: int = 1):
        if not 1 <= min_batch <= engine.capacity:
            raise ValueError(f"min_batch must be in [1, {engine.capacity}], got {min_batch}")
        self.engine = engine
        self.min_batch = min_batch
        self.on_batch = on_batch
        self.stats = SchedulerStats()
        self._rows: list[Job] = []                  # row r of the engine holds _rows[r]
        self._pending: list[Job] = []
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
        with self._wake:
            if self._closed:
                raise RuntimeError("the step scheduler is closed")
            self._pending.extend(jobs)
            self._wake.notify()

    def render(self, x0, cond, duration, guidance, sigmas, key: str = "") -> tuple[Job, asyncio.Future]:
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
                  lambda latent, error: loop.call_soon_threadsafe(settle, latent, error), key)
        self.submit(job)
        return job, fut

    def cancel(self, key: str) -> int:
        """Cancel every clip of ``key`` in flight or waiting; returns how many."""
        if not key:
            return 0
        with self._wake:
            jobs = [j for j in self._rows + self._pending if j.key == key and not j.cancelled]
        for j in jobs:
            j.cancel()
        return len(jobs)

    @property
    def active(self) -> int:
        return len(self._rows)

    def tracked(self) -> dict[str, int]:
        """Clips in the engine's rows and clips waiting to join them."""
        return {"scheduler_rows": len(self._rows), "scheduler_pending": len(self._pending)}

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
            for r in range(len(rows) - 1, -1, -1):
                if rows[r].cancelled:
                    self._remove(r).done(None, None)
            if not rows:
                continue
            t0 = time.perf_counter()
            b = len(rows)
            for r, job in enumerate(rows):
                self._sigma[r] = job.sigmas[job.steps_done]
                self._sigma_next[r] = job.sigmas[job.steps_done + 1]
            padded = max(b, self.min_batch)
            for r in range(b, padded):          # spare rows: copies of row 0, results unused
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
            if self.on_batch is not None:
                self.on_batch(b, t1 - te, busy)
        for job in rows + self._pending:      # closed: nobody will step these
            job.done(None, RuntimeError("the step scheduler was closed"))

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

"""DiT step engines: resident rows + one batched guided Euler step per call.

A ``StepEngine`` holds rows ``0..capacity-1`` of latents and their per-clip inputs (conditioning,
duration, guidance) and steps rows ``0..B-1`` in place; the step scheduler (``scheduler.py``) decides
which clip sits in which row. Engines differ only in where the rows live and what runs the step:
``OnnxStepEngine`` (onnxruntime in this process; the cpu profile), ``TritonStepEngine`` (BLS
requests to the ``dit_step`` model, ``max_batch`` rows each, e.g. a TensorRT plan; the gpu profile),
``TorchStepEngine`` (the PyTorch module on any device; the GPU check). Nothing here imports
``triton_python_backend_utils``: the Triton engine is handed ``pb_utils``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import numpy as np

from .. import names
from ..model.config import BRIDGE_DIM, LATENT_CHANNELS, LATENT_FRAMES

DIT_INPUTS = names.DIT_STEP_INPUTS
DIT_OUTPUT = names.DIT_STEP_OUTPUT



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

    def swap(self, a: int, b: int) -> None:
        for buf in (self.x, self.cond, self.duration, self.guidance):
            buf[[a, b]] = buf[[b, a]]

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
        from .onnx_runner import ort_session

        super().__init__(capacity, num_tokens)
        self.session = ort_session(path, threads, device_id)
        names = {i.name for i in self.session.get_inputs()}
        if names != set(DIT_INPUTS):
            raise ValueError(f"{path}: inputs {sorted(names)}, expected {sorted(DIT_INPUTS)}")

    def _run(self, x, cond, duration, sigma, sigma_next, guidance):
        return self.session.run([DIT_OUTPUT], dict(zip(DIT_INPUTS, (x, cond, duration, sigma, sigma_next,
                                                                     guidance))))[0]


class TritonStepEngine(StepEngine):
    """One BLS request per ``max_batch`` rows of an iteration to a Triton ``dit_step`` model —
    whatever its backend: the python/onnxruntime form, or a TensorRT plan on GPU hosts. The chunks
    of one iteration are sent together so that several model instances can work on them.

    A chunk unanswered within ``timeout_s`` is sent again (``on_retry(model, attempt)`` told
    first), up to ``attempts`` sends: its rows travel with the request, so a second answer is the
    same step. Only silence every time, or an error answer, fails the iteration (and so every clip
    in it). An unanswered call keeps its pool thread until it returns; the pool holds a thread for
    every send one iteration can make."""

    def __init__(self, pb_utils, model: str, capacity: int, num_tokens: int, max_batch: int,
                 timeout_s: float = 30.0, attempts: int = 1, on_retry: Callable[[str, int], None] | None = None):
        super().__init__(capacity, num_tokens)
        self.pb = pb_utils
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.timeout_s = float(timeout_s)
        self.timeout_us = int(self.timeout_s * 1_000_000)     # Triton's request timeout is in microseconds
        self.attempts = max(1, int(attempts))
        self.on_retry = on_retry
        chunks = -(-capacity // self.max_batch)
        self.pool = ThreadPoolExecutor(max(1, chunks * self.attempts), "dit-step-bls")

    def _call(self, arrays: dict) -> np.ndarray:
        pb = self.pb
        inputs = [pb.Tensor(name, np.ascontiguousarray(arrays[name] if arrays[name].ndim > 1
                                                        else arrays[name][:, None])) for name in DIT_INPUTS]
        request = pb.InferenceRequest(model_name=self.model, inputs=inputs, requested_output_names=[DIT_OUTPUT],
                                      timeout=self.timeout_us)
        result = request.exec()
        if result.has_error():
            raise RuntimeError(f"{self.model}: {result.error().message()}")
        return pb.get_output_tensor_by_name(result, DIT_OUTPUT).as_numpy()

    def _run(self, x, cond, duration, sigma, sigma_next, guidance):
        arrays = dict(zip(DIT_INPUTS, (x, cond, duration, sigma, sigma_next, guidance)))
        rows = x.shape[0]
        chunks = [{k: v[a:a + self.max_batch] for k, v in arrays.items()} for a in range(0, rows, self.max_batch)]
        sent = [self.pool.submit(self._call, c) for c in chunks]     # all at once, then collected in order
        outs = []
        for chunk, future in zip(chunks, sent):
            for attempt in range(1, self.attempts + 1):
                try:
                    outs.append(future.result(self.timeout_s))
                    break
                except FutureTimeout:
                    if attempt == self.attempts:
                        raise RuntimeError(f"{self.model}: no answer within {self.timeout_s:g} s, "
                                           f"{self.attempts} attempts") from None
                    if self.on_retry is not None:
                        self.on_retry(self.model, attempt)
                    future = self.pool.submit(self._call, chunk)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

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

    def swap(self, a, b):
        idx, rev = self.torch.tensor([a, b], device=self.device), self.torch.tensor([b, a], device=self.device)
        for buf in (self.x, self.cond, self.duration, self.guidance):
            buf[idx] = buf[rev]

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

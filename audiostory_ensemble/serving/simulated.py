"""A simulated H100: the DiT step and the VAE decode cost what they cost on the GPU, on any machine.

The times are ours, measured on one H100 with the full-size modules (bf16, the step as a replayed
CUDA graph; ``benchmarks/README.md``, "Full-size DiT step and VAE on one H100"). A simulated engine
sleeps the time its batch takes there and passes the latent through unchanged (the VAE answers
silence of the real shape), so the real front door, planner, bridge and step scheduler run against
GPU-like costs on a machine without one: what a scheduling policy does to time-to-first-clip and
stalls can be measured here. The audio is not the model's; parity is what the real engines are for.

:class:`CostCurve` is also what the step scheduler plans with: the seconds of one iteration by
its number of rows, given (the simulated engine's table) or learned from the iterations it runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..model import layout
from .step_engines import StepEngine

# One guided DiT step of the full-size model, by batch (clips), milliseconds: bf16, CUDA graph.
H100_STEP_MS = {1: 7.09, 2: 11.4, 4: 20.4, 8: 40.4, 16: 78.9, 32: 152.1}
# The VAE decode of one full-length clip (645 latent frames), bf16, milliseconds, by batch.
H100_VAE_MS = {1: 50.4, 4: 178.0}


class CostCurve:
    """Seconds of one call by its batch size: piecewise linear through the known points, the last
    segment's slope beyond them (a batch of 64 costs twice 32's, less the fixed part; never a
    falling one), the first point's per-row cost below them. ``observe`` folds in a measured call (a running average per
    size), so a curve can start empty and learn the engine it schedules."""

    def __init__(self, points_s: dict[int, float] | None = None, smoothing: float = 0.2):
        self._points: dict[int, float] = {int(b): float(s) for b, s in (points_s or {}).items() if b >= 1}
        self.smoothing = smoothing
        self._sizes = sorted(self._points)

    @classmethod
    def of_ms(cls, points_ms: dict[int, float]) -> "CostCurve":
        return cls({b: ms / 1000.0 for b, ms in points_ms.items()})

    @property
    def known(self) -> bool:
        return bool(self._points)

    def observe(self, batch: int, seconds: float) -> None:
        if batch < 1 or seconds <= 0:
            return
        old = self._points.get(batch)
        self._points[batch] = seconds if old is None else old + self.smoothing * (seconds - old)
        if old is None:
            self._sizes = sorted(self._points)

    def __call__(self, batch: int) -> float:
        """Seconds for ``batch`` rows (1.0 a row while nothing is known: only ratios matter then)."""
        sizes, p = self._sizes, self._points
        if not sizes:
            return float(batch)
        if batch in p:
            return p[batch]
        if batch < sizes[0]:
            return p[sizes[0]] * batch / sizes[0]
        if len(sizes) == 1:
            return p[sizes[0]] * batch / sizes[0]
        if batch > sizes[-1]:       # never cheaper than the largest batch measured (noisy timings)
            lo, hi = sizes[-2], sizes[-1]
            return p[hi] + max(0.0, p[hi] - p[lo]) * (batch - hi) / (hi - lo)
        lo, hi = next((a, b) for a, b in zip(sizes, sizes[1:]) if a < batch < b)
        return p[lo] + (p[hi] - p[lo]) * (batch - lo) / (hi - lo)

    def per_row(self, batch: int) -> float:
        return self(batch) / batch

    def knee(self, capacity: int, tolerance: float = 0.1) -> int:
        """The smallest batch whose cost per row is within ``tolerance`` of the best up to
        ``capacity``: below it, stepping fewer rows wastes the engine; above it, a bigger batch
        buys little throughput and slows every clip in it."""
        costs = [self.per_row(b) for b in range(1, capacity + 1)]
        best = min(costs)
        return next((b for b, c in enumerate(costs, 1) if c <= best * (1 + tolerance)), capacity)


class SimulatedStepEngine(StepEngine):
    """Rows in host memory like the onnx engine; a step sleeps the curve's time for its batch and
    leaves the latents as they were."""

    def __init__(self, capacity: int, num_tokens: int, cost: CostCurve | None = None):
        super().__init__(capacity, num_tokens)
        self.cost = cost or CostCurve.of_ms(H100_STEP_MS)

    def step(self, rows: int, sigma, sigma_next) -> None:
        time.sleep(self.cost(rows))


class SimulatedBatchRunner:
    """``OnnxBatchRunner``'s interface for the VAE: sleeps the curve's time for all the rows of the
    batched requests and answers zeros of each output's shape (from the export's manifest)."""

    def __init__(self, inputs: dict[str, list], outputs: dict[str, list], cost: CostCurve | None = None):
        self.inputs = [(name, len(shape)) for name, shape in inputs.items()]
        self.output_shapes = {name: [int(d) for d in shape[1:]] for name, shape in outputs.items()}
        self.cost = cost or CostCurve.of_ms(H100_VAE_MS)

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        sizes = [r[self.inputs[0][0]].shape[0] for r in requests]
        time.sleep(self.cost(sum(sizes)))
        return [{name: np.zeros([n, *shape], np.float32) for name, shape in self.output_shapes.items()} for n in sizes]


def simulated_runner(onnx_path: str | Path, gpu: str = "h100") -> SimulatedBatchRunner:
    """The VAE's stand-in, shaped like the graph at ``onnx_path`` (from its export's manifest)."""
    if gpu != "h100":
        raise ValueError(f"simulate must be h100 (the GPU our times were measured on), got {gpu!r}")
    path = Path(onnx_path)
    graphs = json.loads((path.parent / layout.MANIFEST).read_text())["graphs"]
    graph = next(g for g in graphs.values() if g["file"] == path.name)
    return SimulatedBatchRunner(graph["inputs"], graph["outputs"])

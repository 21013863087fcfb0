"""onnxruntime sessions, and the batched runner of the cpu form of ``dit_step`` / ``vae_decoder``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_session(path: str | Path, threads: int = 0, device_id: int | None = None):
    """An onnxruntime session (CUDA EP where present, on ``device_id`` — the instance's GPU).
    Spinning is off so that idle ORT threads do not steal CPU from torch or other sessions in the
    same process. The CPU memory arena is off: with it, the full-size VAE decoder's process kept
    7.8 GiB between calls (the arena grows and never gives back) against a 3.3 GiB peak without
    it and 0.2 GiB between calls, at the same speed (deploy/README.md, "Sizing")."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    providers: list = []
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": int(device_id or 0)}))
    providers.append("CPUExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxBatchRunner:
    """Runs one ONNX graph on the rows of several Triton requests at once.

    Each request carries a batch of rows (its first axis); rows are concatenated, run in one
    session call, and split back. Inputs the graph takes as ``[B]`` arrive from Triton as
    ``[b, 1]`` and are flattened.
    """

    def __init__(self, path: str | Path, threads: int = 0, device_id: int | None = None):
        self.session = ort_session(path, threads, device_id)
        self.inputs = [(i.name, len(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        sizes = [r[self.inputs[0][0]].shape[0] for r in requests]
        feed = {}
        for name, rank in self.inputs:
            parts = [np.asarray(r[name], dtype=np.float32) for r in requests]
            arr = np.concatenate(parts, axis=0)
            feed[name] = arr.reshape(-1) if rank == 1 else arr
        results = self.session.run(self.outputs, feed)
        out, start = [], 0
        for n in sizes:
            out.append({name: res[start:start + n] for name, res in zip(self.outputs, results)})
            start += n
        return out

"""bridge: bridging queries (LLM hidden states) -> fused conditioning tokens, in torch."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from audiostory_ensemble import names
from audiostory_ensemble.model.checkpoint import load_converted
from audiostory_ensemble.serving.adapter import Parameters


class TritonPythonModel:
    def initialize(self, args):
        params = Parameters(args)
        torch.set_num_threads(params.int("threads", 1))
        self.bridge = load_converted(params.require("checkpoint")).bridge()

    @torch.no_grad()
    def execute(self, requests):
        responses = []
        for request in requests:
            sem = pb_utils.get_input_tensor_by_name(request, names.SEM)
            res = pb_utils.get_input_tensor_by_name(request, names.RES)
            meta = pb_utils.get_input_tensor_by_name(request, names.META)
            if sem is None or res is None or meta is None:  # a final-flag placeholder
                responses.append(pb_utils.InferenceResponse([]))
                continue
            cond = self.bridge(torch.from_numpy(sem.as_numpy()[None]), torch.from_numpy(res.as_numpy()[None]))[0]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(names.COND, np.ascontiguousarray(cond.numpy(), dtype=np.float32)),
                pb_utils.Tensor(names.META, meta.as_numpy()),
            ]))
        return responses

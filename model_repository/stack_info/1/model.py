"""Health probe model: reports what the stub's interpreter imports (package, numpy, torch)."""
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import audiostory_ensemble
        import torch

        self.info = {
            "audiostory_ensemble": audiostory_ensemble.__version__,
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "torch": torch.__version__,
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            info = dict(self.info)
            query = pb_utils.get_input_tensor_by_name(request, "QUERY")
            if query is not None:
                info["echo"] = query.as_numpy().reshape(-1)[0].decode("utf-8")
            out = pb_utils.Tensor("INFO", np.array([json.dumps(info).encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

"""dit_step and vae_decoder (CPU form): one ONNX graph on onnxruntime, the rows of all batched
requests in one session call. On GPU hosts the tensorrt_plan platform serves the same graph.
With ``simulate`` set (benchmarks), the graph's stand-in: an H100's measured time, zeros out."""

import triton_python_backend_utils as pb_utils

from audiostory_ensemble.serving.adapter import Parameters
from audiostory_ensemble.serving.metrics import StageMetrics
from audiostory_ensemble.serving.onnx_runner import OnnxBatchRunner
from audiostory_ensemble.serving.placement import instance_gpu
from audiostory_ensemble.serving.simulated import simulated_runner


class TritonPythonModel:
    def initialize(self, args):
        params = Parameters(args)
        self.name = args["model_name"]
        if params.get("simulate", ""):
            self.runner = simulated_runner(params.require("onnx_path"), params.get("simulate"))
        else:
            self.runner = OnnxBatchRunner(params.require("onnx_path"), params.int("threads", 0),
                                          instance_gpu(args))   # the GPU Triton placed this instance on
        self.metrics = StageMetrics(pb_utils, self.name)

    def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in self.runner.inputs}
                 for r in requests]
        outputs = self.runner.run(feeds)
        self.metrics.batch(sum(len(next(iter(o.values()))) for o in outputs), self.name)
        return [pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]) for out in outputs]

"""What the serving code uses of ``triton_python_backend_utils``, in memory: tests of the models'
helpers without a python backend stub."""


class FakeTriton:
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError:
        INTERNAL, INVALID_ARG, UNAVAILABLE, UNKNOWN = "INTERNAL", "INVALID_ARG", "UNAVAILABLE", "UNKNOWN"

        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def as_numpy(self):
            return self.value

    class InferenceResponse:
        def __init__(self, tensors=None, error=None):
            self.tensors, self.error = tensors, error

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.tensors or () if t.name == name), None)

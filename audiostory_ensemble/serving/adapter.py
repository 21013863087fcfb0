"""What every ``model.py`` does with Triton's python backend, written once.

``pb_utils`` (``triton_python_backend_utils``) is passed in, never imported, so that this module
imports and is tested anywhere (``tests/test_story_loop.py`` runs it on a small fake).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from ..pipeline.request import Limits, RequestError


class Parameters:
    """A model's ``parameters`` from its config (every value a ``string_value``), read one way."""

    def __init__(self, args: dict):
        raw = json.loads(args["model_config"]).get("parameters", {})
        self.model = args.get("model_name", "")
        self._values = {key: value.get("string_value", "") for key, value in raw.items()}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._values.get(key, default)

    def require(self, key: str) -> str:
        if key not in self._values:
            raise KeyError(f"{self.model or 'model'}: the config has no parameter {key!r}")
        return self._values[key]

    def int(self, key: str, default: int) -> int:
        return int(self._values.get(key, default))

    def float(self, key: str, default: float) -> float:
        return float(self._values.get(key, default))

    def json(self, key: str, default):
        return json.loads(self._values[key]) if key in self._values else default

    def limits(self) -> Limits:
        """The request ranges this deployment accepts (the ``limits`` parameter over the defaults)."""
        return Limits(**self.json("limits", {}))


def error_response(pb_utils, error: Exception | str, code=None):
    """An error response: INVALID_ARGUMENT for a :class:`RequestError` unless ``code`` says
    otherwise, else ``code`` (or Triton's default, INTERNAL)."""
    if code is None and isinstance(error, RequestError):
        code = pb_utils.TritonError.INVALID_ARG
    message = str(error)
    triton_error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=triton_error)


def send_error(pb_utils, sender, error: Exception | str, code=None) -> None:
    """A decoupled model's last word on a request: the error, with the final flag."""
    sender.send(error_response(pb_utils, error, code), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


async def bls_output(pb_utils, model: str, inputs: list, output: str, timeout_s: float, attempts: int,
                     on_retry: Callable[[str, int], None] | None = None):
    """One BLS request for one output, as numpy. A request with no answer within ``timeout_s`` is
    sent again (``on_retry(model, attempt)`` told first, attempts counted from 1), up to ``attempts``
    times; an error answer, or silence every time, raises a ``RuntimeError`` naming the model.

    Only for models that are pure functions of their inputs (the VAE): re-sending must be safe. A
    safety net behind :func:`runtime.loop.ensure_heartbeat`, which fixed the stalls the soak found."""
    for attempt in range(1, attempts + 1):
        request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=[output])
        try:
            result = await asyncio.wait_for(request.async_exec(), timeout_s)
        except asyncio.TimeoutError:
            if on_retry is not None and attempt < attempts:
                on_retry(model, attempt)
            continue
        if result.has_error():
            raise RuntimeError(f"{model}: {result.error().message()}")
        return pb_utils.get_output_tensor_by_name(result, output).as_numpy()
    raise RuntimeError(f"{model}: no answer within {timeout_s:g} s, {attempts} attempts")

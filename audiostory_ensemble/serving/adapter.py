"""What every ``model.py`` does with Triton's python backend, written once.

``pb_utils`` (``triton_python_backend_utils``) is passed in, never imported, so that this module
imports and is tested anywhere (``tests/test_story_loop.py`` runs it on a small fake).
"""

from __future__ import annotations

import json

from .request import Limits, RequestError


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

"""Cancelling a story across the pipeline's processes.

Triton 2.51 neither passes an ensemble's cancellation to its composing models nor lets a BLS
caller cancel the request it sent. So the front door (``audiostory_stream``, which
``audiostory_full`` calls with its own key) gives every story a key — the request id of the
story's ``llm`` and ``dit_sampler`` requests — and, when its client cancels or disconnects, sends a
control request carrying that key to the stages that hold long work:

- ``llm``: cancels the plan's coroutine, which aborts its vLLM requests (generate and pooling);
- ``dit_sampler``: remembers the key; every clip of the story stops before its next step and
  clips still on their way are dropped on arrival.

``pb_utils`` is passed in (it exists only inside the python-backend stub).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import numpy as np

from .. import names
from ..names import CANCEL_TARGETS
from ..pipeline.request import RequestError

CANCEL_INPUT = names.CANCEL          # control input of the targets: BYTES [1], the key
STORY_KEY_INPUT = names.STORY_KEY    # optional input of `audiostory_stream`: a caller's key

BUSY = "server busy"              # how the front door's admission refusal begins (UNAVAILABLE)
_KEY = re.compile(r"^[0-9a-f]{32}$")


def new_key() -> str:
    return uuid.uuid4().hex


def valid_key(key: str) -> bool:
    return bool(_KEY.match(key))


def read_key(arr) -> str:
    """The key in a BYTES [1] control tensor (as numpy), as text."""
    key = np.asarray(arr).reshape(-1)[0]
    return key.decode("utf-8", "replace") if isinstance(key, (bytes, np.bytes_)) else str(key)


def story_key(tensor) -> str:
    """The story key of a front-door request: the caller's ``_STORY_KEY`` tensor (32 lowercase hex
    digits; ``audiostory_full`` passes one), or a fresh key when there is none (``tensor`` None)."""
    if tensor is None:
        return new_key()
    key = read_key(tensor.as_numpy())
    if not valid_key(key):
        raise RequestError(f"{STORY_KEY_INPUT} must be 32 lowercase hex digits")
    return key


def _requests(pb_utils, key: str, targets=CANCEL_TARGETS):
    tensor = np.array([key.encode()], dtype=np.object_)
    return [pb_utils.InferenceRequest(model_name=m, inputs=[pb_utils.Tensor(CANCEL_INPUT, tensor)],
                                      requested_output_names=[]) for m in targets]


def _send(model: str, req) -> list[str]:
    try:
        return [f"{model}: {r.error().message()}" for r in req.exec(decoupled=True) if r.has_error()]
    except Exception as e:  # noqa: BLE001 - a dead stage cannot be cancelled; report it
        return [f"{model}: {type(e).__name__}: {e}"]


def cancel_story_sync(pb_utils, key: str, targets=CANCEL_TARGETS, timeout_s: float = 10.0) -> list[str]:
    """Send the cancel to every target at once (the sampler's steps do not wait on the planner's
    abort); returns the errors (empty when all acknowledged). A target that does not answer within
    ``timeout_s`` (a stage that died and is not yet known dead) is reported, not waited for: each
    send runs on a daemon thread, which a dead target may keep forever."""
    if not targets:
        return []
    results: list[list[str] | None] = [None] * len(targets)
    threads = []
    for i, (model, req) in enumerate(zip(targets, _requests(pb_utils, key, targets))):
        def send(i=i, model=model, req=req):
            results[i] = _send(model, req)
        t = threading.Thread(target=send, name=f"cancel-{model}", daemon=True)
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [e for model, r in zip(targets, results)
            for e in (r if r is not None else [f"{model}: no answer to the cancel within {timeout_s:g} s"])]


async def cancel_story(pb_utils, key: str, targets=CANCEL_TARGETS) -> list[str]:
    return await asyncio.to_thread(cancel_story_sync, pb_utils, key, targets)

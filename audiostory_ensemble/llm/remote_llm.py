"""The disaggregated LLM tier: the planner's two engines as separate vLLM OpenAI-compatible servers.

- the **generate server** (``vllm serve <converted>/llm``): ``POST /v1/completions`` with the prompt
  as token ids, the request's sampling (greedy unless it asks for a sampled plan, seeded per part),
  the checkpoint's repetition penalty, the stop ids, the part's plan grammar (``structured_outputs``;
  the server runs the guidance backend), ``return_token_ids`` — token ids in, token ids out, no
  detokenisation on our side;
- the **pooling server** (``vllm serve <converted>/llm --runner pooling --convert embed
  --pooler-config '{"task": "token_embed", "tok_pooling_type": "ALL", "use_activation": false}'``):
  ``POST /pooling`` with ``task = token_embed``: the last-layer hidden state of every position.

Both classes answer the two calls the planner makes on vLLM's ``AsyncLLM`` (``generate`` /
``encode`` as async iterators, ``abort``, ``shutdown``), so the planner's logic — forced runs,
clip release, cancellation — is the same code in both modes. A cancelled plan closes its HTTP
requests, which vLLM's server takes as an abort. Connection failures and 5xx answers are retried
(``retries``, exponential back-off); a request that does not finish within ``timeout_s`` fails.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np

from ..runtime.gates import TasksByKey


class RemoteEngineError(RuntimeError):
    """A remote vLLM server failed or could not be reached (the message names it). ``unavailable``:
    it could not be reached or answered 5xx (the request may succeed later)."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable


class _RemoteServer:
    def __init__(self, url: str, model: str, timeout_s: float, retries: int, what: str):
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.what = what
        self._session = None
        self._tasks = TasksByKey()      # engine request id -> its HTTP calls in flight

    async def _post(self, path: str, body: dict) -> dict:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                async with self._session.post(self.url + path, json=body) as r:
                    text = await r.text()
                    if r.status == 200:
                        return json.loads(text)
                    if r.status < 500 or attempt == self.retries:
                        raise RemoteEngineError(f"{self.what} at {self.url}{path}: HTTP {r.status}: {text[:300]}",
                                                unavailable=r.status >= 500)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if attempt == self.retries:
                    raise RemoteEngineError(f"{self.what} at {self.url} unreachable after {self.retries + 1} "
                                            f"attempt(s): {type(e).__name__}: {e}", unavailable=True) from None
            await asyncio.sleep(delay)
            delay *= 2
        raise RemoteEngineError(f"{self.what} at {self.url}: no answer")

    @staticmethod
    def _token_ids(prompt: dict) -> list[int]:
        if "prompt_token_ids" not in prompt:
            raise RemoteEngineError("the remote LLM tier takes token ids only (audio continuation needs the "
                                    "embedded engines)")
        return [int(t) for t in prompt["prompt_token_ids"]]

    async def _tracked(self, request_id: str, coro):
        with self._tasks.track(request_id, asyncio.ensure_future(coro)) as task:
            return await task

    async def abort(self, request_ids) -> None:
        for rid in request_ids:
            self._tasks.cancel(rid)     # closes the HTTP request: the server aborts it

    def shutdown(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            try:
                asyncio.get_event_loop().create_task(session.close())
            except RuntimeError:
                pass


class RemoteGenerateEngine(_RemoteServer):
    """``generate(prompt, SamplingParams, request_id)`` over ``/v1/completions``: one output with
    every token id of this part (the planner reads deltas; a single delta is all of them)."""

    def __init__(self, url, model, timeout_s=600.0, retries=2):
        super().__init__(url, model, timeout_s, retries, "vLLM generate server")

    async def generate(self, prompt: dict, params, request_id: str):
        body = {"model": self.model, "prompt": self._token_ids(prompt), "max_tokens": int(params.max_tokens),
                "temperature": float(params.temperature), "top_p": float(params.top_p),
                "repetition_penalty": float(params.repetition_penalty),
                "stop_token_ids": list(params.stop_token_ids or []), "skip_special_tokens": False,
                "return_token_ids": True, "detokenize": False}
        if params.seed is not None:
            body["seed"] = int(params.seed)
        if params.structured_outputs is not None:     # the plan grammar: the server runs the guidance backend
            body["structured_outputs"] = {"grammar": params.structured_outputs.grammar}
        out = await self._tracked(request_id, self._post("/v1/completions", body))
        ids = out["choices"][0].get("token_ids")
        if ids is None:
            raise RemoteEngineError(f"{self.what} at {self.url} returned no token_ids (vLLM too old?)")
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[int(t) for t in ids])], finished=True)


class RemotePoolingEngine(_RemoteServer):
    """``encode(prompt, PoolingParams, request_id)`` over ``/pooling`` with ``task = token_embed``."""

    def __init__(self, url, model, timeout_s=120.0, retries=2):
        super().__init__(url, model, timeout_s, retries, "vLLM pooling server")

    async def encode(self, prompt: dict, params, request_id: str):
        ids = self._token_ids(prompt)
        body = {"model": self.model, "input": ids, "task": "token_embed",
                "use_activation": False}
        out = await self._tracked(request_id, self._post("/pooling", body))
        data = np.asarray(out["data"][0]["data"], dtype=np.float32)
        if data.ndim != 2 or data.shape[0] != len(ids):
            raise RemoteEngineError(f"{self.what} at {self.url} returned shape {list(data.shape)} for "
                                    f"{len(ids)} tokens: is it running token_embed "
                                    "with tok_pooling_type ALL?")
        yield SimpleNamespace(outputs=SimpleNamespace(data=data), finished=True)


GRAMMAR_BACKEND_CONFIG = '{"backend":"guidance"}'     # the plan grammar's backend (planner.GRAMMAR_BACKEND)
POOLER_CONFIG = '{"task":"token_embed","tok_pooling_type":"ALL","use_activation":false}'


# What each tier server runs with besides its model, name, host and port: the embedded engines'
# settings (plans from vLLM's generation config, seed 0, the plan grammar's backend; the pooling
# runner). The one source: the Helm chart's vLLM Deployments read the same lists from SERVER_ARGS_FILE, which `make
# deploy-check` and the tests keep equal to these.
SERVER_ARGS = {
    "generate": ["--generation-config=vllm", "--seed=0", f"--structured-outputs-config={GRAMMAR_BACKEND_CONFIG}"],
    "pooling": ["--generation-config=vllm", "--seed=0", "--runner=pooling", "--convert=embed",
                "--no-enable-prefix-caching", f"--pooler-config={POOLER_CONFIG}"],
}
SERVER_ARGS_FILE = "deploy/helm/audiostory/files/vllm-server-args.json"


def server_command(python: str, llm_dir, role: str, port: int, model: str = "audiostory-llm",
                   host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> list[str]:
    """The ``vllm serve`` command line for one tier server (``role`` = generate | pooling)."""
    if role not in SERVER_ARGS:
        raise ValueError(f"role must be generate or pooling, got {role!r}")
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(llm_dir),
            "--served-model-name", model, "--host", host, "--port", str(port), *SERVER_ARGS[role], *extra]

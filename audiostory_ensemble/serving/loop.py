"""Event loops in the python stubs: one on its own thread (for vLLM's AsyncLLM inside a model), and
the heartbeat that keeps a stub's loop from sleeping through completions handed to it."""

from __future__ import annotations

import asyncio
import threading


_HEARTBEATS: dict[int, asyncio.Task] = {}


def ensure_heartbeat(interval: float = 0.05) -> None:
    """Keep the running event loop waking up every ``interval`` seconds.

    The python backend's stub completes ``async_exec`` futures from its own threads; when every
    coroutine of a model is awaiting such a future and nothing else happens, the loop can sleep
    through the completion (measured: at concurrency 16 a few stories in a hundred stalled until
    some unrelated event woke the loop, and the last ones never finished). A periodic wake-up makes
    the loop run the callbacks it was handed.
    """
    loop = asyncio.get_running_loop()
    task = _HEARTBEATS.get(id(loop))
    if task is None or task.done():
        async def beat():
            while True:
                await asyncio.sleep(interval)
        _HEARTBEATS[id(loop)] = loop.create_task(beat())




class LoopThread:
    def __init__(self, name: str = "audiostory-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        return self.submit(coro).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

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


class DaemonCalls:
    """Blocking calls (a BLS stream's iterator) on daemon threads, at most ``limit`` at once.

    A stream to a decoupled stub that dies is never answered: its thread blocks for good. On a
    daemon thread such a call cannot hold up the stub's exit (a ``ThreadPoolExecutor`` joins its
    threads at exit), and :attr:`stuck` counts the calls whose caller stopped waiting (their future
    cancelled) while their thread still runs, so that the caller can bound them."""

    def __init__(self, limit: int, name: str = "call"):
        self.limit = limit
        self.name = name
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._abandoned: set[int] = set()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def stuck(self) -> int:
        return len(self._abandoned)

    def run(self, loop: asyncio.AbstractEventLoop, fn) -> asyncio.Future:
        """``fn()`` on a new daemon thread; its result (or exception) on a future of ``loop``."""
        fut = loop.create_future()
        token = id(fut)
        with self._lock:
            if len(self._running) >= self.limit:
                raise RuntimeError(f"{self.name}: {len(self._running)} blocking calls running (limit {self.limit})")
            self._running.add(token)

        def given_up(f):
            if f.cancelled():
                with self._lock:
                    if token in self._running:
                        self._abandoned.add(token)

        fut.add_done_callback(given_up)

        def settle(result, error):
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        def body():
            result = error = None
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
                error = e
            finally:
                with self._lock:
                    self._running.discard(token)
                    self._abandoned.discard(token)
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:            # the loop is closed: nobody waits any more
                pass

        threading.Thread(target=body, name=f"{self.name}-{token:x}", daemon=True).start()
        return fut

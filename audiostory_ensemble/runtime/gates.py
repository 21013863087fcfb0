"""asyncio admission and cancellation: who may run next, how many per request, which stories are
cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from typing import Callable


class CancelRegistry:
    """Keys of cancelled stories, remembered for ``ttl`` seconds (clips of a cancelled story can
    still be on their way between stages when the cancel arrives), and at most ``max_keys`` of them
    (the oldest forgotten first), so that a flood of cancels cannot grow it without bound."""

    def __init__(self, ttl: float = 600.0, clock: Callable[[], float] | None = None, max_keys: int = 65536):
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock or time.monotonic
        self._keys: dict[str, float] = {}

    def cancel(self, key: str) -> None:
        if key:
            self._prune()
            self._keys.pop(key, None)
            self._keys[key] = self._clock()
            while len(self._keys) > self.max_keys:
                self._keys.pop(next(iter(self._keys)))

    def __contains__(self, key: str) -> bool:
        return bool(key) and key in self._keys

    def _prune(self) -> None:
        now = self._clock()
        while self._keys:               # insertion order is time order: the expired ones lead
            k = next(iter(self._keys))
            if now - self._keys[k] <= self.ttl:
                break
            del self._keys[k]

    def __len__(self) -> int:
        self._prune()
        return len(self._keys)


class PriorityGate:
    """At most ``capacity`` holders at once; waiters are admitted lowest ``priority`` first
    (FIFO among equals). With ``priority = (request arrival, clip index)`` the clips of requests
    already in progress take freed slots before a newer request starts its DiT work."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._waiters: list = []     # heap of (priority, sequence, future)
        self._seq = 0

    @contextlib.asynccontextmanager
    async def slot(self, priority=0):
        if self.held < self.capacity and not self._waiters:
            self.held += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._seq += 1
            entry = (priority, self._seq, fut)
            heapq.heappush(self._waiters, entry)
            try:
                await fut                      # the releaser counted us in ``held``
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()            # admitted and cancelled at once: pass the slot on
                else:
                    self._waiters.remove(entry)
                    heapq.heapify(self._waiters)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)           # the slot passes straight to the next waiter
                return
        self.held -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class PerKeyLimiter:
    """At most ``limit`` holders per key at once, served first come first served (asyncio)."""

    def __init__(self, limit: int = 1):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: str):
        sem = self._sems.setdefault(key, asyncio.Semaphore(self.limit))
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with sem:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:        # nobody holds or waits: forget the key
                del self._users[key], self._sems[key]

    def __len__(self) -> int:
        return len(self._sems)


class TasksByKey:
    """The asyncio tasks working for each key (a story key, an engine request id): a task is
    registered for as long as it runs (:meth:`track`), and :meth:`cancel` cancels a key's tasks.
    Keys are removed with their last task, so the size is what is in flight."""

    def __init__(self):
        self._tasks: dict[str, set[asyncio.Future]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self, key: str, task: asyncio.Future | None = None):
        task = task if task is not None else asyncio.current_task()
        self._tasks.setdefault(key, set()).add(task)
        try:
            yield task
        finally:
            tasks = self._tasks.get(key)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._tasks[key]

    def cancel_all(self, loop: asyncio.AbstractEventLoop | None = None) -> int:
        """Cancels every task of every key; returns how many."""
        return sum(self.cancel(key, loop) for key in list(self._tasks))

    def cancel(self, key: str, loop: asyncio.AbstractEventLoop | None = None) -> int:
        """Cancels the key's tasks (through ``loop`` when called from another thread); returns how many."""
        tasks = list(self._tasks.get(key, ()))
        for task in tasks:
            if loop is None:
                task.cancel()
            else:
                loop.call_soon_threadsafe(task.cancel)
        return len(tasks)


class CancelScope:
    """A stage's cancellation, one object: the story keys cancelled and the work running for each.

    :meth:`cancel` remembers the key (a cancel can overtake its story's requests: work that
    starts later under that key is refused by :meth:`track`) and cancels the asyncio tasks
    tracked under it — on ``loop`` when the cancel comes from another thread (a stage whose work
    runs on its own event loop), else directly. Whatever a task holds (a scheduler row, vLLM
    requests) it gives back in its own ``CancelledError`` handler, so no stage keeps a second
    list of what to stop. Both maps are bounded (:class:`CancelRegistry`; tasks leave with their
    work). A Triton with request cancellation would call :meth:`cancel` from its callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, ttl: float = 600.0,
                 clock: Callable[[], float] | None = None, max_keys: int = 65536):
        self.loop = loop
        self._keys = CancelRegistry(ttl, clock, max_keys)
        self._tasks = TasksByKey()

    def cancel(self, key: str) -> int:
        """Cancels the story ``key`` here; returns how many tasks were running for it."""
        if not key:
            return 0
        self._keys.cancel(key)
        return self._tasks.cancel(key, self.loop)

    def cancel_all(self) -> int:
        """Cancels every task tracked (the stage is going down); keys are not remembered."""
        return self._tasks.cancel_all(self.loop)

    def cancelled(self, key: str) -> bool:
        return key in self._keys

    @contextlib.contextmanager
    def track(self, key: str):
        """The current task works for ``key`` until the block ends; raises ``CancelledError`` at
        once when ``key`` is already cancelled. An empty key is tracked under "" and never
        cancelled by key."""
        if self.cancelled(key):
            raise asyncio.CancelledError(f"story {key} was cancelled")
        with self._tasks.track(key) as task:
            yield task

    def tracked(self) -> dict[str, int]:
        return {"cancelled_keys": len(self._keys), "tasks_by_key": len(self._tasks)}

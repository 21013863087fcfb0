"""The asyncio admission gates and the cancel registry (runtime/gates.py), on the event loop alone."""
import pytest


def test_per_key_limiter_serves_in_order_and_forgets_idle_keys():
    import asyncio

    from audiostory_ensemble.runtime.gates import PerKeyLimiter

    limiter = PerKeyLimiter(1)
    events = []

    async def clip(key, index):
        async with limiter.slot(key):
            events.append((key, index, "start"))
            await asyncio.sleep(0.01)
            events.append((key, index, "end"))

    async def main():
        await asyncio.gather(clip("a", 0), clip("a", 1), clip("b", 0), clip("a", 2))

    asyncio.run(main())
    a = [(i, what) for key, i, what in events if key == "a"]
    assert a == [(0, "start"), (0, "end"), (1, "start"), (1, "end"), (2, "start"), (2, "end")]
    assert events.index(("b", 0, "start")) < events.index(("a", 0, "end"))  # other keys overlap
    assert len(limiter) == 0


def test_priority_gate_admits_the_oldest_request_first_and_never_exceeds_capacity():
    import asyncio

    from audiostory_ensemble.runtime.gates import PriorityGate

    gate = PriorityGate(2)
    started, holding = [], [0]
    peak = [0]

    async def clip(arrival, index, hold=0.02):
        async with gate.slot((arrival, index)):
            started.append((arrival, index))
            holding[0] += 1
            peak[0] = max(peak[0], holding[0])
            await asyncio.sleep(hold)
            holding[0] -= 1

    async def main():
        first = [asyncio.create_task(clip(1.0, 0)), asyncio.create_task(clip(1.0, 1))]
        await asyncio.sleep(0.005)                 # both slots held by request 1
        # A newer request queues first, then request 1's next clips: request 1 still goes first.
        late = [asyncio.create_task(clip(2.0, 0)), asyncio.create_task(clip(2.0, 1))]
        await asyncio.sleep(0)
        own = [asyncio.create_task(clip(1.0, 2)), asyncio.create_task(clip(1.0, 3))]
        await asyncio.gather(*first, *late, *own)

    asyncio.run(main())
    assert started == [(1.0, 0), (1.0, 1), (1.0, 2), (1.0, 3), (2.0, 0), (2.0, 1)]
    assert peak[0] == 2 and gate.held == 0 and gate.waiting == 0


def test_priority_gate_survives_cancelled_waiters():
    import asyncio

    from audiostory_ensemble.runtime.gates import PriorityGate

    gate = PriorityGate(1)

    async def main():
        release = asyncio.Event()

        async def holder():
            async with gate.slot(0):
                await release.wait()

        async def waiter(p):
            async with gate.slot(p):
                return p

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        w1, w2 = asyncio.create_task(waiter(1)), asyncio.create_task(waiter(2))
        await asyncio.sleep(0)
        w1.cancel()
        release.set()
        await h
        assert await w2 == 2
        with pytest.raises(asyncio.CancelledError):
            await w1

    asyncio.run(main())
    assert gate.held == 0 and gate.waiting == 0


def test_cancel_registry_remembers_keys_for_the_ttl():
    from audiostory_ensemble.runtime.gates import CancelRegistry

    now = [0.0]
    reg = CancelRegistry(ttl=10, clock=lambda: now[0])
    reg.cancel("k1")
    reg.cancel("")                       # no key: nothing to cancel
    assert "k1" in reg and "" not in reg and "k2" not in reg
    now[0] = 11
    reg.cancel("k2")
    assert "k1" not in reg and "k2" in reg and len(reg) == 1


def test_cancel_registry_is_capped_under_a_flood_of_cancels():
    from audiostory_ensemble.runtime.gates import CancelRegistry

    now = [0.0]
    reg = CancelRegistry(ttl=10, clock=lambda: now[0], max_keys=100)
    for i in range(1000):                 # all within the ttl
        now[0] = i * 1e-3
        reg.cancel(f"k{i}")
    assert len(reg) == 100 and "k999" in reg and "k899" not in reg and "k900" in reg
    now[0] = 5.0
    reg.cancel("k900")                    # a repeated cancel renews its key: it is now the newest
    now[0] = 11.0                         # past the ttl of all but the renewed key
    assert len(reg) == 1 and "k900" in reg


def test_a_cancel_scope_cancels_a_storys_work_on_its_loop_and_refuses_what_comes_later():
    """The llm stage's case: the plans run on the engines' loop, the cancel arrives on Triton's
    thread. The story's tasks are cancelled, other stories' are not, a plan of the story that
    starts after the cancel is refused at once, and nothing stays tracked."""
    import asyncio
    import concurrent.futures
    import threading

    from audiostory_ensemble.runtime.gates import CancelScope
    from audiostory_ensemble.runtime.loop import LoopThread

    loop = LoopThread("scope-test")
    scope = CancelScope(loop.loop)
    started = {"a": threading.Event(), "b": threading.Event()}

    async def work(key):
        with scope.track(key):
            started[key].set()
            try:
                await asyncio.sleep(30)
                return "finished"
            except asyncio.CancelledError:
                return "cancelled"
    try:
        a, b = loop.submit(work("a")), loop.submit(work("b"))
        assert started["a"].wait(5) and started["b"].wait(5)
        assert scope.tracked() == {"cancelled_keys": 0, "tasks_by_key": 2}
        assert scope.cancel("a") == 1 and scope.cancel("") == 0
        assert a.result(5) == "cancelled" and not b.done()
        assert scope.cancelled("a") and not scope.cancelled("b")
        late = loop.submit(work("a"))          # the story's next plan, after its cancel
        concurrent.futures.wait([late], 5)
        assert late.cancelled(), "a plan of a cancelled story was allowed to start"
        assert scope.cancel_all() == 1 and b.result(5) == "cancelled"
        assert scope.tracked() == {"cancelled_keys": 1, "tasks_by_key": 0}
    finally:
        loop.stop()

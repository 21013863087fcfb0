"""Process and concurrency helpers of the served stack, free of Triton and of the model:

- ``processes``: the process tree and its shared memory, the orphan guard; ``watchdog`` is the
  guard's own program (``python -m audiostory_ensemble.runtime.watchdog``);
- ``gates``: asyncio admission (``PriorityGate``, ``PerKeyLimiter``) and cancellation
  (``CancelScope``: a stage's cancelled story keys and the work running for each);
- ``loop``: an event loop on its own thread, the heartbeat that keeps a stub's loop awake, and
  blocking calls on daemon threads;
- ``stages``: the stage board the supervisor and the models share (which stage is up, restarts).

``llm``, ``pipeline`` and ``serving`` import from here; nothing here imports them."""

"""What the Triton python models share, by job, free of ``triton_python_backend_utils`` so that all of
it is importable and testable anywhere (the ``model.py`` files pass numpy arrays in and out):

- ``request``: request validation (``parse_request``, ``Limits``, ``RequestParams``, ``RequestError``);
- ``records``: the clip record that travels between the stages (``ClipMeta``);
- ``placement``: which GPU a model instance runs on;
- ``onnx_runner``: onnxruntime sessions and the batched runner of the cpu ``dit_step``/``vae_decoder``;
- ``gates``: asyncio admission (``PriorityGate``, ``PerKeyLimiter``) and the cancel registry;
- ``loop``: an event loop on its own thread, and the heartbeat that keeps a stub's loop awake;
- ``processes``: the process tree and its shared memory, the orphan guard; ``watchdog`` is the
  guard's own program (``python -m audiostory_ensemble.serving.watchdog``);
- ``adapter``: what every ``model.py`` does with the python backend (``pb_utils`` passed in): its
  config parameters, error responses, a BLS request re-sent after silence.
- ``story``: the front door's story loop as a state machine (what each stream event means);
- ``scheduler``: the DiT step scheduler (continuous batching of clips over one engine), its engines
  in ``step_engines``;
- ``control``: cancelling a story across the stages; ``metrics``: the stages' Triton metrics;
- ``stitch``: collecting streamed clips into the story (the client and ``audiostory_full``);
- ``allocator``: jemalloc or glibc's malloc for the server (the helper's and the container's rule);
- ``triton_server``: starting and stopping a ``tritonserver`` (``python -m
  audiostory_ensemble.serving.triton_server``)."""

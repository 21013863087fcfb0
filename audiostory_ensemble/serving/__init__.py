"""What the Triton python models share, free of ``triton_python_backend_utils`` so that all of it is
importable and testable anywhere (``pb_utils`` is passed in where it is needed):

- ``adapter``: what every ``model.py`` does with the python backend: its config parameters, error
  responses, a BLS request re-sent after silence;
- ``stage_clients``: the front door's stages as BLS clients (what ``pipeline.story.StoryRunner``
  is handed) and its responses sent from threads;
- ``placement``: which GPU a model instance runs on;
- ``onnx_runner``: onnxruntime sessions;
- ``scheduler``: the DiT step scheduler (continuous batching of clips over one engine), its engines
  in ``step_engines``;
- ``control``: cancelling a story across the stages; ``metrics``: the stages' Triton metrics;
- ``allocator``: jemalloc or glibc's malloc for the server (the helper's and the container's rule);
- ``supervisor`` and ``triton_server``: starting, watching and stopping a ``tritonserver``
  (``python -m audiostory_ensemble.serving.triton_server``).

The data path itself (requests, clips, the story) is in ``pipeline``; process and asyncio helpers in
``runtime``."""

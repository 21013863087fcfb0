"""AudioStory served on Triton.

- ``model``: the model itself, as the checkpoint defines it: configs and the checkpoint layout,
  the plan grammar, the bridge, the DiT and its sampler, the VAE, post-processing;
- ``pipeline``: the served data path as plain Python (requests, the clip record, the story and
  clip runners, script mode, stitching), numpy only: the client and the web page need no torch;
- ``runtime``: process and asyncio helpers (the process tree, gates and cancel scopes, event
  loops, the stage board);
- ``llm``: the planning stage: the vLLM planner and its token driver, engine options, the remote
  vLLM tier, audio input (continuation), vLLM's metrics on Triton;
- ``serving``: what the Triton python models share: adapters over the python backend, the DiT
  step scheduler and its engines, cancellation across stages, metrics, the server helper;
- ``reference``: the reference pipeline (eager PyTorch), the oracle the served stack must equal;
- ``tiny_story``: the tiny model's story world (its captions and plans);
- ``interface`` and ``names``: the public request/response names and the internal ones (stages,
  internal tensors, the exported graphs' inputs and outputs).
"""

__version__ = "0.1.0"

"""The planning stage: the LLM that writes a story's plan and its bridging queries.

- ``planner``: the vLLM engines (generate and pooling) and a plan's stream of clips;
  ``plan_tokens``: the engine-free token driver it runs; ``engine_options``: vLLM's engine
  arguments as the repository passes them;
- ``remote_llm``: the same engines behind vLLM's OpenAI-compatible servers (the disaggregated tier);
- ``audio_input``: a continuation's input audio, encoded for the prompt;
- ``script``: script mode (a caller's timed captions instead of a written plan);
- ``vllm_metrics``: vLLM's engine metrics as Triton custom metrics."""

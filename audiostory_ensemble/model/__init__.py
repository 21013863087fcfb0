"""The AudioStory model as its checkpoint defines it, free of any serving concern:

- ``config``: sizes, rates and defaults of each model size; ``layout``: the release's files and
  the converted checkpoint's; ``checkpoint``: loading the converted parts;
- ``grammar``: the prompt, the plan's token grammar and its parser;
- ``bridge``, ``dit``, ``vae``: the bridge from the LLM's queries to the DiT's conditioning, the
  diffusion transformer with its guided Euler step, the VAE decoder;
- ``sampler``: the flow-matching sigmas, the initial noise and the reference denoising loop;
- ``post``: rendered lengths, fades, crossfades, resampling and placing clips on the timeline."""

"""The served data path as plain Python: what a story and a clip are and what happens to them,
with the stages handed in as clients (the ``model.py`` files hand Triton's BLS in; the tests hand
fakes or in-process engines). Needs numpy, not torch or Triton:

- ``request``: a request's inputs checked (``parse_request``, ``Limits``, ``RequestParams``);
  ``script``: script mode's segments and the clips they make;
- ``records``: ``ClipMeta``, the clip as it travels between the stages;
- ``story``: the front door's story (plan → bridge → render, clips to the client, why it stopped):
  ``StoryLoop`` decides, ``StoryRunner`` runs it over its stage clients;
- ``clip``: ``ClipRenderer``, one clip from its conditioning to its public outputs (the step
  scheduler, the VAE, trim, resample);
- ``stitch``: streamed clips collected into the story (the client and ``audiostory_full``)."""

"""The one owner of the pipeline's names: every model of the repository (the front doors a client
calls and the stages behind them) and the tensors that pass between the stages. The public request
and response tensors are in ``interface``, which re-exports the front doors' names.

The repository templates are filled from :func:`template_fields` (``${t_sem}``, ``${stage_llm}``,
...), the python models read the same constants, so a name is written once.
"""

from __future__ import annotations

# The models a client calls.
STREAM_MODEL = "audiostory_stream"    # the streaming front door (admission, cancel)
FULL_MODEL = "audiostory_full"        # the whole story in one response (BLS over the front door)
ENSEMBLE = "audiostory"               # the same steps as a Triton ensemble (perf runs; no admission, no cancel)

# Stages: the models of the repository that the pipeline runs through.
LLM = "llm"                   # the planner: vLLM generate + pooling; streams one plan entry per clip
BRIDGE = "bridge"             # bridging queries -> DiT conditioning
SAMPLER = "dit_sampler"       # the step scheduler, the VAE decode, the clip's public outputs
DIT_STEP = "dit_step"         # one guided Euler step (ONNX / TensorRT)
VAE = "vae_decoder"           # latent -> 44.1 kHz stereo wave (ONNX / TensorRT)
CANCEL_TARGETS = (LLM, SAMPLER)   # the stages holding long work that a story's cancel reaches

# Tensors between stages (a leading underscore: not part of the public interface).
SEM = "_SEM"                  # llm -> bridge: the semantic queries, [N, hidden]
RES = "_RES"                  # llm -> bridge: the residual queries, [M, hidden]
META = "_META"                # llm -> bridge -> dit_sampler: the clip record (JSON)
COND = "_COND"                # bridge -> dit_sampler: the DiT conditioning, [N, 1024]
CANCEL = "_CANCEL"            # control input of the cancel targets: the story key
STORY_KEY = "_STORY_KEY"      # optional input of audiostory_stream: a caller-chosen story key

# The exported graphs' tensors (the export records them with their shapes, read back from the
# graphs, in its manifest.json; the repository generator fills dit_step's and vae_decoder's
# inputs and outputs from there).
DIT_STEP_INPUTS = ("x", "cond", "duration", "sigma", "sigma_next", "guidance")
DIT_STEP_OUTPUT = "x_next"
VAE_INPUT = "latent"
VAE_OUTPUT = "wave"


def template_fields() -> dict[str, str]:
    """The names as the repository templates spell their fields."""
    return {"stage_llm": LLM, "stage_bridge": BRIDGE, "stage_sampler": SAMPLER, "stage_dit_step": DIT_STEP,
            "stage_vae": VAE, "t_sem": SEM, "t_res": RES, "t_meta": META, "t_cond": COND, "t_cancel": CANCEL}

"""GPU placement: which device a model instance was given, and what its own GPU work may see."""

from __future__ import annotations


def instance_gpu(args: dict) -> int | None:
    """The GPU Triton gave this model instance (``KIND_GPU``), or None (CPU / ``KIND_MODEL``)."""
    if str(args.get("model_instance_kind", "")).upper() != "GPU":
        return None
    return int(args.get("model_instance_device_id", 0))


def visible_gpus(args: dict, configured: list[int] | None) -> str | None:
    """What ``CUDA_VISIBLE_DEVICES`` a model that starts its own GPU work (vLLM) must see: the
    configured set (``llm_gpus``, e.g. two for tensor parallelism), else the instance's own GPU,
    else None (leave the environment alone: CPU, or one GPU visible). Never silently GPU 0."""
    if configured:
        return ",".join(str(int(g)) for g in configured)
    gpu = instance_gpu(args)
    return None if gpu is None else str(gpu)

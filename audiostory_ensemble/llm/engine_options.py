"""The vLLM engines' settings (the ``engine_options`` repository setting): our named options, any
other vLLM engine argument passed through as vLLM names it, and the disaggregated tier's URLs."""

from __future__ import annotations

from dataclasses import dataclass, field

from audiostory_ensemble.model.config import MAX_NEW_TOKENS


@dataclass
class EngineOptions:
    """vLLM engine settings (configuration, not constants). ``kv_cache_gib`` is the CPU KV space."""
    dtype: str = "float32"
    max_model_len: int = 2048
    generate_gpu_memory_utilization: float = 0.35
    pooling_gpu_memory_utilization: float = 0.15
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    seed: int = 0
    # The plan's token budget (generated and forced tokens together): the official 1600, or less
    # where a deployment wants a plan cut short rather than a long wait (e.g. a random-weight model).
    max_new_tokens: int = MAX_NEW_TOKENS
    # Constrain each generate part to the plan grammar (model/grammar.py: plan_grammar), with
    # vLLM's structured outputs on the guidance backend. False: free text parsed afterwards, as the
    # official code does (a plan that does not parse fails its request).
    plan_grammar: bool = True
    # The disaggregated tier: both URLs set = no engines in-process, vLLM OpenAI servers instead
    # (see remote_llm.py); the servers run the converted llm folder under `remote_model`.
    generate_url: str = ""
    pooling_url: str = ""
    remote_model: str = "audiostory-llm"
    remote_timeout_s: float = 600.0
    remote_retries: int = 2
    # Any other vLLM engine argument, as vLLM names it (AsyncEngineArgs), passed through as it is:
    # to both engines, or to one (the per-engine dict wins).
    engine_args: dict = field(default_factory=dict)
    generate_engine_args: dict = field(default_factory=dict)
    pooling_engine_args: dict = field(default_factory=dict)

    # What the planner itself sets on the engines: the model, its role, and the fields above.
    PLANNER_SET = ("model", "tokenizer", "runner", "convert", "pooler_config", "enable_prompt_embeds",
                   "disable_log_stats", "generation_config", "dtype", "max_model_len", "tensor_parallel_size",
                   "enforce_eager", "seed", "max_num_seqs", "gpu_memory_utilization", "enable_prefix_caching",
                   "structured_outputs_config")

    @property
    def remote(self) -> bool:
        if bool(self.generate_url) != bool(self.pooling_url):
            raise ValueError("engine options: set both generate_url and pooling_url (the remote LLM tier) or neither")
        return bool(self.generate_url)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EngineOptions":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown engine option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)} "
                             "(other vLLM engine arguments go in engine_args, as vLLM names them)")
        options = cls(**d)
        if not (isinstance(options.max_new_tokens, int) and 1 <= options.max_new_tokens <= options.max_model_len):
            raise ValueError(f"engine option max_new_tokens must be an integer in [1, max_model_len "
                             f"{options.max_model_len}], got {options.max_new_tokens!r}")
        options.check_engine_args()
        return options

    def check_engine_args(self) -> None:
        """Every passed-through name is one of vLLM's engine arguments and none is one the planner
        sets itself (those have their own option, or are fixed by the engine's role)."""
        from dataclasses import fields as dataclass_fields

        passed = {where: getattr(self, where)
                  for where in ("engine_args", "generate_engine_args", "pooling_engine_args")}
        for where, args in passed.items():
            if not isinstance(args, dict):
                raise ValueError(f"engine option {where} must be an object of vLLM engine arguments")
        if not any(passed.values()):
            return
        from vllm.engine.arg_utils import AsyncEngineArgs

        known = {f.name for f in dataclass_fields(AsyncEngineArgs)}
        for where, args in passed.items():
            unknown = sorted(set(args) - known)
            if unknown:
                raise ValueError(f"engine option {where}: {unknown} are not vLLM engine arguments "
                                 f"(vllm.engine.arg_utils.AsyncEngineArgs)")
            fixed = sorted(set(args) & set(self.PLANNER_SET))
            if fixed:
                raise ValueError(f"engine option {where}: {fixed} are set by the planner (use the engine option "
                                 "of that name where there is one)")

    def check_gpus(self, gpus: list[int] | None) -> None:
        """``tensor_parallel_size`` must fit the GPUs placed for ``llm`` (``llm_gpus``), when given."""
        if gpus and self.tensor_parallel_size > len(gpus):
            raise ValueError(f"engine option tensor_parallel_size is {self.tensor_parallel_size}, but llm_gpus "
                             f"places the llm on {len(gpus)} GPU(s) {list(gpus)}")

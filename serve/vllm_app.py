"""The GPU serving path: Ray Serve LLM (vLLM) on the HF export, same autoscaling and limits, same OpenAI API.

Selected with `engine: vllm` in the serve config. Needs a GPU and `pip install "ray[llm]"` (vLLM),
and a model exported with `llava-ray export` (a `LlavaForConditionalGeneration` directory, which
vLLM serves natively; `image_url` parts as URLs or data URLs). Ray Serve LLM brings its own
ingress: the web chat page and our API-key check are not part of this path. Not exercised on
CPU-only machines; `vllm_llm_config` (what is deployed) is tested there.
"""

from llava import storage
from llava.config import config_to_dict
from serve.config import ServeConfig


def vllm_llm_config(config: ServeConfig) -> dict:
    """The `ray.serve.llm.LLMConfig` fields for `config`."""
    source = {"bucket_uri": config.model} if storage.is_s3(config.model) else config.model
    return {
        "model_loading_config": {"model_id": config.model_name, "model_source": source},
        "deployment_config": {
            "autoscaling_config": config_to_dict(config.autoscaling),
            "max_ongoing_requests": config.replica.max_ongoing_requests,
        },
        "engine_kwargs": {
            "limit_mm_per_prompt": {"image": config.limits.max_images},
            "max_num_seqs": config.batching.max_batch_size * 8,  # vLLM batches continuously
        },
    }


def build_vllm_app(config: ServeConfig):
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise ImportError(
            f"engine=vllm needs Ray Serve LLM with vLLM on a GPU machine: pip install 'ray[llm]' ({exc})") from exc
    return build_openai_app({"llm_configs": [LLMConfig(**vllm_llm_config(config))]})

"""medusa_tree through Ray's own LLM APIs: Ray Data batch jobs (``ray.data.llm``) and Ray Serve
OpenAI apps (``ray.serve.llm``), on GPU clusters and on CPU-only ones.

Nothing here replaces Ray's classes; these functions fill in what a user would otherwise have to
know: the speculative config, and on CPU-only clusters the resources. Ray's defaults reserve a GPU
per engine (the job waits forever for ``{'CPU': 1, 'GPU': 1}`` on a cluster without one) and a
whole CPU for each light pre/post-processing stage, which on a small node leaves the engine's
input stage unschedulable. Each replica's vLLM engine finds the plugin through vLLM's entry point,
so the workers need only the package installed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

#: CPUs for each light stage (chat template, tokenizer, detokenizer, user pre/post-processing).
LIGHT_STAGE_CPUS = 0.1
#: Settings of the driver that the engines started by Ray need as well.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "VLLM_CPU_KVCACHE_SPACE",
                 "VLLM_NO_USAGE_STATS", "VLLM_MEDUSA_CACHE_DIR", "TOKENIZERS_PARALLELISM")


def driver_runtime_env(**env_vars: str) -> dict[str, Any]:
    """A ``runtime_env`` for ``ray.init`` carrying the driver's :data:`FORWARDED_ENV` settings
    (offline hub, KV-cache size, where the adaptive policy keeps its profiles) and ``env_vars``."""
    import os

    return {"env_vars": {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **env_vars}}


def cluster_has_gpus() -> bool:
    """Whether the connected (or, if none, a fresh local) Ray cluster offers any GPU."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray.cluster_resources().get("GPU", 0) > 0


def speculative_config(heads: str, **options: Any) -> dict[str, Any]:
    """``engine_kwargs["speculative_config"]`` for Medusa tree decoding with ``heads`` (a local
    folder or a hub id), plus any medusa_tree option (``tree``, ``lookup``, ``acceptance``...)."""
    return {"method": "medusa_tree", "model": str(heads), **options}


def cpu_engine_resources(num_cpus: float = 1.0, tensor_parallel_size: int = 1,
                         runtime_env: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One CPU bundle per engine worker instead of Ray's default GPU bundle, and no thread pinning:
    vLLM's CPU workers pin their threads to the cores of one NUMA node, the same cores in every
    engine, so replicas sharing a node would all run on one core; unpinned, each runs the
    ``OMP_NUM_THREADS`` threads Ray gives it (its bundle's CPUs) wherever the OS has room."""
    env = dict((runtime_env or {}).get("env_vars") or {})
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return {"placement_group_config": {"bundles": [{"CPU": num_cpus}] * tensor_parallel_size,
                                       "strategy": "PACK"},
            "runtime_env": {**(runtime_env or {}), "env_vars": env}}


def processor_config(model: str, heads: str, *, engine_kwargs: Mapping[str, Any] | None = None,
                     medusa: Mapping[str, Any] | None = None, cpu: bool | None = None,
                     engine_cpus: float = 1.0, **config: Any):
    """A ``ray.data.llm.vLLMEngineProcessorConfig`` whose engines decode with Medusa trees.

    ``cpu`` (default: the cluster has no GPU) sizes the engine and the light stages for CPU-only
    nodes. Other keyword arguments (``concurrency``, ``batch_size``, ``runtime_env``...) are Ray's.
    """
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = {**(engine_kwargs or {}), "speculative_config": speculative_config(heads, **(medusa or {}))}
    if cpu is None:
        cpu = not cluster_has_gpus()
    if cpu:
        light = {"num_cpus": LIGHT_STAGE_CPUS}
        resources = cpu_engine_resources(engine_cpus, kwargs.get("tensor_parallel_size", 1),
                                         config.pop("runtime_env", None))
        config = {"chat_template_stage": light, "tokenize_stage": light, "detokenize_stage": light,
                  **resources, **config}
    return vLLMEngineProcessorConfig(model_source=str(model), engine_kwargs=kwargs, **config)


def build_processor(config: Any, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None, **kwargs: Any):
    """``ray.data.llm.build_processor``, with the user functions' map tasks sized like the other
    light stages when the engines run on CPUs (Ray's default of one CPU each can starve them)."""
    from ray.data.llm import build_processor as ray_build_processor

    pg = getattr(config, "placement_group_config", None) or {}
    on_cpu = bool(pg) and not any(b.get("GPU") for b in pg.get("bundles", []))
    if on_cpu:
        for key in ("preprocess_map_kwargs", "postprocess_map_kwargs"):
            kwargs[key] = {"num_cpus": LIGHT_STAGE_CPUS, **(kwargs.get(key) or {})}
    return ray_build_processor(config, preprocess=preprocess, postprocess=postprocess, **kwargs)


def serve_config(model: str, heads: str, *, model_id: str | None = None,
                 engine_kwargs: Mapping[str, Any] | None = None, medusa: Mapping[str, Any] | None = None,
                 cpu: bool | None = None, engine_cpus: float = 1.0, replicas: int = 1, **config: Any):
    """A ``ray.serve.llm.LLMConfig`` serving ``model`` with Medusa tree decoding, ``replicas``
    engine replicas (fixed; pass ``deployment_config`` for autoscaling). Serve it with
    ``ray.serve.llm.build_openai_app({"llm_configs": [cfg]})``."""
    from ray.serve.llm import LLMConfig

    kwargs = {**(engine_kwargs or {}), "speculative_config": speculative_config(heads, **(medusa or {}))}
    if cpu is None:
        cpu = not cluster_has_gpus()
    deployment = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas},
                  **(config.pop("deployment_config", None) or {})}
    if cpu:
        config = {**cpu_engine_resources(engine_cpus, kwargs.get("tensor_parallel_size", 1),
                                         config.pop("runtime_env", None)), **config}
        # The replica actor only relays requests to its engine processes, which have the bundle.
        deployment["ray_actor_options"] = {"num_cpus": LIGHT_STAGE_CPUS,
                                           **deployment.get("ray_actor_options", {})}
    config["deployment_config"] = deployment
    return LLMConfig(model_loading_config={"model_id": model_id or str(model), "model_source": str(model)},
                     engine_kwargs=kwargs, **config)


def openai_app(llm_configs: list[Any], *, cpu: bool | None = None, **builder: Any):
    """``ray.serve.llm.build_openai_app`` for ``llm_configs``; on CPU-only clusters the OpenAI
    ingress gets a light share of a CPU (Ray's default whole CPU can leave it unschedulable next
    to the engines on a small node)."""
    from ray.serve.llm import build_openai_app

    if cpu is None:
        cpu = not cluster_has_gpus()
    if cpu:
        ingress = dict(builder.get("ingress_deployment_config") or {})
        ingress["ray_actor_options"] = {"num_cpus": LIGHT_STAGE_CPUS, **ingress.get("ray_actor_options", {})}
        builder["ingress_deployment_config"] = ingress
    return build_openai_app({"llm_configs": list(llm_configs), **builder})

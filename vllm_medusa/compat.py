"""The vLLM-version-facing glue: every vLLM name the plugin reaches is looked up here.

vLLM moves things between releases (0.33 moved ``cli_env_setup`` from
``vllm.entrypoints.serve.utils.api_utils`` to ``vllm.entrypoints.common.startup``). Each name in
:data:`LOCATIONS` lists where the supported releases keep it, newest first; :func:`resolve` takes
the first that imports, and :func:`check_vllm_hooks` reports, with the installed vLLM version, every
name that none of its locations provides. Modules import moved names through :func:`resolve` rather
than with a plain ``from vllm... import``.
"""

from __future__ import annotations

import importlib
from typing import Any

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [min, max)

Location = tuple[str, str]  # (module, attribute path inside it)

#: Name -> where the supported vLLM releases keep it, tried in order (newest location first).
LOCATIONS: dict[str, list[Location]] = {
    # command line
    "cli_env_setup": [("vllm.entrypoints.common.startup", "cli_env_setup"),
                      ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup")],
    "serve_cmd_init": [("vllm.entrypoints.cli.serve", "cmd_init")],
    "configure_logging_from_args": [("vllm.logger", "configure_logging_from_args")],
    "FlexibleArgumentParser": [("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
                               ("vllm.utils", "FlexibleArgumentParser")],
    "CUDAGraphMode": [("vllm.config", "CUDAGraphMode"), ("vllm.config.compilation", "CUDAGraphMode")],
    # engine arguments (registration.py wraps these)
    "EngineArgs.create_engine_config": [("vllm.engine.arg_utils", "EngineArgs.create_engine_config")],
    "EngineArgs.add_cli_args": [("vllm.engine.arg_utils", "EngineArgs.add_cli_args")],
    "EngineArgs.from_cli_args": [("vllm.engine.arg_utils", "EngineArgs.from_cli_args")],
    # drafter, attention, runner, executor and scheduler extension points
    "create_custom_proposer": [("vllm.v1.spec_decode.custom_class_proposer", "create_custom_proposer")],
    "register_backend": [("vllm.v1.attention.backends.registry", "register_backend")],
    "AttentionBackendEnum": [("vllm.v1.attention.backends.registry", "AttentionBackendEnum")],
    "AttentionType": [("vllm.v1.attention.backend", "AttentionType"),
                      ("vllm.attention.backends.abstract", "AttentionType")],
    "resolve_obj_by_qualname": [("vllm.utils.import_utils", "resolve_obj_by_qualname"),
                                ("vllm.utils", "resolve_obj_by_qualname")],
    "GPUModelRunner._prepare_inputs": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs")],
    "GPUModelRunner._sample": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample")],
    "GPUModelRunner.propose_draft_token_ids": [
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.propose_draft_token_ids")],
    "GPUModelRunner._update_states": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states")],
    "GPUModelRunner.execute_model": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model")],
    "GPUModelRunner.sample_tokens": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.sample_tokens")],
    "GPUModelRunner.take_draft_token_ids": [
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.take_draft_token_ids")],
    "GPUModelRunner.load_model": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model")],
    "GPUModelRunner.initialize_kv_cache": [
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache")],
    "MultiprocExecutor.sample_tokens": [("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.sample_tokens")],
    "MultiprocExecutor.take_draft_token_ids": [
        ("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.take_draft_token_ids")],
    "Scheduler.schedule": [("vllm.v1.core.sched.scheduler", "Scheduler.schedule")],
    "build_logitsprocs": [("vllm.v1.worker.gpu_model_runner", "build_logitsprocs")],
    # tensor parallelism: rank 0's drafting decisions reach every rank; the heads' projection gathered
    "get_tp_group": [("vllm.distributed.parallel_state", "get_tp_group"), ("vllm.distributed", "get_tp_group")],
    "tensor_model_parallel_all_gather": [
        ("vllm.distributed.communication_op", "tensor_model_parallel_all_gather"),
        ("vllm.distributed", "tensor_model_parallel_all_gather")],
    "BUILTIN_LOGITS_PROCESSORS": [("vllm.v1.sample.logits_processor", "BUILTIN_LOGITS_PROCESSORS")],
    # CPU path
    "CPUModelRunner": [("vllm.v1.worker.cpu_worker", "CPUModelRunner")],
    "CPUWorker.init_device": [("vllm.v1.worker.cpu_worker", "CPUWorker.init_device")],
    "CPUAttentionBackendImpl.forward": [("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward")],
    "cpu_attn_reshape_and_cache": [("vllm._custom_ops", "cpu_attn_reshape_and_cache")],
}

#: The names every medusa_tree engine needs, and those only the CPU path needs.
REQUIRED_HOOKS = [
    "EngineArgs.create_engine_config", "EngineArgs.add_cli_args", "EngineArgs.from_cli_args",
    "create_custom_proposer", "register_backend", "AttentionBackendEnum", "AttentionType",
    "resolve_obj_by_qualname",
    "GPUModelRunner._prepare_inputs", "GPUModelRunner._sample", "GPUModelRunner.propose_draft_token_ids",
    "GPUModelRunner._update_states", "GPUModelRunner.execute_model", "GPUModelRunner.sample_tokens",
    "GPUModelRunner.take_draft_token_ids", "GPUModelRunner.load_model",
    "GPUModelRunner.initialize_kv_cache",
    "MultiprocExecutor.sample_tokens", "MultiprocExecutor.take_draft_token_ids", "Scheduler.schedule",
    "build_logitsprocs", "BUILTIN_LOGITS_PROCESSORS", "get_tp_group", "tensor_model_parallel_all_gather",
]
CPU_HOOKS = ["CPUModelRunner", "CPUWorker.init_device", "CPUAttentionBackendImpl.forward",
             "cpu_attn_reshape_and_cache"]


class VllmCompatError(RuntimeError):
    """The installed vLLM lacks something the plugin needs; the message names the version."""


def vllm_version_string() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # pragma: no cover - vLLM always importable where the plugin runs
        return "unknown"


def vllm_version() -> tuple[int, int]:
    parts = vllm_version_string().split(".")
    return int(parts[0]), int(parts[1])


def _lookup(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(name: str) -> str:
    return f"{name} (looked in {', '.join(m for m, _ in LOCATIONS[name])})"


def resolve(name: str) -> Any:
    """The object ``name`` stands for in the installed vLLM: the first of its locations that
    imports. Raises :class:`VllmCompatError` naming the vLLM version and the places looked in."""
    errors = []
    for module, path in LOCATIONS[name]:
        try:
            return _lookup(module, path)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module}.{path}: {exc}")
    raise VllmCompatError(f"vLLM {vllm_version_string()} has no {name} that vllm-medusa can use; "
                          f"tried " + "; ".join(errors))


def missing_hooks(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            resolve(name)
        except VllmCompatError:
            missing.append(_describe(name))
    return missing


def check_vllm_hooks(cpu: bool) -> None:
    """Fail with a clear message if the installed vLLM is outside the supported range or lacks an
    extension point the plugin needs; the message names the vLLM version and what is missing."""
    version = vllm_version()
    lo, hi = SUPPORTED_VLLM
    if not lo <= version < hi:
        raise VllmCompatError(f"vllm-medusa supports vLLM {lo[0]}.{lo[1]} to <{hi[0]}.{hi[1]}; found "
                              f"{vllm_version_string()}")
    missing = missing_hooks(REQUIRED_HOOKS + (CPU_HOOKS if cpu else []))
    if missing:
        raise VllmCompatError(f"vLLM {vllm_version_string()} lacks extension points vllm-medusa needs: "
                              + "; ".join(missing))

"""vLLM plugin entry point: turns ``method="medusa_tree"`` into vLLM's own extension points.

``register()`` runs in every vLLM process (entry point group ``vllm.general_plugins``). It wraps two
``EngineArgs`` methods, nothing else:

- ``add_cli_args`` / ``from_cli_args``: add ``--speculative-model medusa:HEADS`` and
  ``--medusa-tree`` and fold them into ``--speculative-config``;
- ``create_engine_config``: rewrite ``{"method": "medusa_tree", ...}`` into
  ``method="custom_class"`` (the drafter), ``worker_cls`` (the Medusa runner) and
  ``additional_config["medusa_tree"]`` (the options, since ``SpeculativeConfig`` forbids extra keys),
  and, unless another scheduler is configured, ``scheduler_cls`` (``scheduler.py``: no drafts in
  steps that admit prefills); vLLM's multiprocess executor becomes ``executor.py``'s (drafts come
  with the step's output, not by a second RPC).

One front-end check is relaxed for medusa_tree engines only: ``SamplingParams._validate_spec_decode``
refuses ``min_p`` and ``logit_bias`` in any speculative engine, because vLLM builds no logits
processors for them there; the Medusa runner builds them and applies them to every row it samples
(``runner.builtin_logitsprocs``), so medusa_tree engines take them as a plain engine does.

The hooks are checked against the installed vLLM when medusa_tree is first used, with an error
naming the vLLM version and what is missing (``compat.py``: where each vLLM name lives in each
supported release).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm_medusa.compat import (CPU_HOOKS, REQUIRED_HOOKS, SUPPORTED_VLLM,  # noqa: F401 (re-exported)
                                check_vllm_hooks, vllm_version)
from vllm_medusa.config import (ADDITIONAL_CONFIG_KEY, METHOD, MedusaConfigError, MedusaOptions,
                                parse_speculative_model, resolve_heads)

PROPOSER_CLASS = "vllm_medusa.proposer.MedusaTreeProposer"
CPU_WORKER_CLASS = "vllm_medusa.cpu_runner.MedusaCPUWorker"
GPU_WORKER_CLASS = "vllm_medusa.gpu_runner.MedusaGPUWorker"
_REGISTERED = False


def _is_medusa_tree(method: Any) -> bool:
    # vLLM 0.33 dropped Medusa, so there "medusa" means the tree drafter; on 0.32 it stays upstream's
    # chain Medusa (the baseline).
    return method == METHOD or (method == "medusa" and vllm_version() >= (0, 33))


#: vLLM's shorthand flags for ``--speculative-config`` keys (EngineArgs fields in 0.32 and 0.33).
SPEC_FLAGS = (("--spec-method", "spec_method", "method"), ("--spec-model", "spec_model", "model"),
              ("--spec-tokens", "spec_tokens", "num_speculative_tokens"))


def fold_spec_flags(args: Any) -> None:
    """Fold ``--spec-method / --spec-model / --spec-tokens`` into ``speculative_config`` now, when
    they ask for medusa_tree, as vLLM would fold them later (inside ``create_engine_config``, after
    the translation has run). ``--spec-model medusa:HEADS[?...]`` implies the method. Flags that ask
    for another method are left to vLLM."""
    given = {key: (flag, getattr(args, attr, None)) for flag, attr, key in SPEC_FLAGS
             if getattr(args, attr, None) is not None}
    if not given:
        return
    spec = args.speculative_config
    if spec is not None and not isinstance(spec, dict):
        return
    folded: dict[str, Any] = {}
    model = given.get("model", (None, None))[1]
    if isinstance(model, str) and model.startswith("medusa:"):
        folded = parse_speculative_model(model)
        method = given.get("method", (None, None))[1]
        if method is not None and not _is_medusa_tree(method):
            raise MedusaConfigError(f"--spec-model {model!r} asks for medusa_tree, but --spec-method "
                                    f"is {method!r}")
    elif "model" in given:
        folded["model"] = model
    if "method" in given:
        folded["method"] = given["method"][1]
    if "num_speculative_tokens" in given:
        folded["num_speculative_tokens"] = given["num_speculative_tokens"][1]
    if not _is_medusa_tree(folded.get("method", (spec or {}).get("method"))):
        return
    for key in folded:
        if key in (spec or {}):
            flag = next((f for k, (f, _) in given.items() if k == key), "--spec-model")
            raise MedusaConfigError(f"{flag} and --speculative-config['{key}'] are mutually exclusive")
    args.speculative_config = {**(spec or {}), **folded}
    for _, attr, _ in SPEC_FLAGS:
        if hasattr(args, attr):
            setattr(args, attr, None)


def translate_engine_args(args: Any) -> None:
    """Rewrite a ``medusa_tree`` speculative config on ``EngineArgs`` in place."""
    fold_spec_flags(args)
    spec = args.speculative_config
    if not isinstance(spec, dict) or not _is_medusa_tree(spec.get("method")):
        return
    from vllm.platforms import current_platform

    from vllm_medusa.heads import checkpoint_num_heads
    from vllm_medusa.proposer import heads_default_tree, resolve_medusa_tree
    from vllm_medusa.trees import MAX_TREE_ROWS

    raw = dict(spec)
    raw["method"] = METHOD
    raw["model"] = resolve_heads(str(raw.get("model") or ""))
    options = MedusaOptions.from_dict(raw)
    # Here only the tree's size matters: the heads are checked against the model after the config
    # is built (precheck_heads) and again when the workers load them.
    needs_count = options.tree is None and heads_default_tree(options.heads) is None
    tree = resolve_medusa_tree(options, checkpoint_num_heads(options.heads) if needs_count else 64)
    if tree.num_nodes == 0:
        raise MedusaConfigError("the medusa_tree tree has no nodes")
    cpu = current_platform.is_cpu()
    check_vllm_hooks(cpu)
    if args.worker_cls not in ("auto", None, CPU_WORKER_CLASS, GPU_WORKER_CLASS):
        raise MedusaConfigError(f"medusa_tree runs in its own worker; remove --worker-cls "
                                f"{args.worker_cls!r}")
    # vLLM sizes its draft buffers by this: the tree, or a long prompt-lookup branch beyond it.
    args.speculative_config = {"method": "custom_class", "model": PROPOSER_CLASS,
                               "num_speculative_tokens": min(tree.num_nodes + options.lookup,
                                                             MAX_TREE_ROWS - 1)}
    args.worker_cls = CPU_WORKER_CLASS if cpu else GPU_WORKER_CLASS
    if not cpu and not args.enforce_eager:
        piecewise_cuda_graphs(args)
    args.additional_config = {**(args.additional_config or {}), ADDITIONAL_CONFIG_KEY: options.to_dict()}


def _full_graph_modes(mode: Any) -> bool:
    return mode is not None and mode.name != "NONE" and mode.has_full_cudagraphs()


def piecewise_cuda_graphs(args: Any) -> None:
    """GPU engines run compiled with piecewise CUDA graphs, not eager: vLLM's piecewise graphs end
    at every attention op (its default ``splitting_ops``), and the attention op runs eagerly between
    the graph pieces, so the tree pass inside it sees each step's masks and rows. Full CUDA graphs
    would replay a decode step's attention as captured, without the tree pass, so they are refused
    when asked for, and the default (FULL_AND_PIECEWISE) becomes PIECEWISE."""
    from vllm_medusa.compat import resolve

    mode_cls = resolve("CUDAGraphMode")
    cc = args.compilation_config
    mode = cc.get("cudagraph_mode") if isinstance(cc, dict) else getattr(cc, "cudagraph_mode", None)
    if isinstance(mode, str):
        mode = mode_cls[mode.upper()]
    if _full_graph_modes(mode):
        raise MedusaConfigError(
            f"medusa_tree cannot run with cudagraph_mode {mode.name}: a full CUDA graph replays "
            f"attention without the tree pass. Use cudagraph_mode PIECEWISE (the default for "
            f"medusa_tree) or NONE, or --enforce-eager")
    if mode is None:
        if isinstance(cc, dict):
            cc["cudagraph_mode"] = mode_cls.PIECEWISE
        else:
            cc.cudagraph_mode = mode_cls.PIECEWISE


def check_cuda_graphs(vllm_config: Any) -> None:
    """After vLLM resolved its compilation settings: no full CUDA graphs, and piecewise graphs
    only when they end at the attention ops (else the attention op, and the tree pass with it,
    would be captured)."""
    if ADDITIONAL_CONFIG_KEY not in (vllm_config.additional_config or {}):
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # no CUDA graphs; the CPU attention op is never captured
        return
    cc = vllm_config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    if mode is None or mode.name == "NONE":
        return
    if _full_graph_modes(mode):
        raise MedusaConfigError(f"medusa_tree cannot run with cudagraph_mode {mode.name}: a full "
                                f"CUDA graph replays attention without the tree pass; use PIECEWISE")
    contains = getattr(cc, "splitting_ops_contain_attention", None)
    if mode.has_piecewise_cudagraphs() and contains is not None and not contains():
        raise MedusaConfigError("medusa_tree needs the attention ops among the compilation's "
                                "splitting_ops when piecewise CUDA graphs are on (they are by "
                                "default); leave splitting_ops unset or use --enforce-eager")


def check_parallelism(vllm_config: Any) -> None:
    """Tensor parallelism works (rank 0's drafting decisions reach every rank); pipeline stages do
    not: the runner drafts from the last stage's hidden states in the same step, which a pipeline
    splits across processes."""
    if ADDITIONAL_CONFIG_KEY not in (vllm_config.additional_config or {}):
        return
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        raise MedusaConfigError(f"medusa_tree does not support pipeline parallelism "
                                f"(pipeline_parallel_size={pp}); use tensor_parallel_size across "
                                f"the GPUs (and nodes, with the Ray executor) instead")


PRECHECK_MAX_BYTES = 512 * 2**20


def precheck_heads(vllm_config: Any) -> None:
    """Load small heads once in the front end, so a bad checkpoint or an impossible tree fails in
    ``LLM(...)`` / ``vllm serve`` with its own message rather than as a dead engine process.
    Large heads (own vocab projections of big models) are left to the workers."""
    raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if raw is None:
        return
    from pathlib import Path

    from vllm_medusa.heads import load_medusa_heads
    from vllm_medusa.proposer import resolve_medusa_tree

    options = MedusaOptions.from_dict(raw)
    path = Path(options.heads)
    files = [f for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file()]
    if sum(f.stat().st_size for f in files) > PRECHECK_MAX_BYTES:
        return
    model = vllm_config.model_config
    heads = load_medusa_heads(path, hidden_size=model.get_hidden_size(),
                              vocab_size=model.get_vocab_size(), dtype=model.dtype, device="cpu")
    resolve_medusa_tree(options, heads.num_heads)


def use_medusa_scheduler(vllm_config: Any) -> None:
    """The Medusa scheduler for medusa_tree engines, where vLLM's default synchronous one would run."""
    sched = vllm_config.scheduler_config
    if (ADDITIONAL_CONFIG_KEY in (vllm_config.additional_config or {})
            and sched.scheduler_cls is None and not sched.async_scheduling):
        from vllm_medusa.scheduler import SCHEDULER_CLASS

        sched.scheduler_cls = SCHEDULER_CLASS


def use_medusa_executor(vllm_config: Any) -> None:
    """The multiprocess executor that takes drafts from the step's output (``executor.py``) where
    vLLM's own would run; other executors (uni, Ray, a user's class) are left as they are."""
    parallel = vllm_config.parallel_config
    if (ADDITIONAL_CONFIG_KEY in (vllm_config.additional_config or {})
            and parallel.distributed_executor_backend == "mp"):
        from vllm_medusa.executor import EXECUTOR_CLASS

        parallel.distributed_executor_backend = EXECUTOR_CLASS


def _allow_spec_method(parser) -> None:
    """vLLM's ``--spec-method`` takes a list of choices: add ``medusa_tree`` (and ``medusa``, which
    0.33 no longer lists) so the shorthand can ask for the plugin."""
    for action in getattr(parser, "_actions", []):
        if "--spec-method" in action.option_strings and action.choices is not None:
            extra = [m for m in (METHOD, "medusa") if m not in action.choices]
            if extra:
                action.choices = [*action.choices, *extra]


def is_medusa_tree_spec(speculative_config: Any) -> bool:
    """Whether a built ``SpeculativeConfig`` is a medusa_tree one (as ``translate_engine_args``
    writes it)."""
    return (getattr(speculative_config, "method", None) == "custom_class"
            and getattr(speculative_config, "model", None) == PROPOSER_CLASS)


def _allow_logitsprocs_params(validate):
    """``SamplingParams._validate_spec_decode`` without its min_p / logit_bias refusal for
    medusa_tree engines (their runner applies both); other speculative methods keep it."""

    @functools.wraps(validate)
    def validate_spec_decode(self, speculative_config):
        if is_medusa_tree_spec(speculative_config):
            return None
        return validate(self, speculative_config)

    return validate_spec_decode


def _add_cli_args(parser):
    _allow_spec_method(parser)
    group = parser.add_argument_group("Medusa tree speculative decoding (vllm-medusa)")
    group.add_argument("--speculative-model", default=None, metavar="medusa:HEADS",
                       help="Medusa tree speculative decoding with the heads HEADS: a local folder or a "
                            "Hugging Face Hub repo id (org/name[@revision]). Options may "
                            "follow as a query string: medusa:HEADS?tree=small&acceptance=typical")
    group.add_argument("--medusa-tree", default=None,
                       help="Tree for --speculative-model: a preset (mc_sim_7b_63, small, chain-N), a "
                            "JSON file or a JSON list of index paths; default: the heads' tree.json")
    return parser


def _fold_cli_args(args) -> None:
    model = getattr(args, "speculative_model", None)
    tree = getattr(args, "medusa_tree", None)
    if model is None:
        if tree is not None:
            raise MedusaConfigError("--medusa-tree needs --speculative-model medusa:HEADS_DIR")
        return
    if getattr(args, "speculative_config", None):
        raise MedusaConfigError("--speculative-model and --speculative-config are mutually exclusive")
    args.speculative_config = parse_speculative_model(model, tree)


def register() -> None:
    """Run by vLLM in every process; idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_engine_config

    @functools.wraps(create)
    def create_engine_config(self, *a, **kw):
        translate_engine_args(self)
        config = create(self, *a, **kw)
        precheck_heads(config)
        check_cuda_graphs(config)
        check_parallelism(config)
        use_medusa_scheduler(config)
        use_medusa_executor(config)
        return config

    add_cli_args = EngineArgs.add_cli_args

    @functools.wraps(add_cli_args)
    def add_cli_args_with_medusa(parser, *a, **kw):
        return _add_cli_args(add_cli_args(parser, *a, **kw))

    from_cli_args = EngineArgs.from_cli_args.__func__

    @functools.wraps(from_cli_args)
    def from_cli_args_with_medusa(cls, args):
        _fold_cli_args(args)
        return from_cli_args(cls, args)

    from vllm.sampling_params import SamplingParams

    if hasattr(SamplingParams, "_validate_spec_decode"):  # absent: nothing to relax
        SamplingParams._validate_spec_decode = _allow_logitsprocs_params(
            SamplingParams._validate_spec_decode)

    EngineArgs.create_engine_config = create_engine_config
    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_medusa)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_medusa)

"""Quieter vLLM output for the example scripts: only their own lines unless asked for more."""

from __future__ import annotations

import logging
import os


def quiet_logs(verbose: bool) -> None:
    """vLLM logs at INFO in every process; show only the script's lines unless ``verbose``.

    Environment variables reach vLLM's engine processes as well as this one.
    """
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TQDM_DISABLE", "1")  # vLLM's own progress bars
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Python warnings in the engine processes
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's C++ warnings (NUMA binding)
        import warnings

        warnings.filterwarnings("ignore")
    early_vllm_log_level()


def early_vllm_log_level() -> None:
    """vLLM sets up its loggers only when an engine starts, so a warning logged while it is imported
    (Triton without a CPU backend) would print at any level. Call it at the top of a script, before
    vLLM is imported: vLLM's engine processes are spawned, and a spawned process imports the script
    first, so it runs there too."""
    if "VLLM_LOGGING_LEVEL" in os.environ:
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())

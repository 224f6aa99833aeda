"""vLLM plugin entry point (placeholder until the hooks land)."""

_REGISTERED = False


def register() -> None:
    """Run by vLLM in every process; idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True

"""User-facing options of ``method="medusa_tree"``, parsed and checked without vLLM.

Users write ``speculative_config={"method": "medusa_tree", "model": HEADS, ...}`` or
``--speculative-model medusa:HEADS[?tree=NAME&acceptance=typical...]``, where HEADS is a local folder
or file, or a Hugging Face Hub repo id (``org/name`` or ``org/name@revision``) resolved by
:func:`resolve_heads`. vLLM's own
``SpeculativeConfig`` forbids unknown keys, so the registration layer carries these options to the
workers in ``additional_config["medusa_tree"]`` as the plain dict produced by :meth:`to_dict`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import parse_qsl

METHOD = "medusa_tree"
ADDITIONAL_CONFIG_KEY = "medusa_tree"


class MedusaConfigError(ValueError):
    """A bad ``medusa_tree`` option; the message names the option."""


@dataclass
class MedusaOptions:
    heads: str
    tree: Any = None
    num_speculative_tokens: int | None = None
    acceptance: str = "exact"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    adaptive: bool = True
    max_topk: int = 10
    lookup: int = 0  # prompt-lookup branch per tree (lookup.py): at most this many tokens; 0 = off
    lookup_min: int = 2  # ... matching a repeated suffix of lookup_min..lookup_max tokens
    lookup_max: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> "MedusaOptions":
        known = {f.name for f in fields(MedusaOptions)}
        raw = dict(raw)
        raw.pop("method", None)
        if "model" in raw:
            raw["heads"] = raw.pop("model")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MedusaConfigError(f"unknown medusa_tree option(s) {unknown}; known: {sorted(known - {'heads'}) + ['model']}")
        if not raw.get("heads"):
            raise MedusaConfigError("medusa_tree needs 'model': the folder (or file) of the Medusa heads")
        opts = MedusaOptions(**raw)
        opts.validate()
        return opts

    def validate(self) -> None:
        if not os.path.exists(self.heads):
            raise MedusaConfigError(f"Medusa heads not found: {self.heads!r} does not exist")
        if self.acceptance not in ("exact", "typical"):
            raise MedusaConfigError(f"acceptance must be 'exact' or 'typical', got {self.acceptance!r}")
        if self.num_speculative_tokens is not None:
            n = self.num_speculative_tokens
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 63:
                raise MedusaConfigError(f"num_speculative_tokens must be an integer in 1..63, got {n!r}")
        if not 0 < float(self.posterior_threshold) <= 1:
            raise MedusaConfigError(f"posterior_threshold must be in (0, 1], got {self.posterior_threshold!r}")
        if not 0 < float(self.posterior_alpha) <= 1:
            raise MedusaConfigError(f"posterior_alpha must be in (0, 1], got {self.posterior_alpha!r}")
        for key, low, high in (("lookup", 0, 62), ("lookup_min", 1, 64), ("lookup_max", 1, 64)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise MedusaConfigError(f"{key} must be an integer in {low}..{high}, got {v!r}")
        if self.lookup_min > self.lookup_max:
            raise MedusaConfigError(f"lookup_min ({self.lookup_min}) is larger than lookup_max "
                                    f"({self.lookup_max})")
        if not isinstance(self.adaptive, bool):
            raise MedusaConfigError(f"adaptive must be true or false, got {self.adaptive!r}")


#: ``org/name`` or ``org/name@revision`` (the Hub's repo id characters; a revision may hold slashes).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
#: The files a heads checkpoint may need (configs, tree.json, weights); READMEs, images etc. are skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.pt", "*.bin"]


def resolve_heads(heads: str) -> str:
    """The local path of the Medusa heads named by ``heads``: a local folder or file (an existing
    path always wins), else a Hugging Face Hub repo id, ``org/name[@revision]``, fetched (or found
    in the cache) with ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``,
    ``HF_HOME`` / ``HF_HUB_CACHE`` and the user's token. Fails with an error naming ``heads``."""
    heads = str(heads or "")
    if not heads:
        raise MedusaConfigError("medusa_tree needs 'model': the folder (or file) of the Medusa heads, "
                                "or a Hugging Face Hub repo id")
    local = os.path.expanduser(heads)
    if os.path.exists(local):
        return os.path.abspath(local)
    match = _REPO_ID.match(heads)
    if match is None or heads.startswith((".", "~")) or os.path.isabs(heads):
        raise MedusaConfigError(f"Medusa heads not found: {heads!r} does not exist (and is not a "
                                f"Hugging Face Hub repo id 'org/name[@revision]')")
    repo, revision = match.group("repo"), match.group("rev")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # offline without a cached copy, unknown repo, no access, ...
        raise MedusaConfigError(
            f"Medusa heads {heads!r}: no such local path, and the Hugging Face Hub repo {repo!r}"
            f"{f' at revision {revision!r}' if revision else ''} could not be resolved "
            f"({type(exc).__name__}: {exc})") from exc
    return os.path.abspath(path)


def _coerce(key: str, value: str) -> Any:
    if key in ("num_speculative_tokens", "max_topk", "lookup", "lookup_min", "lookup_max"):
        try:
            return int(value)
        except ValueError:
            raise MedusaConfigError(f"{key} must be an integer, got {value!r}") from None
    if key in ("posterior_threshold", "posterior_alpha"):
        try:
            return float(value)
        except ValueError:
            raise MedusaConfigError(f"{key} must be a number, got {value!r}") from None
    if key == "adaptive":
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise MedusaConfigError(f"adaptive must be true or false, got {value!r}")
        return value.lower() in ("1", "true", "yes")
    return value


def parse_speculative_model(value: str, tree: str | None = None) -> dict[str, Any]:
    """``medusa:HEADS[?key=value&...]`` -> a ``speculative_config`` dict for ``medusa_tree``."""
    if not value.startswith("medusa:"):
        raise MedusaConfigError(f"--speculative-model takes 'medusa:HEADS_DIR[?tree=...]', got {value!r}")
    rest = value[len("medusa:"):]
    path, _, query = rest.partition("?")
    if not path:
        raise MedusaConfigError("--speculative-model medusa: needs a heads folder after 'medusa:'")
    config: dict[str, Any] = {"method": METHOD, "model": path}
    for key, val in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        config[key] = _coerce(key, val)
    if tree is not None:
        config["tree"] = tree
    return config

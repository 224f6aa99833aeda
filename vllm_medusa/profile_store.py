"""What the adaptive policy knows about one (model, heads, tree, hardware, dtype, vLLM) setup, kept
on disk so that a fresh engine starts where the last one stopped instead of paying to explore.

One JSON file per setup under ``$VLLM_MEDUSA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/vllm-medusa``,
else ``~/.cache/vllm-medusa``; set it to ``off`` to keep nothing). The file name is a digest of the
key and the key itself is stored inside, so a file copied from another setup is recognised and
ignored. Writes are atomic (a temporary file, then ``os.replace``); a file that cannot be read,
parsed or does not match is ignored with a warning: a cache never stops an engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: the cost model carries the measured tree pass


def cache_dir() -> Path | None:
    """Where profiles live, or None when caching is off."""
    env = os.environ.get("VLLM_MEDUSA_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-medusa"


def hardware_id(device: str = "cpu") -> str:
    """The processor the costs were measured on: the GPU's name, or the CPU model and thread count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return f"cuda:{torch.cuda.get_device_name(index)}:{torch.cuda.device_count()}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu:{model}:{cpus} cpus"


def files_digest(path: str, chunk: int = 1 << 20) -> str:
    """A digest of a heads folder (or file): names, sizes and the first and last MiB of each file,
    so retrained heads get a new profile without hashing gigabytes."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    h = hashlib.sha256()
    for f in files:
        if f.name in ("TRAINING.md",):
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > 2 * chunk:
                fh.seek(-chunk, os.SEEK_END)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


class ProfileStore:
    """Load and save one setup's profile: ``{"cost": ..., "policy": ...}`` under ``key``."""

    def __init__(self, key: dict[str, Any], directory: Path | None = None):
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self.directory = directory if directory is not None else cache_dir()
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = self.directory / f"profile-{digest}.json" if self.directory is not None else None
        self._warned = False

    def load(self) -> dict[str, Any] | None:
        """The saved profile, or None (absent, unreadable, corrupt, or another setup's)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else '?'}, "
                                 f"expected {FORMAT}")
            if data.get("key") != self.key:
                raise ValueError("its key names another model, heads, tree, hardware or vLLM version")
            if not isinstance(data.get("cost"), dict) or not isinstance(data.get("policy"), dict):
                raise ValueError("no cost or policy section")
            return data
        except (OSError, ValueError, TypeError, AttributeError) as e:
            logger.warning("Medusa policy profile %s ignored (%s); measuring afresh", self.path, e)
            return None

    def save(self, cost: dict[str, Any], policy: dict[str, Any]) -> bool:
        """Write atomically; a failure is logged once and otherwise ignored."""
        if self.path is None:
            return False
        data = {"format": FORMAT, "key": self.key, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                "cost": cost, "policy": policy}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
            return True
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            if not self._warned:
                logger.warning("Medusa policy profile not saved to %s: %s", self.path, e)
                self._warned = True
            return False

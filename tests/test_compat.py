"""The version-facing glue (compat.py): names looked up where 0.33 keeps them, then where 0.32 did,
and a start-up check that names the vLLM version and what is missing."""

from __future__ import annotations

import sys
import types

import pytest

from vllm_medusa import compat


@pytest.fixture
def fake_modules(monkeypatch):
    """Two stand-in modules, 'new' (0.33's location) and 'old' (0.32's), each with a marker."""
    new, old = types.ModuleType("medusa_fake_new"), types.ModuleType("medusa_fake_old")
    new.thing, old.thing = "new", "old"
    old.Outer = types.SimpleNamespace(method="old-method")
    monkeypatch.setitem(sys.modules, new.__name__, new)
    monkeypatch.setitem(sys.modules, old.__name__, old)
    monkeypatch.setitem(compat.LOCATIONS, "thing", [(new.__name__, "thing"), (old.__name__, "thing")])
    return new, old


def test_resolve_prefers_the_first_location(fake_modules):
    assert compat.resolve("thing") == "new"


def test_resolve_falls_back_when_the_module_is_missing(fake_modules, monkeypatch):
    real = compat.importlib.import_module

    def import_module(name, *a, **kw):
        if name == "medusa_fake_new":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(compat.importlib, "import_module", import_module)
    assert compat.resolve("thing") == "old"


def test_resolve_falls_back_when_the_attribute_is_missing(fake_modules):
    new, _ = fake_modules
    del new.thing
    assert compat.resolve("thing") == "old"


def test_resolve_names_version_and_places_when_nothing_fits(monkeypatch):
    monkeypatch.setitem(compat.LOCATIONS, "thing", [("medusa_no_such_module", "thing"),
                                                    ("vllm_medusa.compat", "no_such_attr")])
    monkeypatch.setattr(compat, "vllm_version_string", lambda: "0.33.0")
    with pytest.raises(compat.VllmCompatError) as err:
        compat.resolve("thing")
    msg = str(err.value)
    assert "vLLM 0.33.0" in msg and "medusa_no_such_module" in msg and "no_such_attr" in msg


def test_cli_env_setup_resolves_on_the_installed_vllm():
    """0.33 keeps it in vllm.entrypoints.common.startup, 0.32 in ...serve.utils.api_utils."""
    pytest.importorskip("vllm")
    assert callable(compat.resolve("cli_env_setup"))
    assert [m for m, _ in compat.LOCATIONS["cli_env_setup"]] == [
        "vllm.entrypoints.common.startup", "vllm.entrypoints.serve.utils.api_utils"]


def test_installed_vllm_has_every_hook():
    pytest.importorskip("vllm")
    assert compat.missing_hooks(compat.REQUIRED_HOOKS + compat.CPU_HOOKS) == []
    compat.check_vllm_hooks(cpu=True)


def test_hook_check_names_version_and_what_is_missing(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setitem(compat.LOCATIONS, "GPUModelRunner.gone",
                        [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.gone")])
    monkeypatch.setattr(compat, "REQUIRED_HOOKS", compat.REQUIRED_HOOKS + ["GPUModelRunner.gone"])
    with pytest.raises(compat.VllmCompatError) as err:
        compat.check_vllm_hooks(cpu=False)
    msg = str(err.value)
    assert f"vLLM {compat.vllm_version_string()}" in msg
    assert "GPUModelRunner.gone (looked in vllm.v1.worker.gpu_model_runner)" in msg


def test_unsupported_version_is_named(monkeypatch):
    monkeypatch.setattr(compat, "vllm_version_string", lambda: "0.35.1")
    with pytest.raises(compat.VllmCompatError, match="found 0.35.1"):
        compat.check_vllm_hooks(cpu=False)


def test_serve_uses_the_fallback(monkeypatch, capsys):
    """`vllm-medusa serve --help` with 0.33's location absent: vLLM's parser still comes up."""
    pytest.importorskip("vllm")
    monkeypatch.setitem(compat.LOCATIONS, "cli_env_setup",
                        [("medusa_no_such_module", "cli_env_setup")] + compat.LOCATIONS["cli_env_setup"])
    from vllm_medusa.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    assert "usage: vllm serve" in capsys.readouterr().out

"""Install/uninstall of the wrapt patches, driven by each integration's ``PATCHES`` table.

NB: post-import hooks must never raise: a raising hook makes the *user's*
``import openai`` fail. wrapt appends a hook every time one is registered, so we
register each module once; a hook that fires after ``disable=True`` checks the
switch itself (wrapt cannot unregister hooks).

Uninstall removes each wrapper with wrapt's handle API. When another patcher (e.g.
MLflow's gorilla) sits on top and our wrapper cannot be removed, it stays in place
*dormant*: every wrapper checks ``RUNTIME.enabled`` at call time, so ``disable=True``
still takes effect; a later install reuses it instead of stacking a second one.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import wrapt

from ._guard import DRIVERS
from ._runtime import RUNTIME, internal_error, log_once

# integration module path -> its root SDK module (imported lazily: nothing here imports an SDK)
INTEGRATIONS = {
    "runguard_autolog.integrations.openai": "openai",
    "runguard_autolog.integrations.anthropic": "anthropic",
    "runguard_autolog.integrations.litellm": "litellm",
    "runguard_autolog.integrations.mlflow_runs": "mlflow",
    "runguard_autolog.integrations.langchain": "langchain_core",
    "runguard_autolog.integrations.mlflow_deployments": "mlflow.deployments",
    "runguard_autolog.integrations.mlflow_evaluation": "mlflow",
    "runguard_autolog.integrations.mlflow_artifacts": "mlflow",
    "runguard_autolog.integrations.mlflow_serving": "mlflow",
}
# the names users give to ``disabled_integrations`` (RUNGUARD_DISABLED_INTEGRATIONS)
NAMES = {
    "openai": "runguard_autolog.integrations.openai",
    "anthropic": "runguard_autolog.integrations.anthropic",
    "litellm": "runguard_autolog.integrations.litellm",
    "runs": "runguard_autolog.integrations.mlflow_runs",
    "langchain": "runguard_autolog.integrations.langchain",
    "deployments": "runguard_autolog.integrations.mlflow_deployments",
    "evaluation": "runguard_autolog.integrations.mlflow_evaluation",
    "artifacts": "runguard_autolog.integrations.mlflow_artifacts",
    "serving": "runguard_autolog.integrations.mlflow_serving",
}
_NAME_OF = {module: name for name, module in NAMES.items()}


def _disabled(integration: str) -> bool:
    """Whether the configuration turns this integration off (``disabled_integrations``)."""
    return _NAME_OF[integration] in RUNTIME.settings["disabled_integrations"].value


@dataclass(frozen=True)
class PatchSpec:
    module: str
    attribute: str  # "Class.method"
    endpoint: Any = None
    is_async: bool = False
    wrapper: Callable[..., Any] | None = None  # for non-LLM patches (MLflow run lifecycle)
    lazy: bool = False  # patch when its module is first imported, rather than importing it
    lazy_stream: bool = False  # returns a generator that sends its request when iterated

    @property
    def driver(self) -> str:
        """Which of ``_guard.DRIVERS`` guards this entry (``"custom"``: its own ``wrapper``)."""
        if self.wrapper is not None:
            return "custom"
        return "lazy_stream" if self.lazy_stream else "async" if self.is_async else "sync"


_installed: dict[tuple[str, str], Any] = {}
_dormant: dict[tuple[str, str], Any] = {}
_hooked: set[str] = set()  # integrations whose root module has a post-import hook
_lock = threading.RLock()
RUNTIME.fork_safe(sys.modules[__name__], "_lock", threading.RLock)


def _wrapper_for(spec: PatchSpec) -> Callable[..., Any]:
    if spec.wrapper is not None:
        return spec.wrapper
    return DRIVERS[spec.driver](spec.endpoint)


def _resolve(spec: PatchSpec):
    module = importlib.import_module(spec.module)
    owner_path, _, name = spec.attribute.rpartition(".")
    owner = module
    for part in owner_path.split(".") if owner_path else ():
        owner = getattr(owner, part)
    return module, owner, name


_lazy_hooked: set[str] = set()  # modules of lazy patches that have a post-import hook


def install_spec(spec: PatchSpec) -> None:
    key = (spec.module, spec.attribute)
    with _lock:
        if key in _installed:
            return
        if spec.lazy and spec.module not in sys.modules:
            _install_on_import(spec)
            return
        try:
            module, owner, name = _resolve(spec)
        except (ImportError, AttributeError):
            log_once(("missing", key), "runguard: %s.%s not found in this SDK version; not patched", *key)
            return
        dormant = _dormant.pop(key, None)
        if dormant is not None and _reachable(owner, name, dormant):
            _installed[key] = dormant
            return
        _installed[key] = wrapt.wrap_function_wrapper(module, spec.attribute, _wrapper_for(spec))


def _install_on_import(spec: PatchSpec) -> None:
    """A module most programs never import (an evaluation's judge transport, say) is patched
    when it is imported, instead of being imported here."""
    if spec.module in _lazy_hooked:
        return
    _lazy_hooked.add(spec.module)
    specs = [(owner, other) for owner, other in _lazy_specs() if other.module == spec.module]

    def install() -> None:
        for owner, each in specs:
            if not _disabled(owner):
                install_spec(each)

    wrapt.register_post_import_hook(_on_import(spec.module, install), spec.module)


def _lazy_specs() -> list[tuple[str, PatchSpec]]:
    """(integration, spec) of every patch made when its module is imported."""
    specs: list[tuple[str, PatchSpec]] = []
    for integration in INTEGRATIONS:
        module = sys.modules.get(integration)
        specs.extend((integration, spec) for spec in getattr(module, "PATCHES", ()) if spec.lazy)
    return specs


def uninstall_spec(spec: PatchSpec) -> None:
    key = (spec.module, spec.attribute)
    with _lock:
        handle = _installed.pop(key, None)
        if handle is None:
            return
        module = sys.modules.get(spec.module)
        try:
            wrapt.unwrap_object(module, spec.attribute, handle)
        except Exception:  # another patcher sits on top of ours (or hides it): leave it dormant
            _dormant[key] = handle


def _reachable(owner: Any, name: str, handle: Any) -> bool:
    """Is our old wrapper still what the attribute (or a patcher above it) calls?"""
    current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if current is handle:
        return True
    # MLflow's gorilla keeps the patched-over original on the class
    if isinstance(owner, type) and owner.__dict__.get(f"_gorilla_original_{name}") is handle:
        return True
    try:
        return wrapt.find_wrapper(current, handle) is not None
    except Exception:
        return False


def install_integration(integration: str) -> None:
    if _disabled(integration):
        return
    module = importlib.import_module(integration)
    for spec in module.PATCHES:
        try:
            install_spec(spec)
        except Exception as error:
            internal_error(f"patching {spec.module}.{spec.attribute}", error)
    on_install = getattr(module, "on_install", None)
    if on_install is not None:
        try:
            on_install()
        except Exception as error:
            internal_error(f"setting up {integration}", error)


def _on_import(name: str, install: Callable[[], None]):
    """A post-import hook that installs patches if the breaker is on, and never raises."""

    def on_import(_module: Any) -> None:
        try:
            if RUNTIME.enabled:
                install()
        except Exception as error:  # never break the user's import
            try:
                internal_error(f"post-import hook for {name}", error)
            except Exception:
                pass

    return on_import


def install_all() -> None:
    """Patch every SDK already imported and hook the ones imported later; remove the patches of
    integrations the configuration now turns off."""
    with _lock:
        off = [integration for integration in INTEGRATIONS if _disabled(integration)]
        if off:
            _uninstall(off)
        for integration, root in INTEGRATIONS.items():
            if integration in off:
                continue
            if integration not in _hooked:
                _hooked.add(integration)
                wrapt.register_post_import_hook(
                    _on_import(integration, partial(install_integration, integration)), root
                )
            elif root in sys.modules:
                install_integration(integration)


def uninstall_all() -> None:
    with _lock:
        _uninstall(list(INTEGRATIONS))


def _uninstall(integrations: list[str]) -> None:
    """Remove these integrations' patches (a patch another, enabled integration shares stays)."""
    with _lock:
        kept = {
            (spec.module, spec.attribute)
            for integration, root in INTEGRATIONS.items()
            if integration not in integrations and root in sys.modules and not _disabled(integration)
            for spec in importlib.import_module(integration).PATCHES
        }
        for integration in integrations:
            if INTEGRATIONS[integration] not in sys.modules:
                continue
            module = importlib.import_module(integration)
            for spec in module.PATCHES:
                if (spec.module, spec.attribute) in kept:
                    continue
                try:
                    uninstall_spec(spec)
                except Exception as error:
                    internal_error(f"unpatching {spec.module}.{spec.attribute}", error)
            on_uninstall = getattr(module, "on_uninstall", None)
            if on_uninstall is not None:
                try:
                    on_uninstall()
                except Exception as error:
                    internal_error(f"tearing down {integration}", error)


def installed_keys() -> list[tuple[str, str]]:
    return sorted(_installed)


def is_ours(obj: Any) -> bool:
    return any(obj is handle for handle in _installed.values()) or any(obj is handle for handle in _dormant.values())

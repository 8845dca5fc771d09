"""Finds plugins and looks specs up by exact name.

Plugins come from entry points of group ``vlmkit`` (built-ins included) or are added in-process
with ``Registry.add_plugin``. A plugin that fails to import or register is recorded with its
error and skipped; the others keep working. Two plugins registering one name make that name an
error that names both providers.

Environment variables (an entry is an entry-point name, or ``package:name`` to pick one of two
packages that use the same entry-point name; an entry that matches none is one warning):
  ``VLMKIT_PLUGINS``          comma-separated entry points: load only these
  ``VLMKIT_DISABLE_PLUGINS``  comma-separated entry points: never load these
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from vlmkit.core import hookspecs
from vlmkit.core.contracts import DatasetSpec, DecoderSpec, EncoderSpec, PluginSpec, check_spec
from vlmkit.core.errors import PluginError, VlmkitWarning

ENTRY_POINT_GROUP = "vlmkit"
KINDS = ("encoder", "decoder", "dataset")
_HOOK_KIND = {"register_encoders": "encoder", "register_decoders": "decoder", "register_datasets": "dataset"}


class PluginWarning(VlmkitWarning):
    """Plugins failed to load and were skipped (``tracebacks``: theirs, for ``vlmkit --debug``), or
    a ``VLMKIT_PLUGINS`` entry matched nothing; the CLI prints it as one ``warning:`` line."""

    tracebacks: tuple[str, ...] = ()


@dataclass
class Provider:
    """Where a plugin comes from: its entry-point (or plugin) name and its distribution."""

    plugin: str
    package: str
    version: str | None = None
    module: str | None = None
    entry_point: bool = False  # found through an entry point, so VLMKIT_DISABLE_PLUGINS applies

    def __str__(self) -> str:
        if self.entry_point:
            return f"{self.package} (entry point {self.plugin!r}, module {self.module})"
        return f"{self.package} ({self.module or self.plugin})"


@dataclass
class Registration:
    kind: str
    name: str
    spec: PluginSpec
    provider: Provider


@dataclass
class BrokenPlugin:
    """A plugin that failed to import or to register; shown by ``vlmkit plugins list``."""

    provider: Provider
    error: str
    traceback: str = ""


@dataclass
class Registry:
    """All registered specs. Use ``get_registry()`` for the process-wide one."""

    specs: dict[tuple[str, str], Registration] = field(default_factory=dict)
    clashes: dict[tuple[str, str], list[Registration]] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pm = pluggy.PluginManager("vlmkit")
        self._pm.add_hookspecs(hookspecs)

    # ----------------------------------------------------------------------------- loading

    def load_entry_points(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        only = _name_set(env.get("VLMKIT_PLUGINS"))
        disabled = _name_set(env.get("VLMKIT_DISABLE_PLUGINS")) or set()
        first_broken = len(self.broken)
        seen: set[tuple[str, str]] = set()
        known = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist
            package = dist.name if dist else "unknown"
            # Key on the package too: two packages may pick the same entry-point name, and both
            # must load so that a name they both register is reported as a clash, not hidden.
            if (package, ep.name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((package, ep.name))
            ids = {ep.name, f"{package}:{ep.name}"}
            known |= ids
            if (only is not None and not ids & only) or ids & disabled:
                continue
            version = dist.version if dist else None
            provider = Provider(ep.name, package, version, module=ep.value, entry_point=True)
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure must be contained
                self._record_broken(provider, f"import failed{_where(exc)}: {type(exc).__name__}: {exc}", exc)
                continue
            self._add_plugin(plugin, name=f"{package}:{ep.name}", provider=provider)
        unmatched = [f"VLMKIT_PLUGINS entry {n!r}" for n in sorted((only or set()) - known)]
        unmatched += [f"VLMKIT_DISABLE_PLUGINS entry {n!r}" for n in sorted(disabled - known)]
        if unmatched:  # a typo would otherwise load everything (or nothing) without a word
            installed = ", ".join(sorted(n for n in known if ":" not in n)) or "none"
            message = f"{', '.join(unmatched)} matches no installed vlmkit plugin (installed: {installed})"
            warnings.warn(message, PluginWarning, stacklevel=2)
        self._warn_broken(first_broken)

    def add_plugin(
        self, plugin: ModuleType | Any, name: str | None = None, provider: Provider | None = None
    ) -> None:
        """Register a plugin object (module or instance with ``@hookimpl`` functions) in-process."""
        first_broken = len(self.broken)
        self._add_plugin(plugin, name, provider)
        self._warn_broken(first_broken)

    def _add_plugin(self, plugin: ModuleType | Any, name: str | None, provider: Provider | None) -> None:
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if provider is None:
            package = _package_of(plugin)
            provider = Provider(name, package, _version_of(package), module=getattr(plugin, "__name__", None))
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001 - e.g. a hook with the wrong arguments
            self._record_broken(provider, f"invalid plugin: {type(exc).__name__}: {exc}")
            return
        # pluggy accepts @hookimpl functions that match no hookspec; a misspelt hook would
        # otherwise register nothing, silently.
        unknown = sorted(h.name for h in self._pm.get_hookcallers(plugin) or [] if not h.has_spec())
        if unknown:
            self._record_broken(
                provider, f"unknown hook {', '.join(unknown)}; vlmkit hooks are {', '.join(_HOOK_KIND)}"
            )
        for hook_name, kind in _HOOK_KIND.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    impl.function(register=lambda spec, _k=kind: self._register(_k, spec, provider))
                except Exception as exc:  # noqa: BLE001 - one bad plugin must not take others down
                    self._record_broken(provider, f"{hook_name} failed: {type(exc).__name__}: {exc}", exc)

    def _register(self, kind: str, spec: Any, provider: Provider) -> None:
        spec = check_spec(spec, kind)
        reg = Registration(kind=kind, name=spec.name, spec=spec, provider=provider)
        key = (kind, spec.name)
        if key in self.clashes:
            self.clashes[key].append(reg)
        elif key in self.specs:
            self.clashes[key] = [self.specs.pop(key), reg]
        else:
            self.specs[key] = reg

    def _record_broken(self, provider: Provider, error: str, exc: BaseException | None = None) -> None:
        error = " ".join(error.split())  # one line
        trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self.broken.append(BrokenPlugin(provider=provider, error=error, traceback=trace))

    def _warn_broken(self, first: int) -> None:
        """One warning for everything that broke in one load, however many plugins that is."""
        new = self.broken[first:]
        if new:
            details = "; ".join(f"{b.provider.plugin} from {b.provider.package} ({b.error})" for b in new)
            warning = PluginWarning(f"vlmkit plugins skipped: {details}. See 'vlmkit plugins list'.")
            warning.tracebacks = tuple(b.traceback for b in new if b.traceback)
            warnings.warn(warning, stacklevel=3)

    # ----------------------------------------------------------------------------- lookup

    def names(self, kind: str) -> list[str]:
        return sorted({n for (k, n) in [*self.specs, *self.clashes] if k == kind})

    def registration(self, kind: str, name: str) -> Registration:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        key = (kind, name)
        if key in self.clashes:
            who = " and ".join(f"{r.provider}" for r in self.clashes[key])
            eps = [r.provider for r in self.clashes[key] if r.provider.entry_point]
            same = len({p.plugin for p in eps}) < len(eps)  # then only package:name picks one
            how = " or ".join(f"VLMKIT_DISABLE_PLUGINS={f'{p.package}:' * same}{p.plugin}" for p in eps)
            raise PluginError(
                f"{kind} name {name!r} is registered by both {who}; uninstall one, or exclude one with "
                f"{how or 'VLMKIT_DISABLE_PLUGINS'}"
            )
        if key in self.specs:
            return self.specs[key]
        available = self.names(kind)
        hint = did_you_mean(name.lower(), available)
        broken = sorted({b.provider.plugin for b in self.broken})
        extra = f" (broken plugins not loaded: {', '.join(broken)})" if broken else ""
        raise PluginError(
            f"unknown {kind} {name!r}{hint} Available {kind}s: {', '.join(available) or 'none'}{extra}. "
            "See 'vlmkit plugins list'."
        )

    def get(self, kind: str, name: str) -> PluginSpec:
        return self.registration(kind, name).spec

    def encoder(self, name: str) -> EncoderSpec:
        return self.get("encoder", name)  # type: ignore[return-value]

    def decoder(self, name: str) -> DecoderSpec:
        return self.get("decoder", name)  # type: ignore[return-value]

    def dataset(self, name: str) -> DatasetSpec:
        return self.get("dataset", name)  # type: ignore[return-value]

    def all(self) -> list[Registration]:
        regs = list(self.specs.values())
        for clash in self.clashes.values():
            regs.extend(clash)
        return sorted(regs, key=lambda r: (KINDS.index(r.kind), r.name, r.provider.package))


def did_you_mean(name: str, names: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``names``, or ``"."`` when none is close."""
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


def _where(exc: BaseException) -> str:
    """`` at file:line`` of an import failure: the syntax error's, else the deepest frame of real code."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _name_set(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _package_of(plugin: Any) -> str:
    module = getattr(plugin, "__name__", None) or type(plugin).__module__
    top = module.split(".")[0]
    for dist_name in _packages_distributions(tuple(sys.path)).get(top, []):
        return dist_name
    return top


@functools.lru_cache(maxsize=4)
def _packages_distributions(path: tuple[str, ...]) -> dict[str, list[str]]:
    # Reads every installed distribution's file list (~0.2 s with torch installed): once per sys.path.
    return metadata.packages_distributions()


def _version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = Registry()
        registry.load_entry_points()
        _REGISTRY = registry
    return _REGISTRY


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or forget) the process-wide registry; for tests and long-lived processes."""
    global _REGISTRY
    _REGISTRY = registry

"""The plugin manager and the registry of named parts.

Builtin plugins (``clipkit.builtin.*``) and installed ones (entry-point group ``clipkit``) go through
the same hooks. Loading happens once, on first use, never at ``import clipkit``; it imports plugin
modules but no torch. Every registered name remembers the plugin and distribution that provided it.

Which kinds of part there are, their hooks and the keywords their ``register()`` takes come from
:mod:`clipkit.kinds`; why each hook implementation is called on its own is written there too.

Environment:
    ``CLIPKIT_DISABLE_PLUGINS=name,...`` skips installed plugins by entry-point or distribution name
    (``all`` skips every installed plugin; builtins always load).
    ``CLIPKIT_STRICT_PLUGINS=1`` turns plugin failures and conflicts into errors (for CI).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import pluggy

from . import hookspecs, kinds
from .errors import PluginError, PluginWarning, UnknownPartError, suggest  # noqa: F401 (re-exported)
from .hookspecs import Infer
from .kinds import Kind

ENTRY_POINT_GROUP = "clipkit"
BUILTIN_DIST = "clipkit-torch"
def _builtin_plugins() -> Tuple[str, ...]:
    """Every public subpackage of ``clipkit.builtin`` is a builtin plugin (found, not listed)."""
    import pkgutil

    from . import builtin

    return tuple(f"clipkit.builtin.{m.name}" for m in sorted(pkgutil.iter_modules(builtin.__path__), key=lambda m: m.name)
                 if m.ispkg and not m.name.startswith("_"))


#: What first-party plugin distributions provide, as data: ``{distribution: {"parts": [{kind, name, infer}],
#: "models": [name pattern, ...]}}``. The core names no plugin in code; this table only lets a request for
#: a part or config of one that is not installed end in its ``pip install`` line.
FIRST_PARTY_FILE = Path(__file__).with_name("first_party.json")


def _first_party() -> Tuple[Dict[Tuple[str, str], str], Dict[Tuple[str, str], Infer], Dict[str, str]]:
    table = json.loads(FIRST_PARTY_FILE.read_text(encoding="utf-8"))
    parts: Dict[Tuple[str, str], str] = {}
    rules: Dict[Tuple[str, str], Infer] = {}
    models: Dict[str, str] = {}
    for dist, provides in table.items():
        if dist.startswith("_"):
            continue
        for part in provides.get("parts", []):
            key = (part["kind"], part["name"])
            parts[key] = dist
            if "infer" in part:
                rules[key] = Infer(part["infer"]["key"], part["infer"].get("test", "set"))
        models.update({pattern: dist for pattern in provides.get("models", [])})
    return parts, rules, models


#: Parts that first-party plugin distributions provide, for the "pip install" hint.
#: How a section would select a first-party part that is not installed: a hint only, naming the part in the
#: "not installed" error when no installed registration's ``infer=`` rule claims the section.
#: Model names (regular expressions) whose configs first-party plugins ship.
FIRST_PARTY, FIRST_PARTY_INFER, FIRST_PARTY_MODELS = _first_party()


#: What a plugin's import or hook may raise and still only fail itself: a stray ``sys.exit()`` in a
#: plugin module is that plugin's failure, not the end of every command (Ctrl-C still stops the process).
PLUGIN_FAILURES = (Exception, SystemExit)


def import_target(target: str, *, what: str) -> Any:
    """Import ``"package.module:attr"`` (attr may be dotted). ``what`` names it in errors."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{what}: {target!r} is not of the form 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except PLUGIN_FAILURES as exc:
        raise PluginError(f"{what}: cannot import {module_name!r}: {exc!r}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


@dataclass
class PluginInfo:
    """One plugin as ``clipkit plugins`` shows it."""

    name: str
    distribution: str
    version: str
    module: str
    builtin: bool = False
    status: str = "active"  # active | failed | disabled
    error: Optional[str] = None
    registered: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version} (plugin {self.name!r})"

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "name": self.name, "distribution": self.distribution, "version": self.version,
            "module": self.module, "builtin": self.builtin, "status": self.status,
            "registers": {},
        }
        for kind, name in self.registered:
            out["registers"].setdefault(kind, []).append(name)
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Entry:
    """A registered part: its factory (or data) and config class, both possibly lazy strings."""

    kind: Kind
    name: str
    target: Any
    config: Any
    plugin: PluginInfo
    meta: Dict[str, Any]

    @property
    def where(self) -> str:
        return f"{kinds.title(self.kind)} {self.name!r} from {self.plugin.label}"

    def load(self) -> Any:
        """The factory (or data), importing it on first use."""
        if isinstance(self.target, str) and not kinds.spec(self.kind).data:
            self.target = import_target(self.target, what=self.where)
        return self.target

    def config_class(self) -> Optional[type]:
        """The registered config class, imported on first use (``None`` when none was given)."""
        if isinstance(self.config, str):
            self.config = import_target(self.config, what=f"config class of {self.where}")
        cls: Optional[type] = self.config
        return cls

    @property
    def infer(self) -> Tuple[Infer, ...]:
        """The rules by which a config section that names no part selects this one (none: only by name)."""
        rules: Tuple[Infer, ...] = self.meta.get("infer", ())
        return rules


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def strict_plugins() -> bool:
    """Whether ``CLIPKIT_STRICT_PLUGINS`` asks for plugin problems to be errors."""
    return _env_flag("CLIPKIT_STRICT_PLUGINS")


def _itself(plugin: Any) -> Any:
    return plugin  # an in-process plugin is loaded already


def _disabled_names() -> Set[str]:
    raw = os.environ.get("CLIPKIT_DISABLE_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


@dataclass
class _Snapshot:
    """One complete load of every plugin; replaced whole, never mutated after loading."""

    entries: Dict[Tuple[str, str], Entry] = field(default_factory=dict)
    conflicts: Dict[Tuple[str, str], List[PluginInfo]] = field(default_factory=dict)
    plugins: Dict[str, PluginInfo] = field(default_factory=dict)


_WARNED: Set[str] = set()


class _Loader:
    """Builds a :class:`_Snapshot`: imports plugins one by one, isolating each one's failures."""

    def __init__(self, extra: List[Tuple[Any, str]]):
        self.snap = _Snapshot()
        self.extra = extra

    def load(self) -> _Snapshot:
        from . import __version__

        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(kinds.hookspec_namespace())
        for module_name in _builtin_plugins():
            info = PluginInfo(module_name.rsplit(".", 1)[-1], BUILTIN_DIST, __version__, module_name, builtin=True)
            self._add_plugin(pm, info, functools.partial(importlib.import_module, module_name))
        self._load_entry_points(pm)
        for plugin, name in self.extra:
            info = PluginInfo(name, getattr(plugin, "__name__", name), "in-process", getattr(plugin, "__name__", name))
            self._add_plugin(pm, info, functools.partial(_itself, plugin))
        self._collect(pm)
        return self.snap

    def _load_entry_points(self, pm: pluggy.PluginManager) -> None:
        disabled = _disabled_names()
        seen = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "unknown"
            version = dist.version if dist is not None else "unknown"
            if (ep.name, dist_name) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, dist_name))
            info = PluginInfo(ep.name, dist_name, version, ep.value)
            if "all" in disabled or ep.name in disabled or dist_name in disabled:
                info.status = "disabled"
                self.snap.plugins[info.name] = info
                continue
            self._add_plugin(pm, info, ep.load)

    def _add_plugin(self, pm: pluggy.PluginManager, info: PluginInfo, load: Callable[[], Any]) -> None:
        if info.name in self.snap.plugins:
            info.name = f"{info.name}@{info.distribution}"
        self.snap.plugins[info.name] = info
        try:
            plugin = load()
            pm.register(plugin, name=info.name)
        except PLUGIN_FAILURES as exc:
            self._fail(info, f"failed to load: {exc!r}")
            return
        unknown = [hc.name for hc in pm.get_hookcallers(plugin) or [] if not hc.has_spec()]
        if unknown:
            pm.unregister(plugin)
            hints = [repr(name) + suggest(name, kinds.by_hook()) for name in unknown]
            self._fail(info, "unknown hook " + ", ".join(hints))

    @staticmethod
    def _fail(info: PluginInfo, error: str) -> None:
        info.status = "failed"
        info.error = error
        if info.builtin:
            raise PluginError(f"builtin plugin {info.module} is broken: {error}")
        message = f"clipkit plugin skipped: {info.label} {error}"
        if message not in _WARNED:  # a reload does not repeat what the process was already told
            _WARNED.add(message)
            warnings.warn(message, PluginWarning, stacklevel=2)

    def _collect(self, pm: pluggy.PluginManager) -> None:
        staged: Dict[str, List[Entry]] = {}
        # each implementation is called on its own, not through pm.hook: see clipkit.kinds for why
        for hook_name, kind in kinds.by_hook().items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                info = self.snap.plugins[impl.plugin_name]
                if info.status != "active":
                    continue
                bucket = staged.setdefault(info.name, [])
                try:
                    impl.function(**{arg: self._register_callback(kind, info, bucket) for arg in impl.argnames})
                except PLUGIN_FAILURES as exc:
                    staged.pop(info.name, None)
                    self._fail(info, f"hook {hook_name} raised {exc!r}")
        # builtins first: their names are the ones a conflict message compares against
        entries, conflicts = self.snap.entries, self.snap.conflicts
        for info in sorted(self.snap.plugins.values(), key=lambda p: not p.builtin):
            for entry in staged.get(info.name, []):
                key = (entry.kind, entry.name)
                if key in entries:
                    conflicts.setdefault(key, [entries[key].plugin]).append(info)
                entries.setdefault(key, entry)
                info.registered.append(key)

    @staticmethod
    def _register_callback(kind: Kind, info: PluginInfo, bucket: List[Entry]) -> hookspecs.Register:
        spec = kinds.spec(kind)

        def register(name: str, factory: Any, *, config: Any = None, **meta: Any) -> None:
            title = spec.title
            if not isinstance(name, str) or not name:
                raise PluginError(f"registered a {title} with name {name!r}")
            unknown = sorted(set(meta) - spec.keywords)
            if unknown:
                raise PluginError(f"register() of {title} {name!r} got unknown keyword(s) {', '.join(unknown)}")
            if "infer" in meta:
                try:
                    meta["infer"] = hookspecs.infer_rules(meta["infer"])
                except (TypeError, ValueError) as exc:
                    raise PluginError(f"register() of {title} {name!r}: {exc}") from None
            if any(e.kind == kind and e.name == name for e in bucket):
                raise PluginError(f"registered {title} {name!r} twice")
            bucket.append(Entry(kind, name, factory, config, info, meta))
        return register


class Registry:
    """All registered parts, keyed by ``(kind, name)``. Use the module-level :data:`registry`.

    Loading builds a complete snapshot and swaps it in, so queries from other threads see either
    the old or the new set of plugins, never half of one. ``generation`` counts loads, so caches
    built from the registry (the config store) know when to rebuild.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._snap: Optional[_Snapshot] = None
        self._extra: List[Tuple[Any, str]] = []  # in-process plugins, kept across reload()
        self.generation = 0

    def _snapshot(self) -> _Snapshot:
        snap = self._snap
        if snap is None:
            with self._lock:
                if self._snap is None:
                    self._install(_Loader(list(self._extra)).load())
                snap = self._snap
        assert snap is not None  # _install set it, under the lock
        return snap

    def _install(self, snap: _Snapshot) -> None:
        self._snap = snap
        self.generation += 1
        if strict_plugins():
            problems = [f"{p.label}: {p.error}" for p in snap.plugins.values() if p.status == "failed"]
            problems += [self._conflict_message(snap, key) for key in snap.conflicts]
            if problems:
                raise PluginError("CLIPKIT_STRICT_PLUGINS is set and plugins failed: " + "; ".join(problems))

    def reload(self) -> None:
        """Load the plugins again (after installing one, or in tests) and swap the result in."""
        with self._lock:
            self._install(_Loader(list(self._extra)).load())

    # -- in-process plugins ---------------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: Optional[str] = None) -> None:
        """Register a plugin object (a module or instance with hookimpls) in this process only."""
        with self._lock:
            self._extra.append((plugin, name or str(getattr(plugin, "__name__", repr(plugin)))))
            self.reload()

    def unregister_plugin(self, plugin: Any) -> None:
        """Undo :meth:`register_plugin`."""
        with self._lock:
            self._extra = [(p, n) for p, n in self._extra if p is not plugin]
            self.reload()

    # -- queries ---------------------------------------------------------------------------------
    def names(self, kind: Kind) -> List[str]:
        """Registered names of one kind, sorted."""
        return sorted(name for k, name in self._snapshot().entries if k == kind)

    def entries(self, kind: Kind) -> List[Entry]:
        """Registered parts of one kind, sorted by name."""
        snap = self._snapshot()
        return [snap.entries[key] for key in sorted(k for k in snap.entries if k[0] == kind)]

    def inferring(self, kind: Kind) -> List[Entry]:
        """The parts of one kind that declared ``infer=`` rules, in the order rules are tried: builtin
        plugins' first, then installed ones' in load order (the first rule that matches wins)."""
        snap = self._snapshot()
        return [entry for key, entry in snap.entries.items()
                if key[0] == kind and entry.infer and key not in snap.conflicts]

    def plugins(self) -> List[PluginInfo]:
        """Every plugin seen, builtin ones first."""
        return sorted(self._snapshot().plugins.values(), key=lambda p: (not p.builtin, p.name))

    def find_plugin(self, name: str) -> Optional[PluginInfo]:
        """The plugin with this entry-point name or distribution name (``None`` when there is none)."""
        return next((p for p in self.plugins() if name in (p.name, p.distribution)), None)

    def conflicts(self) -> List[str]:
        snap = self._snapshot()
        return [self._conflict_message(snap, key) for key in snap.conflicts]

    @staticmethod
    def _conflict_message(snap: _Snapshot, key: Tuple[str, str]) -> str:
        kind, name = key
        who = " and ".join(p.label for p in snap.conflicts[key])
        return (f"{kinds.title(kind)} {name!r} is registered by both {who}; uninstall one or set "
                f"CLIPKIT_DISABLE_PLUGINS to one of their names")

    def has(self, kind: Kind, name: str) -> bool:
        return (kind, name) in self._snapshot().entries

    def get(self, kind: Kind, name: str, *, where: str = "") -> Entry:
        """The entry for ``name``; an :class:`UnknownPartError` that teaches when there is none.

        ``where`` (e.g. ``"vision_cfg.type"``) prefixes the message.
        """
        snap = self._snapshot()
        key = (kind, name)
        if key in snap.conflicts:
            raise PluginError((f"{where}: " if where else "") + self._conflict_message(snap, key))
        if key in snap.entries:
            return snap.entries[key]
        raise UnknownPartError(self.unknown_message(kind, name, where=where))

    def unknown_message(self, kind: Kind, name: str, *, where: str = "", note: str = "") -> str:
        """One line: what is unknown, what is installed, did-you-mean, failed plugins, pip hint.

        ``note`` follows the name (e.g. how the name was inferred).
        """
        snap = self._snapshot()
        known = self.names(kind)
        parts = [f"unknown {kinds.title(kind)} {name!r}{note}" + suggest(str(name), known)]
        parts.append("installed: " + (", ".join(known) if known else "none"))
        for plugin in snap.plugins.values():
            if plugin.status not in ("failed", "disabled"):
                continue
            match = name in (plugin.name, plugin.distribution) or plugin.distribution.endswith(f"-{name}")
            verb = "failed to load" if plugin.status == "failed" else "is disabled by CLIPKIT_DISABLE_PLUGINS"
            if match or plugin.status == "failed":
                parts.append(f"plugin {plugin.label} {verb}" + (" and may provide it" if match else "")
                             + (f" ({plugin.error})" if plugin.error and match else ""))
        dist = FIRST_PARTY.get((kind, name))
        if dist and not any(p.distribution == dist for p in snap.plugins.values()):
            parts.append(f"it is provided by a plugin: pip install {dist}")
        return (f"{where}: " if where else "") + "; ".join(parts)


registry = Registry()
"""The process-wide registry. Loads plugins on first query."""

_MOVED = {"KIND_TITLES": ("clipkit.kinds.titles()", kinds.titles),
          "ALLOWED_META": ("clipkit.kinds.spec(kind).keywords", lambda: {k: set(s.keywords) for k, s in kinds.KINDS.items()})}


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # these tables are views of clipkit.kinds now
        new, view = _MOVED[name]
        warnings.warn(f"clipkit.registry.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return view()
    raise AttributeError(f"module 'clipkit.registry' has no attribute {name!r}")

"""Contract tests for clipkit plugins, as a pytest plugin (loaded through the ``pytest11`` entry point).

Every part a plugin registers must honour the contract of ``docs/plugins.md``; this module turns that
contract into test cases, so a broken plugin is caught by its author rather than its users::

    import pytest
    from clipkit.testing import contract_cases

    @pytest.mark.parametrize("case", contract_cases("myplugin"), ids=str)   # entry-point name
    def test_contract(case):
        case.run()

A case that fails raises :class:`~clipkit.errors.ContractError` (an ``AssertionError``) naming the part,
the plugin and distribution that registered it, and the contract it broke. clipkit's own test suite
runs the same cases over every registered part (``contract_cases()`` without a plugin).

Fixtures: ``clipkit_plugins`` registers plugin objects in-process for one test and restores the
registry afterwards.

pytest loads this module into every test run of an environment that has clipkit installed, so it
imports nothing heavy: torch is imported only when a case runs (by ``clipkit._contract``).
"""
from __future__ import annotations

import dataclasses
import sys
import types
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, TypeVar

from . import kinds as _kinds

if TYPE_CHECKING:
    from .registry import Entry

_P = TypeVar("_P")

try:
    import pytest
except ImportError:  # check_plugin() from a script works without pytest; only the fixture needs it
    pytest = None  # type: ignore[assignment]  # the module name stays bound; the fixture checks it

__all__ = ["Case", "contract_cases", "check_part", "check_plugin", "PluginSandbox", "PLUGIN", "PLUGIN_CONTRACTS"]

#: The case kind of checks of a whole plugin rather than of one part it registers.
PLUGIN = "plugin"
#: What every installed plugin must do. Each kind of part has its own contracts: ``clipkit.kinds.spec(kind).contracts``.
PLUGIN_CONTRACTS = ("loads", "imports-without-torch")

# the names these tuples had before the kinds table held them
_MOVED = {"TOWER_CONTRACTS": _kinds.VISION_TOWER, "TOKENIZER_CONTRACTS": _kinds.TOKENIZER,
          "POOLER_CONTRACTS": _kinds.POOLER, "MODEL_CONFIG_CONTRACTS": _kinds.MODEL_CONFIG,
          "FREEZER_CONTRACTS": _kinds.FREEZER}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"clipkit.testing.{name} is deprecated; use clipkit.kinds.spec({_MOVED[name]!r}).contracts",
                      DeprecationWarning, stacklevel=2)
        return _kinds.spec(_MOVED[name]).contracts
    raise AttributeError(f"module 'clipkit.testing' has no attribute {name!r}")


@dataclass(frozen=True)
class Case:
    """One contract of one registered part (``kind`` is a registry kind, or :data:`PLUGIN`).

    Cases hold names, not registry entries, so they can be collected before the test runs and still
    see the registry as it is when it does. ``str(case)`` is a stable test id:
    ``vision_tower:resnet:save-load``.
    """

    kind: str
    name: str
    contract: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}:{self.contract}"

    def run(self, section: Optional[Mapping[str, Any]] = None) -> None:
        """Check the contract; raise :class:`~clipkit.errors.ContractError` if it is broken.

        ``section`` replaces the ``example=`` the part registered: the JSON section of a tower (without
        ``"type"``), the ``text_cfg`` of a tokenizer, or the ``cfg`` given to a pooler's factory.
        """
        from . import _contract

        _contract.run(self, section)


def _has_output_tokens(entry: Entry) -> bool:
    try:
        cls = entry.config_class()
    except Exception:  # an unimportable config class fails the "builds" case, with the reason
        return False
    return cls is not None and any(f.name == "output_tokens" for f in dataclasses.fields(cls))


def contract_cases(plugin: Optional[str] = None, kinds: Optional[List[str]] = None) -> List[Case]:
    """The contract cases of one plugin's parts (by entry-point or distribution name), or of every part.

    A plugin that is not installed, failed to load or is disabled yields one ``loads`` case, which fails
    saying so. Every part gets the contracts its kind declares in :mod:`clipkit.kinds` (a tower's
    ``output-tokens`` only when its config class has an ``output_tokens`` key); a part keyed by another
    (a freezer, by its tower type) is checked with that part when the same plugin registers it, on its
    own otherwise. ``kinds`` restricts the kinds listed.
    """
    from .registry import registry

    cases: List[Case] = []
    owner: Optional[str] = None  # the plugin's name when one is asked for
    if plugin is not None:
        info = registry.find_plugin(plugin)
        if info is None or info.status != "active":
            return [Case(PLUGIN, plugin, "loads")]
        # a subprocess sees installed plugins only, not ones registered in this process
        owner = info.name
        cases += [Case(PLUGIN, info.name, contract) for contract in PLUGIN_CONTRACTS
                  if contract == "loads" or info.version != "in-process"]
    elif kinds is None or PLUGIN in kinds:  # installed plugins import without torch too
        cases += [Case(PLUGIN, p.name, "imports-without-torch") for p in registry.plugins()
                  if p.status == "active" and not p.builtin and p.version != "in-process"]
    declared = _kinds.KINDS
    mine = {kind: [e for e in registry.entries(spec.name) if owner is None or e.plugin.name == owner]
            for kind, spec in declared.items()}
    listed: Dict[str, Set[str]] = {kind: {e.name for e in entries} for kind, entries in mine.items()}
    for kind, spec in _in_case_order(declared):
        if kinds is not None and kind not in kinds:
            continue
        for entry in mine[kind]:
            if any(entry.name in listed[key] for key in spec.keyed_by):
                continue  # checked by the part it is keyed by (a tower's "freezer" case)
            for contract in spec.contracts:
                if contract == "output-tokens" and not _has_output_tokens(entry):
                    continue
                cases.append(Case(kind, entry.name, contract))
    return cases


def _in_case_order(declared: Mapping[str, _kinds.KindSpec]) -> List[Tuple[str, _kinds.KindSpec]]:
    """Kinds with contracts, parts keyed by another kind after that kind's (towers before freezers)."""
    return sorted(((k, s) for k, s in declared.items() if s.contracts), key=lambda item: bool(item[1].keyed_by))


def check_part(kind: str, name: str, section: Optional[Mapping[str, Any]] = None,
               contracts: Optional[List[str]] = None) -> None:
    """Run every contract (or the named ones) of one registered part; the first broken one raises."""
    from .registry import registry

    if contracts is None:
        declared = _kinds.spec(kind)
        tokens = declared.is_tower and _has_output_tokens(registry.get(declared.name, name))
        contracts = [c for c in _kinds.spec(kind).contracts if c != "output-tokens" or tokens]
    for contract in contracts:
        Case(kind, name, contract).run(section)


def check_plugin(plugin: str) -> None:
    """Run every contract case of a plugin and raise one ``ContractError`` listing all that failed."""
    from .errors import ContractError

    failures = []
    for case in contract_cases(plugin):
        try:
            case.run()
        except ContractError as exc:
            failures.append(str(exc))
    if failures:
        raise ContractError(f"{len(failures)} contract case(s) of plugin {plugin!r} failed:\n" + "\n".join(failures))


class PluginSandbox:
    """In-process plugins for one test (the ``clipkit_plugins`` fixture): removed at teardown."""

    def __init__(self) -> None:
        self._registered: List[Any] = []
        self._modules: List[str] = []

    def register(self, plugin: _P, name: Optional[str] = None) -> _P:
        """Register a module or object with ``@clipkit.hookimpl`` functions, as if it were installed."""
        from .registry import registry

        registry.register_plugin(plugin, name)
        self._registered.append(plugin)
        return plugin

    def module(self, name: str, **hooks: Callable[..., None]) -> types.ModuleType:
        """Make a plugin module ``name`` from hook functions (``register_vision_towers=fn``, ... each
        decorated with ``@clipkit.hookimpl``, as in a real plugin) and register it. It is put in
        ``sys.modules``, so lazy ``"name:attr"`` targets resolve."""
        module = types.ModuleType(name)
        for hook_name, fn in hooks.items():
            setattr(module, hook_name, fn)
        sys.modules[name] = module
        self._modules.append(name)
        return self.register(module, name)

    def close(self) -> None:
        from .registry import registry

        for plugin in reversed(self._registered):
            registry.unregister_plugin(plugin)
        for name in self._modules:
            sys.modules.pop(name, None)
        self._registered.clear()
        self._modules.clear()


def _clipkit_plugins() -> Iterator[PluginSandbox]:
    """Register plugins in-process for one test; they are unregistered, and the registry reloaded, after it.

    ``clipkit_plugins.register(module_or_object, name=None)`` registers an existing plugin object;
    ``clipkit_plugins.module("my_plugin", register_vision_towers=fn, ...)`` builds one from functions.
    """
    sandbox = PluginSandbox()
    try:
        yield sandbox
    finally:
        sandbox.close()


if pytest is not None:
    clipkit_plugins = pytest.fixture(_clipkit_plugins, name="clipkit_plugins")

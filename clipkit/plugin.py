"""Everything a plugin author uses, from one public module (nothing here needs ``clipkit._*``)::

    from dataclasses import dataclass

    import clipkit
    from clipkit.plugin import Infer, TowerContext, option

    @dataclass
    class MyNetCfg:
        width: int = option(64, "Channels of the first stage.", gt=0)

    @clipkit.hookimpl
    def register_vision_towers(register):
        register("mynet", "clipkit_plugin_mynet.model:build", config=MyNetCfg,
                 infer=Infer("mynet_depth"), example={"width": 8})

Importing this module imports no torch, so a plugin module that imports it stays light (clipkit loads
plugins in every process). Contract tests live in :mod:`clipkit.testing`, the registry in
:mod:`clipkit.registry`, the kinds of part in :mod:`clipkit.kinds`.
"""
from __future__ import annotations

from ._provenance import PROVENANCE_KEY, check_provenance, missing_parts, parts_provenance
from ._typed import option
from .errors import (
                     ClipkitError,
                     ConfigError,
                     ContractError,
                     PluginError,
                     PluginWarning,
                     Problem,
                     TowerContractError,
                     UnknownPartError,
)
from .exporters import Exporter, ExporterFactory
from .hookspecs import (
                     Freezer,
                     Infer,
                     ModelConfigSource,
                     ModelContext,
                     ModelFamilyFactory,
                     PoolerFactory,
                     Register,
                     Target,
                     TokenizerFactory,
                     TowerContext,
                     TowerFactory,
                     hookimpl,
)
from .kinds import (
                     DATA_SOURCE,
                     EXPORTER,
                     FREEZER,
                     KINDS,
                     MODEL_CONFIG,
                     MODEL_FAMILY,
                     OBJECTIVE,
                     POOLER,
                     REPORTER,
                     TEXT_TOWER,
                     TOKENIZER,
                     VISION_TOWER,
                     Kind,
                     KindSpec,
)
from .registry import registry
from .train.data_sources import DataSource, DataSourceContext, DataSourceFactory
from .train.objectives import FEATURES, BaseObjective, Objective, ObjectiveContext, ObjectiveFactory
from .train.report import Reporter, ReporterContext, ReporterFactory

__all__ = [
    # declaring parts
    "hookimpl", "Register", "Target", "Infer", "option",
    # what factories receive and return
    "TowerContext", "TowerFactory", "PoolerFactory", "TokenizerFactory", "Freezer", "ModelConfigSource",
    "ModelContext", "ModelFamilyFactory",
    "DataSourceFactory", "DataSourceContext", "DataSource",
    "ObjectiveFactory", "ObjectiveContext", "Objective", "BaseObjective", "FEATURES",
    "ReporterFactory", "ReporterContext", "Reporter", "ExporterFactory", "Exporter",
    # kinds of part
    "Kind", "KindSpec", "KINDS", "VISION_TOWER", "TEXT_TOWER", "POOLER", "TOKENIZER", "FREEZER",
    "MODEL_CONFIG", "MODEL_FAMILY", "DATA_SOURCE", "OBJECTIVE", "REPORTER", "EXPORTER",
    # errors
    "ClipkitError", "ConfigError", "Problem", "PluginError", "PluginWarning", "UnknownPartError", "ContractError",
    "TowerContractError",
    # which plugin provided each part of a saved model
    "PROVENANCE_KEY", "parts_provenance", "check_provenance", "missing_parts",
    # the registry of named parts
    "registry",
]

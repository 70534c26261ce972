"""Model configs: where named configs come from, and validation of a config into typed parts.

Named configs come from, later ones winning on equal names: the builtin ``model_configs/`` folder,
configs shipped by plugins (``register_model_configs``), the paths in ``CLIPKIT_MODEL_CONFIG_PATH``
(``os.pathsep``-separated files or folders, seen by every process), and ``add_model_config`` calls.

Validation binds each section to the config class its tower type registered, collects every problem
(unknown key, wrong type, impossible value, unknown type) and raises them together. No torch here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

from ._size import size_problems
from ._typed import option, validate
from .errors import ClipkitError, ConfigError, JSONBoundError, PluginWarning, Problem, explain_os_error, suggest
from .kinds import MODEL_CONFIG, MODEL_FAMILY, TEXT_TOWER, TOKENIZER, VISION_TOWER, Kind, spec
from .registry import FIRST_PARTY_INFER, FIRST_PARTY_MODELS, Entry, registry

logger = logging.getLogger("clipkit")

SCHEMA_VERSION = 1
BUILTIN_CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_CONFIG_NAME = "open_clip_config.json"
_REQUIRED_TOP = ("embed_dim", "vision_cfg", "text_cfg")
#: Bounds on a model config file: real ones are a few KB and a few levels deep. Past them a file is
#: refused before parsing, so one hostile or mistaken file cannot exhaust memory or the stack.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 64
TOKENIZER_KEYS = ("tokenizer", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")

__all__ = ["add_model_config", "list_models", "get_model_config", "validate_model_config", "ModelConfig",
           "ModelCfg", "TokenizerCfg", "parse_model_name", "infer_part", "infer_vision_type", "infer_text_type",
           "infer_tokenizer", "option"]


@dataclass
class ModelCfg:
    """Top-level keys of a model config (``vision_cfg`` and ``text_cfg`` are validated by their tower)."""

    embed_dim: int = option(doc="Width of the joint image-text embedding space; both towers project to it.", gt=0)
    quick_gelu: bool = option(False, "Use QuickGELU (x * sigmoid(1.702 x)) in builtin towers, as OpenAI's weights need.")
    init_logit_scale: float = option(math.log(1 / 0.07), "Initial value of the learned log temperature.")
    init_logit_bias: Optional[float] = option(None, "Initial logit bias (SigLIP uses -10); null means no bias parameter.")
    nonscalar_logit_scale: bool = option(False, "Store logit scale and bias with shape [1] instead of [].")
    custom_text: bool = option(False, "Keep text weights under 'text.' in checkpoints (OpenCLIP's CustomTextCLIP layout).")
    schema_version: int = option(SCHEMA_VERSION, "Config format version; a newer file fails clearly on an older clipkit.",
                                 ge=1)


@dataclass
class TokenizerCfg:
    """Tokenizer keys of ``text_cfg``; they are shared by every text tower type."""

    tokenizer: Optional[str] = option(None, "Registered tokenizer name; inferred when absent, from the keys "
                                            "tokenizers declare (hf_tokenizer_name -> 'hf'), otherwise 'clip'.")
    hf_tokenizer_name: Optional[str] = option(None, "HuggingFace tokenizer: hub name or local folder.")
    tokenizer_mode: Optional[str] = option(None, "Tokenizer mode passed to the tokenizer (OpenCLIP: 'clips').")
    tokenizer_kwargs: Optional[Dict[str, Any]] = option(None, "Extra tokenizer arguments, e.g. {\"clean\": \"canonicalize\"}.")


@dataclass
class ModelConfig:
    """A validated model config: typed parts plus the original mapping (kept for saving)."""

    raw: Dict[str, Any]
    top: ModelCfg
    vision_type: str
    vision: Any
    text_type: str
    text: Any
    tokenizer: TokenizerCfg
    name: Optional[str] = None
    source: Optional[str] = None
    family: str = "clip"
    family_cfg: Any = None

    @property
    def embed_dim(self) -> int:
        return self.top.embed_dim

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer to build: explicit ``text_cfg.tokenizer`` or the one inferred from ``text_cfg``."""
        return infer_tokenizer(self.raw.get("text_cfg") or {})


# -- which part a section selects ------------------------------------------------------------------

def _selection(kind: Kind, section: Mapping[str, Any]) -> Tuple[Any, str]:
    """``(name, note)``: the part of ``kind`` a config section selects, and how (for messages).

    A section names its part by the kind's key (``"type"``, ``"tokenizer"``); otherwise the ``infer=``
    rules registrations declared are tried (builtins first, first match wins), then the first-party
    hints (which name a plugin that is not installed, so the error says what to install), then the
    kind's default.
    """
    declared = spec(kind)
    key = declared.select_key
    if key is not None and section.get(key) is not None:
        return section[key], ""
    matched = [(entry, rule) for entry in registry.inferring(kind)
               for rule in [next((rule for rule in entry.infer if rule.matches(section)), None)] if rule is not None]
    if matched:
        (entry, rule), others = matched[0], matched[1:]
        if others:
            _warn_ambiguous(kind, matched)
        return entry.name, f" (inferred from {rule.describe()})"
    for (hint_kind, name), rule in FIRST_PARTY_INFER.items():
        # a hint stands in for a rule the part's plugin would declare: when it is not installed, or is a
        # release from before plugins declared their rules
        declares = any(entry.name == name for entry in registry.inferring(kind))
        if hint_kind == kind and not declares and rule.matches(section):
            return name, f" (inferred from {rule.describe()})"
    return declared.default, " (the default)"


def _warn_ambiguous(kind: Kind, matched: List[Tuple[Entry, Any]]) -> None:
    """Several parts' ``infer=`` rules select the same section: the first is used (builtins' rules are tried
    first, then plugins' in load order), but the config's meaning depends on what is installed."""
    declared = spec(kind)
    where = f"{declared.section}: a section" if declared.section else "a model config"
    claims = ", ".join(f"{entry.name!r} ({rule.describe()}) of {entry.plugin.label}" for entry, rule in matched)
    choose = f"set {declared.section + '.' if declared.section else ''}{declared.select_key} to choose"
    warnings.warn(PluginWarning(f"{where} without {declared.select_key!r} matches the infer= rules of "
                                f"{len(matched)} {declared.title}s: {claims}; {matched[0][0].name!r} is "
                                f"used; {choose}"), stacklevel=3)


def infer_part(kind: Kind, section: Mapping[str, Any]) -> Any:
    """The name of the part of ``kind`` a model-config section selects: the one it names, else the one
    the registered ``infer=`` rules pick, else the kind's default."""
    return _selection(kind, section)[0]


def infer_vision_type(vision_cfg: Mapping[str, Any]) -> str:
    """``type`` if given, else the vision tower type whose ``infer=`` rule matches (``timm_model_name`` ->
    timm, a list of ``layers`` -> resnet), else vit."""
    name: str = infer_part(VISION_TOWER, vision_cfg)
    return name


def infer_text_type(text_cfg: Mapping[str, Any]) -> str:
    """``type`` if given, else the text tower type whose ``infer=`` rule matches (``hf_model_name`` -> hf),
    else transformer."""
    name: str = infer_part(TEXT_TOWER, text_cfg)
    return name


def infer_tokenizer(text_cfg: Mapping[str, Any]) -> str:
    """The tokenizer a ``text_cfg`` selects: ``tokenizer`` if given, else the tokenizer whose ``infer=`` rule
    matches (``hf_tokenizer_name`` -> hf), else clip. The one place this is decided."""
    name: str = infer_part(TOKENIZER, text_cfg)
    return name


# -- validation -------------------------------------------------------------------------------------

def _tower(kind: Kind, data: Any, extra_known: Tuple[str, ...], problems: List[Problem]) -> Tuple[Optional[str], Any]:
    section_key = spec(kind).section or ""  # a tower kind always has its section
    if data is None:
        problems.append(Problem(section_key, "missing required section"))
        return None, None
    if not isinstance(data, dict):
        problems.append(Problem(section_key, f"expected an object, got {type(data).__name__}"))
        return None, None
    key = spec(kind).select_key
    if key in data and not (isinstance(data[key], str) and data[key]):
        problems.append(Problem(f"{section_key}.{key}", f"expected a registered tower type name, got {data[key]!r}"))
        return None, None
    tower_type, note = _selection(kind, data)
    if not registry.has(kind, tower_type):
        problems.append(Problem(f"{section_key}.{key}", registry.unknown_message(kind, tower_type, note=note)))
        return tower_type, None
    try:
        entry = registry.get(kind, tower_type)
        cls = entry.config_class()
    except ClipkitError as exc:  # a name conflict, or a config class that cannot be imported
        problems.append(Problem(f"{section_key}.type", str(exc)))
        return tower_type, None
    if cls is None:  # a plugin without a config class gets the raw mapping and validates it itself
        return tower_type, {k: v for k, v in data.items() if k not in ("type",) + extra_known}
    try:
        instance, found = validate(cls, data, section_key, f"{spec(kind).title} {tower_type!r}",
                                   extra_known=("type",) + extra_known)
    except Exception as exc:  # the plugin's config class itself is broken: name it, do not crash
        problems.append(Problem(f"{section_key}.type", f"config class of {entry.where} failed: {exc!r}"))
        return tower_type, None
    problems.extend(found)
    return tower_type, instance


def _tokenizer_problems(tok: TokenizerCfg, text_cfg: Mapping[str, Any]) -> List[Problem]:
    """The tokenizer named (or inferred) must exist, and take the keys given to it."""
    name = infer_tokenizer(text_cfg)
    where = "text_cfg.tokenizer" if tok.tokenizer is not None else "text_cfg"
    if not registry.has(TOKENIZER, name):
        return [Problem(where, registry.unknown_message(TOKENIZER, name,
                                                        note="" if tok.tokenizer is not None else " (inferred)"))]
    if name != "hf" and tok.hf_tokenizer_name:
        return [Problem("text_cfg.hf_tokenizer_name", f"is used only by the 'hf' tokenizer, not {name!r}")]
    if name != "hf" and tok.tokenizer_mode:
        return [Problem("text_cfg.tokenizer_mode", f"is used only by the 'hf' tokenizer, not {name!r}")]
    options = registry.get(TOKENIZER, name).meta.get("options")
    problems = []
    for key in sorted(tok.tokenizer_kwargs or {}):
        if options is not None and key not in options:
            problems.append(Problem(f"text_cfg.tokenizer_kwargs.{key}", f"unknown option of tokenizer {name!r}"
                                    + suggest(key, options) + f"; it takes {', '.join(options)}"))
    return problems


def _family(cfg: Dict[str, Any], fail: Any) -> Tuple[str, Optional[type], Tuple[str, ...]]:
    """``(family, its config class, the top-level keys it owns)`` of a config mapping.

    A family that is not installed ends validation at once, in one line naming what selected it and,
    for a first-party one, the ``pip install`` line: its keys would otherwise all read as unknown keys.
    """
    key = str(spec(MODEL_FAMILY).select_key)
    if key in cfg and not (isinstance(cfg[key], str) and cfg[key]):
        raise fail([Problem(key, f"expected a registered model family name, got {cfg[key]!r}")])
    name, note = _selection(MODEL_FAMILY, cfg)
    if not registry.has(MODEL_FAMILY, name):
        where = key if cfg.get(key) is not None else next(
            (rule.key for (k, n), rule in FIRST_PARTY_INFER.items() if k == MODEL_FAMILY and n == name), "")
        raise fail([Problem(where, registry.unknown_message(MODEL_FAMILY, name, note=note))])
    try:
        cls = registry.get(MODEL_FAMILY, name).config_class()
    except ClipkitError as exc:
        raise fail([Problem(key, str(exc))]) from exc
    owned = tuple(f.name for f in dataclasses.fields(cls) if f.init) if cls is not None else ()
    return name, cls, (key, *owned)


def _bind_family(cls: Optional[type], cfg: Mapping[str, Any], name: str, problems: List[Problem]) -> Any:
    """The family's config: its class bound to its top-level keys; a field typed by a dataclass is a
    section, validated key by key like a tower's."""
    if cls is None:
        return None
    what = f"{spec(MODEL_FAMILY).title} {name!r}"
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    sections = {k for k in fields if dataclasses.is_dataclass(hints[k])}
    plain = {k: cfg[k] for k in fields if k in cfg and k not in sections}
    try:
        instance, found = validate(cls, plain, "", what, extra_known=sections)
        problems.extend(found)
        for key in sorted(sections & set(cfg)):
            if not isinstance(cfg[key], dict):
                problems.append(Problem(key, f"expected an object, got {type(cfg[key]).__name__}"))
                continue
            section, found = validate(hints[key], cfg[key], key, f"{what} section {key!r}")
            problems.extend(found)
            if instance is not None and section is not None:
                setattr(instance, key, section)
    except Exception as exc:  # the plugin's config class itself is broken: name it, do not crash
        problems.append(Problem(str(spec(MODEL_FAMILY).select_key),
                                f"config class of {registry.get(MODEL_FAMILY, name).where} failed: {exc!r}"))
        return None
    return instance


def validate_model_config(cfg: Any, source: Optional[str] = None, name: Optional[str] = None) -> ModelConfig:
    """Validate a model config mapping; raise :class:`ConfigError` listing every problem.

    ``source`` (a file path, or a description) prefixes each problem line.
    """
    def fail(problems: List[Problem]) -> ConfigError:
        return ConfigError([Problem(p.path, p.message, source) for p in problems])

    if not isinstance(cfg, dict):
        raise fail([Problem("", f"a model config must be a JSON object, got {type(cfg).__name__}")])
    family, family_class, family_keys = _family(cfg, fail)
    version = cfg.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise fail([Problem("schema_version", f"this config needs a newer clipkit (schema_version {version}, "
                                              f"this clipkit reads up to {SCHEMA_VERSION}); upgrade clipkit-torch")])
    problems: List[Problem] = []
    top, found = validate(ModelCfg, {k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg")},
                          "", "a model config", extra_known=("vision_cfg", "text_cfg", *family_keys))
    problems.extend(found)
    family_cfg = _bind_family(family_class, cfg, family, problems)
    vision_type, vision = _tower(VISION_TOWER, cfg.get("vision_cfg"), (), problems)
    text_type, text = _tower(TEXT_TOWER, cfg.get("text_cfg"), TOKENIZER_KEYS, problems)
    tokenizer: Optional[TokenizerCfg] = TokenizerCfg()
    if isinstance(cfg.get("text_cfg"), dict):
        tok_data = {k: v for k, v in cfg["text_cfg"].items() if k in TOKENIZER_KEYS}
        tokenizer, found = validate(TokenizerCfg, tok_data, "text_cfg", "a tokenizer")
        problems.extend(found)
        if tokenizer is not None:
            problems.extend(_tokenizer_problems(tokenizer, cfg["text_cfg"]))
    if problems:
        raise fail(problems)
    # no problems: every part was bound
    assert top is not None and tokenizer is not None and vision_type is not None and text_type is not None
    problems = size_problems(top.embed_dim, [("vision_cfg", vision), ("text_cfg", text)])
    if problems:  # refused before anything is built: building would run until memory runs out
        raise fail(problems)
    return ModelConfig(raw=copy.deepcopy(cfg), top=top, vision_type=vision_type, vision=vision,
                       text_type=text_type, text=text, tokenizer=tokenizer, name=name, source=source,
                       family=family, family_cfg=family_cfg)


# -- the named-config store ---------------------------------------------------------------------------

def _natural_key(name: str) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def is_model_config(data: Any) -> bool:
    """What counts as a model config when scanning folders: an object with the three required keys."""
    return isinstance(data, dict) and all(key in data for key in _REQUIRED_TOP)


class _Store:
    def __init__(self) -> None:
        self.user_paths: List[Path] = []
        self._configs: Optional[Dict[str, Tuple[Dict[str, Any], str]]] = None
        self._generation = -1  # the registry load the cache was built from
        self._reported: Set[str] = set()  # scan messages already logged, so rescans stay quiet
        self.replaced: Dict[str, str] = {}  # builtin config name -> the plugin whose config replaced it

    def invalidate(self) -> None:
        self._configs = None

    def _env_paths(self) -> List[Path]:
        raw = os.environ.get("CLIPKIT_MODEL_CONFIG_PATH", "")
        return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]

    @property
    def configs(self) -> Dict[str, Tuple[Dict[str, Any], str]]:
        entries = registry.entries(MODEL_CONFIG)  # loads plugins first: generation is then current
        if self._configs is None or self._generation != registry.generation:
            found: Dict[str, Tuple[Dict[str, Any], str]] = {}
            self._scan(BUILTIN_CONFIG_DIR, found, "builtin")
            self.replaced = {}
            for entry in entries:
                data, where = self._plugin_config(entry)
                if data is None:
                    continue
                if entry.name in found:  # silently swapping a builtin model would change what a name means
                    self.replaced[entry.name] = entry.plugin.label
                    self._report(logging.WARNING, f"model config {entry.name!r} from {entry.plugin.label} replaces "
                                                  f"the builtin config of that name ({found[entry.name][1]})")
                found[entry.name] = (data, where)
            for path in self._env_paths():
                if not path.exists():
                    self._report(logging.WARNING, f"CLIPKIT_MODEL_CONFIG_PATH: {path} does not exist; skipped")
                    continue
                self._scan(path, found, "CLIPKIT_MODEL_CONFIG_PATH")
            for path in self.user_paths:
                self._scan(path, found, "add_model_config")
            self._configs = dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))
            self._generation = registry.generation
        return self._configs

    def _report(self, level: int, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            logger.log(level, message)

    def _plugin_config(self, entry: Entry) -> Tuple[Optional[Dict[str, Any]], str]:
        target = entry.target
        where = f"{entry.plugin.label}"
        if isinstance(target, Mapping):
            if _too_deep(target):
                self._report(logging.WARNING, f"model config {entry.name!r} from {where} skipped: nested more than "
                                              f"{MAX_CONFIG_DEPTH} levels deep")
                return None, where
            return copy.deepcopy(dict(target)), where
        path = Path(target)
        if not path.is_absolute():  # relative to the plugin's package, not to the current directory
            import importlib.util

            spec = importlib.util.find_spec(entry.plugin.module.split(":")[0])
            if spec is not None and spec.origin:
                path = Path(spec.origin).parent / path
        try:
            return load_json(path), str(path)
        except (OSError, ValueError, TypeError) as exc:
            self._report(logging.WARNING, f"model config {entry.name!r} from {where} cannot be read: {exc}")
            return None, where

    def _scan(self, path: Path, found: Dict[str, Tuple[Dict[str, Any], str]], origin: str) -> int:
        files = [path] if path.is_file() else sorted(path.glob("*.json"))
        skipped = 0
        for file in files:
            try:
                data = load_json(file)
            except JSONBoundError as exc:  # not just "not a config": one file must not go unnoticed
                self._report(logging.WARNING, f"{origin}: {file} skipped: {exc}")
                skipped += 1
                continue
            except (OSError, ValueError) as exc:
                logger.debug("%s: not readable as JSON (%s)", file, exc)
                skipped += 1
                continue
            if not is_model_config(data):
                skipped += 1
                continue
            found[file.stem] = (data, str(file))
        if skipped and origin != "builtin":
            self._report(logging.INFO, f"{origin}({path}): skipped {skipped} JSON file(s) that are not model "
                                       f"configs (a model config has embed_dim, vision_cfg and text_cfg)")
        return skipped


_store = _Store()


def add_model_config(path: Union[str, os.PathLike[str]]) -> None:
    """Register a folder of model config JSON files, or one file; the file stem is the model name.

    JSON files that are not model configs (no ``embed_dim``/``vision_cfg``/``text_cfg``) are skipped
    and counted in the log. Configs added here are process-local; use ``CLIPKIT_MODEL_CONFIG_PATH``
    to reach subprocesses and the ``clipkit`` command.
    """
    path = Path(path).expanduser().resolve()  # later scans must not depend on the working directory
    if not path.exists():
        raise ClipkitError(f"add_model_config: {path} does not exist")
    _store.user_paths.append(path)
    _store.invalidate()
    configs = _store.configs
    if path.is_file() and path.stem not in configs:
        logger.warning("add_model_config(%s): not a model config (needs embed_dim, vision_cfg, text_cfg); skipped", path)


def list_models() -> List[str]:
    """Every named model config: builtin, plugin-shipped and added ones, in natural order."""
    return list(_store.configs)


def replaced_model_configs() -> Dict[str, str]:
    """Builtin config names that a plugin's config replaced, each with the plugin (for ``clipkit models``)."""
    configs = _store.configs  # scanning is what fills _store.replaced
    return {name: plugin for name, plugin in _store.replaced.items() if name in configs}


def model_config_source(model_name: str) -> Optional[str]:
    """Where a named config came from (a file path or a plugin), or None."""
    item = _store.configs.get(model_name)
    return item[1] if item else None


def parse_model_name(model_name: str) -> Tuple[Optional[str], str]:
    """Split ``hf-hub:org/repo`` / ``local-dir:/path`` into ``(schema, identifier)``."""
    for schema in ("hf-hub", "local-dir"):
        prefix = schema + ":"
        if model_name.startswith(prefix):
            ident = model_name[len(prefix):]
            if not ident:
                raise ClipkitError(f"model name {model_name!r}: nothing after '{prefix}'")
            return schema, ident
    return None, model_name


def read_hub_config(schema: str, ident: str, cache_dir: Optional[str] = None, offline: bool = False) -> Dict[str, Any]:
    """The ``open_clip_config.json`` of a ``local-dir:`` folder or ``hf-hub:`` repo.

    ``offline`` reads hub repos from the huggingface_hub cache only (``clipkit config`` never downloads).
    """
    if schema == "local-dir":
        path = Path(ident).expanduser() / HF_CONFIG_NAME
        if not path.is_file():
            raise ClipkitError(f"local-dir:{ident}: no {HF_CONFIG_NAME} in that folder")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(ident, HF_CONFIG_NAME, cache_dir=cache_dir, local_files_only=offline))
        except Exception as exc:  # offline, gated, missing repo or file: say which, in one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ClipkitError(f"hf-hub:{ident}: cannot fetch {HF_CONFIG_NAME} ({type(exc).__name__}: {reason[:160]})"
                               + ("; only the huggingface_hub cache was searched" if offline else "")) from exc
    return read_json_object(path)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def load_json(path: Union[str, os.PathLike[str]]) -> Any:
    """Parse a model config file within the size and depth bounds (:class:`JSONBoundError` past them).

    Read errors are ``OSError``; invalid JSON is ``ValueError``. The one way clipkit reads config files.
    """
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise JSONBoundError(f"larger than the {MAX_CONFIG_BYTES >> 20} MiB limit of a model config file")
    text = raw.decode("utf-8")
    # json's parser recurses once per level: measure the nesting first (brackets inside strings do not count)
    depth = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_CONFIG_DEPTH:
            raise JSONBoundError(f"nested more than {MAX_CONFIG_DEPTH} levels deep (a model config needs a few)")
    return json.loads(text)


def _too_deep(data: Any) -> bool:
    """Whether a Python object (a config a plugin registers as data) nests past :data:`MAX_CONFIG_DEPTH`."""
    level = [data]
    for _ in range(MAX_CONFIG_DEPTH + 1):
        level = [child for item in level if isinstance(item, (Mapping, list, tuple))
                 for child in (item.values() if isinstance(item, Mapping) else item)]
        if not level:
            return False
    return True


def read_json_object(path: Path) -> Dict[str, Any]:
    """A JSON file that must hold an object; any other content is a one-line ClipkitError."""
    try:
        with explain_os_error(str(path)):
            data = load_json(path)
    except JSONBoundError as exc:
        raise ClipkitError(f"{path}: {exc}") from exc
    except ValueError as exc:
        raise ClipkitError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ClipkitError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def get_model_config(model_name: str) -> Optional[Dict[str, Any]]:
    """A copy of a named config (or of a ``local-dir:``/``hf-hub:`` model's ``model_cfg``), or None."""
    schema, ident = parse_model_name(model_name)
    if schema is not None:
        data = read_hub_config(schema, ident)
        found: Dict[str, Any] = data.get("model_cfg", data)
        return copy.deepcopy(found)
    item = _store.configs.get(model_name)
    return copy.deepcopy(item[0]) if item else None


def unknown_model_message(model_name: str) -> str:
    """Unknown model name: did-you-mean and, for known plugin families, the pip install line."""
    message = f"unknown model {model_name!r}" + suggest(model_name, list_models(), n=3)
    for pattern, dist in FIRST_PARTY_MODELS.items():
        if re.fullmatch(pattern, model_name):
            return message + f"; {model_name} comes with a plugin: pip install {dist}"
    from .pretrained import list_pretrained_tags_by_model

    if list_pretrained_tags_by_model(model_name):
        message += "; it is an OpenCLIP model with pretrained tags whose config clipkit does not ship"
    return message + "; see `clipkit models` for the list, or add_model_config() for your own"

"""``clipkit plugin new``: write a ready plugin distribution ``clipkit-plugin-NAME/`` from the templates in
``clipkit/templates/plugin`` (``$name``-style placeholders, filled by :class:`string.Template`).

Which kinds it writes, and what each one's package says about itself, come from :mod:`clipkit.kinds`
(a kind's :class:`~clipkit.kinds.Scaffold`); its files are the folder of templates named by its short name.

What is written installs with ``pip install -e``, passes its own tests (clipkit's contract cases and a
few of its own), and shows in ``clipkit plugins``. No torch here.
"""
from __future__ import annotations

import re
import string
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Dict, List

from . import __version__
from .errors import ClipkitError
from .kinds import KindSpec, Scaffold, scaffolds

#: How a NAME may look: it becomes the registry name, the entry-point name and (with _ for -) the package.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
#: The longest NAME: it is typed in configs and in ``pip install clipkit-plugin-NAME``, and it names
#: files and folders, which file systems limit to 255 bytes.
MAX_NAME_LENGTH = 40


def kinds() -> Dict[str, KindSpec]:
    """The ``--kind`` choices: every kind :mod:`clipkit.kinds` declares a scaffold for, by its short name."""
    return scaffolds()


def _version_range(version: str) -> str:
    """The releases that keep this clipkit's API: the same minor version before 1.0, the same major after."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return f">={major}.{minor},<{major}.{minor + 1}" if major == 0 else f">={major}.{minor},<{major + 1}"


def _templates(kind: KindSpec) -> Traversable:
    return resources.files("clipkit") / "templates" / "plugin" / kind.short


def _scaffold(kind: KindSpec) -> Scaffold:
    if kind.scaffold is None:  # kinds() offers only the kinds that declare one
        raise ClipkitError(f"clipkit plugin new has no template for kind {kind.name!r}")
    return kind.scaffold


def _fields(name: str, kind: KindSpec) -> Dict[str, str]:
    ident = name.replace("-", "_")
    fields = {"name": name, "pkg": f"clipkit_plugin_{ident}", "dist": f"clipkit-plugin-{name}",
              "cls": "".join(part.capitalize() for part in re.split(r"[-_]", name)),
              "requirement": _scaffold(kind).requirement + _version_range(__version__), "test_file": f"test_{ident}.py"}
    fields["summary"] = string.Template(_scaffold(kind).summary).substitute(fields)
    usage = (_templates(kind) / "usage.md.tmpl").read_text(encoding="utf-8").rstrip("\n")
    fields["usage"] = string.Template(usage).substitute(fields)
    # what only a plugin that ships a model config (parts used in model configs) can show
    ships_config = (_templates(kind) / "config.json.tmpl").is_file()
    fields["models"] = f"\n$ clipkit models | grep {name}\n{name}-example" if ships_config else ""
    fields["config_check"] = ("\n`clipkit config check my_model.json` validates a config that uses it (offline, without "
                              "torch), and\n`clipkit config schema` includes its keys, with their types, defaults and "
                              "meanings.\n") if ships_config else ""
    return fields


def check_name(name: str, kind: str) -> str:
    """The plugin name to use, or a ClipkitError saying why ``name`` cannot be one."""
    if name.startswith("clipkit-plugin-"):
        name = name[len("clipkit-plugin-"):]
    choices = kinds()
    if kind not in choices:
        raise ClipkitError(f"unknown plugin kind {kind!r}; choose one of {', '.join(choices)}")
    if len(name) > MAX_NAME_LENGTH:
        raise ClipkitError(f"plugin name {name[:20]!r}... is {len(name)} characters long; use at most "
                           f"{MAX_NAME_LENGTH}")
    if not NAME_PATTERN.fullmatch(name):
        raise ClipkitError(f"plugin name {name!r}: use lowercase letters and digits, starting with a letter, "
                           f"optionally joined by '-' or '_' (e.g. 'tinyconv' or 'my-tower')")
    from .registry import registry

    registers = choices[kind]
    if registry.has(registers.name, name):
        raise ClipkitError(f"{registers.title} {name!r} is already registered by "
                           f"{registry.get(registers.name, name).plugin.label}; two plugins with one name conflict, "
                           f"so choose another name")
    return name


def scaffold_plugin(name: str, kind: str = "vision", output: Path = Path(".")) -> List[Path]:
    """Write ``clipkit-plugin-NAME/`` under ``output``; return the files written, the folder first.

    Raises :class:`ClipkitError` for a bad name or kind, a name already registered, an ``output`` that is
    not a folder, an existing plugin folder, or a folder that cannot be written.
    """
    name = check_name(name, kind)
    fields = _fields(name, kinds()[kind])
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ClipkitError(f"--output {output}: is a file, not a folder")
    root = output / fields["dist"]
    if root.exists():
        raise ClipkitError(f"{root} already exists; remove it or choose another --output")
    try:
        return _write(root, kind, name, fields)
    except OSError as exc:  # a file on the way to --output, no permission, a full disk
        raise ClipkitError(f"cannot write {exc.filename or root}: {exc.strerror or exc}") from exc


def _write(root: Path, kind: str, name: str, fields: Dict[str, str]) -> List[Path]:
    templates = resources.files("clipkit") / "templates" / "plugin"
    spec = kinds()[kind]
    own, module = _templates(spec), _scaffold(spec).module
    pkg = root / fields["pkg"]
    layout = {
        templates / "pyproject.toml.tmpl": root / "pyproject.toml",
        templates / "README.md.tmpl": root / "README.md",
        templates / "gitignore.tmpl": root / ".gitignore",
        own / "__init__.py.tmpl": pkg / "__init__.py",
        own / f"{module}.py.tmpl": pkg / f"{module}.py",
    }
    if (own / "config.json.tmpl").is_file():  # kinds whose parts go into model configs ship an example
        layout[own / "config.json.tmpl"] = pkg / "model_configs" / f"{name}-example.json"
    layout[own / "test.py.tmpl"] = root / "tests" / fields["test_file"]
    written = [root]
    for template, path in layout.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(string.Template(template.read_text(encoding="utf-8")).substitute(fields), encoding="utf-8")
        written.append(path)
    return written

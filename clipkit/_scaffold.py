"""``clipkit plugin new``: write a ready plugin distribution ``clipkit-plugin-NAME/`` from the templates in
``clipkit/templates/plugin`` (``$name``-style placeholders, filled by :class:`string.Template`).

What is written installs with ``pip install -e``, passes its own tests (clipkit's contract cases and a
few of its own), and shows in ``clipkit plugins``. No torch here.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List

from . import __version__
from .errors import ClipkitError

#: How a NAME may look: it becomes the registry name, the entry-point name and (with _ for -) the package.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
#: The longest NAME: it is typed in configs and in ``pip install clipkit-plugin-NAME``, and it names
#: files and folders, which file systems limit to 255 bytes.
MAX_NAME_LENGTH = 40


@dataclass(frozen=True)
class Kind:
    """One kind of plugin the scaffold writes: what it registers and how its README shows it in use."""

    registers: str   # the registry kind its NAME is registered as
    module: str      # the torch module of the package, beside __init__.py
    summary: str     # one line, no quotes: it is the description in pyproject.toml
    usage: str
    requirement: str = "clipkit-torch"


_VIT_TINY = '"vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32}'

KINDS: Dict[str, Kind] = {
    "vision": Kind("vision_tower", "model", "A small convolutional vision tower for clipkit (tower type $name)",
                   'Select the tower by type in a model config:\n\n```json\n'
                   '{\n    "embed_dim": 64,\n    "vision_cfg": {"type": "$name", "image_size": 32, "channels": [16, 32, 64]},\n'
                   '    "text_cfg": {"context_length": 32, "width": 64, "heads": 4, "layers": 2}\n}\n```\n\n'
                   'or use the config it ships: `clipkit.create_model("$name-example")`.'),
    "text": Kind("text_tower", "model", "A convolutional text tower for clipkit (tower type $name)",
                 'Select the tower by type in a model config:\n\n```json\n'
                 '{\n    "embed_dim": 64,\n    ' + _VIT_TINY + ',\n'
                 '    "text_cfg": {"type": "$name", "context_length": 32, "width": 64, "layers": 2}\n}\n```\n\n'
                 'or use the config it ships: `clipkit.create_model("$name-example")`. It reads CLIP\'s BPE '
                 'tokens (the default tokenizer).'),
    "pooler": Kind("pooler", "pooler", "A last-token pooler for the HuggingFace text towers of clipkit (pooler $name)",
                   'Name it as the pooler of an `hf` text tower:\n\n```json\n'
                   '"text_cfg": {"hf_model_name": "sentence-transformers/all-MiniLM-L6-v2", '
                   '"hf_pooler_type": "$name"}\n```\n\n'
                   'The shipped `$name-example` config does this with all-MiniLM-L6-v2 (downloaded when built).',
                   requirement="clipkit-torch[hf]"),
    "tokenizer": Kind("tokenizer", "tokenizer", "A byte-level tokenizer for clipkit (tokenizer $name)",
                      'Select it in a model\'s `text_cfg`; the text tower needs its vocabulary (259 ids) and '
                      'special ids:\n\n```json\n"text_cfg": {"tokenizer": "$name", "vocab_size": 259, '
                      '"pool_type": "eos", "eos_id": 2, "pad_id": 0, "context_length": 64, '
                      '"width": 64, "heads": 4, "layers": 2}\n```\n\n'
                      '`clipkit.get_tokenizer("$name-example")` gives it for the shipped config; '
                      '`"tokenizer_kwargs": {"lowercase": true}` lowercases texts first.'),
    "freezer": Kind("freezer", "freezer", "The builtin ViT of clipkit as tower type $name, locked with its projection "
                                          "kept trainable",
                    'Select the type in a model config; its keys are the builtin ViT\'s:\n\n```json\n'
                    '"vision_cfg": {"type": "$name", "image_size": 32, "patch_size": 8, "layers": 2, '
                    '"width": 64, "head_width": 32}\n```\n\n'
                    '`model.lock_image_tower(0)` then freezes everything but the projection into the joint '
                    'space (`clipkit trainable $name-example --lock-image` shows it).'),
}


def _version_range(version: str) -> str:
    """The releases that keep this clipkit's API: the same minor version before 1.0, the same major after."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return f">={major}.{minor},<{major}.{minor + 1}" if major == 0 else f">={major}.{minor},<{major + 1}"


def _fields(name: str, kind: Kind) -> Dict[str, str]:
    ident = name.replace("-", "_")
    fields = {"name": name, "pkg": f"clipkit_plugin_{ident}", "dist": f"clipkit-plugin-{name}",
              "cls": "".join(part.capitalize() for part in re.split(r"[-_]", name)),
              "requirement": kind.requirement + _version_range(__version__), "test_file": f"test_{ident}.py"}
    fields["summary"] = string.Template(kind.summary).substitute(fields)
    fields["usage"] = string.Template(kind.usage).substitute(fields)
    return fields


def check_name(name: str, kind: str) -> str:
    """The plugin name to use, or a ClipkitError saying why ``name`` cannot be one."""
    if name.startswith("clipkit-plugin-"):
        name = name[len("clipkit-plugin-"):]
    if kind not in KINDS:
        raise ClipkitError(f"unknown plugin kind {kind!r}; choose one of {', '.join(KINDS)}")
    if len(name) > MAX_NAME_LENGTH:
        raise ClipkitError(f"plugin name {name[:20]!r}... is {len(name)} characters long; use at most "
                           f"{MAX_NAME_LENGTH}")
    if not NAME_PATTERN.fullmatch(name):
        raise ClipkitError(f"plugin name {name!r}: use lowercase letters and digits, starting with a letter, "
                           f"optionally joined by '-' or '_' (e.g. 'tinyconv' or 'my-tower')")
    from .registry import KIND_TITLES, registry

    registers = KINDS[kind].registers
    if registry.has(registers, name):
        raise ClipkitError(f"{KIND_TITLES[registers]} {name!r} is already registered by "
                           f"{registry.get(registers, name).plugin.label}; two plugins with one name conflict, "
                           f"so choose another name")
    return name


def scaffold_plugin(name: str, kind: str = "vision", output: Path = Path(".")) -> List[Path]:
    """Write ``clipkit-plugin-NAME/`` under ``output``; return the files written, the folder first.

    Raises :class:`ClipkitError` for a bad name or kind, a name already registered, an ``output`` that is
    not a folder, an existing plugin folder, or a folder that cannot be written.
    """
    name = check_name(name, kind)
    fields = _fields(name, KINDS[kind])
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
    pkg = root / fields["pkg"]
    layout = {
        templates / "pyproject.toml.tmpl": root / "pyproject.toml",
        templates / "README.md.tmpl": root / "README.md",
        templates / "gitignore.tmpl": root / ".gitignore",
        templates / kind / "__init__.py.tmpl": pkg / "__init__.py",
        templates / kind / f"{KINDS[kind].module}.py.tmpl": pkg / f"{KINDS[kind].module}.py",
        templates / kind / "config.json.tmpl": pkg / "model_configs" / f"{name}-example.json",
        templates / kind / "test.py.tmpl": root / "tests" / fields["test_file"],
    }
    written = [root]
    for template, path in layout.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(string.Template(template.read_text(encoding="utf-8")).substitute(fields), encoding="utf-8")
        written.append(path)
    return written

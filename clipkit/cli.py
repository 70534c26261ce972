"""The ``clipkit`` command. Parsing imports nothing heavy; ``models``, ``plugins`` and ``config`` never
import torch (``trainable`` builds a model, so it does). A command's ``--help`` text (its line in the list
of commands, what it does, its examples) is the docstring of the ``_cmd_*`` function that runs it."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._precision import PRECISIONS

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
#: The status a shell reports for a command stopped by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def _cmd_models(args: argparse.Namespace) -> int:
    """list model configs

    example:
      clipkit models --json | jq '.[].name'
    """
    from .config import list_models, model_config_source, replaced_model_configs

    names = list_models()
    if args.json:
        print(json.dumps([{"name": n, "source": model_config_source(n)} for n in names], indent=2))
    else:
        replaced = replaced_model_configs()
        print("\n".join(f"{n}  (from {replaced[n]}, replacing the builtin config)" if n in replaced else n
                        for n in names))
    return EXIT_OK


def _cmd_plugins(args: argparse.Namespace) -> int:
    """list installed plugins and what they register

    example:
      CLIPKIT_DISABLE_PLUGINS=resnet clipkit plugins
    """
    from .registry import registry

    plugins = registry.plugins()
    if args.json:
        print(json.dumps({"plugins": [p.as_dict() for p in plugins], "conflicts": registry.conflicts()}, indent=2))
        return EXIT_OK
    for p in plugins:
        print(f"{p.name}  {p.distribution} {p.version}  [{p.status}]{'  (builtin)' if p.builtin else ''}")
        if p.error:
            print(f"    error: {p.error}")
        for kind, names in p.as_dict()["registers"].items():
            print(f"    {kind}: {', '.join(names)}")
    for conflict in registry.conflicts():
        print(f"conflict: {conflict}")
    return EXIT_OK


def _load_target(target: str) -> Tuple[Any, str, str, Optional[Dict[str, Any]]]:
    """(config dict, source label, name, parts record) for a file path or a model name; raises _Usage
    when neither. The record (which plugin provided each part) comes with saved models only.

    ``local-dir:`` folders are read; ``hf-hub:`` repos only from the local huggingface_hub cache.
    """
    from ._provenance import PROVENANCE_KEY
    from .config import (
        HF_CONFIG_NAME,
        get_model_config,
        model_config_source,
        parse_model_name,
        read_hub_config,
        unknown_model_message,
    )
    from .errors import ClipkitError

    try:
        schema, ident = parse_model_name(target)
        if schema is not None:
            data = read_hub_config(schema, ident, offline=True)
            return data.get("model_cfg", data), target, target, data.get(PROVENANCE_KEY)
    except ClipkitError as exc:
        raise _Usage(str(exc)) from exc
    path = Path(target)
    if path.is_dir() and get_model_config(target) is None:  # a folder named like a model is not in the way
        saved = (path / HF_CONFIG_NAME).is_file()
        raise _Usage(f"{path}: is a folder, not a config file; " + (
            f"for the model saved there, check local-dir:{target}" if saved else
            f"a model saved with clipkit.save_pretrained is checked as local-dir:FOLDER (this one has no "
            f"{HF_CONFIG_NAME})"))
    if path.suffix == ".json" or path.exists() and not path.is_dir():
        from .config import load_json  # bounded: a crafted file is an error, not a RecursionError

        try:
            return load_json(path), str(path), path.stem, None
        except OSError as exc:
            raise _Usage(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise _Usage(f"{path}: not valid JSON: {exc}") from exc
    cfg = get_model_config(target)
    if cfg is None:
        raise _Usage(unknown_model_message(target))
    return cfg, model_config_source(target) or target, target, None


class _Usage(Exception):
    pass


def _prefixed(where: str, message: str) -> str:
    """``where: message``, unless the message already starts by saying where."""
    return message if message.startswith(f"{where}: ") else f"{where}: {message}"


def _cmd_config_check(args: argparse.Namespace) -> int:
    """validate config files or named configs, offline and without torch

    Prints one line per problem: FILE: key.path: what is wrong (did you mean ...).
    Exit 0 valid, 1 invalid, 2 unknown model name or unreadable file.

    example:
      clipkit config check my_model.json ViT-B-32
    """
    from ._provenance import check_provenance
    from ._trust import ignored_request_message, remote_code_requests
    from .config import validate_model_config
    from .errors import ClipkitError, ConfigError

    status = EXIT_OK
    for target in args.targets:  # every target is checked; the exit status is the worst one
        try:
            cfg, source, name, parts = _load_target(target)
        except _Usage as exc:
            print(_prefixed(target, str(exc)), file=sys.stderr)
            status = EXIT_USAGE
            continue
        try:
            check_provenance(parts, source)  # a missing plugin: say which package to install
            validate_model_config(cfg, source=source, name=name)
        except ConfigError as exc:
            for problem in exc.problems:
                print(str(problem), file=sys.stderr)
            status = max(status, EXIT_INVALID)
            continue
        except ClipkitError as exc:
            print(_prefixed(source, str(exc)), file=sys.stderr)
            status = max(status, EXIT_INVALID)
            continue
        requests = remote_code_requests(cfg)
        if requests:  # valid, but the config asks for something only the caller may grant
            print(f"warning: {ignored_request_message(requests, source)}", file=sys.stderr)
        if not args.quiet:
            print(f"{source}: ok")
    return status


def _full_config(cfg: Dict[str, Any], source: str, name: str) -> Dict[str, Any]:
    """The config with inferred types and every default written out."""
    from .config import validate_model_config

    config = validate_model_config(cfg, source=source, name=name)
    out = {f.name: getattr(config.top, f.name) for f in dataclasses.fields(config.top)}
    vision, text = (dataclasses.asdict(part) if dataclasses.is_dataclass(part) and not isinstance(part, type)
                    else dict(part) for part in (config.vision, config.text))
    text.update({k: v for k, v in dataclasses.asdict(config.tokenizer).items()})
    out["vision_cfg"] = {"type": config.vision_type, **vision}
    out["text_cfg"] = {"type": config.text_type, **text}
    return out


def _cmd_config_show(args: argparse.Namespace) -> int:
    """print a config as JSON

    example:
      clipkit config show ViT-B-32 --full
    """
    from .errors import ConfigError

    try:
        cfg, source, name, _ = _load_target(args.target)
    except _Usage as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    if args.full:
        try:
            cfg = _full_config(cfg, source, name)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_INVALID
    print(json.dumps(cfg, indent=2, default=list))
    return EXIT_OK


def _cmd_config_schema(args: argparse.Namespace) -> int:
    """JSON Schema of model configs (reflects installed plugins)

    example:
      clipkit config schema > clipkit-config.schema.json
    """
    from ._schema import model_config_schema

    print(json.dumps(model_config_schema(), indent=2))
    return EXIT_OK


def _cmd_plugin_new(args: argparse.Namespace) -> int:
    """scaffold clipkit-plugin-NAME/: a working example part, its typed config, a model config using it,
    README and contract tests

    The plugin installs and passes its tests as written; then make the part yours.

    examples:
      clipkit plugin new tinyconv
      pip install -e ./clipkit-plugin-tinyconv && pytest clipkit-plugin-tinyconv
      clipkit plugin new bytes --kind tokenizer --output ~/src
    """
    from ._scaffold import scaffold_plugin
    from .errors import ClipkitError

    try:
        written = scaffold_plugin(args.name, args.kind, args.output)
    except ClipkitError as exc:
        print(f"clipkit plugin new: {exc}", file=sys.stderr)
        return EXIT_USAGE
    root, package = written[0], next(path.parent for path in written if path.name == "__init__.py")
    for path in written[1:]:
        print(f"wrote {path}")
    where = root if root.is_absolute() else f".{os.sep}{root}"  # pip reads a bare name as a package name
    print(f"\nnext:\n  pip install -e {where}\n  pytest {root}\n  clipkit plugins\n"
          f"then make the example part in {package}/ yours, and publish it as docs/plugins.md shows")
    return EXIT_OK


def _cmd_trainable(args: argparse.Namespace) -> int:
    """list the parameters a lock leaves trainable (builds on the meta device)

    The lock flags mean what they mean to clipkit-train.

    examples:
      clipkit trainable roberta-ViT-B-32 --lock-text --lock-text-unlocked-layers 10
      clipkit trainable ViT-B-32 --lock-image --lock-image-unlocked-groups 1 --json
    """
    from .factory import create_model
    from .freeze import lock_as_asked

    model = create_model(args.model, device="meta", load_weights=False)  # shapes only: saved weights stay unread
    lock_as_asked(model, args)  # its --lock-* arguments are named as clipkit-train's
    rows = [(name, p.numel(), p.requires_grad) for name, p in model.named_parameters()]
    summary = {}
    for tower in ("visual", "text", "other"):
        part = [r for r in rows if (r[0].split(".")[0] if r[0].split(".")[0] in ("visual", "text") else "other") == tower]
        summary[tower] = {"trainable": sum(n for _, n, t in part if t), "total": sum(n for _, n, _ in part)}
    if args.json:
        print(json.dumps({"model": args.model, "towers": summary,
                          "trainable": [name for name, _, trainable in rows if trainable]}, indent=2))
        return EXIT_OK
    for name, count, trainable in rows:
        if trainable or args.all:
            print(f"{'train' if trainable else 'frozen':6s} {count:>12,d}  {name}")
    for tower, counts in summary.items():
        if counts["total"]:
            print(f"{tower}: {counts['trainable']:,d} of {counts['total']:,d} parameters trainable")
    return EXIT_OK


EPILOG = """examples:
  clipkit models                        list every model config (builtin, plugin-shipped, added)
  clipkit plugins                       installed plugins, their versions and what each registers
  clipkit config check my_model.json    validate a config file (exit 0 ok, 1 invalid, 2 usage)
  clipkit config show ViT-B-32 --full   a config with every default written out
  clipkit config schema > schema.json   JSON Schema of model configs for your editor
  clipkit plugin new tinyconv           scaffold clipkit-plugin-tinyconv/, a vision tower plugin with tests
  clipkit trainable ViT-B-32 --lock-text --lock-text-unlocked-layers 2
                                        what a lock leaves trainable, before a long run
  clipkit data digits data/digits       the demo dataset as WebDataset shards (then see clipkit-train)
  clipkit data bench 'shards/{00000..00099}.tar' --workers 2,4,8
                                        samples/s of clipkit-train's data pipeline per worker count
  clipkit eval MODEL --pretrained W --task zeroshot --data val/
                                        zero-shot top-1/top-5 (or --task retrieval: recall@k)
  clipkit embed MODEL --pretrained W --images photos/ --out emb/
                                        embeddings.npy + ids.txt of a folder, shards or CSV (or --texts FILE)
  clipkit caption MODEL --pretrained W a.jpg b.png
                                        a caption per image, from a model that generates text
"""


# clipkit-train's lock settings, which clipkit trainable takes as flags for clipkit.freeze.lock_as_asked
_LOCK_FLAGS = ("lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats", "lock_text",
               "lock_text_unlocked_layers", "lock_text_freeze_layer_norm")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL and --pretrained, as every command that loads a model with its weights takes them."""
    p.add_argument("model", help="model name, local-dir:/hf-hub: name, or a .json config file")
    p.add_argument("--pretrained", metavar="W", help="weights: a pretrained tag, a file, or a training checkpoint")


def _compute_arguments(p: argparse.ArgumentParser, *, batch: str, workers: str) -> None:
    """--batch-size, --workers, --device and --precision of the commands that run a model over data."""
    p.add_argument("--batch-size", type=_positive_int, default=64, help=f"{batch} (default: 64)")
    p.add_argument("--workers", type=_nonnegative_int, default=4, help=f"{workers} (default: 4)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="as clipkit-train's --precision: fp16/bf16 weights, amp autocast (default: fp32)")


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A sub-command that runs ``func``, whose docstring is its help: the first paragraph is its line in the
    list of commands, the rest its epilog (what it does, its examples), line breaks kept. (``python -OO``
    drops docstrings, and with them these texts.)"""
    summary, _, details = inspect.cleandoc(func.__doc__ or "").partition("\n\n")
    return _parser(sub, name, func, help=" ".join(summary.split()) or None, epilog=details or None)


def _group(sub: Any, name: str, metavar: str, **kwargs: Any) -> Any:
    """A command of sub-commands (``clipkit config ACTION``) that prints its help when given none; returns
    what its sub-commands are added to."""
    group = _parser(sub, name, lambda _args: _missing_action(group), **kwargs)
    return group.add_subparsers(dest=f"{name}_command", metavar=metavar)


def _parser(sub: Any, name: str, func: Callable[[argparse.Namespace], int], **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command's parser, whose epilog keeps its line breaks, that runs ``func``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter,
                                                     **kwargs)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .kinds import scaffolds  # the kinds table imports nothing heavy, so parsing stays fast
    from .train.args import add_setting_arguments  # clipkit-train's flags: no torch either
    from .train.settings import DataSettings, ModelSettings

    parser = argparse.ArgumentParser(prog="clipkit", description="Build and train CLIP-style models from JSON configs.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"clipkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _command(sub, "models", _cmd_models)
    p.add_argument("--json", action="store_true", help="names and where each config comes from, as JSON")

    p = _command(sub, "plugins", _cmd_plugins)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    csub = _group(sub, "config", "ACTION", help="show, check or describe model configs",
                  epilog="examples:\n  clipkit config check configs/*.json\n  clipkit config show ViT-B-32")
    p = _command(csub, "check", _cmd_config_check)
    p.add_argument("targets", nargs="+", metavar="FILE_OR_NAME")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for valid configs")
    p = _command(csub, "show", _cmd_config_show)
    p.add_argument("target", metavar="FILE_OR_NAME")
    p.add_argument("--full", action="store_true", help="write out inferred types and every default")
    _command(csub, "schema", _cmd_config_schema)

    psub = _group(sub, "plugin", "ACTION", help="write a new plugin distribution",
                  epilog="example:\n  clipkit plugin new tinyconv --kind vision")
    p = _command(psub, "new", _cmd_plugin_new)
    p.epilog = f"{p.epilog}\n\nkinds:\n" + "".join(f"  {short:<10s} {kind.scaffold.blurb}\n"
                                                  for short, kind in scaffolds().items() if kind.scaffold)
    p.add_argument("name", metavar="NAME", help="registry and entry-point name; the distribution is "
                                                "clipkit-plugin-NAME and the package clipkit_plugin_NAME")
    p.add_argument("--kind", choices=tuple(scaffolds()), default="vision", help="what the plugin registers (default: vision)")
    p.add_argument("--output", "-o", type=Path, default=Path("."), metavar="DIR",
                   help="where to create clipkit-plugin-NAME/ (default: the current folder)")

    p = _command(sub, "trainable", _cmd_trainable)
    p.add_argument("model", help="model name, local-dir:/hf-hub: name, or a .json config file")
    add_setting_arguments(p, ModelSettings, _LOCK_FLAGS)
    p.add_argument("--all", action="store_true", help="list frozen parameters too")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(sub, "embed", _cmd_embed)
    _model_arguments(p)
    p.add_argument("--images", metavar="SRC", help="an image folder (recursive; ids: relative paths), WebDataset "
                                                   "shards 'dir/{00000..00009}.tar' (ids: SHARD:KEY) or a .csv/.tsv")
    p.add_argument("--texts", metavar="FILE", help=".txt (a text a line), .jsonl (field --text-key) or .csv/.tsv "
                                                   "(column --csv-caption-key); ids: line numbers or --id-key")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to write (new, or an interrupted run's)")
    p.add_argument("--raw", action="store_true", help="write the embeddings as the model gives them, not L2-normalised")
    _compute_arguments(p, batch="inputs per forward pass", workers="image decoding processes; 0 decodes in this one")
    p.add_argument("--chunk-size", type=_positive_int, default=1024,
                   help="inputs per resumable part (a shard is always one part; default: 1024)")
    add_setting_arguments(p, DataSettings, ("csv_img_key", "csv_caption_key", "csv_separator"))
    p.add_argument("--text-key", default="text", help="text field of a --texts .jsonl (default: text)")
    p.add_argument("--id-key", help="id field (.jsonl) or column (CSV) of --texts (default: line numbers)")
    p.add_argument("--force", action="store_true", help="start over in an OUT that holds another run or other files")

    p = _command(sub, "caption", _cmd_caption)
    _model_arguments(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--generation-type", default="beam_search", choices=("beam_search", "top_k", "top_p"),
                   help="beam search, or sampling from the top_k / top_p tokens (default: beam_search)")
    p.add_argument("--seq-len", type=_positive_int, default=30, help="longest caption in tokens (default: 30)")
    p.add_argument("--top-k", type=_positive_int, default=1, help="with --generation-type top_k (default: 1, greedy)")
    p.add_argument("--top-p", type=float, default=0.1, help="with --generation-type top_p (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="torch seed, for sampling (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")

    p = _command(sub, "eval", _cmd_eval)
    _model_arguments(p)
    p.add_argument("--task", required=True, choices=("zeroshot", "retrieval"), help="what to measure")
    p.add_argument("--data", required=True, metavar="SRC",
                   help="zeroshot: a folder of class sub-folders or shards with 'cls'; retrieval: shards with "
                        "'txt' or a CSV (filepath, title; tab-separated)")
    p.add_argument("--classnames", metavar="FILE", help="class names in label order: a JSON list or one per line "
                                                        "(default: a folder's sub-folder names)")
    p.add_argument("--templates", metavar="FILE", help="prompt templates with {} or {c}: a JSON list or one per line "
                                                       "(default: 'a photo of a {}.')")
    p.add_argument("--out", metavar="FILE", help="append the result as one JSON line to FILE")
    _compute_arguments(p, batch="images per batch", workers="data loader processes; 0 loads in this one")
    p.add_argument("--cache-dir", metavar="DIR", help="where pretrained weights and tokenizers are cached")

    dsub = _group(sub, "data", "DATASET", help="write demo datasets as WebDataset shards",
                  epilog="example:\n  clipkit data digits data/digits")
    p = _command(dsub, "digits", _cmd_data_digits)
    p.add_argument("out", metavar="OUT", help="folder to write: new or empty, unless --force")
    p.add_argument("--per-shard", type=_positive_int, default=256, help="samples per training shard (default: 256)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that is not empty (same-named files are replaced, others kept)")
    p = _command(dsub, "bench", _cmd_data_bench)
    p.add_argument("spec", metavar="SHARDS", help="training data as --train-data takes it (shards, a brace pattern, "
                                                  "a .csv file)")
    p.add_argument("--workers", type=_worker_counts, default=[0, 1, 2, 4], metavar="N,N,...",
                   help="data worker counts to measure (default: 0,1,2,4)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    p.add_argument("--samples", type=_positive_int, default=1024,
                   help="samples to read per worker count, at most (default: 1024)")
    p.add_argument("--model", default="ViT-B-32",
                   help="model name or config file whose input size, preprocessing and tokenizer to use "
                        "(default: ViT-B-32)")
    add_setting_arguments(p, DataSettings, ("dataset_type",))
    p.add_argument("--cache-dir", metavar="DIR", help="where tokenizers are cached")

    p = _command(sub, "export", _cmd_export)
    _model_arguments(p)
    p.add_argument("--format", required=True, type=_export_format, metavar="FORMAT",
                   help="a registered export format: onnx, hf, or one a plugin adds")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    return parser


def _export_format(text: str) -> str:
    # checked here rather than with choices=: the registry loads only when an export is asked for
    from .exporters import formats

    registered = formats()
    if text not in registered:
        raise argparse.ArgumentTypeError(f"unknown format {text!r} (choose from {', '.join(registered)})")
    return text


def _cmd_export(args: argparse.Namespace) -> int:
    """write a model for another runtime (ONNX, transformers), checked after writing

    Formats: onnx (image_encoder.onnx + text_encoder.onnx, dynamic batch, compared with
    onnxruntime), hf (a transformers CLIPModel folder, loaded back and compared), and any
    a plugin registers (clipkit plugins). docs/inference.md has the details.

    examples:
      clipkit export ViT-B-32 --pretrained laion2b_s34b_b79k --format onnx --out vit-b-32-onnx
      clipkit export my.json --pretrained logs/run/checkpoints/epoch_5.pt --format hf --out my-hf
    """
    from .errors import ClipkitError
    from .exporters import export_model

    try:
        lines = export_model(args.model, args.format, Path(args.out), pretrained=args.pretrained)
    except ClipkitError as exc:
        print(f"clipkit export: {exc}", file=sys.stderr)
        return EXIT_INVALID
    for line in lines:
        print(line)
    return EXIT_OK


def _cmd_embed(args: argparse.Namespace) -> int:
    """embed images or texts into embeddings.npy + ids.txt (resumable)

    Writes OUT/embeddings.npy (float32 [N, D], L2-normalised unless --raw), OUT/ids.txt (one
    id a line, same order) and OUT/meta.json. Rerunning an interrupted command continues where
    it stopped, with the same result. Unreadable images are skipped and counted in meta.json.
    Formats and the Python API: docs/inference.md.

    examples:
      clipkit embed ViT-B-32 --pretrained laion2b_s34b_b79k --images photos/ --out photos-emb
      clipkit embed my.json --pretrained logs/run/checkpoints/epoch_5.pt \\
          --images 'shards/{00000..00009}.tar' --out emb --workers 8 --device cuda
      clipkit embed ViT-B-32 --pretrained laion2b_s34b_b79k --texts captions.jsonl --out text-emb
    """
    from .embed import run_embed
    from .errors import ClipkitError

    if (args.images is None) == (args.texts is None):
        print("clipkit embed: give exactly one of --images SRC and --texts FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        meta = run_embed(args.model, args.out, pretrained=args.pretrained, images=args.images, texts=args.texts,
                         batch_size=args.batch_size, workers=args.workers, device=args.device,
                         precision=args.precision, normalize=not args.raw, chunk_size=args.chunk_size,
                         csv_img_key=args.csv_img_key, csv_text_key=args.csv_caption_key,
                         csv_separator=args.csv_separator, text_key=args.text_key, id_key=args.id_key,
                         force=args.force, progress=sys.stderr.isatty())
    except ClipkitError as exc:
        print(f"clipkit embed: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("clipkit embed: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130  # as a shell reports a command stopped by SIGINT (128 + 2)
    except OSError as exc:  # a full disk, no permission
        print(f"clipkit embed: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    if meta is None:
        print(f"{args.out}: already holds this run's embeddings; nothing to do")
        return EXIT_OK
    skipped = sum(meta["skipped"].values())
    print(f"wrote {meta['count']} embeddings of dimension {meta['dim']} to {args.out}"
          + (f" ({skipped} input(s) skipped: {', '.join(f'{k} {n}' for k, n in meta['skipped'].items())})"
             if skipped else ""))
    return EXIT_OK


def _cmd_caption(args: argparse.Namespace) -> int:
    """caption images with a model that generates text

    Prints one line per image: PATH, a tab, the caption. The model must generate text (its
    model family gives it generate(), as a captioning plugin's does); others are a one-line
    error. Captions are read back with the model's tokenizer.

    examples:
      clipkit caption my-captioner.json --pretrained weights.safetensors cat.jpg dog.jpg
      clipkit caption my.json --pretrained logs/run/checkpoints/epoch_5.pt --generation-type top_p photos/*.png
    """
    from .caption import _exists, caption_images
    from .errors import ClipkitError

    missing = _exists(args.images)
    if missing:
        print(f"clipkit caption: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        captions = caption_images(args.model, args.images, pretrained=args.pretrained, device=args.device,
                                  seed=args.seed, generation_type=args.generation_type, seq_len=args.seq_len,
                                  top_k=args.top_k, top_p=args.top_p)
    except ClipkitError as exc:
        print(f"clipkit caption: {exc}", file=sys.stderr)
        return EXIT_INVALID
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")
    return EXIT_OK


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return value


def _cmd_eval(args: argparse.Namespace) -> int:
    """zero-shot classification or image-text retrieval metrics of a model

    Metrics are the trainer's (same loaders, classifier and code). --out appends one JSON
    line per run: model, pretrained, task, data, metrics, counts. Data formats,
    templates and keys: docs/inference.md.

    examples:
      clipkit eval ViT-B-32 --pretrained laion2b_s34b_b79k --task zeroshot --data val/ \\
          --templates templates.txt --out results.jsonl
      clipkit eval my.json --pretrained logs/run/checkpoints/epoch_5.pt --task retrieval --data 'val/{00000..00003}.tar'
    """
    from .errors import ClipkitError
    from .evaluate import append_jsonl, evaluate, table

    try:
        result = evaluate(args.model, args.task, args.data, pretrained=args.pretrained, classnames=args.classnames,
                          templates=args.templates, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, precision=args.precision, cache_dir=args.cache_dir)
        if args.out:
            append_jsonl(args.out, result)
    except ClipkitError as exc:
        print(f"clipkit eval: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(table(result))
    return EXIT_OK


def _cmd_data_digits(args: argparse.Namespace) -> int:
    """scikit-learn's handwritten digits, captioned ('a handwritten digit seven')

    Writes OUT/train/*.tar, OUT/test/00000.tar (with cls labels), classnames.txt, templates.txt
    and OUT/digits-minilm.json. example:
      clipkit data digits data/digits
    """
    from .errors import ClipkitError
    from .train.digits import write_digits

    try:
        written = write_digits(Path(args.out), per_shard=args.per_shard, force=args.force)
    except (ClipkitError, RuntimeError) as exc:
        print(f"clipkit data digits: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file where a folder must go, no permission, a full disk
        print(f"clipkit data digits: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {written['train_samples']} training digits: {written['train']}")
    print(f"wrote {written['test_samples']} held-out digits (with cls labels): {written['test']}")
    print(f"class names: {written['classnames']}, templates: {written['templates']}")
    if written["model"]:
        print(f"model config (ViT image tower + all-MiniLM-L6-v2 text tower): {written['model']}")
    return EXIT_OK


def _cmd_data_bench(args: argparse.Namespace) -> int:
    """read and decode a sample of training data with clipkit-train's pipeline: samples/s per number of
    data workers

    Runs the trainer's own data pipeline (shuffle, decode, the model's training transform, tokenize, batch)
    once per worker count and prints samples/s, so that --workers can be sized before a run. example:
      clipkit data bench 'shards/{00000..00099}.tar' --workers 2,4,8 --model ViT-B-32
    """
    from .errors import ClipkitError
    from .train.data_bench import run

    try:
        run(args.spec, model=args.model, workers=args.workers, batch_size=args.batch_size, samples=args.samples,
            dataset_type=args.dataset_type, cache_dir=args.cache_dir)
    except ClipkitError as exc:
        print(f"clipkit data bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _worker_counts(text: str) -> List[int]:
    from .train.data_bench import parse_counts

    try:
        return parse_counts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``clipkit`` with ``argv`` (default: the command line); returns the exit status."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at interpreter exit, so a reader that left is noticed below
    except BrokenPipeError:
        # the reader stopped early (clipkit models | head -1): stop quietly, as a tool stopped by SIGPIPE
        # does, and point stdout at /dev/null so the flush at exit has nowhere left to fail
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # a replaced sys.stdout without a file descriptor
            pass
        return EXIT_BROKEN_PIPE


def _main(argv: Optional[List[str]]) -> int:
    from .errors import ClipkitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except ClipkitError as exc:
        print(f"clipkit: {exc}", file=sys.stderr)
        return EXIT_INVALID

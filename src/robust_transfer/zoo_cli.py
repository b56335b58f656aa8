"""The ``robust-transfer zoo`` subcommand: list, show, import and export models.

`add_zoo_parser(subparsers)` adds it to the main parser; each action sets ``run=`` to a handler
that takes the parsed arguments, prints its result and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

MODEL_DIR_HELP = (
    "the local model directory (default: $ROBUST_TRANSFER_MODELS, else ~/.cache/robust-transfer/models)"
)


def _fmt_top1(value: float | None) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def run_list(args: argparse.Namespace) -> int:
    from .zoo import list_models, model_directory

    rows = list_models(args.model_dir)
    if args.json:
        print(json.dumps(rows))
        return 0
    header = ("NAME", "ARCH", "THREAT", "TOP-1", "ROBUST", "LOCAL")
    table = [header] + [
        (r["name"], str(r["arch"]), r["threat"], _fmt_top1(r["clean_top1"]), _fmt_top1(r.get("robust_top1")),
         r["status"] + ("" if r["paper_model"] else " (yours)"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    present = sum(r["status"] != "absent" for r in rows)
    print(f"\n{present} of {len(rows)} present in {model_directory(args.model_dir)}. TOP-1: clean ImageNet "
          "accuracy as published; ROBUST: robust accuracy as published (AutoAttack for RobustBench and ARES "
          "models, under the listed threat). 'released file': the .ckpt is in place (loads as is; zoo import "
          "converts it); 'absent': zoo show NAME says which file to place where.")
    return 0


def _print_mapping(document: dict[str, Any], indent: str = "") -> None:
    for key, value in document.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_mapping(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value if value is not None else '-'}")


def run_show(args: argparse.Namespace) -> int:
    from .zoo import describe

    info = describe(args.name, args.model_dir)
    if args.json:
        print(json.dumps(info))
        return 0
    todo = info.pop("todo", None)
    _print_mapping(info)
    if todo:
        print(f"to get it: {todo}")
    return 0


def add_arch_option_argument(parser: argparse.ArgumentParser) -> None:
    """``--arch-option NAME=VALUE`` (repeatable): keyword arguments of a timm architecture or a builder."""
    parser.add_argument("--arch-option", dest="arch_options", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument of a timm architecture or builder, repeatable (e.g. img_size=32 "
                             "patch_size=4 for a ViT on 32 px images)")


def run_import(args: argparse.Namespace) -> int:
    from .parsing import parse_options
    from .zoo import import_model

    record = import_model(args.file, args.name, model_dir=args.model_dir, arch=args.arch, mean=args.mean,
                          std=args.std, force=args.force, options=parse_options(args.arch_options))
    inferred = " (inferred from the weights' names and shapes)" if record["arch_inferred"] else ""
    print(f"imported {record['name']}: {record['arch']}{inferred}, {record['num_classes']} classes, "
          f"from {record['source_format']} file {args.file}")
    where = {"file": "from the file", "given": "as given", "default": f"{record['arch']}'s default; the file has "
             "none, pass --mean/--std if it expects other"}.get(record["normalization"], record["normalization"])
    print(f"normalisation: mean {record['mean']}, std {record['std']} ({where})")
    print(f"model: {record['path']} (sha256 {record['sha256']})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .models import load_model
    from .models.export import export_model

    model = load_model(args.name, model_dir=args.model_dir)
    weights, meta = export_model(model, args.out, args.format)
    info = json.loads(meta.read_text(encoding="utf-8"))
    print(f"exported {args.name} ({info['layout']}) to {weights}; mean/std and how to load it: {meta}")
    print(f"load: {info['load']}; mean {info['mean']}, std {info['std']}")
    return 0


def add_zoo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``zoo`` with the actions list, show, import and export to ``subparsers``; returns the zoo parser."""
    zoo = subparsers.add_parser(
        "zoo", help="list, show, import and export models (the paper's released checkpoints among them)",
        description="The paper's released ImageNet models and your own, in a local model directory. Nothing is "
                    "downloaded: place a released .ckpt there or convert any supported file with zoo import "
                    "(robustness-library checkpoints, torchvision / timm / RobustBench state dicts, safetensors, "
                    "our format; all read without running pickled code).")
    actions = zoo.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-dir", default=None, help=MODEL_DIR_HELP)

    listing = actions.add_parser("list", parents=[common], help="the zoo's models and which are present locally")
    listing.add_argument("--json", action="store_true", help="print one JSON list")
    listing.set_defaults(run=run_list)

    show = actions.add_parser("show", parents=[common], help="details of one model and where its file goes")
    show.add_argument("name", help="zoo name (e.g. resnet50_l2_eps3) or a name you registered")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=run_show)

    importing = actions.add_parser(
        "import", parents=[common], help="convert a model file into our format and register it",
        description="Read FILE in any supported format (without running pickled code), write it as NAME in the "
                    "model directory (safetensors + JSON) and record its sha256 in the registry.")
    importing.add_argument("file", help="the model file (.ckpt/.pt/.pth/.bin/.safetensors, or our model.safetensors), "
                                        "or the zoo name of a released file placed in the model directory")
    importing.add_argument("--name", required=True, help="name to register it under (a zoo name for the paper's "
                                                          "models, e.g. resnet50_l2_eps3)")
    importing.add_argument("--arch", default=None, help="architecture, for files that do not name it (inferred "
                                                         "from the weights when only one fits)")
    importing.add_argument("--mean", type=float, nargs="+", default=None,
                           help="normalisation mean a plain state dict expects (default: the architecture's)")
    importing.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std (with --mean)")
    add_arch_option_argument(importing)
    importing.add_argument("--force", action="store_true", help="replace a model already registered as NAME")
    importing.set_defaults(run=run_import)

    export = actions.add_parser(
        "export", parents=[common], help="write a model for torchvision, timm or as plain safetensors",
        description="Write NAME's classifier weights without the normalisation layer; mean/std and how to load "
                    "the file go to OUT.json beside it.")
    export.add_argument("name", help="zoo name, registered name, or a model file")
    export.add_argument("--format", required=True, choices=("torchvision", "safetensors", "timm"),
                        help="torchvision: torch.save state dict; safetensors; timm: timm's names (timm-defined "
                             "architectures only)")
    export.add_argument("--out", required=True, help="output file, e.g. resnet50.pth or resnet50.safetensors")
    export.set_defaults(run=run_export)
    return zoo

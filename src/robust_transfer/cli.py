"""The ``robust-transfer`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config_flags import HelpFormatter, add_attack_flags, add_config_flags, attack_from_flags, config_values
from .detect.config import DetectConfig
from .errors import RobustTransferError
from .parsing import parse_eps
from .train.config import PretrainConfig
from .transfer.config import TransferConfig
from .visualize.pictures import KINDS
from .zoo_cli import add_arch_option_argument, add_zoo_parser


def _run_pretrain(args: argparse.Namespace) -> int:
    from .train import pretrain

    result = pretrain(PretrainConfig.from_dict(config_values(PretrainConfig, args)))
    if result.test is not None:
        print(_format_eval(result.test.to_dict()))
    print(f"model: {result.model_path}")
    return 0


def _format_eval(result: dict) -> str:
    line = f"clean accuracy {100 * result['clean_acc']:.2f}% on {result['n']} examples"
    if result.get("robust_acc") is not None:
        line += f"; robust accuracy {100 * result['robust_acc']:.2f}% under {result['attack']}"
    return line


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_file
    from .parsing import parse_options

    result = evaluate_file(args.model, args.dataset, attack_from_flags(args), data_root=args.data_root,
                           split=args.split, max_examples=args.max_examples, arch=args.arch,
                           options=parse_options(args.arch_options), batch_size=args.batch_size, device=args.device,
                           precision=args.precision, seed=args.seed, masking_check=args.masking_check,
                           progress=not args.json)
    record = {"model": str(args.model), "dataset": args.dataset, "split": args.split, **result.to_dict()}
    print(json.dumps(record) if args.json else _format_eval(record))
    if args.masking_check and not args.json:
        print("gradient-masking checks: " + ("nothing suspicious" if not result.warnings else
                                             f"{len(result.warnings)} warning(s), see above"))
    return 0


def _add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="model", help="the source model: a model file written by pretrain "
                        "(model.safetensors), another tool's checkpoint, or a zoo name")
    add_config_flags(parser, TransferConfig)
    add_attack_flags(parser, "eval-", more=False, what="the attack measuring robust accuracy after transfer")


def _run_transfer(args: argparse.Namespace) -> int:
    from .transfer import transfer

    config = TransferConfig(**config_values(TransferConfig, args), eval_attack=attack_from_flags(args, "eval-"))
    result = transfer(config)
    record = result.record
    line = (f"{record.mode} transfer to {record.target.dataset}: test {record.metric} {100 * record.test_score:.2f}% "
            f"({record.selection.by} {record.selection.chosen:g} chosen on validation)")
    if record.robust is not None:
        line += f"; robust accuracy {100 * record.robust.robust_acc:.2f}% under {record.robust.attack}"
    print(line)
    print(f"model: {result.model_path}\nrecord: {result.out_dir / 'result.json'}")
    return 0


def _run_detect(args: argparse.Namespace) -> int:
    from .detect import detect

    values = config_values(DetectConfig, args)
    result = detect(DetectConfig(**{**values, "progress": False} if args.json else values))
    record = result.record
    if record is None:  # another process than rank 0 of a torchrun run: rank 0 reports
        return 0
    if args.json:
        print(json.dumps({**record.to_dict(), "detector_path": str(result.detector_path)}))
        return 0
    line = (f"{record.task} on {record.config['data']} ({record.images['test']} test images): box AP "
            f"{100 * record.box_ap:.2f}, AP50 {100 * record.box_ap50:.2f}")
    if record.mask_ap is not None:
        line += f"; mask AP {100 * record.mask_ap:.2f}"
    line += f" (lr {record.selection.chosen:g} chosen on validation; {record.timings['total_s']:.0f} s)"
    print(line)
    print(f"detector: {result.detector_path}\nrecord: {result.out_dir / 'result.json'}")
    return 0


def _run_visualize(args: argparse.Namespace) -> int:
    from .visualize import draw_pictures
    from .visualize.pictures import picture_attack

    attack = picture_attack(args.eps, args.steps, args.step_size)
    path = draw_pictures(args.models, args.kind, args.dataset, args.out, labels=args.labels, data_root=args.data_root,
                         images=args.images, attack=attack, seed=args.seed)
    print(f"{args.kind}: {path}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(args.out_dir, quick=args.quick, progress=not args.no_progress, workers=args.workers,
                   detection=args.detection))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robust-transfer",
        description="Adversarially robust pretraining, robust evaluation and transfer learning. "
                    "Images are in [0,1]; eps is measured in that pixel space.")
    parser.add_argument("--version", action="version", version=f"robust-transfer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    pretrain = commands.add_parser(
        "pretrain", help="train a (robust) source model",
        description="Train a source model, minimising E[max_{||d||<=eps} L(x+d, y)]. eps 0 is standard "
                    "training. A checkpoint is written after every epoch; --resume continues exactly. "
                    "Run under torchrun for multi-process data parallel training.",
        formatter_class=HelpFormatter)
    add_config_flags(pretrain, PretrainConfig)
    pretrain.set_defaults(run=_run_pretrain)

    evaluate = commands.add_parser("evaluate", help="clean and robust accuracy of a model",
                                   description="Clean accuracy and accuracy under a PGD attack.",
                                   formatter_class=HelpFormatter)
    evaluate.add_argument("model", help="a model file written by pretrain (model.safetensors), another tool's "
                                        "checkpoint, or a zoo name")
    evaluate.add_argument("--arch", default=None, help="the architecture of a checkpoint that does not name it "
                                                        "(e.g. timm:convnext_base)")
    add_arch_option_argument(evaluate)
    evaluate.add_argument("--dataset", required=True, help="dataset name, as for pretrain")
    evaluate.add_argument("--data-root", default=None, help="folder holding the dataset")
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test")
    add_attack_flags(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--max-examples", type=int, default=None, help="evaluate a seeded random N of the examples")
    evaluate.add_argument("--precision", default="fp32", help="fp32 (the reference), bf16 or auto")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--masking-check", action="store_true",
                          help="also run gradient-masking sanity checks (robust accuracy against eps, with and "
                               "without random start, more steps, an unbounded attack) and warn about anything odd")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=_run_evaluate)

    transfer = commands.add_parser(
        "transfer", help="transfer a source model to a target dataset",
        description="Fixed-feature (new last layer on frozen features), full-network or partial (first K "
                    "stages frozen) transfer. Frozen BatchNorm layers stay in eval mode unless "
                    "--train-frozen-batchnorm. Writes the model and a JSON record with the configuration, the "
                    "source model's identity, validation scores, the test score and timings.",
        formatter_class=HelpFormatter)
    _add_transfer_arguments(transfer)
    transfer.set_defaults(run=_run_transfer)

    detect = commands.add_parser(
        "detect", help="transfer a source model to object detection or instance segmentation",
        description="Faster R-CNN (detection) or Mask R-CNN (instance segmentation) with a feature pyramid over "
                    "the source's stages; the source's normalisation becomes the detector's, BatchNorm stays "
                    "frozen, the stem and first stage stay frozen unless --trainable-stages says otherwise. "
                    "Data: COCO 2017, Pascal VOC 2007/2012, any COCO-format folder, or the embedded scenes. "
                    "Chosen on validation (held out of train), scored on val2017 / VOC test with COCO AP "
                    "(pycocotools) or VOC AP50. A checkpoint is written after every epoch; --resume continues "
                    "exactly. Run under torchrun for data parallel training.",
        formatter_class=HelpFormatter)
    detect.add_argument("source", metavar="model", help="the source model (a model file or a zoo name) whose "
                        "architecture has stages: ResNets, timm CNNs through their feature maps")
    add_config_flags(detect, DetectConfig)
    detect.add_argument("--json", action="store_true", help="print one JSON object (box_ap, box_ap50, mask_ap, "
                        "per_class, timings, ...) and no progress bars")
    detect.set_defaults(run=_run_detect)

    visualize = commands.add_parser(
        "visualize", help="what models' representations look like: inversion, class synthesis, saliency",
        description="The paper's Figure 3: a grid with the dataset's test images on top and one row per model. "
                    "inversion: L2 PGD from noise towards each image's penultimate features; synthesis: targeted "
                    "L2 PGD from class-conditional seeds; saliency: the input gradient of the true class. Robust "
                    "models' inversions and drawings look like the images; standard models' stay texture.",
        formatter_class=HelpFormatter)
    visualize.add_argument("models", nargs="+", help="model files or zoo names, one grid row each")
    visualize.add_argument("--kind", choices=KINDS, default="inversion")
    visualize.add_argument("--dataset", required=True, help="dataset whose test images are shown")
    visualize.add_argument("--data-root", default=None, help="folder holding the dataset")
    visualize.add_argument("--labels", nargs="+", default=None, help="one row label per model (default: folder)")
    visualize.add_argument("--images", type=int, default=8, help="images (columns)")
    visualize.add_argument("--eps", type=parse_eps, default=None, help="L2 radius of the search (default: 40)")
    visualize.add_argument("--steps", type=int, default=None, help="PGD steps (default: 200)")
    visualize.add_argument("--step-size", type=parse_eps, default=None, help="PGD step size (default: 0.5)")
    visualize.add_argument("--seed", type=int, default=0)
    visualize.add_argument("--out", default="runs/visualize", help="folder for KIND.png")
    visualize.set_defaults(run=_run_visualize)

    add_zoo_parser(commands)

    from .study_cli import add_study_parsers

    add_study_parsers(commands)

    demo = commands.add_parser(
        "demo", help="the paper in miniature on the embedded data, end to end",
        description="Pretrain a small ResNet on Fashion-MNIST at L2 eps 0, 0.5 and 1, measure clean and robust "
                    "accuracy of each, transfer each to Animal-MNIST, MNIST-5k and digits in fixed-feature and "
                    "full-network modes, and print the paper's table (best robust vs best standard source). "
                    "It is a study: finished runs and features are reused on a second call.")
    demo.add_argument("--out-dir", default="runs/demo", help="where the runs go (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller version for CI (under 2 minutes)")
    demo.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: one per two cores)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--detection", action="store_true",
                      help="also transfer each source to object detection on the embedded scenes (real photographs "
                           "with Fashion-MNIST objects): the blog's detection table, about 4 more minutes per source")
    demo.set_defaults(run=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; user errors print one line and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)  # flag types such as parse_eps raise our error for bad text
        return args.run(args)
    except RobustTransferError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a fault of the machine (full disk, lost mount), not a bug: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: pretrain and transfer continue from their last checkpoint with --resume; "
              "`study run` continues where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``robust-transfer`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import RobustTransferError
from .zoo_cli import add_arch_option_argument, add_zoo_parser

PRETRAIN_HELP = {
    "dataset": "training data: fashion-mnist, animal-mnist, mnist-5k, digits, cifar10, cifar100, idx, imagefolder",
    "arch": "architecture: small_resnet (28 px), cifar_resnet18/50 (32 px), resnet50, ..., timm:NAME for any timm "
            "architecture, or package.module:function for your own builder",
    "out_dir": "run folder: checkpoint.pt, metrics.jsonl, tensorboard/, model.safetensors, results.json",
    "data_root": "folder holding the dataset (default: where the dataset is installed)",
    "method": "standard, pgd (PGD-AT), fgsm-rs (fast AT) or free (minibatch replay)",
    "norm": "threat model: l2 or linf",
    "eps": "radius in [0,1] pixel units; fractions such as 8/255 are fine; 0 = standard training",
    "attack_steps": "PGD steps per training batch (method pgd)",
    "attack_step_size": "attack step in pixel units (default 2.5*eps/steps; 1.25*eps for fgsm-rs; eps for free)",
    "free_replays": "replays of each batch (method free)",
    "epochs": "training epochs",
    "batch_size": "global batch size (split over processes under torchrun)",
    "lr": "peak learning rate of SGD with momentum",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "schedule": "learning-rate schedule: cosine, step or constant",
    "warmup_epochs": "linear warm-up length in epochs (fractions allowed)",
    "milestones": "epochs at which the step schedule multiplies the rate by 0.1",
    "label_smoothing": "label smoothing (off by default)",
    "augment": "crop-flip, crop or none (default: the dataset's own choice)",
    "val_fraction": "share of the training data held out for validation",
    "train_examples": "train on a seeded random N of the training examples (quick runs)",
    "eval_examples": "validation examples attacked after each epoch",
    "eval_steps": "PGD steps of the per-epoch robust validation",
    "test_steps": "PGD steps of the final robust test evaluation",
    "test_examples": "evaluate the final model on a seeded random N of the test examples",
    "precision": "auto (bf16 autocast + channels_last where the hardware is fast at it), bf16 or fp32",
    "device": "auto, cpu, cuda or cuda:N",
    "num_workers": "data-loading worker processes (image folders only; in-memory sets need none)",
    "seed": "seed of the splits, data order, augmentation and initialisation",
}


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import PretrainConfig

    defaults = PretrainConfig.__dataclass_fields__
    for name, help_text in PRETRAIN_HELP.items():
        flag = "--" + name.replace("_", "-")
        field = defaults[name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if name == "milestones":
            parser.add_argument(flag, type=int, nargs="*", default=default, help=help_text)
        elif name in ("eps", "attack_step_size"):
            parser.add_argument(flag, type=str, default=default, help=f"{help_text} (default: {default})")
        else:
            kind = type(default) if default is not None else (float if name.endswith("size") else int)
            if name in ("data_root", "augment"):
                kind = str
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")
    add_arch_option_argument(parser)
    parser.add_argument("--no-random-start", dest="random_start", action="store_false",
                        help="start PGD training attacks at the clean input")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _run_pretrain(args: argparse.Namespace) -> int:
    from .parsing import parse_eps, parse_options
    from .train import PretrainConfig, pretrain

    args.arch_options = parse_options(args.arch_options)
    values = {k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__}
    if values.get("attack_step_size") is not None:
        values["attack_step_size"] = parse_eps(values["attack_step_size"])
    result = pretrain(PretrainConfig.from_dict(values))
    if result.test:
        print(_format_eval(result.test))
    print(f"model: {result.model_path}")
    return 0


def _format_eval(result: dict) -> str:
    line = f"clean accuracy {100 * result['clean_acc']:.2f}% on {result['n']} examples"
    if result.get("robust_acc") is not None:
        line += (f"; robust accuracy {100 * result['robust_acc']:.2f}% under {result['threat']}, "
                 f"PGD-{result['steps']}" + (f" with {result['restarts']} restarts" if result['restarts'] else ""))
    return line


def _run_evaluate(args: argparse.Namespace) -> int:
    from .data import load_dataset, sample_examples
    from .evaluation import evaluate
    from .models import load_model
    from .parsing import parse_eps, parse_options
    from .threat import ThreatModel

    model = load_model(args.model, args.arch, options=parse_options(args.arch_options))
    spec = model.spec
    data = load_dataset(args.dataset, args.data_root, seed=args.seed, in_channels=spec.in_channels)
    if data.num_classes != spec.num_classes:
        raise RobustTransferError(
            f"{args.model} predicts {spec.num_classes} classes but {args.dataset} has {data.num_classes}: "
            "evaluate it on the data it was trained for, or transfer it first")
    split = sample_examples(getattr(data, args.split), args.max_examples, args.seed)
    eps = parse_eps(args.eps) if args.eps is not None else None
    threat = ThreatModel(args.norm, eps) if eps else None
    result = evaluate(model, split, threat, steps=args.steps,
                      step_size=parse_eps(args.step_size) if args.step_size else None,
                      restarts=args.restarts, batch_size=args.batch_size, device=args.device,
                      precision=args.precision, seed=args.seed, masking_check=args.masking_check,
                      progress=not args.json)
    record = {"model": str(args.model), "dataset": args.dataset, "split": args.split, **result.to_dict()}
    print(json.dumps(record) if args.json else _format_eval(record))
    if args.masking_check and not args.json:
        print("gradient-masking checks: " + ("nothing suspicious" if not result.warnings else
                                             f"{len(result.warnings)} warning(s), see above"))
    return 0


def _add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the source model: a model file written by pretrain (model.safetensors), "
                                      "another tool's checkpoint, or a zoo name")
    parser.add_argument("--arch", dest="source_arch", default=None,
                        help="the source's architecture when its file does not name it (e.g. timm:convnext_base)")
    add_arch_option_argument(parser)
    parser.add_argument("--dataset", required=True, help="target dataset name (as for pretrain; imagefolder for "
                                                          "any train/ + val|test/ folder)")
    parser.add_argument("--mode", default="fixed", help="fixed (new last layer on frozen features), full "
                        "(fine-tune everything) or partial:K (freeze the first K stages) (default: fixed)")
    parser.add_argument("--protocol", default="fast", choices=("fast", "paper"),
                        help="fixed mode: fast = cached features + L-BFGS heads over --penalties chosen on "
                             "validation; paper = SGD on the head through the frozen network, 150 epochs, "
                             "lr x0.1 every 50 (default: fast)")
    parser.add_argument("--out-dir", default="runs/transfer", help="where model.safetensors and result.json go")
    parser.add_argument("--data-root", default=None, help="folder holding the target dataset")
    parser.add_argument("--penalties", type=float, nargs="+", default=None,
                        help="L2 penalties tried by the fast protocol (default: 10 values from 1e-6 to 1)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: 10; paper: 150)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.001],
                        help="learning rates tried, chosen on validation (default: 0.01 0.001)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="do not retrain on train + validation with the chosen setting")
    parser.add_argument("--hidden", type=int, nargs="*", default=[], help="hidden layer widths of the new head")
    parser.add_argument("--train-frozen-batchnorm", action="store_true",
                        help="let frozen BatchNorm layers keep updating their running statistics (the paper's "
                             "code did); by default frozen layers, BatchNorm included, stay in eval mode")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize target images to this side (default: the source model's training size; "
                             "e.g. 32 for low-resolution transfer)")
    parser.add_argument("--augment", default=None, help="crop-flip, crop, resized-crop-flip or none")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="use a seeded random N of the training examples")
    parser.add_argument("--eval-eps", default="0", help="also measure robust accuracy of the transferred model "
                                                       "under this eps, e.g. 1.0 or 8/255 (default: 0 = no)")
    parser.add_argument("--eval-norm", default="l2", help="l2 or linf (default: l2)")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: ~/.cache/robust-transfer/features)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted fine-tuning in --out-dir from its per-epoch checkpoints")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _run_transfer(args: argparse.Namespace) -> int:
    from .parsing import parse_options
    from .transfer import TransferConfig, transfer
    from .transfer.linear_probe import DEFAULT_PENALTIES

    config = TransferConfig(
        source=args.model, source_arch=args.source_arch, source_options=parse_options(args.arch_options),
        dataset=args.dataset, mode=args.mode, protocol=args.protocol, out_dir=args.out_dir,
        data_root=args.data_root, penalties=list(args.penalties or DEFAULT_PENALTIES), epochs=args.epochs,
        lrs=list(args.lrs), batch_size=args.batch_size, weight_decay=args.weight_decay, refit=args.refit,
        hidden=list(args.hidden), train_frozen_batchnorm=args.train_frozen_batchnorm, image_size=args.image_size,
        augment=args.augment, train_examples=args.train_examples, eval_eps=args.eval_eps, eval_norm=args.eval_norm,
        eval_steps=args.eval_steps, cache_dir=args.cache_dir, precision=args.precision, device=args.device,
        seed=args.seed, progress=args.progress, resume=args.resume)
    result = transfer(config)
    record = result.record
    line = (f"{record['mode']} transfer to {record['target']['dataset']}: test {record['test']['metric']} "
            f"{100 * record['test']['score']:.2f}% ({record['selection']['by']} {record['selection']['chosen']:g} "
            "chosen on validation)")
    if record["robust"]:
        line += f"; robust accuracy {100 * record['robust']['robust_acc']:.2f}% under {record['robust']['threat']}"
    print(line)
    print(f"model: {result.model_path}\nrecord: {result.out_dir / 'result.json'}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(args.out_dir, quick=args.quick, progress=not args.no_progress, workers=args.workers))
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=_run_pretrain)

    evaluate = commands.add_parser("evaluate", help="clean and robust accuracy of a model",
                                   description="Clean accuracy and accuracy under a PGD attack.")
    evaluate.add_argument("model", help="a model file written by pretrain (model.safetensors), another tool's "
                                        "checkpoint, or a zoo name")
    evaluate.add_argument("--arch", default=None, help="the architecture of a checkpoint that does not name it "
                                                        "(e.g. timm:convnext_base)")
    add_arch_option_argument(evaluate)
    evaluate.add_argument("--dataset", required=True, help="dataset name, as for pretrain")
    evaluate.add_argument("--data-root", default=None, help="folder holding the dataset")
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test")
    evaluate.add_argument("--norm", default="l2", help="l2 or linf (default: l2)")
    evaluate.add_argument("--eps", default=None, help="attack radius in [0,1] pixel units, e.g. 1.0 or 8/255; "
                                                       "without it only clean accuracy is measured")
    evaluate.add_argument("--steps", type=int, default=20, help="PGD steps (default: 20)")
    evaluate.add_argument("--step-size", default=None, help="PGD step size (default: 2.5*eps/steps)")
    evaluate.add_argument("--restarts", type=int, default=0, help="extra random restarts (default: 0)")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--max-examples", type=int, default=None, help="evaluate a seeded random N of the examples")
    evaluate.add_argument("--precision", default="fp32", help="fp32 (default, the reference), bf16 or auto")
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_transfer_arguments(transfer)
    transfer.set_defaults(run=_run_transfer)

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
    demo.set_defaults(run=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; user errors print one line and exit with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
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

"""Benchmark: images/s of one PGD-7 L2 adversarial training step (eps 0.5, step 2.5*eps/7,
random start) on a CIFAR-style ResNet-18, batch 128, 32x32x3 random images, 10 classes.

Contenders, measured in one run, interleaved round by round (the order rotates each round):
  ours         robust_transfer at its defaults: tune_malloc(), device/precision "auto"
               (bf16 autocast + channels_last on a CPU with native bf16), train_step with the
               "pgd" objective. Runs in this process.
  plain        a plain fp32 NCHW PyTorch loop (benchmarks/_plain_worker.py), in its own process
               so that it does not inherit our process-wide malloc tuning.
  robustness   MadryLab robustness==1.2.1 (benchmarks/_robustness_worker.py) in its own venv
               (benchmarks/setup_robustness_env.sh builds it); skipped with a message if missing.
  plain-bf16   optional (--contenders): the plain loop with channels_last + bf16 autocast.

All start from the same initial weights and the same batch. The first step of each contender
(from those weights, untimed, also its warm-up) yields its adversarial batch: the driver reports
the perturbations' L2 norms and their cross-entropy under one common fp32 eval-mode copy of the
initial model, so the attacks can be compared, next to each contender's own training loss.

Timing: after the warm-up, each round runs --steps timed steps of every contender in turn (the
order rotates each round). The machine is shared and contention comes in bursts of tens of
seconds, so the default interleaves finely (1 step per contender per round, 10 rounds) and the
speed-up figures are medians of same-round ratios. The CPU-stall column is the share of each
timed step during which some task waited for a CPU (Linux PSI, /proc/pressure/cpu): high values
mark steps slowed by other work on the machine.

Run:  PYTHONPATH=src python benchmarks/pgd_training_step.py   (see benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DEFAULT_ROBUSTNESS_PYTHON = Path.home() / ".cache/robust-transfer/bench-robustness-venv/bin/python"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
ALL_CONTENDERS = ("ours", "plain", "robustness", "plain-bf16")
LABELS = {
    "ours": "robust_transfer (defaults)",
    "plain": "plain PyTorch fp32 loop",
    "robustness": "robustness 1.2.1 (fp32)",
    "plain-bf16": "plain loop + channels_last + bf16",
}


class BenchmarkError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- contenders


class Ours:
    """robust_transfer at its defaults, in this process."""

    name = "ours"

    def __init__(self, base_model, x, y, args) -> None:
        from robust_transfer import ThreatModel
        from robust_transfer.runtime import prepare_batch, prepare_model, resolve_device, resolve_precision
        from robust_transfer.train.objectives import make_objective
        from robust_transfer.train.step import train_step

        self.device = resolve_device("auto")
        self.precision = resolve_precision("auto", self.device)
        self.model = prepare_model(copy.deepcopy(base_model), self.device, self.precision)
        self.x = prepare_batch(x, self.device, self.precision)
        self.y = y.to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        self.objective = make_objective(
            "pgd",
            ThreatModel("l2", args.eps),
            attack_steps=args.attack_steps,
            attack_step_size=args.step_size,
        )
        self._train_step = train_step
        # Capture the adversarial batch that train_step's objective produces, without changing it.
        self._last_adv = None
        perturb = self.objective.perturb

        def capturing_perturb(model, x_, y_):
            self._last_adv = perturb(model, x_, y_)
            return self._last_adv

        self.objective.perturb = capturing_perturb
        self.info = {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.x.is_contiguous(memory_format=torch.channels_last)
            and not self.x.is_contiguous(),
            "threads": torch.get_num_threads(),
        }

    def step(self) -> tuple[float, torch.Tensor]:
        loss, _logits = self._train_step(
            self.model,
            self.optimizer,
            self.objective,
            self.x,
            self.y,
            precision=self.precision,
            device=self.device,
        )
        return loss.item(), self._last_adv

    def first(self) -> dict:
        t0 = time.perf_counter()
        loss, x_adv = self.step()
        return {
            "loss": loss,
            "seconds": time.perf_counter() - t0,
            "x_adv": x_adv.detach().float().contiguous().cpu(),
        }

    def round(self, warmup: int, steps: int) -> dict:
        for _ in range(warmup):
            self.step()
        times: list[float] = []
        losses: list[float] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss, _x = self.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss)
        return {"times": times, "losses": losses}

    def close(self) -> None:
        pass


class Worker:
    """A contender in a subprocess speaking benchmarks/_worker_protocol.py."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the workers must not see our package
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(HERE),
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise BenchmarkError(
                f"contender {self.name!r} exited (code {self.proc.returncode}); its log:\n{self.log_tail()}"
            )
        msg = json.loads(line)
        if "error" in msg:
            raise BenchmarkError(f"contender {self.name!r} failed:\n{msg['error']}")
        return msg

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def first(self) -> dict:
        out = self.workdir / f"{self.name}-x_adv.pt"
        reply = self._call(cmd="first", out=str(out))
        reply["x_adv"] = torch.load(out, weights_only=True)
        return reply

    def round(self, warmup: int, steps: int) -> dict:
        return self._call(cmd="round", warmup=warmup, steps=steps)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ----------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return ""
    return ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags)


def cpu_stall_us() -> int | None:
    """Total microseconds some task has waited for a CPU (Linux PSI), or None where unavailable."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def attack_quality(x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, ref_model, eps: float) -> dict:
    norms = (x_adv - x).flatten(1).norm(dim=1)
    with torch.no_grad():
        adv_loss = F.cross_entropy(ref_model(x_adv), y).item()
    return {
        "norm_mean": norms.mean().item(),
        "norm_min": norms.min().item(),
        "norm_max": norms.max().item(),
        "frac_at_eps": (norms >= eps * 0.99).float().mean().item(),
        "inside_ball": bool((norms <= eps * (1 + 1e-4)).all()),
        "inside_box": bool(((x_adv >= 0) & (x_adv <= 1)).all()),
        "ref_adv_loss": adv_loss,
    }


def summarize(results: dict, contenders: list[str], batch: int) -> dict:
    summary = {}
    for name in contenders:
        rounds = results["rounds"][name]
        all_times = [t for r in rounds for t in r["times"]]
        round_medians = [statistics.median(r["times"]) for r in rounds]
        stalls = [r["stall_frac"] for r in rounds if r.get("stall_frac") is not None]
        summary[name] = {
            "stall_frac": statistics.mean(stalls) if stalls else None,
            "median_s": statistics.median(all_times),
            "min_s": min(all_times),
            "img_s": batch / statistics.median(all_times),
            "best_img_s": batch / min(all_times),
            "round_img_s": [batch / m for m in round_medians],
            "round_median_s": round_medians,
        }

    def ratio(a: str, b: str) -> dict | None:
        if a not in summary or b not in summary:
            return None
        per_round = [
            tb / ta for ta, tb in zip(summary[a]["round_median_s"], summary[b]["round_median_s"], strict=True)
        ]
        return {
            "overall": summary[b]["median_s"] / summary[a]["median_s"],
            "best": summary[b]["min_s"] / summary[a]["min_s"],
            "per_round": per_round,
            "per_round_median": statistics.median(per_round),
            "per_round_min": min(per_round),
            "per_round_max": max(per_round),
        }

    summary["ratios"] = {
        f"{a}/{b}": ratio(a, b) for a in contenders for b in ("robustness", "plain") if a != b and ratio(a, b)
    }
    return summary


def print_report(results: dict) -> None:
    s, meta, q = results["summary"], results["meta"], results["quality"]
    contenders = results["contenders"]
    print()
    print(
        f"PGD-{meta['attack_steps']} L2 adversarial training step, eps {meta['eps']}, "
        f"step {meta['step_size']:.4f}, "
        f"CIFAR ResNet-18, batch {meta['batch_size']}; per contender {meta['warmup']} warm-up step(s), then "
        f"{meta['rounds']} interleaved rounds x {meta['steps']} timed step(s)"
    )
    print(
        f"machine: {meta['cpu']} [{meta['cpu_flags']}], {meta['threads']} torch threads, "
        f"torch {meta['torch']}; "
        f"ours ran on {meta['ours']['device']} in {meta['ours']['precision']}"
        f"{' + channels_last' if meta['ours']['channels_last'] else ''}"
    )
    print(f"load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}")
    print()
    head = (
        f"{'contender':<36} {'s/step':>7} {'img/s':>7} {'best img/s':>10} {'CPU stall':>9} "
        f"{'x vs robustness':>22} {'x vs plain':>22}"
    )
    print(head)
    print("-" * len(head))
    for name in contenders:
        row = s[name]
        vs_rob = s["ratios"].get(f"{name}/robustness")
        vs_plain = s["ratios"].get(f"{name}/plain")
        fmt = lambda r: (
            f"{r['per_round_median']:.2f} ({r['per_round_min']:.2f}-{r['per_round_max']:.2f})" if r else "-"
        )
        stall = f"{row['stall_frac']:.0%}" if row["stall_frac"] is not None else "-"
        print(
            f"{LABELS[name]:<36} {row['median_s']:>7.2f} {row['img_s']:>7.1f} {row['best_img_s']:>10.1f} "
            f"{stall:>9} {fmt(vs_rob):>22} {fmt(vs_plain):>22}"
        )
    print(
        "(s/step, img/s: median of all timed steps; best: fastest step; ratios: median (min-max) over rounds"
    )
    print(" of same-round speed ratios; CPU stall: mean share of step time some task waited for a CPU)")
    print()
    head = (
        f"{'attack from the initial weights':<36} {'mean L2':>8} {'min':>7} {'max':>7} {'at eps':>7} "
        f"{'in ball+box':>11} {'own loss':>9} {'fp32 ref loss':>14}"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{'clean batch (no attack)':<36} {0:>8.4f} {'':>7} {'':>7} {'':>7} {'':>11} {'':>9} "
        f"{results['clean_ref_loss']:>14.4f}"
    )
    for name in contenders:
        row = q[name]
        print(
            f"{LABELS[name]:<36} {row['norm_mean']:>8.4f} {row['norm_min']:>7.4f} {row['norm_max']:>7.4f} "
            f"{row['frac_at_eps']:>7.0%} {str(row['inside_ball'] and row['inside_box']):>11} "
            f"{row['own_loss']:>9.4f} {row['ref_adv_loss']:>14.4f}"
        )
    print("(own loss: the contender's training loss on its adversarial batch, train-mode BN; fp32 ref loss:")
    print(
        " cross-entropy of that batch under one fp32 eval-mode copy of the initial model; 'at eps': share of"
    )
    print(" perturbations with L2 norm >= 0.99 eps)")
    for note in results["notes"]:
        print(f"note: {note}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1, help="timed steps per contender per round (default 1)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps per contender before round 1, the first of which (from the initial "
        "weights) gives the attack-quality figures (default 1, at least 1)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.5)
    p.add_argument("--attack-steps", type=int, default=7)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for every contender (0: torch's default, one per core)",
    )
    p.add_argument(
        "--contenders",
        default="ours,plain,robustness",
        help=f"comma-separated subset of {','.join(ALL_CONTENDERS)} (default ours,plain,robustness)",
    )
    p.add_argument(
        "--robustness-python",
        type=Path,
        default=Path(os.environ.get("ROBUSTNESS_PYTHON", DEFAULT_ROBUSTNESS_PYTHON)),
        help=f"python of the robustness venv (default {DEFAULT_ROBUSTNESS_PYTHON})",
    )
    p.add_argument(
        "--robustness-use-best",
        action="store_true",
        help="give robustness its train-loop default use_best=1 (an extra forward per step); "
        "by default it keeps the last iterate like the other contenders",
    )
    p.add_argument("--json", type=Path, help="also write all measurements to this JSON file")
    args = p.parse_args(argv)
    args.step_size = 2.5 * args.eps / args.attack_steps
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(ALL_CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; choose from {ALL_CONTENDERS}")
    if min(args.steps, args.rounds, args.batch_size, args.warmup) < 1:
        p.error("--steps, --rounds, --warmup and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    contenders = list(args.contenders)
    if "robustness" in contenders and not args.robustness_python.exists():
        msg = (
            f"SKIPPING the robustness contender: no robustness venv at {args.robustness_python} "
            f"(build it with: bash benchmarks/setup_robustness_env.sh, or pass --robustness-python)"
        )
        print(msg, file=sys.stderr)
        notes.append(msg)
        contenders.remove("robustness")

    # Our engine's defaults, applied first as its CLI does (allocator tuning is process-wide).
    from robust_transfer.models import create_model
    from robust_transfer.runtime import tune_malloc

    malloc_tuned = tune_malloc() if "ours" in contenders else False
    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    started = time.time()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    base = create_model("cifar_resnet18", num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    ref = copy.deepcopy(base).float().eval()  # common fp32 judge of every attack
    with torch.no_grad():
        clean_logits = ref(x)
    clean_ref_loss = F.cross_entropy(clean_logits, y).item()

    with tempfile.TemporaryDirectory(prefix="bench-pgd-") as tmp:
        workdir = Path(tmp)
        init_path = workdir / "init.pt"
        torch.save(
            {
                "x": x,
                "y": y,
                "state": base.model.state_dict(),
                "num_classes": 10,
                "mean": base.normalize.mean.flatten().clone(),
                "std": base.normalize.std.flatten().clone(),
                "eps": args.eps,
                "step_size": args.step_size,
                "attack_steps": args.attack_steps,
                "lr": args.lr,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "use_best": args.robustness_use_best,
                "clean_logits": clean_logits,
            },
            init_path,
        )
        common = ["--init", str(init_path), "--threads", str(args.threads)]
        runners: dict = {}
        try:
            for name in contenders:
                if name == "ours":
                    runners[name] = Ours(base, x, y, args)
                elif name == "plain":
                    runners[name] = Worker(
                        name, [sys.executable, str(HERE / "_plain_worker.py"), *common], workdir
                    )
                elif name == "plain-bf16":
                    runners[name] = Worker(
                        name,
                        [sys.executable, str(HERE / "_plain_worker.py"), *common, "--precision", "bf16"],
                        workdir,
                    )
                elif name == "robustness":
                    runners[name] = Worker(
                        name,
                        [str(args.robustness_python), str(HERE / "_robustness_worker.py"), *common],
                        workdir,
                    )
                diff = runners[name].info.get("logits_max_abs_diff")
                if diff is not None and diff > 1e-3:
                    raise BenchmarkError(
                        f"{name}: its model disagrees with ours on the clean batch "
                        f"(max |logit diff| {diff:.3g}); the weights did not transfer"
                    )

            # 1) One step of each from the same initial weights: the attacks' quality.
            quality = {}
            for name in contenders:
                print(f"[first step from the initial weights] {name} ...", file=sys.stderr, flush=True)
                out = runners[name].first()
                quality[name] = {
                    "own_loss": out["loss"],
                    "seconds": out["seconds"],
                    **attack_quality(x, y, out["x_adv"], ref, args.eps),
                }
                if args.warmup > 1:
                    runners[name].round(args.warmup - 1, 0)

            # 2) Interleaved timing rounds; the order rotates so nobody always goes first.
            rounds: dict[str, list] = {name: [] for name in contenders}
            for r in range(args.rounds):
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for name in order:
                    stall0, t0 = cpu_stall_us(), time.perf_counter()
                    out = runners[name].round(0, args.steps)
                    stall1, elapsed = cpu_stall_us(), time.perf_counter() - t0
                    out["stall_frac"] = (
                        None
                        if stall0 is None or stall1 is None
                        else min(1.0, (stall1 - stall0) / 1e6 / elapsed)
                    )
                    rounds[name].append(out)
                    print(
                        f"[round {r + 1}/{args.rounds}] {name:<11} "
                        f"{args.batch_size / statistics.median(out['times']):6.1f} img/s "
                        f"({statistics.median(out['times']):.2f} s/step"
                        + (f", CPU stall {out['stall_frac']:.0%})" if out["stall_frac"] is not None else ")"),
                        file=sys.stderr,
                        flush=True,
                    )
        except BenchmarkError:
            raise
        except Exception as exc:
            logs = "\n".join(
                f"--- {n} log ---\n{w.log_tail()}" for n, w in runners.items() if isinstance(w, Worker)
            )
            raise BenchmarkError(f"{type(exc).__name__}: {exc}\n{logs}") from exc
        finally:
            for runner in runners.values():
                runner.close()

    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "eps": args.eps,
        "step_size": args.step_size,
        "attack_steps": args.attack_steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "steps": args.steps,
        "ours": {**runners["ours"].info, "malloc_tuned": malloc_tuned}
        if "ours" in runners
        else {"device": "-", "precision": "-", "channels_last": False},
        "workers": {n: w.info for n, w in runners.items() if isinstance(w, Worker)},
        "robustness_use_best": args.robustness_use_best,
        "loadavg_start": loadavg_start,
        "loadavg_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "wall_s": round(time.time() - started, 1),
        "argv": sys.argv[1:],
    }
    results = {
        "meta": meta,
        "contenders": contenders,
        "rounds": rounds,
        "quality": quality,
        "clean_ref_loss": clean_ref_loss,
        "notes": notes,
    }
    results["summary"] = summarize(results, contenders, args.batch_size)
    print_report(results)
    print(f"\ntotal wall time {meta['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)

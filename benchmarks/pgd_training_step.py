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
seconds, so the default interleaves finely (1 step per contender per round, 10 rounds). The
CPU-stall column is the share of each timed step during which some task waited for a CPU (Linux
PSI, /proc/pressure/cpu): high values mark steps slowed by other work on the machine. Speed-ups
are given as medians of same-round ratios and as ratios of the "quiet" steps (under 10% stall);
under saturation every contender gets the same CPU share, which pulls same-round ratios towards
1, so the headline uses the quiet steps once each side has at least 3 of them.

Run:  PYTHONPATH=src python benchmarks/pgd_training_step.py   (see benchmarks/README.md)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import signal
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
ALL_CONTENDERS = ("ours", "plain", "robustness", "plain-bf16", "ours-compiled")
LABELS = {
    "ours": "robust_transfer (defaults)",
    "ours-compiled": "robust_transfer --compile",
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

    def __init__(self, base_model, x, y, args, compiled: bool = False) -> None:
        from robust_transfer import Attack, ThreatModel
        from robust_transfer.runtime import prepare_batch, prepare_model, resolve_device, resolve_precision
        from robust_transfer.train.objectives import make_objective
        from robust_transfer.train.step import train_step

        self.device = resolve_device("auto")
        self.precision = resolve_precision("auto", self.device)
        self.model = prepare_model(copy.deepcopy(base_model), self.device)
        # --compile: the training forward and the attack run through one compiled module (its first step compiles).
        self.train_model = torch.compile(self.model) if compiled else self.model
        self.x = prepare_batch(x, self.device)
        self.y = y.to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        attack = Attack(ThreatModel("l2", args.eps), steps=args.attack_steps, step_size=args.step_size)
        self.objective = make_objective("pgd", attack)
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
            "channels_last": self.x.is_contiguous(memory_format=torch.channels_last) and not self.x.is_contiguous(),
            "threads": torch.get_num_threads(),
            "compiled": compiled,
        }

    def step(self) -> tuple[float, torch.Tensor]:
        loss, _logits = self._train_step(
            self.train_model,
            self.optimizer,
            self.objective,
            self.x,
            self.y,
            precision=self.precision,
            device=self.device,
            attack_model=self.train_model,
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
        cpu_times: list[float] = []
        losses: list[float] = []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _x = self.step()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            losses.append(loss)
        return {"times": times, "cpu_times": cpu_times, "losses": losses}

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
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
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


QUIET_STALL = 0.10  # a step is "quiet" when other work kept a task waiting for under 10% of it
MIN_QUIET = 3  # quiet steps per contender needed before the quiet-step ratio is the headline


def summarize(results: dict, contenders: list[str], batch: int) -> dict:
    summary: dict = {}
    for name in contenders:
        rounds = results["rounds"][name]
        all_times = [t for r in rounds for t in r["times"]]
        cpu_times = [t for r in rounds for t in r.get("cpu_times", [])]
        quiet = [
            t for r in rounds for t in r["times"] if r.get("stall_frac") is not None and r["stall_frac"] < QUIET_STALL
        ]
        stalls = [r["stall_frac"] for r in rounds if r.get("stall_frac") is not None]
        summary[name] = {
            "stall_frac": statistics.mean(stalls) if stalls else None,
            "median_s": statistics.median(all_times),
            "min_s": min(all_times),
            "img_s": batch / statistics.median(all_times),
            "best_img_s": batch / min(all_times),
            "quiet_n": len(quiet),
            "quiet_median_s": statistics.median(quiet) if quiet else None,
            "quiet_img_s": batch / statistics.median(quiet) if quiet else None,
            "cpu_median_s": statistics.median(cpu_times) if cpu_times else None,
            "round_median_s": [statistics.median(r["times"]) for r in rounds],
        }

    def ratio(a: str, b: str) -> dict:
        """How many times faster ``a`` is than ``b``, by several estimators."""
        sa, sb = summary[a], summary[b]
        per_round = [tb / ta for ta, tb in zip(sa["round_median_s"], sb["round_median_s"], strict=True)]
        both_quiet = sa["quiet_median_s"] is not None and sb["quiet_median_s"] is not None
        both_cpu = sa["cpu_median_s"] is not None and sb["cpu_median_s"] is not None
        return {
            "per_round": per_round,
            "per_round_median": statistics.median(per_round),
            "per_round_min": min(per_round),
            "per_round_max": max(per_round),
            "overall": sb["median_s"] / sa["median_s"],
            "quiet": sb["quiet_median_s"] / sa["quiet_median_s"] if both_quiet else None,
            "quiet_n": (sa["quiet_n"], sb["quiet_n"]),
            "cpu": sb["cpu_median_s"] / sa["cpu_median_s"] if both_cpu else None,
            "best": sb["min_s"] / sa["min_s"],
        }

    summary["ratios"] = {
        f"{a}/{b}": ratio(a, b)
        for a in contenders
        for b in ("robustness", "plain")
        if b in contenders and a != b and not (a == "robustness" and b == "plain")
    }
    if "ours-compiled" in contenders and "ours" in contenders:
        summary["ratios"]["ours-compiled/ours"] = ratio("ours-compiled", "ours")
    return summary


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_report(results: dict) -> None:
    s, meta, q = results["summary"], results["meta"], results["quality"]
    contenders = results["contenders"]
    print()
    print(
        f"PGD-{meta['attack_steps']} L2 adversarial training step, eps {meta['eps']}, "
        f"step {meta['step_size']:.4f}, CIFAR ResNet-18, batch {meta['batch_size']}; per contender "
        f"{meta['warmup']} warm-up step(s), then {meta['rounds']} interleaved rounds x {meta['steps']} timed step(s)"
    )
    print(
        f"machine: {meta['cpu']} [{meta['cpu_flags']}], {meta['threads']} torch threads, "
        f"torch {meta['torch']}; ours ran on {meta['ours']['device']} in {meta['ours']['precision']}"
        f"{' + channels_last' if meta['ours']['channels_last'] else ''}; {meta['date']}"
    )
    print(f"load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}")
    print()
    head = (
        f"{'contender':<36} {'s/step':>7} {'img/s':>7} {'quiet img/s [n]':>16} {'best img/s':>10} "
        f"{'CPU-s/step':>10} {'CPU stall':>9}"
    )
    print(head)
    print("-" * len(head))
    for name in contenders:
        row = s[name]
        quiet = f"{_f(row['quiet_img_s'], '.1f')} [{row['quiet_n']}]"
        stall = _f(row["stall_frac"], ".0%")
        print(
            f"{LABELS[name]:<36} {row['median_s']:>7.2f} {row['img_s']:>7.1f} {quiet:>16} "
            f"{row['best_img_s']:>10.1f} {_f(row['cpu_median_s'], '.2f'):>10} {stall:>9}"
        )
    print("(s/step, img/s: median of all timed steps; quiet: median of the steps during which other work kept")
    print(f" a task waiting for a CPU less than {QUIET_STALL:.0%} of the time [their number]; best: fastest step;")
    print(" CPU-s/step: process CPU time per step, all threads; CPU stall: mean share of step time some task")
    print(" waited for a CPU, from /proc/pressure/cpu)")
    print()
    head = (
        f"{'speed-up (times faster)':<50} {'same-round median (range)':>26} {'quiet':>6} {'CPU time':>8} {'fastest':>8}"
    )
    print(head)
    print("-" * len(head))
    for key, r in s["ratios"].items():
        a, b = key.split("/")
        rng = f"{r['per_round_median']:.2f} ({r['per_round_min']:.2f}-{r['per_round_max']:.2f})"
        print(
            f"{LABELS[a] + ' vs ' + b:<50} {rng:>26} {_f(r['quiet'], '.2f'):>6} {_f(r['cpu'], '.2f'):>8} "
            f"{r['best']:>8.2f}"
        )
    print("(same-round: ratio of the two contenders' step times in each round, adjacent in time; quiet, CPU time,")
    print(" fastest: ratios of the quiet-step medians, of the median CPU seconds per step, of the fastest steps)")
    goal = s["ratios"].get("ours/robustness")
    if goal:
        # Under heavy contention every contender gets the same CPU share, which pulls same-round ratios
        # towards 1; the quiet steps are the better estimate whenever both sides have enough of them.
        if min(goal["quiet_n"]) >= MIN_QUIET:
            value, how = goal["quiet"], f"quiet steps ({goal['quiet_n'][0]} and {goal['quiet_n'][1]})"
        else:
            value, how = goal["per_round_median"], f"same-round median (fewer than {MIN_QUIET} quiet steps each)"
        verdict = "met" if value >= 3 else "NOT met"
        caveats = []
        if min(goal["quiet_n"]) < MIN_QUIET:
            caveats.append("unreliable on a busy machine: rerun with more --rounds when it is idle")
        if meta["batch_size"] != 128:
            caveats.append("the goal is stated for batch 128")
        print(
            f"goal: ours >= 3x robustness -> {value:.2f}x by {how}: {verdict}"
            + (f" ({'; '.join(caveats)})" if caveats else "")
        )
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
    print(" cross-entropy of that batch under one fp32 eval-mode copy of the initial model; 'at eps': share")
    print(" of perturbations with L2 norm >= 0.99 eps)")
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
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the report of an earlier --json file")
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
    if args.report:
        results = json.loads(args.report.read_text())
        results["summary"] = summarize(results, results["contenders"], results["meta"]["batch_size"])
        print_report(results)
        return 0
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

    malloc_tuned = tune_malloc() if {"ours", "ours-compiled"} & set(contenders) else False
    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
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
                if name in ("ours", "ours-compiled"):
                    runners[name] = Ours(base, x, y, args, compiled=name == "ours-compiled")
                elif name == "plain":
                    runners[name] = Worker(name, [sys.executable, str(HERE / "_plain_worker.py"), *common], workdir)
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
                        None if stall0 is None or stall1 is None else min(1.0, (stall1 - stall0) / 1e6 / elapsed)
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
            logs = "\n".join(f"--- {n} log ---\n{w.log_tail()}" for n, w in runners.items() if isinstance(w, Worker))
            raise BenchmarkError(f"{type(exc).__name__}: {exc}\n{logs}") from exc
        finally:
            for runner in runners.values():
                runner.close()

    meta = {
        "date": date,
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
    # On SIGTERM unwind normally, so the workers are told to quit and the temporary files go away.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)

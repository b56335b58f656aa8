"""The paper's analyses: Gaussian-noise sources, low-resolution targets, width order, the best eps, source vs
transfer accuracy, and the study that puts them and the perceptual-alignment grids in its report."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robust_transfer.data import InMemoryDataset, load_dataset
from robust_transfer.data.resolution import at_resolution, degrade
from robust_transfer.errors import RobustTransferError
from robust_transfer.models import load_model
from robust_transfer.models.registry import size_order
from robust_transfer.study import Store, load_outcomes, load_pictures, load_spec, parse_spec, plan_runs, run_study
from robust_transfer.study.outcomes import TransferOutcome
from robust_transfer.study.report import write_report
from robust_transfer.study.tables import arch_bars, best_eps, best_per_eps, notions, table1
from robust_transfer.train import PretrainConfig, pretrain
from robust_transfer.train.objectives import NoiseObjective, make_objective

# -- Gaussian-noise training ---------------------------------------------------------------------------


def test_noise_objective_adds_fresh_noise_of_the_given_std_inside_the_box():
    torch.manual_seed(0)
    x = torch.full((64, 1, 28, 28), 0.5)
    objective = make_objective("noise", noise_sigma=0.1)
    assert isinstance(objective, NoiseObjective)
    first, second = objective.perturb(None, x, None), objective.perturb(None, x, None)
    assert (first - x).std().item() == pytest.approx(0.1, rel=0.05)
    assert abs((first - x).mean().item()) < 0.005
    assert not torch.equal(first, second)  # new noise on every batch
    edge = objective.perturb(None, torch.ones(8, 1, 28, 28), None)  # clipped at the box, never outside it
    assert edge.max() <= 1 and edge.min() >= 0 and (edge < 1).any()


def test_noise_training_needs_a_sigma_and_only_noise_takes_one():
    with pytest.raises(RobustTransferError, match="noise-sigma > 0"):
        PretrainConfig(method="noise")
    with pytest.raises(RobustTransferError, match="applies to method noise"):
        PretrainConfig(method="pgd", noise_sigma=0.1)
    result = subprocess.run([sys.executable, "-m", "robust_transfer.cli", "pretrain", "--method", "noise"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "noise-sigma" in result.stderr.strip().splitlines()[-1]


TINY_PRETRAIN = dict(dataset="fashion-mnist", arch="small_resnet", epochs=1, train_examples=128, batch_size=64,
                     eval_examples=32, eval_steps=1, test_examples=64, test_steps=1, precision="fp32",
                     progress=False)


def test_a_noise_trained_model_records_no_adversary_and_differs_from_standard(tmp_path):
    noise = pretrain(PretrainConfig(method="noise", noise_sigma=0.5, out_dir=str(tmp_path / "noise"), **TINY_PRETRAIN))
    standard = pretrain(PretrainConfig(method="standard", out_dir=str(tmp_path / "std"), **TINY_PRETRAIN))
    noisy, plain = load_model(noise.model_path), load_model(standard.model_path)
    # --eps still says 1.0 (the attack it is evaluated under), but it was not trained against one.
    assert noisy.metadata["threat"]["eps"] == 0 and plain.metadata["threat"]["eps"] == 0
    assert noisy.metadata["recipe"]["method"] == "noise" and noisy.metadata["recipe"]["noise_sigma"] == 0.5
    assert "noise_sigma" not in plain.metadata["recipe"]  # runs recorded before the field keep their identity
    assert noise.test.robust_acc is not None  # evaluated under the eps threat like any other source
    weights = zip(noisy.state_dict().values(), plain.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in weights if a.is_floating_point())


# -- low-resolution targets -----------------------------------------------------------------------------


def test_at_resolution_keeps_the_size_and_removes_finer_detail():
    data = load_dataset("fashion-mnist", val_fraction=0.1)
    low = at_resolution(dataclasses.replace(data, train=data.train.subset(range(64)), val=data.val.subset(range(8)),
                                            test=data.test.subset(range(8))), 7)
    assert low.train.images.shape == (64, 1, 28, 28) and low.image_size == 28
    assert not torch.equal(low.train.images, data.train.images[:64])
    # Edges go soft: the pixel-to-pixel variation falls to well under half.
    variation = lambda images: (images.float().diff(dim=-1).abs().mean() + images.float().diff(dim=-2).abs().mean())
    assert variation(low.train.images) < 0.5 * variation(data.train.images[:64])
    assert low.test.images.shape == (8, 1, 28, 28) and not torch.equal(low.test.images, data.test.images[:8])
    # A one-pixel checkerboard holds only detail finer than 7 px: it comes back flat grey.
    board = ((torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 255).to(torch.uint8)[None, None]
    flat = degrade(InMemoryDataset(board, torch.tensor([0]), ["a"]), 7).images.float()
    assert flat.std() < 0.05 * board.float().std()


def test_lazy_splits_degrade_to_the_same_pixels_as_in_memory_ones():
    images = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    memory = InMemoryDataset(images, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    lazy = torch.utils.data.Subset(memory, range(4))
    lazy.labels, lazy.class_names = memory.labels, memory.class_names
    assert torch.equal(degrade(lazy, 8)[2][0], degrade(memory, 8)[2][0])


def test_a_resolution_above_the_images_is_refused():
    data = load_dataset("digits", image_size=28)
    with pytest.raises(RobustTransferError, match="above the images' own 28 px"):
        at_resolution(data, 56)


# -- width order, the best eps, other notions (on hand-made outcomes) ----------------------------------


def test_families_come_together_smallest_first():
    names = ["wide_resnet50_4", "small_resnet_w2", "resnet50", "timm:resnet18", "wide_resnet50_2", "resnet18",
             "small_resnet"]
    assert sorted(names, key=size_order) == ["resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4",
                                             "small_resnet", "small_resnet_w2", "timm:resnet18"]


def run(source, eps, val, test, arch="resnet18", sigma=None, dataset="pets") -> TransferOutcome:
    return TransferOutcome(key=f"{source}/{dataset}", source=source, arch=arch, norm="l2" if eps else None, eps=eps,
                           dataset=dataset, mode="fixed", setting="", seed=0, val_score=val, test_score=test,
                           metric="top1", robust_acc=None, robust_threat=None, seconds=1.0, noise_sigma=sigma)


def test_the_best_eps_is_chosen_on_validation_not_test():
    runs = [run("e0", 0.0, 0.70, 0.71), run("e05", 0.5, 0.80, 0.74), run("e3", 3.0, 0.75, 0.79)]
    (chosen,) = best_eps(best_per_eps(runs)).values()
    assert chosen.source == "e05"  # the test winner (eps 3) never chooses


def test_noise_sources_are_their_own_notion_and_stay_out_of_table1():
    runs = [run("std", 0.0, 0.70, 0.70), run("adv", 1.0, 0.72, 0.75), run("noise", 0.0, 0.90, 0.80, sigma=0.25)]
    (row,) = table1(runs)
    assert row.best_standard.source == "std" and row.best_robust.source == "adv"  # not the noise source
    (notion,) = notions(runs)
    assert (notion.standard.source, notion.adversarial.source, notion.noise.source) == ("std", "adv", "noise")
    assert notion.best == "noise" and notion.noise.noise_sigma == 0.25
    assert notions([r for r in runs if r.noise_sigma is None]) == []


def test_the_per_architecture_rows_follow_width():
    runs = [run(f"{arch}-{eps}", eps, 0.5, 0.5, arch=arch) for arch in ("wide_resnet50_4", "resnet18",
                                                                        "wide_resnet50_2", "resnet50")
            for eps in (0.0, 1.0)]
    assert [row.arch for row in arch_bars(runs)] == ["resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4"]


# -- one small study with every analysis, read back through the report ---------------------------------

PRETRAIN = {"dataset": "fashion-mnist", "epochs": 1, "train_examples": 256, "batch_size": 64, "attack_steps": 1,
            "eval_examples": 64, "eval_steps": 1, "test_examples": 100, "lr": 0.05, "precision": "fp32"}


def analyses_spec(out: Path) -> dict:
    return {
        "name": "analyses", "out_dir": str(out), "targets": ["digits"], "modes": ["fixed"], "resolution": 7,
        "threat": {"norm": "l2", "eps": 1.0, "steps": 1, "examples": 64},
        "sources": [
            {"label": "fm", "eps": [0, 1], "pretrain": {**PRETRAIN, "arch": "small_resnet"}},
            {"label": "wide", "eps": [0, 1], "pretrain": {**PRETRAIN, "arch": "small_resnet_w2"}},
            {"label": "noise", "sigma": [0.25], "pretrain": {**PRETRAIN, "arch": "small_resnet", "method": "noise"}},
        ],
        "transfer": {"train_examples": 256, "precision": "fp32"},
        "pictures": {"kinds": ["inversion", "saliency"], "images": 4, "steps": 10},
    }


@pytest.fixture(scope="module")
def analyses_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyses")
    store_path = run_study(parse_spec(analyses_spec(out / "study")), progress=False)
    with Store(store_path, create=False) as store:
        sources, transfers = load_outcomes(store)
        pictures = load_pictures(store)
        failed = store.rows(status="failed")
    assert not failed, [row.error for row in failed]
    files = write_report(transfers, sources, out / "report", pictures=pictures)
    return sources, transfers, pictures, files


def test_the_study_runs_every_source_at_native_and_low_resolution(analyses_study):
    sources, transfers, _, _ = analyses_study
    labels = {"fm-eps0", "fm-eps1", "wide-eps0", "wide-eps1", "noise-sigma0.25"}
    assert {s.source for s in sources} == labels
    noise = next(s for s in sources if s.source == "noise-sigma0.25")
    assert noise.noise_sigma == 0.25 and noise.eps == 0 and noise.clean_acc is not None
    by_resolution = {(t.source, t.resolution): t for t in transfers}
    assert set(by_resolution) == {(label, r) for label in labels for r in (None, 7)}
    assert {t.dataset for t in transfers} == {"digits", "digits at 7 px"}
    assert all(t.target == "digits" for t in transfers)


def test_the_report_holds_every_analysis(analyses_study):
    _, transfers, _, files = analyses_study
    text = files.markdown.read_text()
    for section in ("## Robustness level: the best source eps per target", "## Input resolution",
                    "## Other notions of robustness: Gaussian-noise training",
                    "## Source accuracy against transfer accuracy", "## Perceptual alignment"):
        assert section in text
    assert "| digits | fixed | 7 px |" in text
    assert "Gaussian noise (sigma 0.25)" in text
    for png in (files.resolution, files.source_vs_transfer, files.accuracy_vs_eps, files.architectures,
                *files.pictures):
        assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in files.pictures) == ["inversion.png", "saliency.png"]
    html = files.html.read_text()
    assert html.count("data:image/png;base64,") == 5 + 2  # every plot and both grids, inline
    # Width: within a dataset, small_resnet's row comes before its twice-as-wide sibling's.
    table = text[text.index("## Per architecture"):text.index("## Robustness level")]
    assert table.index("| digits | fixed | small_resnet |") < table.index("| digits | fixed | small_resnet_w2 |")
    # Table 1 compares adversarial and standard sources only.
    for row in table1(transfers):
        assert "noise" not in row.best_standard.source and "noise" not in row.best_robust.source


def test_every_source_draws_its_row_from_the_same_images(analyses_study):
    sources, _, pictures, _ = analyses_study
    assert sorted((p.kind, p.source) for p in pictures) == sorted(
        (kind, s.source) for kind in ("inversion", "saliency") for s in sources)
    inversions = [load_file(p.file) for p in pictures if p.kind == "inversion"]
    for tensors in inversions:
        assert torch.equal(tensors["reference"], inversions[0]["reference"])
        assert tensors["row"].shape == (4, 1, 28, 28)
        assert tensors["row"].min() >= 0 and tensors["row"].max() <= 1
    assert not torch.equal(inversions[0]["row"], inversions[1]["row"])  # each source inverts its own way


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s["sources"][0].update(sigma=[0.1]), "sources[0].sigma"),
    (lambda s: s["sources"][2].update(eps=[1]), "sources[2].eps"),
    (lambda s: s["sources"][2].pop("sigma"), "method noise needs sigma"),
    (lambda s: s.update(resolution=0), "resolution: expected positive numbers of pixels"),
    (lambda s: s["pictures"].update(kinds=["dream"]), "[pictures].kinds: unknown kind 'dream'"),
    (lambda s: s["pictures"].update(images=0), "[pictures].images"),
    (lambda s: s["sources"].append({"file": "x.safetensors"}), "[pictures].dataset: give the dataset"),
])
def test_spec_errors_for_the_analyses_name_the_field(tmp_path, edit, expected):
    spec = json.loads(json.dumps(analyses_spec(tmp_path)))
    edit(spec)
    with pytest.raises(RobustTransferError, match="^s.toml: ") as error:
        parse_spec(spec, origin="s.toml")
    assert expected in str(error.value)


def test_the_example_analyses_study_plans_every_analysis():
    spec = load_spec(Path(__file__).parents[1] / "examples" / "analyses.toml")
    runs = plan_runs(spec)
    kinds = [run.kind for run in runs]
    assert kinds.count("pretrain") == 6 and kinds.count("pictures") == 12
    transfers = [run for run in runs if run.kind == "transfer"]
    assert {run.config["resolution"] for run in transfers} == {None, 10} and len(transfers) == 6 * 2 * 2
    noise = next(run for run in runs if run.kind == "pretrain" and run.config["source_label"] == "fm-noise-sigma0.25")
    assert noise.config["pretrain"]["method"] == "noise" and noise.config["pretrain"]["noise_sigma"] == 0.25

"""Checkpoint interoperability and the model zoo: the paper's released layout, other tools' state dicts,
weights-only safety, exports for torchvision / timm / safetensors, and the zoo commands.

Checkpoints are built here from torchvision models with random weights (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from robust_transfer.errors import RobustTransferError
from robust_transfer.models import (
    convert_state_dict,
    create_model,
    export_model,
    infer_architectures,
    load_model,
    save_model,
)
from robust_transfer.transfer import transfer
from robust_transfer.zoo import MANIFEST, PAPER, import_model, list_models, zoo_entry
from robust_transfer.zoo_cli import add_zoo_parser

MEAN = (0.5, 0.4, 0.3)  # not ImageNet's: proves the statistics come from the file's buffers
STD = (0.2, 0.25, 0.3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny forwards only: one thread is fastest, and on a busy 2-core machine two threads wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_bn(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(1234)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(torchvision.models.resnet18(weights=None))


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(torchvision.models.mobilenet_v2(weights=None, num_classes=10))


def released_state(state: dict, prefix: str, attacker: bool = True, mean=MEAN, std=STD) -> OrderedDict:
    """A state dict in the robustness library's layout (DataParallel, attacker copy, normaliser buffers)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        out[f"module.{prefix}{key}"] = value
    if attacker:
        for key, value in state.items():
            out[f"module.attacker.{prefix}{key}"] = value
    mean_t = torch.tensor(mean).reshape(3, 1, 1)
    std_t = torch.tensor(std).reshape(3, 1, 1)
    out["module.normalizer.new_mean"], out["module.normalizer.new_std"] = mean_t, std_t
    if attacker:
        out["module.attacker.normalize.new_mean"], out["module.attacker.normalize.new_std"] = mean_t.clone(), std_t
    return out


def save_released(path: Path, state: dict, container: str = "model") -> Path:
    torch.save({container: state, "epoch": 90, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                                                            "param_groups": [{"lr": 0.001, "params": [0]}]},
                "schedule": {"milestones": [30, 60], "last_epoch": 89}, "nat_prec1": torch.tensor(62.5),
                "adv_prec1": np.float32(31.25)}, path)  # a numpy scalar, as some releases hold
    return path


def reference_output(model: nn.Module, x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    mean_t, std_t = torch.tensor(mean).reshape(3, 1, 1), torch.tensor(std).reshape(3, 1, 1)
    with torch.no_grad():
        return model((x - mean_t) / std_t)


def assert_same_outputs(loaded: nn.Module, original: nn.Module, x: torch.Tensor, mean=MEAN, std=STD) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference_output(original, x, mean, std), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def released_resnet18(resnet18, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("released") / "resnet18_l2_eps3.ckpt"
    return save_released(path, released_state(resnet18.state_dict(), "model."))


# --- the robustness library's released layout ---------------------------------------------------------


@pytest.mark.parametrize("attacker", [True, False])
@pytest.mark.parametrize("container", ["model", "state_dict"])
def test_released_resnet_checkpoints_give_the_original_outputs(resnet18, tmp_path, attacker, container):
    path = save_released(tmp_path / "r18.ckpt", released_state(resnet18.state_dict(), "model.", attacker), container)
    loaded = load_model(path)
    assert loaded.spec.arch == "resnet18" and loaded.spec.num_classes == 1000 and not loaded.training
    assert loaded.spec.mean == pytest.approx(MEAN) and loaded.spec.std == pytest.approx(STD)
    meta = loaded.metadata
    assert meta["source_format"] == "robustness" and meta["arch_inferred"] is True
    assert meta["normalization"] == "file" and meta["container_key"] == container
    assert meta["epoch"] == 90 and meta["nat_prec1"] == pytest.approx(62.5) and meta["adv_prec1"] == 31.25
    assert_same_outputs(loaded, resnet18, torch.rand(2, 3, 48, 48))
    inner = loaded.model.state_dict()
    assert all(torch.equal(v, inner[k]) for k, v in resnet18.state_dict().items())


@pytest.mark.parametrize("attacker", [True, False])
def test_torchvision_wrapped_checkpoints_with_double_model_prefix(mobilenet, tmp_path, attacker):
    state = released_state(mobilenet.state_dict(), "model.model.", attacker)
    assert "module.model.model.features.0.0.weight" in state
    path = save_released(tmp_path / "mobilenet_l2_eps3.ckpt", state, "state_dict" if attacker else "model")
    loaded = load_model(path, arch="mobilenet_v2")
    assert loaded.spec.num_classes == 10 and loaded.metadata["arch_inferred"] is False
    assert_same_outputs(loaded, mobilenet, torch.rand(2, 3, 40, 40))


def test_a_mismatched_attacker_copy_is_an_error(resnet18, tmp_path):
    state = released_state(resnet18.state_dict(), "model.")
    state["module.attacker.model.layer2.0.conv1.weight"] = state["module.model.layer2.0.conv1.weight"] + 1e-3
    path = save_released(tmp_path / "bad.ckpt", state)
    with pytest.raises(RobustTransferError, match=r"disagree at layer2\.0\.conv1\.weight.*corrupt or was edited"):
        load_model(path)


def test_mismatched_normaliser_copies_are_an_error(resnet18):
    state = released_state(resnet18.state_dict(), "model.")
    state["module.attacker.normalize.new_std"] = torch.ones(3, 1, 1)
    with pytest.raises(RobustTransferError, match="normaliser buffers disagree"):
        convert_state_dict(state, "bad.ckpt")


def test_wide_resnet50_4_layout_is_read_and_inferred_on_the_meta_device():
    with torch.device("meta"):
        reference = create_model("wide_resnet50_4").model
    state = released_state(reference.state_dict(), "model.")
    state["module.normalizer.new_mean"] = torch.tensor(MEAN).reshape(3, 1, 1)
    converted = convert_state_dict(state, "wide_resnet50_4_l2_eps3.ckpt")
    assert converted.spec.arch == "wide_resnet50_4" and converted.arch_inferred
    assert converted.state["model.layer1.0.conv1.weight"].shape == (256, 64, 1, 1)  # width_per_group 256
    with torch.device("meta"):
        expected = create_model("wide_resnet50_4").state_dict()
    assert {k: v.shape for k, v in converted.state.items()} == {k: v.shape for k, v in expected.items()}
    fit = r"'wide_resnet50_2'.*wrong shapes.*its weights fit 'wide_resnet50_4'"
    with pytest.raises(RobustTransferError, match=fit):
        convert_state_dict(state, "w.ckpt", arch="wide_resnet50_2")


def test_a_checkpoint_of_another_architecture_names_the_problem(released_resnet18):
    with pytest.raises(RobustTransferError, match=r"do not fit architecture 'resnet50'.*its weights fit 'resnet18'"):
        load_model(released_resnet18, arch="resnet50")
    with pytest.raises(RobustTransferError, match="choose one of: resnet18"):
        load_model(released_resnet18, arch="alexnet")


def test_unknown_weights_without_arch_ask_for_it(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    ask = r"does not name its architecture.*arch=\.\.\. \(--arch\), one of: resnet18"
    with pytest.raises(RobustTransferError, match=ask):
        load_model(tmp_path / "other.pt")


# --- weights-only safety and damaged files --------------------------------------------------------------


class _Payload:
    """Unpickling this runs code that writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    payload = {"model": {"conv.weight": torch.zeros(1)}, "epoch": _Payload(marker)}
    if kind == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(RobustTransferError, match=r"refused and nothing in it ran.*trusted environment") as info:
        load_model(path, arch="resnet18")
    assert "exec" in str(info.value) and "weights_only=False" in str(info.value)
    parser = argparse.ArgumentParser()
    add_zoo_parser(parser.add_subparsers())
    args = parser.parse_args(["zoo", "import", str(path), "--name", "evil", "--model-dir", str(tmp_path / "zoo")])
    with pytest.raises(RobustTransferError, match="nothing in it ran"):
        args.run(args)
    assert not marker.exists()


def test_truncated_and_corrupt_files_are_clear_errors(released_resnet18, tmp_path):
    data = released_resnet18.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RobustTransferError, match=r"cut\.ckpt is truncated or corrupt.*again"):
        load_model(tmp_path / "cut.ckpt")
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(RobustTransferError, match="neither a torch.save checkpoint nor a safetensors file"):
        load_model(tmp_path / "junk.pt")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(RobustTransferError, match="empty.pth .0 bytes. is neither"):
        load_model(tmp_path / "empty.pth")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(RobustTransferError, match="holds a list, not a state dict"):
        load_model(tmp_path / "list.pt")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "nostate.pt")
    with pytest.raises(RobustTransferError, match="holds no state dict.*'epoch'"):
        load_model(tmp_path / "nostate.pt")


def test_a_torn_safetensors_file_is_a_clear_error(resnet18, tmp_path):
    from safetensors.torch import save_file

    save_file(resnet18.state_dict(), tmp_path / "r18.safetensors")
    data = (tmp_path / "r18.safetensors").read_bytes()
    (tmp_path / "r18.safetensors").write_bytes(data[:-4096])
    with pytest.raises(RobustTransferError, match=r"r18\.safetensors is truncated or corrupt \(safetensors"):
        load_model(tmp_path / "r18.safetensors")


def test_old_files_without_batch_counts_and_with_old_densenet_names_are_read():
    with torch.device("meta"):
        state = create_model("resnet18").model.state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    converted = convert_state_dict(old, "old.pth")
    assert converted.spec.arch == "resnet18" and "model.bn1.num_batches_tracked" in converted.state
    with torch.device("meta"):
        dense = create_model("densenet161", num_classes=3).model.state_dict()
    renamed = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in dense.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in renamed
    assert convert_state_dict(renamed, "densenet.pth").spec.arch == "densenet161"


def test_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(RobustTransferError, match=f"model file not found: {tmp_path / 'nope.pth'}"):
        load_model(tmp_path / "nope.pth")
    with pytest.raises(RobustTransferError, match="not found: no_such_model.safetensors .nor a zoo model name"):
        load_model("no_such_model", model_dir=tmp_path)


# --- other tools' state dicts -----------------------------------------------------------------------------


def test_plain_torchvision_state_dict_uses_the_default_or_the_given_normalisation(resnet18, tmp_path):
    torch.save(resnet18.state_dict(), tmp_path / "r18.pth")
    default = load_model(tmp_path / "r18.pth")
    assert default.spec.arch == "resnet18" and default.metadata["normalization"] == "default"
    assert default.metadata["source_format"] == "torchvision"
    x = torch.rand(1, 3, 40, 40)
    assert_same_outputs(default, resnet18, x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    given = load_model(tmp_path / "r18.pth", "resnet18", mean=MEAN, std=STD)
    assert given.metadata["normalization"] == "given"
    assert_same_outputs(given, resnet18, x)


def test_given_statistics_must_agree_with_those_the_file_carries(released_resnet18):
    with pytest.raises(RobustTransferError, match="carries its own normalisation.*leave mean/std out"):
        load_model(released_resnet18, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert load_model(released_resnet18, mean=MEAN, std=STD).spec.arch == "resnet18"


def test_robustbench_style_state_dict(mobilenet, tmp_path):
    state = OrderedDict(
        [("module.normalize.mean", torch.tensor(MEAN).reshape(1, 3, 1, 1)),
         ("module.normalize.std", torch.tensor(STD).reshape(1, 3, 1, 1))]
        + [(f"module.model.{k}", v) for k, v in mobilenet.state_dict().items()]
    )
    torch.save({"state_dict": state}, tmp_path / "rb.pt")
    loaded = load_model(tmp_path / "rb.pt")
    assert loaded.spec.arch == "mobilenet_v2" and loaded.metadata["source_format"] == "robustbench"
    assert_same_outputs(loaded, mobilenet, torch.rand(2, 3, 36, 36))


def test_timm_state_dict_with_timm_names_is_mapped(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = _randomise_bn(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=7))
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    loaded = load_model(tmp_path / "timm.pth", mean=MEAN, std=STD)
    assert loaded.spec.arch == "mobilenet_v2" and loaded.metadata["source_format"] == "timm"
    assert_same_outputs(loaded, reference, torch.rand(2, 3, 40, 40))


def test_infer_architectures_tells_resnet50_family_members_apart():
    for arch in ("resnet50", "wide_resnet50_2", "resnext50_32x4d", "wide_resnet50_4"):
        with torch.device("meta"):
            state = create_model(arch, num_classes=5).model.state_dict()
        assert infer_architectures(state) == [arch]


# --- export --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_resnet18(released_resnet18) -> nn.Module:
    return load_model(released_resnet18)


def _equal_models(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt,name", [("torchvision", "r18.pth"), ("safetensors", "r18.safetensors")])
def test_export_and_back_round_trips_exactly(loaded_resnet18, resnet18, tmp_path, fmt, name):
    weights, meta = export_model(loaded_resnet18, tmp_path / name, fmt)
    info = json.loads(meta.read_text())
    assert info["arch"] == "resnet18" and info["mean"] == list(loaded_resnet18.spec.mean) and info["layout"] == fmt
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    back = load_model(weights)
    assert _equal_models(back, loaded_resnet18) and back.spec == loaded_resnet18.spec
    assert _equal_models(load_model(meta), loaded_resnet18)  # the JSON names its weights file
    assert back.metadata["source_format"] == f"{fmt} export" and back.metadata["arch_inferred"] is False
    if fmt == "torchvision":  # plain torchvision takes it as it is
        plain = torchvision.models.resnet18(weights=None)
        plain.load_state_dict(torch.load(weights, weights_only=True))
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in resnet18.state_dict().items())


def test_torchvision_export_keeps_module_versions_for_mnasnet(tmp_path):
    torch.manual_seed(0)
    model = create_model("mnasnet1_0", num_classes=4).eval()
    weights, _ = export_model(model, tmp_path / "mnas.pth", "torchvision")
    plain = torchvision.models.mnasnet1_0(weights=None, num_classes=4)
    plain.load_state_dict(torch.load(weights, weights_only=True))  # MNASNet refuses a state dict without versions
    assert _equal_models(load_model(weights), model)


def test_timm_export_loads_into_timm(loaded_resnet18, tmp_path):
    timm = pytest.importorskip("timm")
    weights, meta = export_model(loaded_resnet18, tmp_path / "r18_timm.pth", "timm")
    info = json.loads(meta.read_text())
    assert info["timm_name"] == "resnet18" and info["verified_with_timm"] is True
    model = timm.create_model("resnet18", pretrained=False).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.rand(2, 3, 40, 40)
    assert_same_outputs(loaded_resnet18, model, x)
    assert _equal_models(load_model(weights), loaded_resnet18)


def test_timm_export_maps_names_where_timm_differs(mobilenet, tmp_path):
    timm = pytest.importorskip("timm")
    ours = load_model(_save_plain(mobilenet, tmp_path / "mnv2.pth"), mean=MEAN, std=STD)
    weights, meta = export_model(ours, tmp_path / "mnv2_timm.safetensors", "timm")
    assert json.loads(meta.read_text())["timm_name"] == "mobilenetv2_100"
    from safetensors.torch import load_file

    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10).eval()
    model.load_state_dict(load_file(weights))
    assert_same_outputs(ours, model, torch.rand(2, 3, 40, 40))
    assert _equal_models(load_model(weights), ours)


def _save_plain(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_timm_export_of_an_architecture_timm_lacks_is_refused(tmp_path):
    with pytest.raises(RobustTransferError, match="timm has no architecture matching 'small_resnet'"):
        export_model(create_model("small_resnet"), tmp_path / "x.pth", "timm")
    with pytest.raises(RobustTransferError, match="unknown export format"):
        export_model(create_model("small_resnet"), tmp_path / "x.pth", "onnx")


# --- the zoo ----------------------------------------------------------------------------------------------------


def test_the_manifest_lists_every_released_model():
    paper = [entry for entry in MANIFEST.values() if entry.source == PAPER]
    assert len(paper) == 4 * 10 + 6 * 2 + 3 * 5
    entry = MANIFEST["resnet50_l2_eps3"]
    assert (entry.arch, entry.norm, entry.eps, entry.filename, entry.clean_top1) == (
        "resnet50", "l2", 3.0, "resnet50_l2_eps3.ckpt", 62.83)
    assert MANIFEST["resnet50_l2_eps0"].clean_top1 == 75.80 and MANIFEST["resnet50_l2_eps5"].clean_top1 == 56.13
    linf = MANIFEST["resnet18_linf_eps4"]
    assert linf.eps == pytest.approx(4 / 255) and linf.filename == "resnet18_linf_eps4.0.ckpt"
    assert MANIFEST["wide_resnet50_4_l2_eps0.01"].arch == "wide_resnet50_4"
    assert MANIFEST["densenet161_l2_eps3"].filename == "densenet_l2_eps3.ckpt"
    assert MANIFEST["mobilenet_v2_l2_eps0"].filename == "mobilenet_l2_eps0.ckpt"
    assert zoo_entry("resnet50_l2_eps0_01") is MANIFEST["resnet50_l2_eps0.01"]
    assert sum(e.clean_top1 is not None for e in paper) == 10


def _zoo(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="robust-transfer")
    add_zoo_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    return capsys.readouterr().out


def test_zoo_commands_end_to_end(released_resnet18, resnet18, tmp_path, monkeypatch, capsys):
    zoo_dir = tmp_path / "models"
    monkeypatch.setenv("ROBUST_TRANSFER_MODELS", str(zoo_dir))

    out = _zoo(["zoo", "list"], capsys)
    assert "resnet50_l2_eps3" in out and "62.83" in out and "linf eps 4/255" in out
    assert f"0 of {len(MANIFEST)} present" in out and "Liu2023Comprehensive_Swin-L" in out and "59.56" in out
    out = _zoo(["zoo", "show", "resnet18_l2_eps3"], capsys)
    assert "place the released file resnet18_l2_eps3.ckpt" in out and str(zoo_dir / "resnet18_l2_eps3.ckpt") in out
    with pytest.raises(RobustTransferError, match=f"place the released file resnet18_l2_eps3.ckpt .* at {zoo_dir}"):
        load_model("resnet18_l2_eps3")

    zoo_dir.mkdir()
    (zoo_dir / "resnet18_l2_eps3.ckpt").symlink_to(released_resnet18)
    placed = load_model("resnet18_l2_eps3")  # the released file, read as is
    assert placed.metadata["threat"] == {"norm": "l2", "eps": 3.0} and placed.metadata["arch_inferred"] is False
    assert "released file" in _zoo(["zoo", "list", "--json"], capsys)

    out = _zoo(["zoo", "import", "resnet18_l2_eps3", "--name", "resnet18_l2_eps3"], capsys)  # the placed file
    assert "imported resnet18_l2_eps3: resnet18, 1000 classes, from robustness file" in out
    assert f"normalisation: mean {list(placed.spec.mean)}" in out and "(from the file)" in out
    registry = json.loads((zoo_dir / "registry.json").read_text())["models"]["resnet18_l2_eps3"]
    weights = zoo_dir / "resnet18_l2_eps3.safetensors"
    assert registry["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert registry["source_sha256"] == hashlib.sha256(released_resnet18.read_bytes()).hexdigest()
    assert registry["source"] == str((zoo_dir / "resnet18_l2_eps3.ckpt").resolve())
    model = load_model("resnet18_l2_eps3")
    assert model.metadata["zoo_name"] == "resnet18_l2_eps3" and model.metadata["threat"]["eps"] == 3.0
    assert_same_outputs(model, resnet18, torch.rand(1, 3, 40, 40))
    rows = {r["name"]: r for r in list_models()}
    assert rows["resnet18_l2_eps3"]["status"] == "imported"
    show = json.loads(_zoo(["zoo", "show", "resnet18_l2_eps3", "--json"], capsys))
    assert show["registered"]["arch"] == "resnet18" and show["metadata"]["threat"]["norm"] == "l2"

    with pytest.raises(RobustTransferError, match="already registered.*--force"):
        import_model(released_resnet18, "resnet18_l2_eps3")
    with pytest.raises(RobustTransferError, match="the paper's resnet18 model"):
        import_model(released_resnet18, "resnet18_l2_eps3", arch="resnet50", force=True)

    out = _zoo(["zoo", "export", "resnet18_l2_eps3", "--format", "torchvision", "--out", str(tmp_path / "e.pth")],
               capsys)
    assert "exported resnet18_l2_eps3 (torchvision)" in out
    assert _equal_models(load_model(tmp_path / "e.pth"), model)
    assert json.loads((tmp_path / "e.json").read_text())["threat"] == {"norm": "l2", "eps": 3.0}

    # tampering: change one weight and even fix the JSON's checksum; the registry still catches it
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    meta = weights.with_suffix(".json")
    document = json.loads(meta.read_text())
    document["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    meta.write_text(json.dumps(document))
    with pytest.raises(RobustTransferError, match="sha256 recorded when resnet18_l2_eps3 was registered.*--force"):
        load_model("resnet18_l2_eps3")


def test_user_models_are_registered_the_same_way(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("small_resnet", num_classes=3, in_channels=1)
    path = save_model(model, tmp_path / "runs" / "x" / "model.safetensors",
                      {"threat": {"norm": "l2", "eps": 1.0}, "source_data": "fashion-mnist"})
    zoo_dir = tmp_path / "zoo"
    out = _zoo(["zoo", "import", str(path), "--name", "mymodel", "--model-dir", str(zoo_dir)], capsys)
    assert "imported mymodel: small_resnet" in out
    loaded = load_model("mymodel", model_dir=zoo_dir)
    assert _equal_models(loaded, model) and loaded.metadata["source_data"] == "fashion-mnist"
    listing = _zoo(["zoo", "list", "--model-dir", str(zoo_dir)], capsys)
    assert "mymodel" in listing and "imported (yours)" in listing and "l2 eps 1" in listing
    with pytest.raises(RobustTransferError, match="model name 'bad/name' is not allowed"):
        import_model(path, "bad/name", zoo_dir)
    with pytest.raises(RobustTransferError, match="neither one of the paper's models nor registered"):
        _zoo(["zoo", "show", "unknown", "--model-dir", str(zoo_dir)], capsys)
    (zoo_dir / "mymodel.safetensors").unlink()
    with pytest.raises(RobustTransferError, match="registered .* but its file .* is missing"):
        load_model("mymodel", model_dir=zoo_dir)


def test_a_released_checkpoint_imported_into_the_zoo_transfers_by_name(released_resnet18, tmp_path, monkeypatch):
    # The whole path a user takes: place the released file, import it under its zoo name, transfer by name.
    monkeypatch.setenv("ROBUST_TRANSFER_MODELS", str(tmp_path / "models"))
    import_model(released_resnet18, "resnet18_l2_eps3")
    result = transfer(source="resnet18_l2_eps3", dataset="digits", mode="fixed", image_size=32,
                      penalties=[1e-2], out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                      progress=False, precision="fp32")
    assert result.record.source.arch == "resnet18" and result.record.target.in_channels == 3
    assert load_model(result.model_path).spec.num_classes == 10

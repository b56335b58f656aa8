"""The zoo's manifest: the robust ImageNet models we know by name, with their architecture, threat model,
preprocessing and published accuracy.

The paper's released models (Salman et al. 2020) are listed with the file name they were released
under; nothing is downloaded: a user places a file in the local model directory or imports it with
``robust-transfer zoo import FILE --name NAME``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PAPER = (
    "Salman et al. 2020, Do Adversarially Robust ImageNet Models Transfer Better? (microsoft/robust-models-transfer)"
)



IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # models trained on [0, 1] inputs with no normalisation at all
ROBUSTBENCH = "RobustBench ImageNet Linf leaderboard (AutoAttack, 5,000 validation images)"
ARES = "ARES 2.0 robust training (Liu et al. 2023, A Comprehensive Study on Robustness of Image Classification Models)"
SINGH = "Singh, Croce, Hein 2023, Revisiting Adversarial Training for ImageNet (ConvStem), via RobustBench"


@dataclass(frozen=True)
class ZooEntry:
    """One released model: ``eps`` is in [0, 1] pixel units (Linf 4/255 = 0.0157), ``eps_label`` as published.

    ``arch`` and ``options`` are what `create_model` rebuilds it with. ``filename`` is the name the
    file was released under. ``clean_top1`` / ``robust_top1`` are the published ImageNet validation
    accuracies in percent (None where we do not have them), ``robust_attack`` says how the robust number
    was measured. ``normalization`` is the (mean, std) the model expects when its file does not carry
    it (RAW: none at all); ``resize`` / ``crop`` / ``interpolation`` its evaluation preprocessing
    (resize the short side, centre-crop). ``source`` names who published it.
    """

    name: str
    arch: str
    norm: str
    eps: float
    eps_label: str
    filename: str
    clean_top1: float | None = None
    robust_top1: float | None = None
    robust_attack: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = IMAGENET
    resize: int | None = 256
    crop: int = 224
    interpolation: str = "bilinear"
    source: str = PAPER

    @property
    def threat(self) -> str:
        return f"{self.norm} eps {self.eps_label}"

    def metadata(self) -> dict[str, Any]:
        """What we know about the model, in our metadata keys (threat, source data, input size, preprocessing,
        accuracies)."""
        document: dict[str, Any] = {
            "threat": {"norm": self.norm, "eps": self.eps},
            "source_data": "imagenet",
            "input_size": self.crop,
            "preprocessing": {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation},
            "zoo": {"name": self.name, "released_file": self.filename, "paper": self.source},
        }
        if self.clean_top1 is not None:
            accuracies: dict[str, Any] = {"clean_acc": self.clean_top1 / 100, "reported": self.source}
            if self.robust_top1 is not None:
                accuracies.update(robust_acc=self.robust_top1 / 100, attack=self.robust_attack)
            document["accuracies"] = {"imagenet_val": accuracies}
        return document


# File names use the robustness library's short names for the torchvision-wrapped architectures.
_RELEASED_ARCH = {
    "densenet161": "densenet",
    "mnasnet1_0": "mnasnet",
    "mobilenet_v2": "mobilenet",
    "shufflenet_v2_x1_0": "shufflenet",
}
_L2_ALL = ("0", "0.01", "0.03", "0.05", "0.1", "0.25", "0.5", "1", "3", "5")
_L2_RESNET50_TOP1 = (75.80, 75.68, 75.76, 75.59, 74.78, 74.14, 73.16, 70.43, 62.83, 56.13)
_LINF = ("0.5", "1", "2", "4", "8")


def _manifest() -> dict[str, ZooEntry]:
    entries: list[ZooEntry] = []
    for arch in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4"):
        for i, label in enumerate(_L2_ALL):
            top1 = _L2_RESNET50_TOP1[i] if arch == "resnet50" else None
            entries.append(ZooEntry(f"{arch}_l2_eps{label}", arch, "l2", float(label), label,
                                    f"{arch}_l2_eps{label}.ckpt", top1))
    for arch in ("densenet161", "mnasnet1_0", "mobilenet_v2", "resnext50_32x4d", "shufflenet_v2_x1_0", "vgg16_bn"):
        for label in ("0", "3"):
            released = _RELEASED_ARCH.get(arch, arch)
            entries.append(ZooEntry(f"{arch}_l2_eps{label}", arch, "l2", float(label), label,
                                    f"{released}_l2_eps{label}.ckpt"))
    for arch in ("resnet18", "resnet50", "wide_resnet50_2"):
        for label in _LINF:
            entries.append(ZooEntry(f"{arch}_linf_eps{label}", arch, "linf", float(label) / 255, f"{label}/255",
                                    f"{arch}_linf_eps{float(label):.1f}.ckpt"))
    entries += _todays_models()
    return {entry.name: entry for entry in entries}


CONVSTEM = "robust_transfer.models.convstem:convstem_model"
_LINF4 = {"norm": "linf", "eps": 4 / 255, "eps_label": "4/255"}
_BICUBIC = {"interpolation": "bicubic"}


def _todays_models() -> list[ZooEntry]:
    """The robust ImageNet models researchers pick today (all Linf 4/255), with RobustBench's or ARES's numbers."""
    rb = {**_LINF4, "robust_attack": ROBUSTBENCH, "source": ROBUSTBENCH}

    def robustbench(name: str, arch: str, clean: float, robust: float, **more: Any) -> ZooEntry:
        return ZooEntry(name, arch, filename=f"{name}.pt", clean_top1=clean, robust_top1=robust, **{**rb, **more})

    singh = {"normalization": RAW, "source": SINGH, **_BICUBIC}
    xcit = {"normalization": RAW, "resize": 224, **_BICUBIC}
    ares = {**_LINF4, "robust_attack": "AutoAttack (ARES, 1,000 validation images)", "source": ARES}
    return [
        robustbench("Liu2023Comprehensive_Swin-L", "timm:swin_large_patch4_window7_224", 78.92, 59.56, **_BICUBIC),
        robustbench("Liu2023Comprehensive_ConvNeXt-L", "timm:convnext_large", 78.02, 58.48, **_BICUBIC),
        robustbench("Liu2023Comprehensive_Swin-B", "timm:swin_base_patch4_window7_224", 76.16, 56.16, **_BICUBIC),
        robustbench("Liu2023Comprehensive_ConvNeXt-B", "timm:convnext_base", 76.02, 55.82, **_BICUBIC),
        robustbench("Singh2023Revisiting_ConvNeXt-L-ConvStem", CONVSTEM, 77.00, 57.70, options={"base": "convnext_l"},
                    **singh),
        robustbench("Singh2023Revisiting_ConvNeXt-B-ConvStem", CONVSTEM, 75.90, 56.14, options={"base": "convnext_b"},
                    **singh),
        robustbench("Singh2023Revisiting_ConvNeXt-S-ConvStem", CONVSTEM, 74.10, 52.42, options={"base": "convnext_s"},
                    **singh),
        robustbench("Singh2023Revisiting_ConvNeXt-T-ConvStem", CONVSTEM, 72.72, 49.46, options={"base": "convnext_t"},
                    **singh),
        robustbench("Singh2023Revisiting_ViT-B-ConvStem", CONVSTEM, 76.30, 54.66, options={"base": "vit_b"}, **singh),
        robustbench("Singh2023Revisiting_ViT-S-ConvStem", CONVSTEM, 72.56, 48.08, options={"base": "vit_s"},
                    **{**singh, "normalization": IMAGENET}),
        robustbench("Salman2020Do_R50", "resnet50", 64.02, 34.96),
        robustbench("Salman2020Do_R18", "resnet18", 52.92, 25.32),
        robustbench("Salman2020Do_50_2", "wide_resnet50_2", 68.46, 38.14),
        robustbench("Engstrom2019Robustness", "resnet50", 62.56, 29.22),
        robustbench("Debenedetti2022Light_XCiT-S12", "timm:xcit_small_12_p16_224", 72.34, 41.78, **xcit),
        robustbench("Debenedetti2022Light_XCiT-M12", "timm:xcit_small_12_p16_224", 74.04, 45.24,
                    options={"embed_dim": 512}, **xcit),
        robustbench("Debenedetti2022Light_XCiT-L12", "timm:xcit_small_12_p16_224", 73.76, 47.60,
                    options={"embed_dim": 768, "num_heads": 16}, **xcit),
        ZooEntry("ARES_ResNet50_AT", "timm:resnet50", filename="ARES_ResNet50_AT.pth", **ares),
        ZooEntry("ARES_ConvNext_Base_AT", "timm:convnext_base", filename="ARES_ConvNext_Base_AT.pth",
                 clean_top1=77.2, robust_top1=56.8, **ares),
        ZooEntry("ARES_ConvNext_Large_AT", "timm:convnext_large", filename="ARES_ConvNext_Large_AT.pth",
                 clean_top1=78.8, robust_top1=60.1, **ares),
        ZooEntry("ARES_Swin_base_patch4_window7_224_AT", "timm:swin_base_patch4_window7_224",
                 filename="ARES_Swin_base_patch4_window7_224_AT.pth", clean_top1=76.6, robust_top1=57.3, **ares),
        ZooEntry("ARES_Swin_large_patch4_window7_224_AT", "timm:swin_large_patch4_window7_224",
                 filename="ARES_Swin_large_patch4_window7_224_AT.pth", clean_top1=79.7, robust_top1=62.3, **ares),
        ZooEntry("ARES_ViT_base_patch16_224_AT", "timm:vit_base_patch16_224",
                 filename="ARES_ViT_base_patch16_224_AT.pth", **ares),
    ]


MANIFEST: dict[str, ZooEntry] = _manifest()
"""Every model the paper released (``resnet50_l2_eps3``, ``resnet18_linf_eps4``) and today's robust ImageNet models
(``Liu2023Comprehensive_Swin-L``, ``Singh2023Revisiting_ConvNeXt-T-ConvStem``, ...), by zoo name."""


def zoo_entry(name: str) -> ZooEntry | None:
    """The manifest entry for ``name`` (``resnet50_l2_eps0_01`` is accepted for ``resnet50_l2_eps0.01``)."""
    if name in MANIFEST:
        return MANIFEST[name]
    for entry in MANIFEST.values():
        if entry.name.replace(".", "_") == name:
            return entry
    return None


"""Decoding image files: any mode to RGB (or gray) uint8 tensors, as the paper's train and test transforms want.

`decode_image` gives a fixed-size square (the centre square at train size, or the test transform);
`read_original` gives the whole image at its own size, for crops drawn from the original (`streaming`).
JPEGs go through TorchCodec's libjpeg-turbo decoder (torchvision.io's successor), about twice as fast as PIL's
here; anything it cannot read (other formats, a PNG named .jpg, a cut-short file) goes through PIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchcodec.decoders import decode_jpeg

from ..errors import RobustTransferError
from .augment import center_crop, eval_resize_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# What PIL raises on a file that is not an image, is cut short, or is a decompression bomb.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
                 Image.DecompressionBombError)


def _scale_to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float gray as 8-bit gray, scaled by the format's range rather than clipped."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        peak = 65535.0
    elif image.mode == "F" and array.size and array.max() <= 1.0:
        peak = 1.0
    else:  # "I" / "F": 16-bit content stored wide, or already 0..255
        peak = 65535.0 if array.size and array.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(array / peak * 255), 0, 255).astype(np.uint8), mode="L")


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """RGB (or L for ``channels == 1``) from any mode; transparency is composited on white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _scale_to_8_bits(image)
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def _loaded(image: Image.Image, channels: int, upright: bool = True) -> Image.Image:
    """An opened image, loaded, turned upright by its EXIF orientation (unless not ``upright``), in RGB (or L)."""
    image.load()
    return _to_mode(ImageOps.exif_transpose(image) if upright else image, channels)


def _open(path: Path, channels: int) -> Image.Image:
    """The file's image, loaded, turned upright by its EXIF orientation and converted to RGB (or L)."""
    with Image.open(path) as image:
        return _loaded(image, channels)


def _as_tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)  # a writable copy, not a view of PIL's buffer
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_image(path: Path, size: int, channels: int, held_out: bool = False) -> torch.Tensor:
    """A uint8 [C, size, size] tensor: for train, the centre square resized to ``size`` (the random crops come
    later); ``held_out`` (validation, test): the paper's test transform as torchvision's Resize(eval_resize_size)
    + CenterCrop(size) gives it, resampled once from the file's pixels rather than again from the train decode."""
    image = _open(path, channels)
    if held_out:
        side, (width, height) = eval_resize_size(size), image.size
        long = int(side * max(width, height) / min(width, height))  # truncated, as torchvision's Resize
        image = image.resize((side, long) if width <= height else (long, side), Image.Resampling.BILINEAR)
    else:
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
    return center_crop(_as_tensor(image), size).contiguous()


def cannot_decode(path: Path, error: Exception, advice: str = "remove or replace the file") -> RobustTransferError:
    """The one-line error for a file that does not decode mid-run (``error``: one of `DECODE_ERRORS`)."""
    return RobustTransferError(f"cannot decode {path} ({type(error).__name__}: {error}): {advice}")


JPEG_SUFFIXES = {".jpg", ".jpeg"}
EXIF_ORIENTATION = 0x0112


def read_original(path: Path, channels: int) -> torch.Tensor:
    """The whole image at its own size as a uint8 [C, H, W] tensor (EXIF orientation applied, as `decode_image`);
    raises one of `DECODE_ERRORS` when the file is not an image."""
    if path.suffix.lower() in JPEG_SUFFIXES:
        try:  # EXIF orientation applied, CMYK and gray converted
            return decode_jpeg(path, mode="GRAY" if channels == 1 else "RGB")
        except RuntimeError:  # not a JPEG libjpeg-turbo takes: PIL decodes it or says why not
            pass
    return _as_tensor(_open(path, channels)).contiguous()


def read_as_stored(path: Path, channels: int) -> torch.Tensor:
    """The whole image as a uint8 [C, H, W] tensor in its stored pixel grid, EXIF orientation not applied: the
    grid that detection datasets' boxes and masks are drawn on (as torchvision's detection references read COCO);
    raises one of `DECODE_ERRORS` when the file is not an image."""
    with Image.open(path) as image:  # reads the header only
        if image.format != "JPEG" or image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            return _as_tensor(_loaded(image, channels, upright=False)).contiguous()
    return read_original(path, channels)  # an upright JPEG: the faster decoder, with nothing to rotate


def read_palette_indices(path: Path) -> torch.Tensor:
    """A palette (or gray) PNG's pixel values as a uint8 [H, W] tensor: VOC's object masks, where value i is the
    i-th object and 255 the void border; raises ValueError for an image of another mode."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"expected a palette PNG of object indices, got an image of mode {image.mode}")
        return torch.from_numpy(np.array(image, dtype=np.uint8))


def read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor (for decoding elsewhere: `decode_jpegs`)."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def decode_jpegs(data: list[torch.Tensor], channels: int, device: torch.device) -> list[torch.Tensor]:
    """JPEG files' bytes decoded together on ``device`` (nvJPEG on a CUDA device) as uint8 [C, H, W] tensors there;
    raises RuntimeError when one of them is not a JPEG the decoder takes."""
    return decode_jpeg(data, mode="GRAY" if channels == 1 else "RGB", device=device)

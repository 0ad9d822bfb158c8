"""Image and mask preprocessing, one function per convention the official codes use.

Every convention is bit-exact with the golden inputs of the method that uses it:

* `squash`: PIL bicubic resize to (S, S), aspect ratio not kept (AnomalyCLIP, APRIL-GAN, AA-CLIP,
  FAPrompt, Bayes-PFL). Their `CenterCrop(S)` afterwards is a no-op and is left out.
* `clip_center`: open_clip's validation transform (shortest side to S, bicubic, centre crop S), the
  plain-CLIP convention of the zero-shot baseline.
* `tensor_squash`: bicubic antialiased resize of the float [0,1] tensor (torchvision on tensors, no
  clamp), as anomalib's WinCLIP does.

Masks: `bilinear` (0/255 image, PIL bilinear resize, > 0.5), `nearest` (PIL nearest resize, != 0)
or `tensor_nearest` (torchvision nearest resize of the 0/1 tensor, anomalib's WinCLIP).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ZsadError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_CONVENTIONS = ("squash", "clip_center", "tensor_squash")
MASK_CONVENTIONS = ("bilinear", "nearest", "tensor_nearest")


class ImageError(ZsadError):
    """An input file that cannot be used as an image; the message names the file and the fix."""


def open_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file when it is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file (check the path)")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable image ({err.__class__.__name__}: {err}); "
                         "pass a PNG/JPEG/BMP/TIFF file or re-export it") from None


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for an 8-bit RGB PIL image: CHW float32 in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """OpenAI mean/std normalisation of a [..., 3, H, W] tensor in [0, 1]."""
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def preprocess_image(img: Image.Image, size: int, convention: str = "squash") -> torch.Tensor:
    """An RGB PIL image -> normalised float32 [3, size, size] under one of IMAGE_CONVENTIONS."""
    if convention == "squash":
        return normalize(_to_tensor(img.resize((size, size), Image.BICUBIC)))
    if convention == "clip_center":
        import torchvision.transforms.functional as TF

        img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC), size)
        return normalize(_to_tensor(img))
    if convention == "tensor_squash":
        import torchvision.transforms.v2.functional as TF

        x = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)  # anomalib read_image (not /255)
        x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return normalize(x)
    raise ValueError(f"unknown image convention {convention!r}; use one of {IMAGE_CONVENTIONS}")


def preprocess_mask(mask: Image.Image | None, size: int, convention: str = "bilinear") -> torch.Tensor:
    """A ground-truth mask (any mode; nonzero = anomalous) -> uint8 {0,1} [size, size]; None -> zeros."""
    if mask is None:
        return torch.zeros(size, size, dtype=torch.uint8)
    binary = Image.fromarray(((np.array(mask.convert("L")) > 0) * 255).astype(np.uint8), mode="L")
    if convention == "bilinear":
        resized = np.array(binary.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy((resized > 0.5).astype(np.uint8))
    if convention == "nearest":
        return torch.from_numpy((np.array(binary.resize((size, size), Image.NEAREST)) != 0).astype(np.uint8))
    if convention == "tensor_nearest":
        import torchvision.transforms.v2.functional as TF

        binary01 = torch.from_numpy((np.array(binary) > 0).astype(np.uint8))[None]
        return TF.resize(binary01, [size, size], interpolation=TF.InterpolationMode.NEAREST)[0]
    raise ValueError(f"unknown mask convention {convention!r}; use one of {MASK_CONVENTIONS}")


def load_images(paths, size: int, convention: str = "squash") -> torch.Tensor:
    """Read and preprocess image files into one [N, 3, size, size] batch (errors name the file)."""
    return torch.stack([preprocess_image(open_image(p), size, convention) for p in paths])

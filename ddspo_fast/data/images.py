"""Images into latents: decode, resize and centre-crop, then the family's VAE.

The preprocessing is the diffusers Diffusion-DPO training script's (without its random
flip): resize so the shorter side fits the target (bilinear, as ``torchvision``'s
``Resize`` does on a PIL image), crop the centre, scale pixels to [-1, 1]. The VAE output
is brought into the denoiser's latent space with the family adapter's scaling and shift
factors (``FamilyAdapter.vae_to_latents``), exactly the space ``prepare``'s sampled
latents are in.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Tuple, Union

import torch

ImageSource = Union[bytes, str, os.PathLike]


class BadImage(ValueError):
    """An image that cannot be read or decoded; the message says why."""


def load_rgb(source: ImageSource):
    """Decode an image file (path) or its bytes into an RGB PIL image.

    Raises :class:`BadImage` with a short reason for a missing, unreadable, truncated or
    undecodable image, whatever the exception the decoder raised.
    """
    from PIL import Image, ImageOps

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImage("empty image bytes")
        opener = lambda: Image.open(io.BytesIO(bytes(source)))  # noqa: E731
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise BadImage("no such file" if not os.path.exists(source) else "not a file")
        opener = lambda: Image.open(source)  # noqa: E731
    else:
        raise BadImage(f"expected image bytes or a path, got {type(source).__name__}")
    try:
        with opener() as img:
            img.load()  # PIL decodes lazily: force it here so a truncated file fails here
            img = ImageOps.exif_transpose(img)  # photos carry their orientation in EXIF
            return img.convert("RGB")
    # A corrupt file can make PIL raise almost anything (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...); every one of them means "this image is unusable".
    except Exception as e:  # noqa: BLE001
        from PIL import UnidentifiedImageError

        if isinstance(e, UnidentifiedImageError):  # its message only names a BytesIO object
            raise BadImage("cannot decode image (not in an image format Pillow knows)") from None
        raise BadImage(f"cannot decode image ({type(e).__name__}: {e})") from None


def resize_center_crop(img, size: Tuple[int, int]):
    """Resize (bilinear) so the image covers ``size`` = (height, width), then crop its centre."""
    from PIL import Image

    th, tw = size
    w, h = img.size
    scale = max(th / h, tw / w)
    nh, nw = max(th, int(h * scale)), max(tw, int(w * scale))  # int() as torchvision's Resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def to_pixels(img) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    import numpy as np

    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def image_pixels(source: ImageSource, size: Tuple[int, int]) -> torch.Tensor:
    """Decode, resize, centre-crop and normalise one image: (3, H, W) in [-1, 1]."""
    return to_pixels(resize_center_crop(load_rgb(source), size))


LATENT_MODES = ("sample", "mean")


@torch.no_grad()
def vae_encode(adapter, pixels: torch.Tensor, *, mode: str = "sample",
               generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Encode pixels (n, 3, H, W) in [-1, 1] with the adapter's VAE into the denoiser's
    latent space (float32, on the CPU).

    ``mode="sample"`` draws from the VAE posterior as the Diffusion-DPO and DreamBooth
    scripts do (one generator per row makes it reproducible and independent of the
    batch); ``"mean"`` takes its mean. A VAE with a deterministic encoder (SANA's DC-AE)
    ignores ``mode``.
    """
    if mode not in LATENT_MODES:
        raise ValueError(f"latent: expected one of {LATENT_MODES}, got {mode!r}")
    vae = getattr(adapter.pipe, "vae", None)
    if vae is None:
        raise ValueError(f"this {adapter.name} adapter was loaded without its VAE")
    x = adapter.vae_pixels(pixels.to(device=vae.device, dtype=vae.dtype))
    out = vae.encode(x)
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        if mode == "sample":
            gens = list(generators) if generators is not None else None
            z = dist.sample(generator=gens)
        else:
            z = dist.mode()
    else:
        z = out.latent
    return adapter.vae_to_latents(z.float()).cpu()


def family_resolution(adapter) -> Tuple[int, int]:
    """(height, width) in pixels of the family's native-resolution latents."""
    return adapter.native_resolution()

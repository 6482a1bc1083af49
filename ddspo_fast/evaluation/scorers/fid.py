"""FID (Heusel et al. 2017) of a set of generated images against a folder of reference
images: ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` over the features of the
two sets, computed by torchmetrics' ``FrechetInceptionDistance``. The features are the
2048-d pool features of the TF-Inception v3 the published FID uses, as torch-fidelity
ports it (``pt_inception-2015-12-05-6726825d.pth``, loaded from the local file you name
through ``feature_extractor_weights_path``; images resized to 299 as TF did). One number
per image set, lower is better: no per-prompt scores, no win rate.

Needs ``torchmetrics`` and ``torch-fidelity`` (which needs a torchvision built for your
torch); tests pass their own feature module instead of the Inception network.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
WHAT = "the FID Inception weights file (pt_inception-2015-12-05-6726825d.pth)"


def _metric(feature):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ValueError("fid: needs torchmetrics (pip install torchmetrics torch-fidelity)") from e
    return FrechetInceptionDistance(feature=feature, reset_real_features=False)


def _as_uint8(image):
    import numpy as np
    import torch

    a = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)


class FID:
    name = "fid"
    higher_is_better = False

    def __init__(self, weights, reference_dir, device="cpu"):
        """``weights``: the Inception file, or (tests, the Python API) a torch module mapping
        uint8 images (N, 3, H, W) to features."""
        import torch
        from PIL import Image

        ref = Path(reference_dir) if reference_dir is not None else None
        if ref is None or not ref.is_dir():
            raise ValueError(f"fid_reference: {ref} is not a folder (expected a folder of "
                             "reference images)")
        files = sorted(p for p in ref.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise ValueError(f"fid_reference: {ref} holds {len(files)} image(s); FID needs at "
                             "least 2 (thousands for a meaningful value)")
        if isinstance(weights, torch.nn.Module):
            feature = weights
        else:
            if weights is None or not Path(weights).is_file():
                raise ValueError(f"fid: {weights} is not a file (expected {WHAT})")
            try:
                import torch_fidelity  # noqa: F401
            except ImportError as e:
                raise ValueError("fid: the Inception network needs torch-fidelity (pip install "
                                 "torch-fidelity, with a torchvision built for your torch)") from e
            from torchmetrics.image.fid import FrechetInceptionDistance

            feature = FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=str(weights)).inception
        self.metric = _metric(feature).to(device)
        self.device = device
        for f in files:
            try:
                with Image.open(f) as im:
                    x = _as_uint8(im)
            except (OSError, ValueError) as e:
                raise ValueError(f"fid_reference: {f} is not a readable image ({type(e).__name__})") from e
            self.metric.update(x.to(device), real=True)
        self.reference_images = len(files)

    def score_set(self, images) -> float:
        if len(images) < 2:
            raise ValueError("fid: needs at least 2 generated images (use more prompts or "
                             "--num-images-per-prompt)")
        self.metric.reset()  # keeps the reference features (reset_real_features=False)
        for im in images:
            self.metric.update(_as_uint8(im).to(self.device), real=False)
        return float(self.metric.compute())

"""Each scorer against an independent computation of its upstream formula, on tiny random
weights built here (nothing downloaded): a fixed image and prompt, fp32 rounding."""

import math

import pytest
import torch

from ddspo_fast.demo.tinyclip import make_tiny_clip
from ddspo_fast.evaluation.scorers import load_scorer

PROMPTS = ["a photo of a cat", "a red car on the street"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("scorers") / "clip", seed=1)


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in PROMPTS]


def _upstream_logits(clip_dir, images, prompts):
    """CLIPModel's own forward: logits_per_image[k, k] = exp(logit_scale) * cos(image k, text k)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    inputs = tok(prompts, padding=True, return_tensors="pt")
    pix = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=pix)
    return model, pix, out.logits_per_image.diagonal().double()


def test_clip_score_is_100_max_cos_0(clip_dir, images):
    model, _, logits = _upstream_logits(clip_dir, images, PROMPTS)
    cos = logits / model.logit_scale.exp().double()
    want = [100 * max(c, 0.0) for c in cos.tolist()]
    got = load_scorer("clip", {"clip": clip_dir}).score(images, PROMPTS)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert len(set(round(c, 6) for c in cos.tolist())) == 2  # a real check: two distinct values


def test_pickscore_is_scaled_cosine(clip_dir, images):
    # PickScore_v1's model card: logit_scale.exp() * (text_emb @ image_emb.T), i.e. CLIP's
    # own logits_per_image, paired image k with prompt k
    _, _, logits = _upstream_logits(clip_dir, images, PROMPTS)
    got = load_scorer("pickscore", {"pickscore": clip_dir}).score(images, PROMPTS)
    assert got == pytest.approx(logits.tolist(), rel=1e-4, abs=1e-4)


def _mlp_state(width, seed=3):
    g = torch.Generator().manual_seed(seed)
    dims = [width, 1024, 128, 64, 16, 1]
    sd = {}
    for k, idx in enumerate((0, 2, 4, 6, 7)):
        sd[f"layers.{idx}.weight"] = torch.randn(dims[k + 1], dims[k], generator=g) / math.sqrt(dims[k])
        sd[f"layers.{idx}.bias"] = torch.randn(dims[k + 1], generator=g) * 0.1
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_is_mlp_of_normalised_image_embedding(clip_dir, images, tmp_path, suffix):
    from transformers import CLIPModel

    model, pix, _ = _upstream_logits(clip_dir, images, PROMPTS)
    sd = _mlp_state(model.config.projection_dim)
    f = tmp_path / f"aesthetic{suffix}"
    if suffix == ".pth":
        torch.save(sd, f)  # what the upstream file is: a torch.save'd state dict
    else:
        from safetensors.torch import save_file

        save_file(sd, str(f))
    with torch.no_grad():  # simple_inference.py: normalized(encode_image(x)) through the MLP
        v = model.vision_model(pixel_values=pix).pooler_output @ model.visual_projection.weight.T
        x = (v / v.norm(dim=-1, keepdim=True)).double()
        for idx in (0, 2, 4, 6, 7):  # Linear layers, dropouts are the identity, no activation
            x = x @ sd[f"layers.{idx}.weight"].double().T + sd[f"layers.{idx}.bias"].double()
    got = load_scorer("aesthetic", {"aesthetic": f, "clip": clip_dir}).score(images, PROMPTS)
    assert got == pytest.approx(x.squeeze(-1).tolist(), rel=1e-4, abs=1e-5)


def test_aesthetic_refuses_an_mlp_for_another_clip(clip_dir, tmp_path):
    f = tmp_path / "mlp.pth"
    torch.save(_mlp_state(768), f)
    with pytest.raises(ValueError, match="aesthetic: .*768.*ViT-L/14"):
        load_scorer("aesthetic", {"aesthetic": f, "clip": clip_dir})


def test_checkpoints_load_without_unpickling_code(tmp_path):
    # a pickle that would run code is refused (weights_only=True), naming the file
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": Evil()}, f)
    with pytest.raises(ValueError, match="aesthetic: cannot read weights from .*evil.pth"):
        load_scorer("aesthetic", {"aesthetic": f, "clip": tmp_path})


@pytest.mark.parametrize("make, fragment", [
    (lambda d: None, "does not exist"),
    (lambda d: (d.mkdir(), (d / "model_index.json").write_text("{}")), "diffusers pipeline folder"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "clip_text_model"}')),
     "CLIP text encoder alone"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "bert"}')), "'bert'"),
    (lambda d: d.mkdir(), "no config.json"),
])
@pytest.mark.parametrize("metric", ["clip", "pickscore"])
def test_wrong_scorer_folders_are_named(tmp_path, make, fragment, metric):
    d = tmp_path / "weights"
    make(d)
    with pytest.raises(ValueError, match=f"^{metric}: .*{fragment}"):
        load_scorer(metric, {metric: d})


@pytest.mark.parametrize("metric", ["hpsv2", "imagereward"])
def test_scorers_not_yet_available_say_so(metric):
    with pytest.raises(ValueError, match=f"^{metric}: not available in this version"):
        load_scorer(metric, {})

"""Each scorer against an independent computation of its upstream formula, on tiny random
weights built here (nothing downloaded): a fixed image and prompt, fp32 rounding."""

import json
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


def _open_clip_state(vocab, seed=7, wv=160, wt=128, embed=16, patch=8, size=32, layers=2, ctx=77):
    """A random open_clip CLIP state dict (ViT-H-14's layout at a tiny size)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    sd = {"token_embedding.weight": r(vocab, wt), "positional_embedding": r(ctx, wt),
          "ln_final.weight": 1 + r(wt), "ln_final.bias": r(wt), "text_projection": r(wt, embed),
          "logit_scale": torch.tensor(math.log(100.0)),
          "visual.conv1.weight": r(wv, 3, patch, patch), "visual.class_embedding": r(wv),
          "visual.positional_embedding": r((size // patch) ** 2 + 1, wv), "visual.proj": r(wv, embed)}
    for ln in ("visual.ln_pre", "visual.ln_post"):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(wv), r(wv)
    for pre, w in (("", wt), ("visual.", wv)):
        for i in range(layers):
            b = f"{pre}transformer.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = 1 + r(w), r(w)
            sd[f"{b}attn.in_proj_weight"], sd[f"{b}attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
            sd[f"{b}attn.out_proj.weight"], sd[f"{b}attn.out_proj.bias"] = r(w, w), r(w)
            sd[f"{b}mlp.c_fc.weight"], sd[f"{b}mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
            sd[f"{b}mlp.c_proj.weight"], sd[f"{b}mlp.c_proj.bias"] = r(w, 4 * w), r(w)
    return sd


def _open_clip_forward(sd, pix, ids, vision_heads, text_heads):
    """open_clip's CLIP.forward written out: residual blocks of nn.MultiheadAttention and a
    GELU MLP; text pooled at the argmax token (EOT), vision at the class token."""
    import torch.nn.functional as F

    def blocks(x, pre, heads, mask=None):
        i = 0
        while f"{pre}transformer.resblocks.{i}.ln_1.weight" in sd:
            b = f"{pre}transformer.resblocks.{i}."
            w = x.shape[-1]
            mha = torch.nn.MultiheadAttention(w, heads, batch_first=True)
            mha.load_state_dict({"in_proj_weight": sd[b + "attn.in_proj_weight"],
                                 "in_proj_bias": sd[b + "attn.in_proj_bias"],
                                 "out_proj.weight": sd[b + "attn.out_proj.weight"],
                                 "out_proj.bias": sd[b + "attn.out_proj.bias"]})
            mha.eval()
            h = F.layer_norm(x, (w,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
            x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (w,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
            h = F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
            x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
            i += 1
        return x

    with torch.no_grad():
        L = ids.shape[1]
        mask = torch.full((L, L), float("-inf")).triu(1)
        t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
        t = blocks(t, "", text_heads, mask)
        t = F.layer_norm(t, (t.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
        t = t[torch.arange(t.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
        x = F.conv2d(pix, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
        x = F.layer_norm(x, (x.shape[-1],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
        x = blocks(x, "visual.", vision_heads)
        v = F.layer_norm(x[:, 0], (x.shape[-1],), sd["visual.ln_post.weight"],
                         sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    return F.normalize(t, dim=-1), F.normalize(v, dim=-1)


def _open_clip_val_transform(img, size):
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    a = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float64) / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    assert scale > 0
    return torch.from_numpy(((a - mean) / std).transpose(2, 0, 1)).float()


def test_hpsv2_is_open_clip_cosine(clip_dir, images, tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip_dir)
    sd = _open_clip_state(len(tok))
    f = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": sd}, f)  # the layout of the published checkpoint
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    eot = tok.eos_token_id
    ids = torch.where(torch.cumsum((ids == eot).int(), 1) - (ids == eot).int() > 0, 0, ids)  # open_clip pads with 0
    pix = torch.stack([_open_clip_val_transform(im, 32) for im in images])
    t, v = _open_clip_forward(sd, pix, ids, vision_heads=2, text_heads=2)
    want = (t * v).sum(-1)  # hpsv2 img_score.py: diag(image_features @ text_features.T)
    from ddspo_fast.evaluation.scorers.hpsv2 import HPSv2

    got = HPSv2(f, tokenizer=clip_dir).score(images, PROMPTS)
    assert got == pytest.approx(want.tolist(), abs=2e-5)
    assert abs(got[0] - got[1]) > 1e-4
    via_registry = load_scorer("hpsv2", {"hpsv2": f, "clip": clip_dir}).score(images, PROMPTS)
    assert via_registry == pytest.approx(got, abs=1e-6)


def test_hpsv2_refuses_other_files(clip_dir, tmp_path):
    f = tmp_path / "not_clip.pt"
    torch.save({"state_dict": {"layers.0.weight": torch.zeros(2, 2)}}, f)
    with pytest.raises(ValueError, match="hpsv2: not an open_clip CLIP state dict"):
        load_scorer("hpsv2", {"hpsv2": f, "clip": clip_dir})
    with pytest.raises(ValueError, match="hpsv2: .* is a folder"):
        load_scorer("hpsv2", {"hpsv2": tmp_path, "clip": clip_dir})


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "red",
              "car", "on", "the", "street"]


def imagereward_folder(root, seed=11, text_w=32, vis_w=128, layers=2, patch=16, size=32):
    """A tiny ImageReward folder in the upstream layout: ImageReward.pt (BLIP key names),
    med_config.json, a bert tokenizer (vocab.txt)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    vocab = len(BERT_WORDS) + 2  # + BLIP's [DEC] and [ENC]
    med = {"vocab_size": vocab, "hidden_size": text_w, "num_hidden_layers": layers,
           "num_attention_heads": 2, "intermediate_size": 2 * text_w, "max_position_embeddings": 40,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0, "encoder_width": vis_w,
           "add_cross_attention": True, "model_type": "bert"}
    (root / "med_config.json").write_text(json.dumps(med))
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": r(1, 1, vis_w), v + "pos_embed": r(1, (size // patch) ** 2 + 1, vis_w),
          v + "patch_embed.proj.weight": r(vis_w, 3, patch, patch), v + "patch_embed.proj.bias": r(vis_w),
          v + "norm.weight": 1 + r(vis_w), v + "norm.bias": r(vis_w),
          t + "embeddings.word_embeddings.weight": r(vocab, text_w),
          t + "embeddings.position_embeddings.weight": r(40, text_w),
          t + "embeddings.LayerNorm.weight": 1 + r(text_w), t + "embeddings.LayerNorm.bias": r(text_w)}
    for i in range(layers):
        b = f"{v}blocks.{i}."
        for name, shape in (("norm1", None), ("norm2", None), ("attn.qkv", (3 * vis_w, vis_w)),
                            ("attn.proj", (vis_w, vis_w)), ("mlp.fc1", (4 * vis_w, vis_w)),
                            ("mlp.fc2", (vis_w, 4 * vis_w))):
            sd[b + name + ".weight"] = 1 + r(vis_w) if shape is None else r(*shape)
            sd[b + name + ".bias"] = r(vis_w if shape is None else shape[0])
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", text_w), ("crossattention", vis_w)):
            sd[b + att + ".self.query.weight"], sd[b + att + ".self.query.bias"] = r(text_w, text_w), r(text_w)
            for k in ("key", "value"):
                sd[f"{b}{att}.self.{k}.weight"], sd[f"{b}{att}.self.{k}.bias"] = r(text_w, kv_in), r(text_w)
            sd[b + att + ".output.dense.weight"], sd[b + att + ".output.dense.bias"] = r(text_w, text_w), r(text_w)
            sd[b + att + ".output.LayerNorm.weight"], sd[b + att + ".output.LayerNorm.bias"] = 1 + r(text_w), r(text_w)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = r(2 * text_w, text_w), r(2 * text_w)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = r(text_w, 2 * text_w), r(text_w)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + r(text_w), r(text_w)
    sd.update({f"mlp.{k}": x for k, x in _mlp_state(text_w, seed=seed).items()})
    torch.save(sd, root / "ImageReward.pt")
    return root, sd


def _blip_reward(sd, pix, ids, mask, text_heads=2, vis_heads=2):
    """ImageReward.score written out: BLIP ViT (fused qkv, eps 1e-6) -> BERT with
    cross-attention to every image token (eps 1e-12) -> [CLS] -> MLP -> standardise."""
    import torch.nn.functional as F

    def mha(q_in, kv_in, p, heads, key_mask=None):
        q = F.linear(q_in, sd[p + "query.weight"], sd[p + "query.bias"])
        k = F.linear(kv_in, sd[p + "key.weight"], sd[p + "key.bias"])
        v = F.linear(kv_in, sd[p + "value.weight"], sd[p + "value.bias"])
        B, L, D = q.shape
        sh = lambda x: x.view(B, -1, heads, D // heads).transpose(1, 2)  # noqa: E731
        s = sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(D // heads)
        if key_mask is not None:
            s = s + (1.0 - key_mask[:, None, None, :].float()) * -10000.0
        return (s.softmax(-1) @ sh(v)).transpose(1, 2).reshape(B, L, D)

    with torch.no_grad():
        v = "blip.visual_encoder."
        w = sd[v + "patch_embed.proj.weight"]
        x = F.conv2d(pix, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
        x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
        i = 0
        while f"{v}blocks.{i}.norm1.weight" in sd:
            b = f"{v}blocks.{i}."
            D = x.shape[-1]
            h = F.layer_norm(x, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
            q, k, vv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
            sh = lambda y: y.view(y.shape[0], -1, vis_heads, D // vis_heads).transpose(1, 2)  # noqa: E731
            a = (sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(D // vis_heads)).softmax(-1) @ sh(vv)
            x = x + F.linear(a.transpose(1, 2).reshape(x.shape), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
            h = F.layer_norm(x, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
            x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                             sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
            i += 1
        img = F.layer_norm(x, (x.shape[-1],), sd[v + "norm.weight"], sd[v + "norm.bias"], 1e-6)

        t = "blip.text_encoder."
        D = sd[t + "embeddings.word_embeddings.weight"].shape[1]
        ln = lambda y, p: F.layer_norm(y, (D,), sd[p + ".weight"], sd[p + ".bias"], 1e-12)  # noqa: E731
        x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
        x = ln(x, t + "embeddings.LayerNorm")
        i = 0
        while f"{t}encoder.layer.{i}.attention.self.query.weight" in sd:
            b = f"{t}encoder.layer.{i}."
            for att, kv, m in (("attention", None, mask), ("crossattention", img, None)):
                a = mha(x, x if kv is None else kv, b + att + ".self.", text_heads, m)
                x = ln(F.linear(a, sd[b + att + ".output.dense.weight"], sd[b + att + ".output.dense.bias"]) + x,
                       b + att + ".output.LayerNorm")
            h = F.gelu(F.linear(x, sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"]))
            x = ln(F.linear(h, sd[b + "output.dense.weight"], sd[b + "output.dense.bias"]) + x, b + "output.LayerNorm")
            i += 1
        y = x[:, 0].double()
        for idx in (0, 2, 4, 6, 7):
            y = y @ sd[f"mlp.layers.{idx}.weight"].double().T + sd[f"mlp.layers.{idx}.bias"].double()
    return ((y.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).tolist()


def test_imagereward_is_blip_reward(images, tmp_path):
    from transformers import BertTokenizer

    folder, sd = imagereward_folder(tmp_path / "ImageReward")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pix = torch.stack([_open_clip_val_transform(im, 32) for im in images])
    want = _blip_reward(sd, pix, enc["input_ids"], enc["attention_mask"])
    got = load_scorer("imagereward", {"imagereward": folder}).score(images, PROMPTS)
    assert got == pytest.approx(want, abs=2e-5)
    assert abs(got[0] - got[1]) > 1e-4


def test_imagereward_refuses_incomplete_folders(tmp_path):
    folder, _ = imagereward_folder(tmp_path / "ir")
    (folder / "med_config.json").unlink()
    with pytest.raises(ValueError, match="imagereward: cannot read .*med_config.json"):
        load_scorer("imagereward", {"imagereward": folder})
    with pytest.raises(ValueError, match="imagereward: .* is a file"):
        load_scorer("imagereward", {"imagereward": folder / "ImageReward.pt"})


class _PoolFeatures(torch.nn.Module):
    """A stand-in feature network (uint8 images -> 6 features) for FID's arithmetic."""

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def _frechet(a, b):
    """Heusel et al.'s FID between two feature sets, written with numpy / scipy."""
    import numpy as np
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_is_the_frechet_distance_of_the_two_sets(tmp_path):
    pytest.importorskip("torchmetrics", reason="FID uses torchmetrics (pip install torchmetrics)")
    import numpy as np
    from PIL import Image

    from ddspo_fast.evaluation.scorers.fid import FID

    g = torch.Generator().manual_seed(2)
    mk = lambda: Image.fromarray((torch.rand(16, 16, 3, generator=g) ** 2 * 255).to(torch.uint8).numpy())  # noqa: E731
    ref = [mk() for _ in range(9)]
    gen = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(8)]
    for i, im in enumerate(ref):
        im.save(tmp_path / f"{i}.png")
    fid = FID(_PoolFeatures(), tmp_path)
    feats = lambda ims: torch.cat([_PoolFeatures()(torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None])  # noqa: E731
                                   for im in ims]).double().numpy()
    want = _frechet(feats(ref), feats(gen))
    assert fid.reference_images == 9
    assert fid.score_set(gen) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert fid.score_set(ref) == pytest.approx(0.0, abs=1e-4)  # the reference set itself


def test_fid_bad_input_is_named(tmp_path):
    pytest.importorskip("torchmetrics", reason="FID uses torchmetrics (pip install torchmetrics)")
    from ddspo_fast.evaluation.scorers.fid import FID

    with pytest.raises(ValueError, match="fid_reference: .* holds 0 image"):
        FID(_PoolFeatures(), tmp_path)
    with pytest.raises(ValueError, match="fid_reference: .* is not a folder"):
        FID(_PoolFeatures(), tmp_path / "missing")

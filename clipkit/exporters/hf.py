"""``--format hf``: a HuggingFace ``transformers`` ``CLIPModel`` folder (config.json, model.safetensors,
CLIP BPE tokenizer files, preprocessor_config.json) for models built from the builtin ViT and text
transformer in OpenCLIP's layout, checked by loading it back with ``CLIPModel.from_pretrained``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import ExportError
from ..kinds import TEXT_TOWER, TOKENIZER, VISION_TOWER

#: the largest difference from clipkit's fp32 features the written model may show
TOLERANCE = 1e-5
#: ``CLIPTextConfig.eos_token_id == 2`` makes CLIPModel pool at the argmax of the ids, as CLIP's own
#: ``pool_type='argmax'`` does (transformers keeps that value for OpenAI's configs); any other id pools at
#: the first occurrence of that id, which is clipkit's ``pool_type='eos'``
_ARGMAX_EOS = 2
_BLOCK_DEFAULTS = {"ls_init_value": None, "act_kwargs": None, "norm_kwargs": None, "block_type": None,
                   "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                   "scale_attn": False, "scale_fc": False}
_VISION_DEFAULTS = {"attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable", "pool_type": "tok"}
_TEXT_DEFAULTS = {"embed_cls": False, "no_causal_mask": False, "proj_type": "linear", "proj_bias": False}
_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _clip_bpe(context_length: int) -> Any:
    """CLIP's BPE tokenizer as the registry provides it (its vocabulary is what the folder ships)."""
    from ..registry import registry

    return registry.get(TOKENIZER, "clip").load()({}, context_length)


def _unexpressible(label: str, cfg: Any, defaults: Dict[str, Any]) -> Optional[str]:
    for key, value in defaults.items():
        if getattr(cfg, key) != value:
            return f"{label}.{key} is {getattr(cfg, key)!r}; CLIPModel has no equivalent of anything but {value!r}"
    return None


class HFExporter:
    """Writes a folder ``transformers.CLIPModel.from_pretrained`` loads offline."""

    def supports(self, model: Any) -> Optional[str]:
        """``None`` for the builtin ViT + text transformer with CLIP's layout and tokenizer; else why not."""
        config = getattr(model, "model_config", None)
        if config is None:
            return "it is not a clipkit ClipModel (no model_config)"
        if config.vision_type != "vit":
            return f"its {VISION_TOWER} is {config.vision_type!r}; CLIPModel holds only the builtin ViT"
        if config.text_type != "transformer":
            return f"its {TEXT_TOWER} is {config.text_type!r}; CLIPModel holds only the builtin text transformer"
        reason = (_unexpressible("vision_cfg", config.vision, {**_BLOCK_DEFAULTS, **_VISION_DEFAULTS})
                  or _unexpressible("text_cfg", config.text, {**_BLOCK_DEFAULTS, **_TEXT_DEFAULTS}))
        if reason:
            return reason
        if config.text.pool_type not in ("argmax", "eos"):
            return f"text_cfg.pool_type is {config.text.pool_type!r}; CLIPModel pools at the end token only"
        if config.text.pool_type == "eos" and config.text.eos_id == _ARGMAX_EOS:
            return f"text_cfg.eos_id {_ARGMAX_EOS} with pool_type 'eos': CLIPModel reads that id as argmax pooling"
        vision = config.vision
        if vision.width % vision.head_width:
            return f"vision_cfg.width {vision.width} is not a multiple of head_width {vision.head_width}"
        for key in ("image_size", "patch_size"):
            value = getattr(vision, key)
            if isinstance(value, (list, tuple)) and len(set(value)) > 1:
                return f"vision_cfg.{key} {value} is not square; CLIPModel takes one size"
        if config.top.nonscalar_logit_scale:
            return "nonscalar_logit_scale is set; CLIPModel's logit_scale is a scalar"
        if getattr(model, "logit_bias", None) is not None:
            return "it has a logit_bias (SigLIP-style); CLIPModel has none"
        if config.tokenizer_name != "clip" or config.tokenizer.tokenizer_kwargs:
            return (f"its tokenizer is {config.tokenizer_name!r} with {config.tokenizer.tokenizer_kwargs or {}}; "
                    f"the folder's tokenizer is CLIP's BPE with default options")
        vocab = _clip_bpe(config.text.context_length).vocab_size
        if config.text.vocab_size != vocab:
            return f"text_cfg.vocab_size is {config.text.vocab_size}, not CLIP BPE's {vocab}"
        return None

    def export(self, model: Any, out: Path) -> List[str]:
        """Write the folder, load it back with transformers and compare image and text features."""
        try:
            import transformers
        except ImportError:
            raise ExportError("--format hf needs the package 'transformers': pip install clipkit-torch[hf]") from None
        model = model.float().eval()
        config = model.model_config
        hf_config = transformers.CLIPConfig(text_config=_text_config(config), vision_config=_vision_config(config),
                                            projection_dim=config.top.embed_dim,
                                            logit_scale_init_value=float(model.logit_scale.detach()))
        hf_model = transformers.CLIPModel(hf_config).eval()
        missing, unexpected = hf_model.load_state_dict(_state_dict(model), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer CLIPModel fills itself
        if missing or unexpected:
            raise ExportError(f"the weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
        hf_model.save_pretrained(str(out), safe_serialization=True)
        _write_tokenizer(out, config.text.context_length)
        _write_preprocessor(out, model.visual.preprocess_cfg)
        diff = _check(model, out, transformers)
        return [f"wrote {out}: a transformers CLIPModel folder (config.json, model.safetensors, vocab.json, merges.txt, "
                f"tokenizer and preprocessor configs)",
                f"CLIPModel.from_pretrained matches clipkit on images and padded texts (max abs diff {diff:.2e})"]


def _act(config: Any) -> str:
    return "quick_gelu" if config.top.quick_gelu else "gelu"


def _text_config(config: Any) -> Dict[str, Any]:
    text = config.text
    bpe = _clip_bpe(text.context_length)
    return {"vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length, "hidden_act": _act(config), "layer_norm_eps": 1e-5,
            "projection_dim": config.top.embed_dim, "pad_token_id": bpe.eot_token_id, "bos_token_id": bpe.sot_token_id,
            "eos_token_id": _ARGMAX_EOS if text.pool_type == "argmax" else text.eos_id}


def _vision_config(config: Any) -> Dict[str, Any]:
    vision = config.vision
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return {"hidden_size": vision.width, "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers, "num_attention_heads": vision.width // vision.head_width,
            "image_size": size, "patch_size": patch, "num_channels": 3, "hidden_act": _act(config),
            "layer_norm_eps": 1e-5, "projection_dim": config.top.embed_dim}


def _blocks(prefix: str, transformer: Any) -> Dict[str, torch.Tensor]:
    out = {}
    for i, block in enumerate(transformer.resblocks):
        layer = f"{prefix}.encoder.layers.{i}"
        # the fused in-projection holds query, key and value rows in that order
        for name, weight, bias in zip(("q", "k", "v"), block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
            out[f"{layer}.self_attn.{name}_proj.weight"], out[f"{layer}.self_attn.{name}_proj.bias"] = weight, bias
        for theirs, ours in (("self_attn.out_proj", block.attn.out_proj), ("layer_norm1", block.ln_1),
                             ("mlp.fc1", block.mlp.c_fc), ("mlp.fc2", block.mlp.c_proj), ("layer_norm2", block.ln_2)):
            out[f"{layer}.{theirs}.weight"], out[f"{layer}.{theirs}.bias"] = ours.weight, ours.bias
    return out


def _state_dict(model: Any) -> Dict[str, torch.Tensor]:
    visual, text = model.visual, model.text
    sd = {"logit_scale": model.logit_scale,
          "visual_projection.weight": visual.proj.T,
          "text_projection.weight": text.text_projection.T,
          "vision_model.embeddings.class_embedding": visual.class_embedding,
          "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
          "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
          "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
          "vision_model.post_layernorm.weight": visual.ln_post.weight,
          "vision_model.post_layernorm.bias": visual.ln_post.bias,
          "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
          "text_model.embeddings.position_embedding.weight": text.positional_embedding,
          "text_model.final_layer_norm.weight": text.ln_final.weight,
          "text_model.final_layer_norm.bias": text.ln_final.bias,
          **_blocks("vision_model", visual.transformer), **_blocks("text_model", text.transformer)}
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _write_tokenizer(out: Path, context_length: int) -> None:
    """CLIP's BPE as transformers' CLIPTokenizer reads it, the special tokens under the names transformers'
    CLIP files use. It pads with the end token, not with clipkit's id 0: a pad token is never split, and id 0
    is ``!``, which texts contain. Ids after the first end token change no feature (the text transformer's
    mask is causal and pooling reads the first end token), so features equal clipkit's either way."""
    bpe = _clip_bpe(context_length)
    vocab = {_SPECIALS.get(token, token): i for token, i in bpe.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(bpe.ranks, key=bpe.ranks.__getitem__)
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
         "errors": "replace", **special}, indent=2))


def _write_preprocessor(out: Path, cfg: Dict[str, Any]) -> None:
    size = cfg["size"][0] if isinstance(cfg["size"], (list, tuple)) else cfg["size"]
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
         "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg["mean"]), "image_std": list(cfg["std"]),
         "resample": _RESAMPLE.get(cfg.get("interpolation", "bicubic"), 3), "do_convert_rgb": True}, indent=2))


def _check(model: Any, out: Path, transformers: Any) -> float:
    """Load the folder as a user would (offline) and return the largest feature difference."""
    loaded = transformers.CLIPModel.from_pretrained(str(out), local_files_only=True).eval()
    size = model.model_config.vision.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # one short text (mostly padding) and one that fills the context
    texts = _clip_bpe(model.text.context_length)(["a photo of a cat", "a diagram " * 40])
    with torch.no_grad():
        pairs = [(model.encode_image(images), loaded.get_image_features(pixel_values=images)),
                 (model.encode_text(texts), loaded.get_text_features(input_ids=texts))]
    diffs = []
    for ours, theirs in pairs:
        theirs = getattr(theirs, "pooler_output", theirs)  # transformers 5 returns an output object
        diffs.append(float((ours - theirs).abs().max()))
    diff = max(diffs)
    if not diff <= TOLERANCE:
        raise ExportError(f"{out}: CLIPModel's features differ from clipkit's by {diff:.3g} (allowed {TOLERANCE:g})")
    return diff

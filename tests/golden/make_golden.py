"""Regenerate the golden outputs (only when a numeric change is intended, and say so in the commit).

    python tests/golden/make_golden.py

For each config in CONFIGS: seed 0, build with clipkit, feed seeded inputs, store the features.
"""
import json
from pathlib import Path

import torch

import clipkit

HERE = Path(__file__).parent
BASE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
CONFIGS = {
    "tiny-vit": {},
    "tiny-clipa": {"vision_cfg": {"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
                   "text_cfg": {"no_causal_mask": True, "pool_type": "last", "proj_bias": True}},
    "tiny-quickgelu-ls": {"quick_gelu": True, "init_logit_bias": -10.0,
                          "vision_cfg": {"ls_init_value": 0.1, "attentional_pool": True, "attn_pooler_queries": 4,
                                         "attn_pooler_heads": 2},
                          "text_cfg": {"ls_init_value": 0.1}},
}
TEXTS = ["a photo of a cat", "a diagram", "Héllo wörld 😀"]


def config(name):
    cfg = json.loads(json.dumps(BASE))
    for key, value in CONFIGS[name].items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def compute(name, tmp):
    path = Path(tmp) / f"{name}.json"
    path.write_text(json.dumps(config(name)))
    torch.manual_seed(0)
    model = clipkit.create_model(str(path)).eval()
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 32, 32, generator=generator)
    text = clipkit.tokenize(TEXTS, context_length=12)
    with torch.no_grad():
        return {"image": model.encode_image(image).tolist(), "text": model.encode_text(text).tolist(),
                "tokens": text.tolist()}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        golden = {name: compute(name, tmp) for name in CONFIGS}
    (HERE / "outputs.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {HERE / 'outputs.json'}")

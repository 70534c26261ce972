"""Build a small CLIP model from a JSON config and embed the handwritten-digits images.

    python examples/quickstart.py
"""
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image
from sklearn.datasets import load_digits

import clipkit

config = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 256, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
folder = Path(tempfile.mkdtemp())
(folder / "digits-clip.json").write_text(json.dumps(config, indent=2))
clipkit.add_model_config(folder)

model, preprocess_train, preprocess = clipkit.create_model_and_transforms("digits-clip", pretrained=None)
model.eval()
print(f"model digits-clip: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
      f"towers {model.vision_type!r} + {model.text_type!r}")

digits = load_digits()
images = [Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).convert("RGB") for i in range(16)]
batch = torch.stack([preprocess(img) for img in images])
tokenizer = clipkit.get_tokenizer("digits-clip")
captions = [f"a handwritten digit {int(d)}" for d in digits.target[:16]]
text = tokenizer(captions)

with torch.no_grad():
    image_features, text_features, logit_scale = model(batch, text)
print(f"images {tuple(batch.shape)} -> image embeddings {tuple(image_features.shape)}")
print(f"texts {tuple(text.shape)} -> text embeddings {tuple(text_features.shape)}  (e.g. {captions[0]!r})")
print(f"logit scale {logit_scale.item():.2f}; image-text similarity matrix {tuple((image_features @ text_features.T).shape)}")

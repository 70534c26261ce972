"""``--format onnx``: the image and text encoders as two ONNX files with a dynamic batch axis, each
checked with onnxruntime against the torch model right after it is written."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, cast

import torch
from torch import nn

from ..errors import ExportError

#: the largest difference from torch's fp32 features an export may show
TOLERANCE = 1e-4
_INSTALL = "pip install clipkit-torch[export]"


class _Encoder(nn.Module):
    """One encoder of the model as a module of its own, so each ONNX file holds one graph."""

    def __init__(self, model: nn.Module, image: bool) -> None:
        super().__init__()
        self.model = model
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every assembled model has both encoders; nn.Module types unknown attributes as Tensor | Module
        encode = cast(Callable[[torch.Tensor], torch.Tensor],
                      self.model.encode_image if self.image else self.model.encode_text)
        return encode(x)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"--format onnx needs the package {module!r}: {_INSTALL}") from None


class OnnxExporter:
    """Writes ``image_encoder.onnx`` (input ``image`` [N, 3, H, W] float32) and ``text_encoder.onnx``
    (input ``text`` [N, context_length] int64), both giving unnormalised features [N, embed_dim]."""

    def supports(self, model: Any) -> Optional[str]:
        """Any model with ``encode_image`` and ``encode_text``; whether its ops trace is found by exporting."""
        for method in ("encode_image", "encode_text"):
            if not callable(getattr(model, method, None)):
                return f"it has no {method}()"
        return None

    def export(self, model: Any, out: Path) -> List[str]:
        """Write both files, then run each in onnxruntime on a batch of another size than the traced one."""
        _require("onnx")  # torch's exporter serialises through it
        ort = _require("onnxruntime")
        model = model.float().eval()
        size = tuple(model.visual.image_size) if hasattr(model.visual, "image_size") else (224, 224)
        if isinstance(size, tuple) and len(size) == 1:
            size = size * 2
        length = getattr(model.text, "context_length", 77)
        vocab = getattr(model.text, "vocab_size", 49408)
        gen = torch.Generator().manual_seed(0)
        lines = []
        for name, image, make in (
                ("image", True, lambda n: torch.randn(n, 3, *size, generator=gen)),
                ("text", False, lambda n: torch.randint(1, vocab, (n, length), generator=gen))):
            path = out / f"{name}_encoder.onnx"
            encoder = _Encoder(model, image).eval()
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    # the exporter warns about every gather by index (argmax pooling): nothing the user can act on
                    warnings.simplefilter("ignore", UserWarning)
                    torch.onnx.export(encoder, (make(2),), str(path), input_names=[name], output_names=["features"],
                                      dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}}, opset_version=17,
                                      dynamo=False)
            except Exception as exc:  # an op ONNX lacks: say which encoder, in one line
                raise ExportError(f"exporting the {name} encoder to ONNX failed: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)}") from exc
            sample = make(3)
            with torch.no_grad():
                expected = encoder(sample).numpy()
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = session.run(None, {name: sample.numpy()})
            diff = float(abs(got - expected).max())
            if got.shape != expected.shape or not diff <= TOLERANCE:
                raise ExportError(f"{path}: onnxruntime's {name} features differ from torch's by {diff:.3g} "
                                  f"(shape {got.shape} vs {expected.shape}; allowed {TOLERANCE:g})")
            lines.append(f"wrote {path}: onnxruntime matches torch on a batch of 3 (max abs diff {diff:.2e})")
        return lines


import pytest
import torch

import clipkit
from clipkit.errors import CheckpointError


def _same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_flat_layout_round_trip_with_wrapper_prefixes(tiny_model_path, tmp_path):
    torch.manual_seed(1)
    src = clipkit.create_model(tiny_model_path)
    keys = list(src.state_dict())
    assert "token_embedding.weight" in keys and "visual.conv1.weight" in keys  # OpenCLIP's CLIP layout
    wrapped = {"epoch": 3, "state_dict": {"module._orig_mod." + k: v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ck.pt")
    dst = clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "ck.pt"))
    assert _same(src, dst)


def test_custom_text_layout_and_safetensors(tiny_model_path, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = clipkit.create_model(tiny_model_path, force_custom_text=True)
    state = src.state_dict()
    assert "text.token_embedding.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ck.safetensors"))
    flat = clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "ck.safetensors"))  # either layout loads
    assert torch.equal(flat.text.token_embedding.weight, src.text.token_embedding.weight)


def test_scalar_logit_scale_fits_nonscalar_model(tiny_model_path, tmp_path):
    src = clipkit.create_model(tiny_model_path)
    torch.save(src.state_dict(), tmp_path / "ck.pt")
    dst = clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "ck.pt"), nonscalar_logit_scale=True)
    assert dst.logit_scale.shape == (1,) and dst.logit_scale.item() == pytest.approx(src.logit_scale.item())


def test_mismatches_are_named(tiny_model_path, tmp_path):
    state = clipkit.create_model(tiny_model_path).state_dict()
    state.pop("ln_final.weight")
    state["visual.extra"] = torch.zeros(1)
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "bad.pt"))
    message = str(info.value)
    assert "missing keys text.ln_final.weight" in message and "unexpected keys visual.extra" in message
    assert "shape mismatch visual.proj (3, 3) vs model (64, 32)" in message


class Payload:
    """Stands for any pickled object a malicious checkpoint could carry."""


def test_pickled_objects_are_refused(tiny_model_path, tmp_path):
    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read with weights_only=True"):
        clipkit.load_checkpoint(clipkit.create_model(tiny_model_path), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=False is refused"):
        clipkit.load_checkpoint(clipkit.create_model(tiny_model_path), tmp_path / "evil.pt", weights_only=False)


def test_unknown_pretrained_and_model(tiny_model_path, without_plugins):
    without_plugins("clipkit-plugin-resnet")
    with pytest.raises(clipkit.ClipkitError, match="not a known pretrained tag of .* \\(it has no tags\\) or an existing file"):
        clipkit.create_model(tiny_model_path, pretrained="laion9000")
    with pytest.raises(KeyError, match="unknown model 'ViT-B-33' \\(did you mean"):
        clipkit.create_model("ViT-B-33")
    with pytest.raises(KeyError, match="pip install clipkit-plugin-resnet"):
        clipkit.create_model("RN50")


def test_create_model_from_pretrained_needs_weights_before_building(tiny_model_path, tmp_path):
    with pytest.raises(clipkit.ClipkitError, match="needs pretrained="):
        clipkit.create_model_from_pretrained(tiny_model_path)
    src = clipkit.create_model(tiny_model_path)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model, preprocess = clipkit.create_model_from_pretrained(tiny_model_path, pretrained=str(tmp_path / "w.pt"))
    assert _same(src, model) and preprocess.transforms[1].size == (32, 32)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # the test makes the archive it refuses
def test_torchscript_archives_are_refused_and_openai_keys_dropped(tiny_model_path, tmp_path):
    """OpenAI's original .pt files are TorchScript: refused (loading them runs no pickle, but
    deserialises code). Their state dicts carry hyper-parameter entries, which are dropped."""
    torch.manual_seed(4)
    src = clipkit.create_model(tiny_model_path).eval()
    traced = torch.jit.trace(src, (torch.randn(1, 3, 32, 32), torch.randint(1, 99, (1, 16))), check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    with pytest.raises(CheckpointError, match="is a TorchScript archive .*'openai' pretrained tag"):
        clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "openai.pt"))
    state = dict(src.state_dict(), input_resolution=torch.tensor(32), context_length=torch.tensor(16),
                 vocab_size=torch.tensor(100))
    torch.save(state, tmp_path / "openai_dict.pt")
    assert _same(src, clipkit.create_model(tiny_model_path, pretrained=str(tmp_path / "openai_dict.pt")))


def test_non_strict_load_reports_mismatches(tiny_model_path, tmp_path):
    model = clipkit.create_model(tiny_model_path)
    state = model.state_dict()
    state.pop("ln_final.bias")
    state["visual.extra"] = torch.zeros(1)
    state["stray.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pt")
    result = clipkit.load_checkpoint(model, tmp_path / "partial.pt", strict=False)
    assert result == {"missing_keys": ["text.ln_final.bias"], "unexpected_keys": ["stray.weight", "visual.extra"]}
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert clipkit.load_checkpoint(model, tmp_path / "full.pt") == {"missing_keys": [], "unexpected_keys": []}

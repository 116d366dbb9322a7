"""Tokenizers: word-level round trip, save/load, dispatch, and the Hugging Face wrapper."""
import json
import sys

import pytest

from megatron_evomoe.data.conversation import IGNORE_INDEX, render_conversation
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer, split_words

CORPUS = [
    "a red circle and a blue square.",
    "Is there a red circle in the image?",
    "a red circle, a blue square and a green triangle.",
    "USER: ASSISTANT: yes no",
]


def test_split_words():
    assert split_words("a red circle, a (blue) square?") == ["a", "red", "circle", ",", "a", "(", "blue", ")",
                                                            "square", "?"]
    assert split_words("<image>\nWhat is 12 plus 3?") == ["<image>", "What", "is", "12", "plus", "3", "?"]


def test_word_tokenizer_round_trip_and_specials():
    tok = WordTokenizer.build(CORPUS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.image_token_id) == (0, 1, 2, 3, 4)
    assert tok.tokens[:5] == ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    # Most frequent word first after the specials: "a" occurs 6 times.
    assert tok.tokens[5] == "a"
    for text in ["a red circle and a blue square.", "USER: Is there a red circle in the image? ASSISTANT: yes",
                 "a red circle, a blue square and a green triangle."]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    ids = tok.encode("a purple circle")
    assert ids == [tok.token_to_id["a"], tok.unk_id, tok.token_to_id["circle"]]
    assert tok.encode("<image> <s> </s>") == [4, 1, 2]
    assert tok.decode([1, *tok.encode("a red circle"), 2], skip_special_tokens=True) == "a red circle"
    assert tok.vocab_size == len(set(split_words(" ".join(CORPUS)))) + 5
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_word_tokenizer_build_is_deterministic_and_covers_extra_words():
    a = WordTokenizer.build(CORPUS, extra_words=["ASSISTANT:", "octagon"])
    b = WordTokenizer.build(list(CORPUS), extra_words=["ASSISTANT:", "octagon"])
    assert a.tokens == b.tokens
    assert "octagon" in a.token_to_id
    rare = WordTokenizer.build(CORPUS, min_freq=2)
    assert "triangle" not in rare.token_to_id and "circle" in rare.token_to_id


def test_word_tokenizer_save_load(tmp_path):
    tok = WordTokenizer.build(CORPUS)
    tok.save(str(tmp_path / "tok"))
    with open(tmp_path / "tok" / "vocab.json") as f:
        assert json.load(f)["type"] == "word"
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(loaded, WordTokenizer)
    assert loaded.tokens == tok.tokens
    assert loaded.encode(CORPUS[2]) == tok.encode(CORPUS[2])


def test_load_tokenizer_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"{empty}.*no tokenizer found.*tokenizer\.json.*vocab\.json"):
        load_tokenizer(str(empty))
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'}.*does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.json").write_text(json.dumps({"hello": 0}))  # a GPT-2 style vocab, not ours
    with pytest.raises(DataError, match=r"vocab\.json.*not a WordTokenizer vocabulary"):
        load_tokenizer(str(bad))


def test_hf_tokenizer_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        HFTokenizer(str(tmp_path))


def _make_hf_dir(tmp_path, tokenizers):
    """A small byte-level BPE trained here, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 20, trainer=trainer)
    d = tmp_path / "hf"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                         "add_bos_token": True}))  # as a Llama tokenizer
    return d, tk


def test_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="HFTokenizer test needs `pip install tokenizers`")
    d, raw = _make_hf_dir(tmp_path, tokenizers)
    assert raw.token_to_id("<image>") is None
    tok = load_tokenizer(str(d))
    assert isinstance(tok, HFTokenizer)
    assert tok.image_token_id == raw.get_vocab_size()  # appended as a new special token
    assert tok.vocab_size == raw.get_vocab_size() + 1
    assert (tok.bos_id, tok.eos_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"))
    assert tok.pad_id == tok.eos_id  # no pad token: falls back to EOS
    text = "a red circle and a blue square."
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a red<image> circle")
    assert ids.count(tok.image_token_id) == 1

    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.image_token_id == tok.image_token_id and again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (tok.bos_id, tok.eos_id, tok.pad_id, True)

    # Through the chat template: only the answer and its EOS are supervised.
    conv = [{"from": "human", "value": "<image>\nIs there a red circle?"}, {"from": "gpt", "value": "yes"}]
    ids, labels = render_conversation(conv, tok, num_image_tokens=3, has_image=True)
    assert ids[0] == tok.bos_id and ids.count(tok.image_token_id) == 3
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert supervised[-1] == tok.eos_id
    assert tok.decode(supervised[:-1]) == " yes"  # the space too: generation continues "ASSISTANT:"
    assert tok.decode(ids[: len(ids) - len(supervised)]).endswith("ASSISTANT:")

"""Conversation templates: the rendered text of every template string for string (expected strings written
by hand from LLaVA's / MoE-LLaVA's conversation.py definitions), the supervised spans, the `tokenizer`
template against transformers' apply_chat_template, the config fields and their errors."""
import json

import pytest

from megatron_evomoe.config import ConfigError, load_config, validate
from megatron_evomoe.data.conversation import (IGNORE_INDEX, conversation_pieces, conversation_text, question_text,
                                               render_conversation, render_prompt)
from megatron_evomoe.data.conversation_templates import NAMED_TEMPLATES, get_template, stage_template
from megatron_evomoe.data.errors import DataError
from megatron_evomoe.data.tokenizer import WordTokenizer, load_tokenizer

SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
       "detailed, and polite answers to the user's questions.")
# As LLaVA's data has it, except the tag after the question: LLaVA's preprocess_multimodal (vicuna_v1, chatml,
# plain) moves it in front; MoE-LLaVA's (phi, stablelm, openchat) leaves it where it is.
CONV = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "Black."}]
CAPTION = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": "A cat."}]

EXPECTED = {
    "vicuna_v1": f"{SYS} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT: Black.</s>",
    "phi": f"{SYS} USER: What is this?\n<image> ASSISTANT: A cat.<|endoftext|>USER: Its colour? ASSISTANT: "
           "Black.<|endoftext|>",
    "stablelm": f"{SYS} USER: What is this?\n<image> ASSISTANT: A cat.<|endoftext|>USER: Its colour? ASSISTANT: "
                "Black.<|endoftext|>",
    "openchat": f"{SYS} USER: What is this?\n<image> ASSISTANT: A cat.<|end_of_turn|>USER: Its colour? "
                "ASSISTANT: Black.<|end_of_turn|>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is this?"
              "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nIts colour?<|im_end|>\n"
              "<|im_start|>assistant\nBlack.<|im_end|>\n",
}
# What follows the prompt asking for each answer, up to its end-of-answer separator.
SUPERVISED = {"vicuna_v1": [" A cat.</s>", " Black.</s>"], "phi": [" A cat.<|endoftext|>", " Black.<|endoftext|>"],
              "stablelm": [" A cat.<|endoftext|>", " Black.<|endoftext|>"],
              "openchat": [" A cat.<|end_of_turn|>", " Black.<|end_of_turn|>"],
              "chatml": ["A cat.<|im_end|>", "Black.<|im_end|>"]}
QUESTION = {"vicuna_v1": f"{SYS} USER: <image>\nIs it a cat? ASSISTANT:",
            "openchat": f"{SYS} USER: Is it a cat?\n<image> ASSISTANT:",
            "phi": f"{SYS} USER: Is it a cat?\n<image> ASSISTANT:",
            "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                      "Is it a cat?<|im_end|>\n<|im_start|>assistant\n",
            "plain": "<image>\nIs it a cat?\n"}

# Qwen2-Instruct's chat template, written out by hand (ChatML with a default system turn).
QWEN2_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
               "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</s>", "<|end_of_turn|>"]


def _supervised_pieces(conv, template):
    return [text for text, supervised in conversation_pieces(conv, template, True) if supervised]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_text_and_supervised_pieces(name):
    template = NAMED_TEMPLATES[name]
    assert conversation_text(CONV, template, has_image=True) == EXPECTED[name]
    assert _supervised_pieces(CONV, template) == SUPERVISED[name]


def test_plain_is_llava_stage_one_captioning():
    plain = NAMED_TEMPLATES["plain"]
    assert conversation_text(CAPTION, plain, has_image=True) == "<image>A cat.\n"  # the human text dropped
    assert _supervised_pieces(CAPTION, plain) == ["A cat.\n"]
    with pytest.raises(DataError, match="one <image> question and one caption"):
        conversation_text(CONV, plain, has_image=True)
    with pytest.raises(DataError, match="and no image"):
        conversation_text([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}], plain, False)


@pytest.mark.parametrize("name", sorted(QUESTION))
def test_question_prompt_text(name):
    assert question_text("Is it a cat?\n<image>", NAMED_TEMPLATES[name]) == QUESTION[name]


def test_system_turn_replaces_the_system_prompt():
    conv = [{"from": "system", "value": "Be brief."}] + CONV[:2]
    assert conversation_text(conv, NAMED_TEMPLATES["vicuna_v1"], True) == \
        "Be brief. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    assert conversation_text(conv, NAMED_TEMPLATES["chatml"], True).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\n")


def test_word_tokenizer_ids_and_labels():
    tok = WordTokenizer.build([SYS, "USER : ASSISTANT What is this ? A cat . Its colour Black"])
    ids, labels = render_conversation(CONV, tok, num_image_tokens=3, has_image=True,
                                      template=NAMED_TEMPLATES["vicuna_v1"])
    e = tok.encode
    want = ([tok.bos_id] + e(SYS) + e("USER :") + [tok.image_token_id] * 3 + e("What is this ? ASSISTANT :")
            + e("A cat .") + [tok.eos_id] + e("USER : Its colour ? ASSISTANT :") + e("Black .") + [tok.eos_id])
    assert ids == want and tok.unk_id not in ids
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert supervised == e("A cat .") + [tok.eos_id] + e("Black .") + [tok.eos_id]
    # The supervised positions are the two answer spans exactly (labels equal the ids there).
    first = len(want) - len(e("USER : Its colour ? ASSISTANT :") + e("Black .")) - 2 - len(e("A cat ."))
    assert [k for k, t in enumerate(labels) if t != IGNORE_INDEX][:4] == list(range(first, first + 4))


def _bpe_dir(tmp_path, tokenizers, chat_template=None, add_bos=None):
    """A tiny byte-level BPE trained here, its special tokens added, saved as a Hugging Face folder."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"] + SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([SYS, EXPECTED["chatml"], EXPECTED["vicuna_v1"], "Be brief. Is it a cat?"] * 3, trainer)
    d = tmp_path / "hf"
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": "<s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "openchat"])
def test_hf_tokenizer_supervised_tokens_are_the_answers(tmp_path, name):
    tokenizers = pytest.importorskip("tokenizers")
    tok = load_tokenizer(str(_bpe_dir(tmp_path, tokenizers, add_bos=True)))
    ids, labels = render_conversation(CONV, tok, num_image_tokens=2, has_image=True, template=NAMED_TEMPLATES[name])
    assert ids[0] == tok.bos_id and ids.count(tok.image_token_id) == 2
    spans, run = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            run.append(i)
        elif run:
            spans, run = spans + [run], []
    spans += [run] if run else []
    assert [tok.decode(s) for s in spans] == SUPERVISED[name]
    # ids: the text tokenised whole between the image slots, as LLaVA's tokenizer_image_token
    before, after = EXPECTED[name].split("<image>")
    assert ids == [tok.bos_id] + tok.encode(before) + [tok.image_token_id] * 2 + tok.encode(after)


def test_bos_only_where_the_tokenizer_adds_one(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = load_tokenizer(str(_bpe_dir(tmp_path, tokenizers)))  # no add_bos_token, no post-processor: as Qwen2/Phi-2
    assert tok.bos_id is not None and not tok.add_bos
    ids = render_prompt("Is it a cat?", tok, 1, NAMED_TEMPLATES["chatml"])
    assert ids == tok.encode(question_text("Is it a cat?", NAMED_TEMPLATES["chatml"]))


def test_tokenizer_template_equals_transformers_apply_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    d = _bpe_dir(tmp_path, tokenizers, chat_template=QWEN2_JINJA)
    tok = load_tokenizer(str(d))
    template = get_template("tokenizer", tok)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in CONV]
    messages[0]["content"] = "<image>\nWhat is this?"  # (the tag first, as the template puts it)
    ours = conversation_text(CONV, template, has_image=True)
    assert ours == hf.apply_chat_template(messages, tokenize=False) == EXPECTED["chatml"]
    ids, labels = render_conversation(CONV, tok, num_image_tokens=1, has_image=True, template=template)
    want = hf.apply_chat_template(messages, tokenize=True)
    assert ids == list(want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want)
    assert _supervised_pieces(CONV, template) == SUPERVISED["chatml"]  # the "\n" after <|im_end|> not trained
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert question_text("What is this?\n<image>", template) == prompt == QUESTION["chatml"].replace(
        "Is it a cat?", "What is this?")
    system = [{"from": "system", "value": "Be brief."}] + CONV[:2]
    assert conversation_text(system, template, True) == hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + messages[:2], tokenize=False)


def test_tokenizer_template_without_chat_template_is_a_config_error(tmp_path):
    tok = WordTokenizer.build(["a"])
    with pytest.raises(ConfigError, match=r"^data\.conversation_template: 'tokenizer' .* has none"):
        get_template("tokenizer", tok)
    tokenizers = pytest.importorskip("tokenizers")
    hf = load_tokenizer(str(_bpe_dir(tmp_path, tokenizers)))
    with pytest.raises(ConfigError, match=r"^stages\.sft\.conversation_template: 'tokenizer'"):
        get_template("tokenizer", hf, field="stages.sft.conversation_template")


def test_config_fields_stage_override_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {conversation_template: chatml}\nstages:\n  - {name: proj, conversation_template: plain,"
                    " moe_mode: dense}\n  - {name: sft, moe_mode: dense}\n")
    cfg = load_config(str(path))
    validate(cfg)
    tok = WordTokenizer.build(["a"])
    assert stage_template(cfg, 0, tok).name == "plain" and stage_template(cfg, -1, tok).name == "chatml"
    saved = cfg.to_dict()  # what a checkpoint stores
    assert saved["data"]["conversation_template"] == "chatml" and saved["stages"][0]["conversation_template"] == "plain"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {conversation_template: llava_v2}\nstages:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"^data\.conversation_template: 'llava_v2' is not one of vicuna_v1, plain"):
        validate(load_config(str(bad)))
    bad.write_text("stages:\n  - {name: a, conversation_template: vicuna}\n")
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.conversation_template: 'vicuna' is not one of"):
        validate(load_config(str(bad)))


def test_template_is_part_of_the_token_index_key():
    from megatron_evomoe.data.token_index import index_key
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        tok = WordTokenizer.build(["a"])
        keys = [index_key(f.name, "", tok, 32, 4, NAMED_TEMPLATES[n], "error", False, False)
                for n in ("vicuna_v1", "phi", "plain")]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3


def test_generation_prompt_uses_the_checkpoint_stage_template(tmp_path):
    from megatron_evomoe.generate import prompt_ids
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - {name: proj, conversation_template: plain}\n  - {name: sft}\n")
    cfg = load_config(str(path))
    tok = WordTokenizer.build([SYS, "USER : ASSISTANT Is it a cat ?"])
    n = cfg.vision.num_image_tokens
    want_plain = [tok.bos_id, *[tok.image_token_id] * n, *tok.encode("Is it a cat ?")]
    assert prompt_ids("Is it a cat?", tok, cfg, True, stage_idx=0) == want_plain
    assert prompt_ids("Is it a cat?", tok, cfg, True) == render_prompt(
        "<image>\nIs it a cat?", tok, n, NAMED_TEMPLATES["vicuna_v1"])  # the last stage's: data's default


# transformers' own environment extras: strftime_now, tojson with its options, the {% generation %} tag.
HF_ENV_JINJA = ("{{ bos_token }}{{ strftime_now('%Y') }}|{{ {'z': 1, 'a': 'caf\u00e9'}|tojson(sort_keys=True, "
                "separators=(',', ':')) }}|{% for m in messages %}{% if m.role == 'assistant' %}{{ 'A: ' }}{% generation %}"
                "{{ m.content + eos_token }}{% endgeneration %}{{ '\\n' }}{% else %}{{ m.role + ': ' + m.content + "
                "'\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}")


def test_tokenizer_template_has_transformers_environment(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    import datetime
    d = _bpe_dir(tmp_path, tokenizers, chat_template=HF_ENV_JINJA)
    template = get_template("tokenizer", load_tokenizer(str(d)))
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in CONV]
    messages[0]["content"] = "<image>\nWhat is this?"
    ours = conversation_text(CONV, template, has_image=True)
    year = datetime.datetime.now().strftime("%Y")
    assert ours == (f'<s>{year}|{{"a":"caf\u00e9","z":1}}|user: <image>\nWhat is this?\nA: A cat.<|im_end|>\n'
                    "user: Its colour?\nA: Black.<|im_end|>\n")
    assert ours == transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(messages, tokenize=False)
    assert _supervised_pieces(CONV, template) == ["A cat.<|im_end|>", "Black.<|im_end|>"]


@pytest.mark.parametrize("source, error", [("{{ messages[0].content.upper(1, 2) }}", "TypeError"),
                                           ("{{ no_such_thing.attr }}", "UndefinedError")])
def test_tokenizer_template_render_errors_are_one_line_config_errors(tmp_path, source, error):
    tokenizers = pytest.importorskip("tokenizers")
    d = _bpe_dir(tmp_path, tokenizers, chat_template=source)
    template = get_template("tokenizer", load_tokenizer(str(d)), field="stages.sft.conversation_template")
    with pytest.raises(ConfigError) as e:
        conversation_text(CONV, template, has_image=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        f"stages.sft.conversation_template: 'tokenizer': the chat_template of the tokenizer {d} fails to render")
    assert f": {error}: " in message

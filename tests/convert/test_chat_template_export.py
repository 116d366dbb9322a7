"""The Jinja chat template of each named conversation template renders, through transformers'
`apply_chat_template`, exactly the text our conversation.py renders; the export carries the
template of the checkpoint's stage."""
import json

import pytest

from megatron_evomoe.config import load_config
from megatron_evomoe.convert import evomoe_to_hf
from megatron_evomoe.convert.hf_processor import chat_template_files, llava_processor_files
from megatron_evomoe.data.conversation import conversation_text, question_text
from megatron_evomoe.data.conversation_templates import NAMED_TEMPLATES, VICUNA_SYSTEM, stage_chat_template

from .helpers import EVO_STAGES, OURS, make_run

IMAGE = {"type": "image"}
CONV = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is it?\n<image>"},
        {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "Black."}]
# The same in transformers' message format; the image part after the text: LLaVA's templates put the tag
# first anyway, MoE-LLaVA's (phi, stablelm, openchat) keep it there.
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is it?\n"}, IMAGE]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Its colour?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Black."}]}]
CAPTION = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A black cat."}]
CAPTION_MESSAGES = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "Describe it."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A black cat."}]}]
QUESTION = [{"role": "user", "content": [IMAGE, {"type": "text", "text": " Is it a cat? "}]}]
# Written by hand from LLaVA's conversation.py: the tag first, its turn stripped; no BOS (the tokenizer adds it).
EXPECTED_VICUNA = ("Be brief. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT: Black.</s>")
EXPECTED_QUESTION = {"vicuna_v1": VICUNA_SYSTEM + " USER: <image>\nIs it a cat? ASSISTANT:",
                     "plain": "<image>\nIs it a cat?\n",
                     "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "<image>\nIs it a cat?<|im_end|>\n<|im_start|>assistant\n"}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer to render with (its vocabulary does not matter: tokenize=False)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                                bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("name", list(NAMED_TEMPLATES))
def test_chat_template_renders_our_text(hf_tokenizer, name):
    template = NAMED_TEMPLATES[name]
    jinja = template.chat_template()
    conv, messages = (CAPTION, CAPTION_MESSAGES) if name == "plain" else (CONV, MESSAGES)
    render = lambda m, **kw: hf_tokenizer.apply_chat_template(m, chat_template=jinja, tokenize=False, **kw)
    assert render(messages) == conversation_text(conv, template, has_image=True)
    question = render(QUESTION, add_generation_prompt=True)
    assert question == question_text("<image> Is it a cat? ", template)
    as_string = render([{"role": "user", "content": "<image>Is it a cat?"}], add_generation_prompt=True)
    assert as_string == question_text("<image>Is it a cat?", template)
    assert (as_string == question) == template.image_first  # only LLaVA's strips the turn
    if name in EXPECTED_QUESTION:
        assert question == EXPECTED_QUESTION[name]
    if name == "vicuna_v1":
        assert render(messages) == EXPECTED_VICUNA
    if name != "plain":  # without a system message: the template's own; text only: no tag
        ours = question_text("Hi there", template)
        assert render([{"role": "user", "content": "Hi there"}], add_generation_prompt=True) == ours
        assert template.system in ours


# Written by hand from MoE-LLaVA's conv_phi / conv_openchat (TWO separators) and its preprocess_multimodal,
# which leaves the tag where the data puts it; LLaVA's vicuna_v1 moves a trailing tag first.
TAG_LAST = [{"role": "user", "content": [{"type": "text", "text": "What is it?\n"}, IMAGE]}]
EXPECTED_TAG_LAST = {"phi": VICUNA_SYSTEM + " USER: What is it?\n<image> ASSISTANT:",
                     "openchat": VICUNA_SYSTEM + " USER: What is it?\n<image> ASSISTANT:",
                     "vicuna_v1": VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"}
EXPECTED_PHI = ("Be brief. USER: What is it?\n<image> ASSISTANT: A cat.<|endoftext|>USER: Its colour? ASSISTANT: "
                "Black.<|endoftext|>")


@pytest.mark.parametrize("name", sorted(EXPECTED_TAG_LAST))
def test_tag_last_stays_last_only_in_moe_llava_templates(hf_tokenizer, name):
    template = NAMED_TEMPLATES[name]
    render = lambda m, **kw: hf_tokenizer.apply_chat_template(m, chat_template=template.chat_template(),
                                                              tokenize=False, **kw)
    want = EXPECTED_TAG_LAST[name]
    assert render(TAG_LAST, add_generation_prompt=True) == want == question_text("What is it?\n<image>", template)
    assert render([{"role": "user", "content": "What is it?\n<image>"}], add_generation_prompt=True) == want
    if name == "phi":
        assert render(MESSAGES) == EXPECTED_PHI == conversation_text(CONV, template, has_image=True)


def test_chat_template_refuses_two_images(hf_tokenizer):
    two = [{"role": "user", "content": [IMAGE, IMAGE, {"type": "text", "text": "Same?"}]}]
    with pytest.raises(Exception, match="one image per conversation"):
        hf_tokenizer.apply_chat_template(two, chat_template=NAMED_TEMPLATES["vicuna_v1"].chat_template(),
                                         tokenize=False)


def test_the_stage_template_replaces_the_tokenizers_own_unless_it_is_tokenizer():
    own = {"bos_token": "<s>", "chat_template": "{{ messages[0]['content'] }}"}
    chatml = NAMED_TEMPLATES["chatml"].chat_template()
    assert chat_template_files(own, chatml) == {"tokenizer_config.json": dict(own, chat_template=chatml),
                                                "chat_template.jinja": chatml}
    assert chat_template_files(own, None) == {"chat_template.jinja": own["chat_template"]}
    assert chat_template_files({"bos_token": "<s>"}, None) == {}
    cfg = load_config(None, OURS + [EVO_STAGES, "--data.conversation_template=tokenizer"])
    assert stage_chat_template(cfg, -1) == ("tokenizer", None)
    assert chat_template_files(None, chatml) == {"chat_template.jinja": chatml}
    files = llava_processor_files(load_config(None, OURS + [EVO_STAGES]).vision, own, chatml)
    assert files["tokenizer_config.json"] == dict(own, chat_template=chatml, processor_class="LlavaProcessor")
    assert files["chat_template.jinja"] == chatml


def test_export_writes_the_checkpoint_stage_template(tmp_path):
    stages = "--stages=[{name: proj, steps: 1, conversation_template: plain}, {name: sft, steps: 1}]"
    for stage_idx, name in ((0, "plain"), (1, "vicuna_v1")):
        make_run(tmp_path / name, stages, "--data.conversation_template=vicuna_v1", stage_idx=stage_idx)
        out = tmp_path / name / "out"
        notes = []
        evomoe_to_hf(tmp_path / name / "run", out, fmt="llama", llm_only=True, echo=notes.append)
        assert (out / "chat_template.jinja").read_text() == NAMED_TEMPLATES[name].chat_template()
        assert json.loads((out / "config.json").read_text())["evomoe_conversation_template"] == name
        assert f"note: chat template: the stage's conversation template '{name}', replacing the tokenizer's own" \
            in notes

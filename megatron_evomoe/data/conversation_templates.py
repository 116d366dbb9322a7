"""The conversation templates (`data.conversation_template`, per stage `stages[].conversation_template`).

A template turns a parsed conversation, (system or None, [(human, gpt), ...]), into text pieces, each
marked supervised or not; conversation.py joins them into the prompt text and tokenises it.  A
question to answer is the same with the last gpt turn None: the text ends where generation starts.
Each named template is LLaVA's / MoE-LLaVA's `llava/conversation.py` definition of that name, and its
supervised pieces are what their `preprocess_*` (llava/train/train.py) leaves unmasked: the answers
and the end-of-answer separator after each; precisely, all that follows the prompt that asks for an
answer (vicuna_v1: " {gpt}</s>", the space included, which a BPE tokenizer puts in the answer's first token).

- vicuna_v1 (LLaVA-1.5 `--version v1`, MoE-LLaVA `v1`; LLaVA's own `llava_v1` has a "human" system
  prompt that LLaVA-1.5 does not train with, so it is not offered under that name):
      "{system} USER: {human} ASSISTANT: {gpt}</s>USER: {human} ASSISTANT: {gpt}</s>"
- phi, stablelm (MoE-LLaVA conv_phi / conv_stablelm): the same with "<|endoftext|>" after each answer;
  openchat (conv_openchat): with "<|end_of_turn|>".  These leave `<image>` where the data has it
  (MoE-LLaVA's preprocess_multimodal); the others (`image_first`) make its turn "<image>\\n" + the
  text stripped, as LLaVA's does.
- plain (LLaVA's stage-1 captioning, preprocess_plain): "<image>{caption}\\n", the human text dropped;
  one image and one caption per record.  A question: "<image>\\n{question}\\n" (conv.get_prompt()).
- chatml (Qwen2-Instruct): "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{human}<|im_end|>\\n
  <|im_start|>assistant\\n{gpt}<|im_end|>\\n..."; supervised: each answer and its <|im_end|>.
- tokenizer: the tokenizer's own Jinja `chat_template`, as transformers' `apply_chat_template` renders
  it; supervised: what the template adds for an assistant message, trailing whitespace excluded.

Each named template also writes itself as a Jinja chat template (`chat_template()`, transformers'
messages, content a string or [{"type": "image"}, {"type": "text", ...}]) that renders through
`apply_chat_template` exactly the text above, `<image>` placed as the template places it; an export carries the
stage's one (`stage_chat_template`).

A record's leading "system" turn replaces the template's system prompt (plain has none).  BOS is the
tokenizer's (`Tokenizer.add_bos`) for the named templates; the Jinja template writes its own.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..config.schema import ConfigError, DataConfig, field_choices
from .errors import DataError
from .tokenizer import Tokenizer

IMAGE_TAG = "<image>"
Piece = Tuple[str, bool]  # (text, supervised)
Turns = Sequence[Tuple[str, Optional[str]]]  # (human, gpt); gpt None: the answer to generate

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_SYSTEM = "You are a helpful assistant."
TOKENIZER_TEMPLATE = "tokenizer"


@dataclass(frozen=True)
class RoleTemplate:
    """LLaVA's SeparatorStyle.TWO: "{system}{sep}{user}: {human}{sep}{assistant}: {gpt}{sep2}..."."""
    name: str
    sep2: str
    system: str = VICUNA_SYSTEM
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "
    image_first: bool = True  # LLaVA's preprocess_multimodal; MoE-LLaVA's leaves the tag where it is
    uses_tokenizer_bos = True

    def pieces(self, system: Optional[str], turns: Turns) -> List[Piece]:
        out: List[Piece] = [((self.system if system is None else system) + self.sep, False)]
        for human, gpt in turns:
            out.append((f"{self.user}: {human}{self.sep}", False))
            if gpt is None:  # LLaVA: an empty last message renders as "ASSISTANT:" (no space)
                out.append((f"{self.assistant}:", False))
                break
            # the space too: generation continues "ASSISTANT:", so whatever token holds it is trained
            out += [(f"{self.assistant}:", False), (f" {gpt}{self.sep2}", True)]
        return out

    def words(self) -> List[str]:
        return [self.system, self.user, self.assistant, ":", self.sep2]

    def chat_template(self) -> str:
        """The Jinja chat template that renders what `pieces` does (see `_jinja_chat`)."""
        return _jinja_chat(self.system, ("", self.sep), user=(f"{self.user}: ", self.sep),
                           assistant=(f"{self.assistant}: ", self.sep2), generation=f"{self.assistant}:",
                           image_first=self.image_first)

    def key(self) -> Dict:
        return {"class": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class PlainTemplate:
    """LLaVA's stage-1 captioning (SeparatorStyle.PLAIN, preprocess_plain)."""
    name: str = "plain"
    sep: str = "\n"
    uses_tokenizer_bos = True
    image_first = True  # LLaVA's stage 1 (a question: "<image>\n{question}")

    def pieces(self, system: Optional[str], turns: Turns) -> List[Piece]:
        human, gpt = turns[0]
        if gpt is None:  # conv.get_prompt(): the question kept, each message followed by sep
            return [(human + self.sep, False)]
        if len(turns) != 1 or IMAGE_TAG not in human:
            raise DataError(f"the plain template (captioning) takes one {IMAGE_TAG} question and one caption; "
                            f"this record has {len(turns)} turn(s)"
                            + ("" if IMAGE_TAG in human else " and no image"), field="conversations",
                            reason="bad_conversations")
        return [(IMAGE_TAG, False), (gpt + self.sep, True)]

    def words(self) -> List[str]:
        return []

    def chat_template(self) -> str:
        """No system prompt; a user turn answered by a caption is only its image tag, the last one (the
        question) its text and `sep`; a caption is followed by `sep`."""
        sep = _jinja_str(self.sep)
        return (_jinja_prompt_macro(self.image_first) + "{%- for m in messages -%}"
                "{%- if m.role == 'user' and loop.last -%}{{ _prompt(m.content) + " + sep + " }}"
                "{%- elif m.role == 'user' -%}{{ " + _jinja_str(IMAGE_TAG) + " }}"
                "{%- elif m.role == 'assistant' -%}{{ _prompt(m.content) + " + sep + " }}"
                "{%- endif -%}{%- endfor -%}")

    def key(self) -> Dict:
        return {"class": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class ChatMLTemplate:
    """Qwen2-Instruct's ChatML turns."""
    name: str = "chatml"
    system: str = QWEN_SYSTEM
    start: str = "<|im_start|>"
    end: str = "<|im_end|>"
    uses_tokenizer_bos = True
    image_first = True  # LLaVA's preprocess_multimodal moves the tag whatever the conversation version

    def pieces(self, system: Optional[str], turns: Turns) -> List[Piece]:
        s, e = self.start, self.end
        out: List[Piece] = [(f"{s}system\n{self.system if system is None else system}{e}\n", False)]
        for human, gpt in turns:
            out.append((f"{s}user\n{human}{e}\n{s}assistant\n", False))
            if gpt is None:
                break
            out += [(gpt + e, True), ("\n", False)]
        return out

    def words(self) -> List[str]:
        return [self.system, self.start, self.end, "system", "user", "assistant"]

    def chat_template(self) -> str:
        """The Jinja chat template that renders what `pieces` does (Qwen2's own form, with our system)."""
        s, e = self.start, self.end
        return _jinja_chat(self.system, (f"{s}system\n", f"{e}\n"), user=(f"{s}user\n", f"{e}\n"),
                           assistant=(f"{s}assistant\n", f"{e}\n"), generation=f"{s}assistant\n",
                           image_first=self.image_first)

    def key(self) -> Dict:
        return {"class": type(self).__name__, **asdict(self)}


def _jinja_str(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads backslash escapes as Python does)."""
    return json.dumps(text, ensure_ascii=False)


# The text of a message's content (a string, or transformers' parts [{"type": "image"}, {"type": "text",
# "text": ...}], an image part standing for the tag where it is) as conversation.py's `place_image_tag`
# leaves it: image_first, "<image>\n" + the text without the tag, stripped; else the text as it is.  The
# template is written on one line, all output inside {{ }}, so that trim_blocks / lstrip_blocks change nothing.
_JINJA_PROMPT_MACRO = (
    "{%- macro _prompt(c) -%}"
    "{%- if c is string -%}{%- set ns = namespace(text=c) -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}{%- for p in c -%}"
    "{%- if p.type == 'image' -%}{%- set ns.text = ns.text + TAG -%}"
    "{%- elif p.type == 'text' -%}{%- set ns.text = ns.text + p.text -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if ns.text.count(TAG) > 1 -%}{{ raise_exception('one image per conversation is supported') }}{%- endif -%}"
    "{%- if FIRST and TAG in ns.text -%}{{ (TAG + '\\n' + ns.text|replace(TAG, '')|trim)|trim }}"
    "{%- else -%}{{ ns.text }}{%- endif -%}"
    "{%- endmacro -%}").replace("TAG", _jinja_str(IMAGE_TAG))


def _jinja_prompt_macro(image_first: bool) -> str:
    return _JINJA_PROMPT_MACRO.replace("FIRST", "true" if image_first else "false")


def _jinja_chat(default_system: str, system: Tuple[str, str], user: Tuple[str, str], assistant: Tuple[str, str],
                generation: str, image_first: bool) -> str:
    """A Jinja chat template of turns: the system text (a leading system message, else `default_system`)
    between system's (before, after), each user / assistant message between its (before, after), and
    `generation` when add_generation_prompt; the tag moved first iff `image_first`."""
    q = _jinja_str
    around = {role: f"{{{{ {q(a)} + _prompt(m.content) + {q(b)} }}}}" for role, (a, b) in
              (("user", user), ("assistant", assistant))}
    return (_jinja_prompt_macro(image_first) +
            "{%- if messages and messages[0].role == 'system' -%}"
            "{%- set system = _prompt(messages[0].content) -%}{%- set turns = messages[1:] -%}"
            f"{{%- else -%}}{{%- set system = {q(default_system)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
            f"{{{{ {q(system[0])} + system + {q(system[1])} }}}}"
            "{%- for m in turns -%}"
            f"{{%- if m.role == 'user' -%}}{around['user']}"
            f"{{%- elif m.role == 'assistant' -%}}{around['assistant']}"
            "{%- else -%}{{ raise_exception('roles after the first message: user and assistant') }}{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {q(generation)} }}}}{{%- endif -%}}")


@dataclass(frozen=True)
class JinjaTemplate:
    """The tokenizer's own `chat_template`, rendered as transformers' `apply_chat_template` does."""
    source: str
    special_tokens: Tuple[Tuple[str, str], ...]  # (name, token) passed to the template, e.g. bos_token
    name: str = TOKENIZER_TEMPLATE
    uses_tokenizer_bos = False  # the template writes BOS itself if it wants one
    image_first = True  # LLaVA's preprocess_multimodal, before the template sees the text
    field: str = "data.conversation_template"  # the config field that chose it, and the tokenizer's
    folder: str = "the tokenizer"  # folder: for errors only (not in `key`)

    def render(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        import jinja2
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **dict(self.special_tokens))
        except (jinja2.TemplateError, TypeError) as e:  # UndefinedError is a TemplateError
            raise ConfigError(f"{self.field}: '{TOKENIZER_TEMPLATE}': the chat_template of {self.folder} fails "
                              f"to render a conversation: {type(e).__name__}: {e}") from None

    def pieces(self, system: Optional[str], turns: Turns) -> List[Piece]:
        """Rendered prefix by prefix: the assistant piece of turn k is what the whole conversation up to
        answer k adds to the prompt that asks for it (add_generation_prompt)."""
        messages = [] if system is None else [{"role": "system", "content": system}]
        out: List[Piece] = []
        done = ""
        for human, gpt in turns:
            messages.append({"role": "user", "content": human})
            prompt = self.render(messages, add_generation_prompt=True)
            if gpt is None:
                return out + [(self._after(done, prompt), False)]
            messages.append({"role": "assistant", "content": gpt})
            full = self.render(messages, add_generation_prompt=False)
            answer = self._after(prompt, full)
            kept = answer.rstrip()
            out += [(self._after(done, prompt), False), (kept, True), (answer[len(kept):], False)]
            done = full
        return out

    @staticmethod
    def _after(prefix: str, text: str) -> str:
        if not text.startswith(prefix):
            raise ConfigError(f"data.conversation_template: '{TOKENIZER_TEMPLATE}': the tokenizer's chat_template "
                              "does not render a conversation as a growing prefix (it rewrites earlier turns), so "
                              "its answers cannot be located; choose a named template")
        return text[len(prefix):]

    def words(self) -> List[str]:
        return []

    def key(self) -> Dict:
        return {"class": type(self).__name__, "name": self.name,
                "source": hashlib.blake2b(self.source.encode(), digest_size=16).hexdigest(),
                "special_tokens": list(self.special_tokens)}


def _raise_exception(message: str):
    raise DataError(f"the tokenizer's chat_template refused it: {message}", field="conversations",
                    reason="bad_conversations")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: JSON without Jinja's HTML escaping, its options exposed."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    from datetime import datetime
    return datetime.now().strftime(format)


def _generation_tag():
    """transformers' `{% generation %}...{% endgeneration %}` (its AssistantTracker): renders its body.  The
    answer's span is found by rendering prefix by prefix (JinjaTemplate.pieces), not from this tag."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()
    return GenerationTag


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """transformers 5's environment (_cached_compile_jinja_template): sandboxed, trim_blocks + lstrip_blocks,
    loop controls, the generation tag, its tojson, raise_exception and strftime_now."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ConfigError(f"data.conversation_template: '{TOKENIZER_TEMPLATE}': the tokenizer's chat_template "
                          f"does not compile: {e}") from None


NAMED_TEMPLATES = {t.name: t for t in (
    RoleTemplate("vicuna_v1", sep2="</s>"),
    PlainTemplate(),
    ChatMLTemplate(),
    # MoE-LLaVA's own (moellava/train/train.py preprocess_multimodal): the tag stays where the data has it
    RoleTemplate("phi", sep2="<|endoftext|>", image_first=False),
    RoleTemplate("stablelm", sep2="<|endoftext|>", image_first=False),
    RoleTemplate("openchat", sep2="<|end_of_turn|>", image_first=False),
)}
DEFAULT_TEMPLATE = NAMED_TEMPLATES[DataConfig.conversation_template]  # data.conversation_template's default
assert set(NAMED_TEMPLATES) | {TOKENIZER_TEMPLATE} == set(field_choices(DataConfig, "conversation_template")), \
    "config/schema.py's conversation_template choices and the registry disagree"


def get_template(name: str, tokenizer: Tokenizer, field: str = "data.conversation_template"):
    """The template called `name` (`field` names the config field that chose it, for errors)."""
    if name == TOKENIZER_TEMPLATE:
        folder = getattr(tokenizer, "directory", None)
        where = f"the tokenizer {folder}" if folder else "the tokenizer"
        if tokenizer.chat_template is None:
            raise ConfigError(f"{field}: '{TOKENIZER_TEMPLATE}' renders with the tokenizer's chat_template, but "
                              f"{where} ({type(tokenizer).__name__}) has none (tokenizer_config.json 'chat_template' "
                              "or chat_template.jinja); choose a named template")
        named = tuple(sorted((k, v) for k, v in tokenizer.special_tokens().items() if v is not None))
        template = JinjaTemplate(tokenizer.chat_template, named, field=field, folder=where)
        _compile(template.source)  # a broken template: named now, not at the first record
        return template
    if name not in NAMED_TEMPLATES:
        raise ConfigError(f"{field}: {name!r} is not one of "
                          f"{', '.join(list(NAMED_TEMPLATES) + [TOKENIZER_TEMPLATE])}")
    return NAMED_TEMPLATES[name]


def stage_template_field(cfg, stage_idx: int) -> Tuple[str, str]:
    """(template name, the config field that chose it) of stage `stage_idx` (negative: from the end):
    the stage's own `conversation_template`, else data's."""
    stage = cfg.stages[stage_idx]
    if stage.conversation_template:
        return stage.conversation_template, f"stages.{stage.name}.conversation_template"
    return cfg.data.conversation_template, "data.conversation_template"


def stage_template(cfg, stage_idx: int, tokenizer: Tokenizer):
    """The template training stage `stage_idx` uses; evaluation and generation of a checkpoint of that
    stage use it too."""
    name, field = stage_template_field(cfg, stage_idx)
    return get_template(name, tokenizer, field)


def stage_chat_template(cfg, stage_idx: int) -> Tuple[str, Optional[str]]:
    """(template name, its Jinja chat template) of stage `stage_idx`, what an export carries; None for
    `tokenizer`: the tokenizer's own chat_template is the template then."""
    name, field = stage_template_field(cfg, stage_idx)
    if name == TOKENIZER_TEMPLATE:
        return name, None
    return name, get_template(name, None, field).chat_template()


def all_template_words() -> List[str]:
    """What a word-level vocabulary must cover for every named template."""
    return [w for t in NAMED_TEMPLATES.values() for w in t.words()]

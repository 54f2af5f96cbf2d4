"""Chat templates: prompt ids equal Hugging Face's `apply_chat_template(..., add_generation_prompt=True)`
for ChatML, Llama-3 and Llama-2 style templates (a byte-level BPE trained here with the special tokens,
and the demo SentencePiece model), how templates are found, and clear errors."""
import json
import shutil
from pathlib import Path

import pytest

from tinyinfer.loading.chat import ChatTemplateError, apply_chat_template, render
from tinyinfer.loading.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CKPT = Path(__file__).resolve().parent.parent / "models" / "shakespeare-llama"
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Written here in each family's format (role headers, end-of-turn markers, generation prompt).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = 'Today is ' + strftime_now('%Y') + '.' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system }}
{%- if tools is not none %}
    {{- '\\nTools:\\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=2) + '\\n' }}
    {%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for m in messages %}
    {%- if m['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('roles must be user or assistant, got ' + m['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}
    {%- else %}{{ m['content'] | trim }}{% endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Whitespace handled by trim_blocks / lstrip_blocks (no "-" modifiers), loop controls, a namespace.
BLOCKY = """{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ m['role'] }} {{ ns.n }}
{{ m['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# Llama 2's layout: BOS and EOS written by the template as text, [INST] blocks.
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
          "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")

CHAT = [{"role": "system", "content": "You are a  player.\n"},
        {"role": "user", "content": "To be, or not to be?"},
        {"role": "assistant", "content": " That is the question. "},
        {"role": "user", "content": "emoji 😀 and café", "name": None}]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([m["content"] for m in CHAT] * 20 + ["system user assistant"] * 20, trainer)
    d = tmp_path_factory.mktemp("chat_bpe")
    tk.save(str(d / "tokenizer.json"))
    return d


def with_config(src: Path, dst: Path, **cfg) -> Path:
    for f in ("tokenizer.json", "tokenizer.model"):
        if (src / f).is_file():
            shutil.copy(src / f, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def hf_ids(path: Path, messages, **kw) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    return list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False, **kw))


@pytest.mark.parametrize("template", [CHATML, LLAMA3, BLOCKY], ids=["chatml", "llama3", "blocks"])
def test_ids_equal_hugging_face_apply_chat_template(bpe_dir, tmp_path, template):
    d = with_config(bpe_dir, tmp_path, chat_template=template, bos_token="<|begin_of_text|>",
                    eos_token="<|eot_id|>", pad_token="<|pad|>", tokenizer_class="PreTrainedTokenizerFast")
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template == template
    for messages in (CHAT, CHAT[1:2], CHAT[:2]):
        ours = apply_chat_template(tok, messages)
        assert ours == hf_ids(d, messages)
        assert any(i == tok._backend.piece_id("<|start_header_id|>") or i == tok._backend.piece_id(
            "<|im_start|>") for i in ours)            # the markers are single special tokens


def test_tools_and_extra_variables_render_as_in_hugging_face(bpe_dir, tmp_path):
    d = with_config(bpe_dir, tmp_path, chat_template=LLAMA3, bos_token="<|begin_of_text|>",
                    eos_token="<|eot_id|>", tokenizer_class="PreTrainedTokenizerFast")
    tools = [{"type": "function", "function": {"name": "wéather", "parameters": {"type": "object",
                                                                                  "properties": {}}}}]
    ours = apply_chat_template(Tokenizer.from_dir(d), CHAT[1:], tools=tools)
    assert ours == hf_ids(d, CHAT[1:], tools=tools)
    text = render(LLAMA3, CHAT[1:], tools=tools, bos_token="<B>")
    assert text.startswith("<B>") and '"name": "wéather"' in text     # tojson: no \\u escapes, indent


def test_llama2_template_with_the_sentencepiece_demo_tokenizer(tmp_path):
    d = with_config(CKPT, tmp_path, chat_template=LLAMA2)
    (tmp_path / "config.json").write_text((CKPT / "config.json").read_text())
    tok = Tokenizer.from_dir(d)
    messages = CHAT[1:]
    ours = apply_chat_template(tok, messages)
    assert ours == hf_ids(d, messages)
    assert ours.count(tok.bos_id) == 2 and ours.count(tok.eos_id) == 1


def test_the_jinja_file_wins_and_named_templates_load(bpe_dir, tmp_path):
    d = with_config(bpe_dir, tmp_path, chat_template=[{"name": "default", "template": CHATML},
                                                      {"name": "tool_use", "template": LLAMA3}],
                    bos_token="<|begin_of_text|>")
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template == CHATML and tok.chat_templates["tool_use"] == LLAMA3
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert apply_chat_template(tok, CHAT[1:2], tools=tools) == hf_ids(d, CHAT[1:2], tools=tools)
    (d / "chat_template.jinja").write_text(BLOCKY)
    assert Tokenizer.from_dir(d).chat_template == BLOCKY


def test_a_model_without_a_template_is_a_clear_error(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        apply_chat_template(tok, CHAT)


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="roles must be user or assistant, got tool"):
        render(LLAMA3, [{"role": "tool", "content": "x"}], bos_token="")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for m in messages %}", CHAT)
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render("{{ messages.__class__.__mro__ }}", CHAT)
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        render(CHATML, [])
    with pytest.raises(ChatTemplateError, match="message 0"):
        render(CHATML, ["hi"])


def test_a_bad_chat_template_entry_in_the_config_is_refused(bpe_dir, tmp_path):
    d = with_config(bpe_dir, tmp_path, chat_template={"default": CHATML})
    with pytest.raises(ValueError, match="chat_template must be a string or a list"):
        Tokenizer.from_dir(d)

"""Test helper: tool calling on the demo Llama checkpoint -- a chat template in the Hermes format written
for these tests (tools listed in the system turn as JSON, calls in <tool_call> tags, results in
<tool_response> tags, in the play-script layout of chat_util.py), and tools to call."""
from __future__ import annotations

import json
import os
from pathlib import Path

from hf_util import LLAMA

HERMES_TEMPLATE = """{{- bos_token }}
{%- if tools %}
{{- 'SYSTEM:\\n' }}
{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n' }}{% endif %}
{{- 'You may call these functions:\\n' }}
{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}
{{- 'To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.\\n\\n' }}
{%- elif messages[0].role == 'system' %}
{{- 'SYSTEM:\\n' + messages[0].content + '\\n\\n' }}
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}
{{- 'USER:\\n' + m.content + '\\n\\n' }}
{%- elif m.role == 'assistant' %}
{{- 'ASSISTANT:\\n' }}{% if m.content %}{{ m.content }}{% endif %}
{%- for call in m.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}
{{- '<tool_call>\\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '\\n\\n' }}
{%- elif m.role == 'tool' %}
{{- 'TOOL:\\n<tool_response>\\n' + m.content + '\\n</tool_response>\\n\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ 'ASSISTANT:\\n' }}{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
# Closed objects: a schema that allows any extra key lets a sampling model write one without end.
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]


def demo_tool_model(root: Path, template: str = HERMES_TEMPLATE) -> str:
    """A directory linking the demo model's files, plus a tokenizer_config.json with `template`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(LLAMA):
        os.symlink(os.path.join(LLAMA, name), root / name)
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return str(root)

"""Test helper: the demo Llama checkpoint with a chat template (a play-script layout its Shakespeare
training suits), for the chat API, the chat CLI and the server."""
from __future__ import annotations

import json
import os
from pathlib import Path

from hf_util import LLAMA

SCRIPT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n"
                   "{% endfor %}{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")


def demo_chat_model(root: Path) -> str:
    """A directory linking the demo model's files, plus a tokenizer_config.json with a chat template."""
    root.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(LLAMA):
        os.symlink(os.path.join(LLAMA, name), root / name)
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": SCRIPT_TEMPLATE}))
    return str(root)

"""Tool calls (OpenAI function calling): the formats models write calls in (Hermes `<tool_call>` tags,
Llama 3 JSON), their parsers for whole and streamed replies, and the structured-output constraint
that makes a model write a valid call when one is required (toolcalls/forcing.py)."""
from tinyinfer.toolcalls.calls import ParsedOutput, ToolCall
from tinyinfer.toolcalls.formats import FORMATS, ToolCallFormat, detect_format, get_format
from tinyinfer.toolcalls.stream import StreamDelta, ToolCallStream

__all__ = ["FORMATS", "ParsedOutput", "StreamDelta", "ToolCall", "ToolCallFormat", "ToolCallStream",
           "detect_format", "get_format"]

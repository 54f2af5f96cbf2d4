"""INT4 weight-only quantization: the format and its layouts (format.py), the quantizer (quantizer.py),
and files on disk -- tinyinfer's own INT4 file, GPTQ / AWQ imports (io.py)."""

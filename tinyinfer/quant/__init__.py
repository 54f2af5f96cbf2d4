"""INT4 weight-only quantization: which linears become INT4 at which group size (plan.py), the quantizer
(quantizer.py) and tinyinfer's own INT4 file (io.py). The format itself is ops/int4_format.py."""

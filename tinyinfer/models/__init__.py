"""Model definitions assembled from `tinyinfer.layers`: one decoder for Llama-family and DeepSeek
checkpoints (models/transformer.py)."""

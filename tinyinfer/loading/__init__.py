"""Loading checkpoints: config, weights, tokenizer, GGUF."""

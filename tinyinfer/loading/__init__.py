"""Loading checkpoints: safetensors and GGUF files, GPTQ / AWQ imports, validation against the config,
tokenizers and chat templates, one tensor-parallel rank's shard, the model built and filled."""

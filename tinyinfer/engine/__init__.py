"""The serving engine: sequences, the block manager, the scheduler, the model runner (model + paged KV
cache + CUDA graphs), output processing, the online `LLMEngine`, the offline `LLM`, and speculative
decoding. Data flow of one step: docs/architecture.md."""

"""Sampling: what a request asks for (`params.py` SamplingParams, validated at construction), what its
parameters do to the logits (`processors.py`) and how the next token is drawn (`sampler.py`: greedy,
keyed Gumbel sampling, speculative acceptance, the finite check). It sits below the model code, which
never needs it, and above config/ for its errors."""

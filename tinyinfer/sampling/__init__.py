"""Sampling: what a request asks for (`params.py` SamplingParams, validated at construction) and how the
next token is drawn from the logits (`sampler.py`: logits processors, keyed sampling, rejection
sampling). It sits below the model code, which never needs it, and above config/ for its errors."""

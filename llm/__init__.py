"""llm: GRPO training of a causal language model with the entropy predictor and the Entrocraft
sampler (``python -m llm.train``; docs/llm.md)."""

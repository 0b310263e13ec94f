"""Recipes that produce the models memllm ships: `tiny` trains the tiny MemoryLLM and M+ models in
`assets/tiny` from scratch on CPU."""

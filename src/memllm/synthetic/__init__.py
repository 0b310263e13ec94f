"""A synthetic world of invented people and its tokenizer: the data behind the tiny models and the
lookup evaluation. Depends on nothing else in memllm."""

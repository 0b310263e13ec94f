"""`memllm serve`: the store of durable memories (`store`), the thread that owns the model (`worker`)
and the OpenAI-compatible HTTP app (`app`)."""

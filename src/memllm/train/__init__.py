"""Training: the one training loop (`loop.fit`), what it optimises (`objectives`: the corpus objectives
of `memllm train` and the recipe's question answering), its data (`data`), `memllm train` itself
(`trainer`), self-documenting run settings (`options`) and the M+ retriever loss (`retriever`)."""

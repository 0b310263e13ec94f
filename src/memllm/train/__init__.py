"""Training: the one training loop (`trainer`), its corpus (`data`) and the M+ retriever loss
(`retriever`)."""

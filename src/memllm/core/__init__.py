"""The memory model itself: configuration, memory state, the model, injection, generation, M+'s
long-term memory and checkpoints. Nothing here imports from the rest of memllm."""

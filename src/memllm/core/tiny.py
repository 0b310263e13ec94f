"""Small random memory models, for tests, benchmarks and the demo on machines with no checkpoint.

Their answers are meaningless (the weights are random); they exercise every code path of the real
models at a size that runs in milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from memllm.core.checkpoint import initialize_memory_parameters
from memllm.core.config import LoraSettings, MemoryConfig
from memllm.core.model import MemoryModel


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>): any text, no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_model(
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    num_tokens: int = 8,
    num_blocks: int = 4,
    kind: str = "memoryllm",
    num_ltm_blocks: int = 0,
    lora_rank: int = 0,
    max_position_embeddings: int = 4096,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | bool = True,
    selector_hidden_dim: int = 16,
    update_ltm_frequency: int = 2,
    decay_frequency: float = 1.0,
    add_encoder_retriever: bool | None = None,
    model_type: str = "llama",
) -> MemoryModel:
    """A randomly initialised memory model with an initialised random pool (so reads use a prefix).

    tokenizer: True for the byte tokenizer, False for none, or a tokenizer to use (its size sets the
    vocabulary unless vocab_size is given). model_type: the base model's family, one of
    `memllm.core.hf_compat.SUPPORTED_MODEL_TYPES`."""
    tok = byte_tokenizer() if tokenizer is True else (tokenizer or None)
    vocab_size = vocab_size or (len(tok) if tok is not None else 256)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id if tok else 1, eos_token_id=tok.eos_token_id if tok else 2,
        pad_token_id=tok.pad_token_id if tok else None,
    )
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()
    lora = LoraSettings(r=lora_rank, lora_alpha=2 * lora_rank) if lora_rank else None
    memory_config = MemoryConfig(
        kind=kind, num_tokens=num_tokens, num_blocks=num_blocks, num_ltm_blocks=num_ltm_blocks,
        lora_config=lora, add_decoder_lora=lora is not None,
        add_selector=kind == "mplus",
        add_encoder_retriever=kind == "mplus" if add_encoder_retriever is None else add_encoder_retriever,
        selector_hidden_dim=selector_hidden_dim, update_ltm_frequency=update_ltm_frequency,
        decay_frequency=decay_frequency, initial_rf_when_moving_stm_to_ltm=2,
    )
    model = MemoryModel(lm, memory_config, tokenizer=tok).eval()
    initialize_memory_parameters(model, seed)
    with torch.no_grad():
        # Make LoRA B matrices non-zero so that the two adapters really differ.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.initialized = True
    return model

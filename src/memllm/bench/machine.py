"""What the machine can do, measured on the spot, and what a model's work needs of it.

A benchmark's seconds mean little on a shared machine whose speed is unknown; the same seconds as a
fraction of the machine's own limits, measured in the same process at the same thread count, say how
much faster the code could still get. Two limits bound the work of a causal LM on a CPU (or GPU):

- the GEMM rate (FLOP/s): prefill, injection and time to first token are matrix products;
- the read bandwidth (bytes/s): decoding one token reads every weight, the LM head and the whole
  key/value cache (the memory prefix included) once, and does little arithmetic on each byte.

`measure` times both; `forward_flops` and `decode_bytes` count what a forward needs from the model's
shape alone (the arithmetic that must be done and the bytes that must be read, not what a particular
kernel happens to do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memllm.bench.timing import device_sync, timed


@dataclass(frozen=True)
class MachineRates:
    """Best rates seen at `threads` torch threads (the bounds: no run of the model can beat them)."""

    threads: int
    gemm_flop_s: float  # square matrix product in `measure`'s dtype
    read_bytes_s: float  # streaming read: the better of a reduction and a matrix-vector product
    gemv_bytes_s: float  # the matrix-vector product alone (same dtype), rows `gemv_cols` wide: decoding's kernel


@dataclass(frozen=True)
class ModelShape:
    """The sizes a Llama-family forward's cost depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    bytes_per_element: int = 4

    @classmethod
    def of(cls, config, dtype: torch.dtype = torch.float32) -> "ModelShape":
        """From a transformers Llama/Mistral/Qwen2 config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size,
                   torch.tensor([], dtype=dtype).element_size())

    @property
    def layer_weights(self) -> int:
        """Matrix entries of one decoder layer: q, k, v, o projections and the gated MLP."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d + 3 * d * self.intermediate


def _best(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up: allocation, first-touch, thread pool
    return min(timed(fn, sync) for _ in range(repeats))


def measure(threads: int, dtype: torch.dtype = torch.float32, gemm_size: int | None = None,
            read_mib: int | None = None, repeats: int = 5, gemv_cols: int = 4096,
            device: str = "cpu") -> MachineRates:
    """Time a square GEMM in `dtype` and streaming reads of `read_mib` MiB (far beyond the caches) at
    `threads` threads, on `device`; the best of `repeats` runs each. `gemv_cols`: the width of the
    matrix-vector product's rows (a model's hidden size: narrow rows are read more slowly than a plain
    stream). Sizes default to 1024² and 256 MiB on a CPU, 8192² and 2 GiB on a GPU (whose kernels
    would otherwise finish in the time it takes to launch them)."""
    sync = device_sync(device)  # None on a CPU
    gemm_size = gemm_size or (8192 if sync else 1024)
    read_mib = read_mib or (2048 if sync else 256)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(gemm_size, gemm_size, generator=g).to(device, dtype)
        b = torch.randn(gemm_size, gemm_size, generator=g).to(device, dtype)
        gemm = 2 * gemm_size**3 / _best(lambda: torch.mm(a, b), repeats, sync)
        del a, b
        cols = gemv_cols
        matrix = torch.ones(read_mib * 2**20 // (4 * cols), cols, device=device)  # float32 rows: a plain streaming read
        nbytes = matrix.numel() * matrix.element_size()
        reduce = nbytes / _best(lambda: matrix.sum(), repeats, sync)
        matrix = matrix.to(dtype)  # the matrix-vector product in the model's dtype
        vector = torch.ones(cols, dtype=dtype, device=device)
        gemv = matrix.numel() * matrix.element_size() / _best(lambda: torch.mv(matrix, vector), repeats, sync)
    finally:
        torch.set_num_threads(previous)
    return MachineRates(threads=threads, gemm_flop_s=gemm, read_bytes_s=max(reduce, gemv), gemv_bytes_s=gemv)


def forward_flops(shape: ModelShape, tokens: int, cached: int, logits: int = 0, prefix_rows: int = 0) -> float:
    """FLOPs of one forward of `tokens` new positions after `cached` cached ones (causal among the
    new ones), with the LM head on `logits` positions, plus projecting `prefix_rows` memory rows to
    keys and values (norm, k_proj, v_proj) at every layer. Matrix products only (2 per multiply-add)."""
    s = shape
    linear = 2 * tokens * s.layer_weights
    keys_read = tokens * cached + tokens * (tokens + 1) // 2  # sum over new positions of keys attended
    attention = 4 * s.heads * s.head_dim * keys_read  # q.k and p.v
    prefix = 2 * prefix_rows * 2 * s.hidden * s.kv_heads * s.head_dim
    return s.layers * (linear + attention + prefix) + 2 * logits * s.hidden * s.vocab


def decode_bytes(shape: ModelShape, cached: float) -> float:
    """Bytes one decoded token must read: every decoder weight and norm, the final norm, the LM head
    and one embedding row, and the keys and values of `cached` positions at every layer."""
    s = shape
    weights = s.layers * (s.layer_weights + 2 * s.hidden) + s.hidden + s.vocab * s.hidden + s.hidden
    kv = s.layers * 2 * s.kv_heads * s.head_dim * cached
    return (weights + kv) * s.bytes_per_element

"""memllm.core.hf_compat against transformers itself, for every supported model type: each function's
test fails by name when a transformers release changes the behaviour it relies on."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from memllm.core import hf_compat
from memllm.core.config import LoraSettings
from memllm.core.tiny import random_model

TYPES = hf_compat.SUPPORTED_MODEL_TYPES
VOCAB = 64


@pytest.fixture(scope="module", params=TYPES)
def lm(request):
    """A tiny random causal LM of the type; mistral's sliding window is shorter than the test sequences."""
    extra = {"sliding_window": 8} if request.param == "mistral" else {}
    config = AutoConfig.for_model(
        request.param, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(lm, input_ids: torch.Tensor, **kw):
    with torch.no_grad():
        return lm(input_ids=input_ids, output_hidden_states=True, **kw)


def test_decoder_layers_are_hooked_in_order_and_see_the_layer_inputs(lm) -> None:
    layers = hf_compat.decoder_layers(lm)
    assert len(layers) == lm.config.num_hidden_layers
    seen: list[tuple[int, str, torch.Tensor]] = []
    handles = []
    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, l=l: seen.append((l, "in", hf_compat.layer_hidden(a, k))), with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, k, out, l=l: seen.append((l, "out", hf_compat.layer_output(out))), with_kwargs=True))
    try:
        out = run(lm, ids(2, 7, 0))
    finally:
        for h in handles:
            h.remove()
    assert [(l, what) for l, what, _ in seen] == [(l, w) for l in range(len(layers)) for w in ("in", "out")]
    for l, what, hidden in seen:  # hidden_states[l] enters layer l; the last one is after the final norm
        if what == "in":
            torch.testing.assert_close(hidden, out.hidden_states[l], rtol=0, atol=0)
        elif l + 1 < len(layers):
            torch.testing.assert_close(hidden, out.hidden_states[l + 1], rtol=0, atol=0)


def test_with_layer_hidden_replaces_what_the_layer_reads(lm) -> None:
    """Layer 0 reads the embeddings: replacing them with another input's gives that input's logits."""
    a, b = ids(1, 6, 1), ids(1, 6, 2)
    other = lm.get_input_embeddings()(b)
    layer = hf_compat.decoder_layers(lm)[0]
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: hf_compat.with_layer_hidden(args, kwargs, other), with_kwargs=True)
    try:
        replaced = run(lm, a).logits
    finally:
        handle.remove()
    torch.testing.assert_close(replaced, run(lm, b).logits, rtol=0, atol=1e-6)
    assert hf_compat.with_layer_hidden((), {"hidden_states": 1, "x": 2}, other)[1]["hidden_states"] is other


def test_input_norm_is_what_attention_reads_and_layer_device(lm) -> None:
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for l, layer in enumerate(hf_compat.decoder_layers(lm)):
        attn = hf_compat.attention(layer)
        assert hf_compat.layer_device(layer) == attn.k_proj.weight.device
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, k, l=l: captured.__setitem__(l, a[0] if a else k["hidden_states"]), with_kwargs=True))
    try:
        out = run(lm, ids(2, 5, 3))
    finally:
        for h in handles:
            h.remove()
    for l, layer in enumerate(hf_compat.decoder_layers(lm)):
        with torch.no_grad():
            normed = hf_compat.input_norm(layer)(out.hidden_states[l])
        torch.testing.assert_close(captured[l], normed, rtol=0, atol=0)


def test_project_kv_and_rotary_give_the_keys_and_values_the_model_caches(lm) -> None:
    x = ids(2, 9, 4)
    cache = DynamicCache(config=lm.config)
    out = run(lm, x, use_cache=True, **{hf_compat.CACHE_ARG: cache})
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    for l, layer in enumerate(hf_compat.decoder_layers(lm)):
        hidden = out.hidden_states[l]
        with torch.no_grad():
            k, v = hf_compat.project_kv(layer, hf_compat.input_norm(layer)(hidden))
            cos, sin = hf_compat.rotary(lm, hidden, positions)
        assert tuple(k.shape) == (2, lm.config.num_key_value_heads, x.shape[1], hf_compat.attention(layer).head_dim)
        keys, values = hf_compat.layer_kv(cache, l)
        window = keys.shape[2]  # a sliding-window layer keeps the last tokens only
        torch.testing.assert_close(hf_compat.apply_rotary(k, cos, sin)[:, :, -window:], keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(v[:, :, -window:], values, rtol=0, atol=1e-6)


def prefix_kv(lm, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (k, v) [1, kv_heads, P, head_dim] of a prefix, as the model itself computes them."""
    kv = []
    positions = torch.arange(prefix.shape[1]).unsqueeze(0)
    hidden = run(lm, prefix).hidden_states
    with torch.no_grad():
        for l, layer in enumerate(hf_compat.decoder_layers(lm)):
            k, v = hf_compat.project_kv(layer, hf_compat.input_norm(layer)(hidden[l]))
            kv.append((hf_compat.apply_rotary(k, *hf_compat.rotary(lm, hidden[l], positions)), v))
    return kv


def test_prefilled_cache_continues_like_the_whole_sequence(lm) -> None:
    """A prefix's (k, v) broadcast to a batch reads like running [prefix ; text] through the model, row
    by row, under the `cache` keyword of forward; the given tensors are not written into."""
    P, T = 6, 5
    prefix, text = ids(1, P, 5), ids(2, T, 6)
    kv = prefix_kv(lm, prefix)
    before = [(k.clone(), v.clone()) for k, v in kv]
    cache = hf_compat.prefilled_cache(lm.config, kv, batch=2)
    assert cache.get_seq_length() == P
    got = run(lm, text, attention_mask=torch.ones(2, P + T, dtype=torch.long),
              position_ids=torch.arange(P, P + T).expand(2, T), use_cache=True,
              **{hf_compat.CACHE_ARG: cache}).logits
    assert cache.get_seq_length() == P + T
    want = run(lm, torch.cat([prefix.expand(2, -1), text], dim=1)).logits[:, P:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, before))


@pytest.mark.parametrize("room", [3, 12])  # mistral: within its window of 8 / rolling past it
def test_static_prefilled_cache_generates_like_the_whole_sequence(lm, room: int) -> None:
    """A preallocated cache holding a prefix (copied into its first P positions for every row) reads
    and generates like [prefix ; text], under `generate`, and the given tensors are not written into."""
    P, T = 5, 3
    prefix, text = ids(1, P, 12), ids(2, T, 13)
    kv = prefix_kv(lm, prefix)
    before = [(k.clone(), v.clone()) for k, v in kv]
    cache = hf_compat.static_prefilled_cache(lm.config, kv, batch=2, max_len=P + T + room)
    assert int(cache.get_seq_length()) == P
    for l, (k, v) in enumerate(kv):
        keys, values = hf_compat.layer_kv(cache, l)
        assert keys.shape[:3] == (2, k.shape[1], P) and torch.equal(keys, k.expand(2, -1, -1, -1))
        assert torch.equal(values, v.expand(2, -1, -1, -1))
    with torch.no_grad():
        got = lm.generate(input_ids=text, attention_mask=torch.ones(2, P + T, dtype=torch.long), max_new_tokens=room,
                          do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                          **{hf_compat.CACHE_ARG: cache})
        want = lm.generate(input_ids=torch.cat([prefix.expand(2, -1), text], dim=1), max_new_tokens=room,
                           do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences[:, T:], want.sequences[:, P + T:])
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=0, atol=1e-5)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(kv, before))


def test_static_prefilled_cache_refuses_a_prefix_it_cannot_hold(lm) -> None:
    kv = prefix_kv(lm, ids(1, 9, 14))
    with pytest.raises(ValueError, match="does not fit"):
        hf_compat.static_prefilled_cache(lm.config, kv, batch=1, max_len=9)


@pytest.mark.parametrize("static", [False, True])
def test_write_layer_rows_replaces_what_the_layer_reads(lm, static: bool) -> None:
    """Rows 2..P of prefix b written over prefix a read like a cache built from [a[:2] ; b[2:]]: in
    place in a static cache (the buffers keep their address), into new tensors in a dynamic one (its
    tensors may be a prefix shared with other reads, which must not change)."""
    P, T, start = 6, 4, 2
    a, b, text = ids(1, P, 7), ids(1, P, 8), ids(1, T, 9)
    kv_a = prefix_kv(lm, a)
    shared = [(k.clone(), v.clone()) for k, v in kv_a]
    if static:
        cache = hf_compat.static_prefilled_cache(lm.config, kv_a, batch=1, max_len=P + T)
    else:
        cache = hf_compat.prefilled_cache(lm.config, kv_a, batch=1)
    mixed = []
    for l, (k, v) in enumerate(prefix_kv(lm, b)):
        address = hf_compat.layer_kv(cache, l)[0].data_ptr()
        hf_compat.write_layer_rows(cache, l, start, k[:, :, start:], v[:, :, start:])
        mixed.append((torch.cat([kv_a[l][0][:, :, :start], k[:, :, start:]], dim=2),
                      torch.cat([kv_a[l][1][:, :, :start], v[:, :, start:]], dim=2)))
        keys, values = hf_compat.layer_kv(cache, l)
        assert torch.equal(keys, mixed[l][0]) and torch.equal(values, mixed[l][1])
        assert (keys.data_ptr() == address) == static
        if static:
            with pytest.raises(ValueError, match="positions 4..8 given"):
                hf_compat.write_layer_rows(cache, l, 4, k[:, :, :4], v[:, :, :4])
    for (k, v), (k0, v0) in zip(kv_a, shared):
        assert torch.equal(k, k0) and torch.equal(v, v0)  # the prefix the cache was built from is untouched
    kw = dict(attention_mask=torch.ones(1, P + T, dtype=torch.long), position_ids=torch.arange(P, P + T).unsqueeze(0))
    got = run(lm, text, **kw, **{hf_compat.CACHE_ARG: cache}).logits
    want = run(lm, text, **kw, **{hf_compat.CACHE_ARG: hf_compat.prefilled_cache(lm.config, mixed, batch=1)}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_cache_keyword_is_what_forward_layers_and_generate_take(lm) -> None:
    for forward in (lm.forward, hf_compat.decoder(lm).forward, hf_compat.decoder_layers(lm)[0].forward,
                    hf_compat.attention(hf_compat.decoder_layers(lm)[0]).forward):
        assert hf_compat.CACHE_ARG in inspect.signature(forward).parameters, forward
    prefix, prompt = ids(1, 4, 10), ids(1, 3, 11)
    cache = hf_compat.prefilled_cache(lm.config, prefix_kv(lm, prefix), batch=1)
    with torch.no_grad():
        got = lm.generate(input_ids=prompt, attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=3,
                          do_sample=False, pad_token_id=0, **{hf_compat.CACHE_ARG: cache})
        want = lm.generate(input_ids=torch.cat([prefix, prompt], dim=1), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(got[:, 3:], want[:, 7:])


def test_lora_targets_name_modules_of_every_layer(lm) -> None:
    for layer in hf_compat.decoder_layers(lm):
        names = {name.rsplit(".", 1)[-1] for name, _ in layer.named_modules()}
        assert set(LoraSettings().target_modules) <= names


@pytest.mark.parametrize("model_type", TYPES)
def test_memory_models_of_every_type_read_padded_batches_like_single_rows(model_type: str) -> None:
    """The whole path (injection hooks, prefilled cache, M+ retrieval over placed keys) on each type."""
    model = random_model(model_type=model_type, kind="mplus", num_blocks=6, num_ltm_blocks=2, lora_rank=4, seed=1)
    memory = model.new_memory()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model.inject(memory, torch.randint(3, 200, (20,), generator=g))
        a, b = torch.randint(3, 200, (1, 7), generator=g), torch.randint(3, 200, (1, 4), generator=g)
        batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
        mask = torch.ones_like(batch)
        mask[1, :3] = 0
        trace: list = []
        together = model(batch, memory, attention_mask=mask, retrievals=trace).logits
        assert len(trace) == model.num_layers  # retrieval ran at every layer
        torch.testing.assert_close(together[0], model(a, memory).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together[1, 3:], model(b, memory).logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_grouped_sdpa_gives_transformers_sdpa_numbers_without_repeating_heads(model_type: str, monkeypatch) -> None:
    """Memory models run `sdpa_grouped`: reads behind a memory prefix and injections (masked prefills
    over grouped key/value heads) take one grouped SDPA call on CPU, never transformers' sdpa (which
    repeats the heads); logits, delta memory and training gradients equal transformers' sdpa."""
    from memllm.core.inject import delta_memory

    model = random_model(model_type=model_type, num_blocks=4, seed=2)
    assert model.lm.config._attn_implementation == hf_compat.SDPA_GROUPED
    memory = model.new_memory()
    g = torch.Generator().manual_seed(0)
    prompt, context = torch.randint(3, 200, (2, 9), generator=g), torch.randint(3, 200, (1, 12), generator=g)

    def run_all() -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            logits = model(prompt, memory).logits
            delta = delta_memory(model, memory.pool, context)
        pools = memory.pool.unsqueeze(0).expand(2, -1, -1, -1).clone().requires_grad_(True)  # [B, L, N, d]
        loss = model.forward_pools(prompt, pools, labels=prompt).loss
        loss.backward()
        return logits, delta, loss.detach(), pools.grad

    delegated: list[int] = []
    sdpa = hf_compat.sdpa_attention_forward
    monkeypatch.setattr(hf_compat, "sdpa_attention_forward",
                        lambda module, query, *a, **kw: delegated.append(query.shape[2]) or sdpa(module, query, *a, **kw))
    grouped = run_all()
    assert delegated == []  # every call above is a masked prefill: none went through repeat_kv
    model.lm.set_attn_implementation("sdpa")
    for ours, theirs in zip(grouped, run_all()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_memory_model_unpickled_in_a_fresh_process_reads_as_before(tmp_path) -> None:
    """Its config names memllm's attention function, which must exist wherever the model is unpickled
    (registered when memllm is imported, not when a model is built)."""
    import pickle
    import subprocess
    import sys

    model = random_model(seed=3)
    memory = model.new_memory()
    model.inject(memory, torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(0)))
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.save(model(prompt, memory).logits, tmp_path / "want.pt")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps((model, memory)))
    code = ("import pickle, sys, torch; d = sys.argv[1]; model, memory = pickle.load(open(d + '/model.pkl', 'rb'))\n"
            "with torch.no_grad(): got = model(torch.tensor([[5, 6, 7, 8]]), memory).logits\n"
            "print(model.lm.config._attn_implementation, torch.equal(got, torch.load(d + '/want.pt')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [hf_compat.SDPA_GROUPED, "True"]

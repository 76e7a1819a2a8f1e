"""Generation: the KV cache gives the same logits and tokens as re-running the whole sequence, for
every attention type (MHA, GQA, QK-norm, MLA with and without query low-rank, yarn); prompts decoded
together get what each gets alone; sampling settings do what they say."""

import pytest
import torch

from moelab.eval.generate import Sampler, generate_batch, generate_ids, inference_routing, next_token_probs
from tests.conftest import needs_transformers
from tests.models.variants import VARIANTS, tiny_model


def _model(variant):
    # a larger init spreads the logits, so greedy choices are not near-ties decided by rounding
    model = tiny_model(variant, init_std=0.2)
    model.reset_parameters()
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_logits_equal_full_forward(variant):
    model = _model(variant)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad(), inference_routing(model):  # (no capacity: see moelab.eval.generate)
        full = model(ids).logits
        cache = model.new_cache(20)
        parts = [model(ids[:, :7], cache=cache).logits,  # prefill at position 0
                 model(ids[:, 7:12], cache=cache).logits]  # a chunk after cached positions (masked)
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 20)]  # one at a time
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_model_held_in_bf16_decodes_through_a_bf16_cache_as_its_full_forward(variant):
    """Weights in bf16 (load_model's dtype): the cache holds bf16 keys and values (MLA: its latent)
    and the cached logits equal the full forward's within bf16 rounding (~1% of the logits' scale;
    a misplaced position or mask is off by about the scale itself)."""
    from moelab.models import MoETransformer

    wide = _model(variant)
    model = MoETransformer.from_weights(wide.cfg, wide.state_dict(), torch.bfloat16)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), inference_routing(model):
        full = model(ids).logits
        cache = model.new_cache(20)
        parts = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:12], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 20)]
    assert full.dtype == torch.bfloat16 and {b.dtype for b in cache.layers[0].buffers} == {torch.bfloat16}
    torch.testing.assert_close(torch.cat(parts, dim=1).float(), full.float(), rtol=0, atol=0.025 * full.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_and_uncached_generation_give_identical_tokens(variant):
    model = _model(variant)
    prompt = torch.randint(0, 97, (9,)).tolist()
    for sampler in (lambda: Sampler(), lambda: Sampler(temperature=1.0, top_k=20, top_p=0.9, seed=3)):
        cached, why_c = generate_ids(model, prompt, 30, sampler(), use_cache=True)
        uncached, why_u = generate_ids(model, prompt, 30, sampler(), use_cache=False)
        assert cached == uncached and why_c == why_u == "length" and len(cached) == 30
    assert len(set(cached)) > 5  # sampling explored the vocabulary


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_rows_get_the_logits_each_prompt_gets_alone(variant):
    """Prompts of different lengths in one batch, left-padded (KVCache(pad=...)): each real position's
    logits, at the prefill and at every decoding step, equal those of the prompt's own forward. A row
    that saw its padding is off by about the logits' scale."""
    model = _model(variant)
    g = torch.Generator().manual_seed(0)
    lens = [9, 4, 13, 1]
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in lens]
    width = max(lens)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), p]) for n, p in zip(lens, prompts)])
    more = torch.randint(0, 97, (len(lens), 5), generator=g)
    with torch.no_grad(), inference_routing(model):
        cache = model.new_cache(width + 5, pad=torch.tensor([width - n for n in lens]))
        first = model(ids, cache=cache).logits
        steps = torch.cat([model(more[:, t:t + 1], cache=cache).logits for t in range(5)], dim=1)
        for b, (n, p) in enumerate(zip(lens, prompts)):
            alone = model(torch.cat([p, more[b]])[None]).logits[0]
            torch.testing.assert_close(first[b, width - n:], alone[:n], rtol=0, atol=2e-5)
            torch.testing.assert_close(steps[b], alone[n:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompts_decoded_together_get_the_tokens_each_gets_alone(variant):
    """generate_batch, greedy and sampled: each prompt's tokens and stop reason are those of
    generate_ids on it alone, with prompts stopping at an end id, a stop condition, the length and
    the context (the 120-token prompt: the model's context is 128) at different steps. The short
    prompts decode on past the long one's context: its leading positions are dropped with it."""
    model = _model(variant)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 4, 13, 1, 120)]
    eos = generate_ids(model, prompts[2], 30)[0][6]
    stops = [None, lambda new: len(new) == 3, None, None, None]
    for make in (Sampler, lambda: Sampler(temperature=1.0, top_k=20, top_p=0.9, seed=3)):
        alone = [generate_ids(model, p, 30, make(), eos_id=eos, stop=st) for p, st in zip(prompts, stops)]
        together = generate_batch(model, prompts, 30, [make() for _ in prompts], eos_id=eos, stops=stops)
        assert [(new, why) for new, why, _ in together] == alone
        assert all(sec > 0 for *_, sec in together)
        if make is Sampler:
            assert {"eos", "stop", "length", "context"} <= {why for _, why in alone}
            assert max(len(new) for new, _ in alone) == 30


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_batch_of_long_prompts_is_read_in_chunks_and_decodes_as_read_at_once(variant):
    """The prefill takes at most `prefill_tokens` prompt tokens per forward (a range of positions of
    every row, each chunk after the cached ones, left padding included): each real position's logits
    equal the prompt's own forward, and the tokens are those of each prompt alone. In one forward a
    batch of 32K-token prompts held an 8.6 GB attention mask."""
    model = _model(variant)
    g = torch.Generator().manual_seed(2)
    lens = [9, 4, 13, 1, 120]
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in lens]
    width = max(lens)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), p]) for n, p in zip(lens, prompts)])
    with torch.no_grad(), inference_routing(model):
        cache = model.new_cache(width, pad=torch.tensor([width - n for n in lens]))
        read = torch.cat([model(ids[:, s:s + 7], cache=cache).logits for s in range(0, width, 7)], dim=1)
        for b, (n, p) in enumerate(zip(lens, prompts)):
            torch.testing.assert_close(read[b, width - n:], model(p[None]).logits[0], rtol=0, atol=2e-5)
    fed = []
    hook = model.embed.register_forward_hook(lambda mod, args, out: fed.append(tuple(args[0].shape)))
    try:
        lists = [p.tolist() for p in prompts]
        for make in (Sampler, lambda: Sampler(temperature=1.0, top_k=20, top_p=0.9, seed=3)):
            alone = [generate_ids(model, p, 6, make()) for p in lists]
            fed.clear()
            chunked = generate_batch(model, lists, 6, [make() for _ in lists], prefill_tokens=35)
            assert [(new, why) for new, why, _ in chunked] == alone
    finally:
        hook.remove()
    prefill = fed[: -(6 - 1)]  # then the decoding steps, a token a row
    assert [w for _, w in prefill] == [7] * 17 + [1] and all(b == 5 for b, _ in prefill)


def test_a_prompt_that_is_done_leaves_the_batch():
    model = _model("mla-q-lowrank-interleaved")
    fed = []
    hook = model.embed.register_forward_hook(lambda mod, args, out: fed.append(tuple(args[0].shape)))
    try:
        done = generate_batch(model, [[1, 2, 3], [4, 5]], 10, stops=[lambda new: len(new) == 2, None])
    finally:
        hook.remove()
    assert [len(new) for new, *_ in done] == [2, 10]
    assert fed == [(2, 3), (2, 1)] + [(1, 1)] * 8  # the prefill, one step of both, then the second alone
    assert generate_batch(model, [], 10) == []


def test_mla_cache_holds_the_latent_not_per_head_keys():
    model = _model("mla-q-lowrank-interleaved")
    cache = model.new_cache(16)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 10)), cache=cache)
    latent, k_rot = cache.layers[0].buffers
    assert latent.shape == (1, 16, model.cfg.kv_lora_rank) and k_rot.shape == (1, 16, model.cfg.qk_rope_head_dim)


def test_generation_stops_at_eos_stop_and_context():
    model = _model("gqa")
    prompt = [1, 2, 3]
    free, _ = generate_ids(model, prompt, 12)
    ids, why = generate_ids(model, prompt, 12, eos_id=free[4])
    assert why == "eos" and ids == free[:free.index(free[4]) + 1]
    ids, why = generate_ids(model, prompt, 12, eos_id={free[6], free[3]})  # any of several end ids
    assert why == "eos" and ids == free[:min(free.index(free[6]), free.index(free[3])) + 1]
    ids, why = generate_ids(model, prompt, 12, stop=lambda new: len(new) == 2)
    assert why == "stop" and ids == free[:2]
    ids, why = generate_ids(model, [i % 97 for i in range(120)], 50)
    assert why == "context" and len(ids) == model.cfg.max_seq_len - 120
    assert generate_ids(model, prompt, 0) == ([], "length")  # not one token past the limit
    from moelab.errors import UserError

    with pytest.raises(UserError, match="give 0 or more"):
        generate_ids(model, prompt, -1)


def test_ids_past_the_tokenizer_are_never_drawn():
    """A model whose vocabulary is padded past its tokenizer's (model.vocab_size, or a Hugging Face
    model's padded embedding) must not emit those ids: no text decodes from them."""
    model = _model("gqa")
    V = model.cfg.vocab_size
    with torch.no_grad():
        model.lm_head.weight[V - 8:] *= 50  # make the padding rows the likeliest
    free, _ = generate_ids(model, [1, 2, 3], 12, Sampler(temperature=1.0, seed=3))
    assert max(free) >= V - 8  # without the limit they are drawn
    for sampler in (Sampler(), Sampler(temperature=1.0, seed=3), Sampler(temperature=2.0, top_k=5, seed=1)):
        ids, _ = generate_ids(model, [1, 2, 3], 12, sampler, vocab=V - 8)
        assert len(ids) == 12 and max(ids) < V - 8, ids


def test_top_k_top_p_and_temperature():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = torch.softmax(logits, 0)
    torch.testing.assert_close(next_token_probs(logits, 1.0, 0, 1.0), p)
    k2 = next_token_probs(logits, 1.0, 2, 1.0)
    torch.testing.assert_close(k2, torch.cat([p[:2] / p[:2].sum(), torch.zeros(3)]))
    # nucleus: the smallest set of most likely tokens with mass >= top_p
    need = int((p.cumsum(0) < 0.9).sum()) + 1
    nuc = next_token_probs(logits, 1.0, 0, 0.9)
    assert (nuc > 0).sum() == need and abs(float(nuc.sum()) - 1) < 1e-6
    assert (next_token_probs(logits, 1.0, 0, 0.01) > 0).sum() == 1  # always keeps the top token
    cold = next_token_probs(logits, 0.1, 0, 1.0)
    assert cold[0] > 0.99
    draws = [Sampler(temperature=1.0, seed=s)(logits) for s in range(400)]
    share0 = draws.count(0) / 400
    assert abs(share0 - float(p[0])) < 0.08  # sampling follows the distribution
    with pytest.raises(Exception, match="top-p"):
        Sampler(top_p=0.0)
    with pytest.raises(Exception, match="temperature nan"):  # sampled from nan probabilities: a traceback
        Sampler(temperature=float("nan"))


def test_extreme_sampling_settings_are_greedy_or_refused():
    logits = torch.tensor([1.0, 3.0, 2.5, -4.0])
    # a tiny temperature is greedy (it was nan: every logit divided to +-inf, or by a float32 zero)
    for t in (1e-30, 1e-39, 5e-324):
        assert torch.equal(next_token_probs(logits, t, 0, 1.0), torch.tensor([0.0, 1.0, 0.0, 0.0])), t
        assert Sampler(temperature=t, seed=1)(logits) == 1
    # an infinite temperature drew uniformly from every token; a seed past 64 bits overflowed in torch
    for bad, match in (({"temperature": float("inf")}, "temperature inf"), ({"seed": 2**64}, "seed"),
                       ({"seed": -2**63 - 1}, "seed")):
        with pytest.raises(Exception, match=match):
            Sampler(**bad)
    Sampler(seed=2**64 - 1)(logits), Sampler(seed=-2**63)(logits)  # torch's whole range is taken


@needs_transformers
def test_sampling_distribution_equals_transformers_warpers():
    """temperature -> top-k -> top-p as transformers' generate applies them, on random cases."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        V = int(torch.randint(2, 300, (1,), generator=g))
        logits = torch.randn(V, generator=g) * 3
        temperature = float(torch.rand(1, generator=g)) * 1.5 + 0.1
        top_k = int(torch.randint(0, V + 3, (1,), generator=g))
        top_p = float(torch.rand(1, generator=g)) * 0.98 + 0.02
        x = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        x = TopKLogitsWarper(top_k)(None, x) if top_k else x
        ref = TopPLogitsWarper(top_p)(None, x).softmax(-1)[0]
        ours = next_token_probs(logits, temperature, top_k, top_p)
        assert torch.equal(ours > 0, ref > 0), (V, temperature, top_k, top_p)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)

"""jaxvlm.sampling against transformers' logits processors (the reference) and against the distributions
that each setting should produce."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxvlm.config import GenerationConfig
from jaxvlm.sampling import (
    TOPK_PATH_MAX_K,
    SamplingState,
    SlotParams,
    init_state,
    pad_ids,
    sample,
    set_slot,
    top_candidates,
)

sample_jit = jax.jit(sample, static_argnames=("greedy_only", "num_logprobs", "path"))
set_slot_jit = jax.jit(set_slot)

V = 80  # > TOPK_PATH_MAX_K, so the top-k path really truncates the vocabulary
N_DRAWS = 10000
S = 8  # most tests use this batch size, so that jit compiles few shapes (compiling dominates the runtime)

# Upper 0.1% points of the chi-square distribution by degrees of freedom.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}

# A fixed distribution over 7 tokens scattered in the vocabulary; the rest is ~impossible (e^-40).
SUPPORT = np.array([3, 17, 42, 55, 61, 70, 79])
SUPPORT_P = np.array([0.32, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03])
FIXED_LOGITS = np.full(V, -40.0, np.float32)
FIXED_LOGITS[SUPPORT] = np.log(SUPPORT_P)


def states(params: list[SlotParams], prompts: list[list[int]] | None = None) -> SamplingState:
    state = init_state(len(params), V)
    for i, p in enumerate(params):
        prompt = pad_ids(prompts[i] if prompts else [])
        state = set_slot_jit(state, i, p, prompt)
    return state


def run(logits, state, step=0, ban_stop=None, **static):
    """One sample() call with every slot at ``step`` (an int or an array)."""
    s = logits.shape[0]
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (s,))
    ban_stop = jnp.zeros((s,), bool) if ban_stop is None else jnp.asarray(ban_stop)
    return sample_jit(jnp.asarray(logits), state, step, ban_stop, **static)


def many_draws(logits_row: np.ndarray, path: str = "auto", **settings) -> np.ndarray:
    """N_DRAWS independent draws from one logit vector: slots with the same settings and seeds 0..n-1."""
    n = N_DRAWS
    state = init_state(n, V)
    full = lambda value, dtype: jnp.full((n,), value, dtype)  # noqa: E731
    state = dataclasses.replace(
        state,
        temperature=full(settings.get("temperature", 1.0), jnp.float32),
        top_k=full(settings.get("top_k", 0), jnp.int32),
        top_p=full(settings.get("top_p", 1.0), jnp.float32),
        min_p=full(settings.get("min_p", 0.0), jnp.float32),
        do_sample=full(True, bool),
        seed=jnp.arange(n, dtype=jnp.uint32),
    )
    out, _ = run(jnp.broadcast_to(jnp.asarray(logits_row), (n, V)), state, path=path)
    return np.asarray(out.tokens)


def reference_probs(logits_row: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The sampling distribution transformers' generate() builds, in its order of warpers."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    scores = warpers(torch.zeros((1, 1), dtype=torch.long), torch.tensor(logits_row, dtype=torch.float64)[None])
    return torch.softmax(scores, dim=-1)[0].numpy()


def assert_matches(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Tokens outside the support of ``probs`` never appear; the counts inside pass a chi-square test."""
    counts = np.bincount(tokens, minlength=probs.shape[0])
    support = probs > 1e-9
    assert counts[~support].sum() == 0, f"sampled outside the allowed set: {np.nonzero(counts * ~support)}"
    expected = probs[support] * len(tokens)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return
    assert stat < CHI2_CRIT[df], f"chi2={stat:.1f} (df={df}); counts {counts[support]} vs {expected.round()}"


# ------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("path", ["auto", "topk", "sort"])
def test_top_k_one_is_greedy(path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3
    params = [SlotParams.make(do_sample=True, top_k=1, temperature=float(rng.uniform(0.3, 2.0)),
                              top_p=float(rng.uniform(0.1, 1.0)), seed=i) for i in range(S)]
    for step in range(3):
        out, _ = run(logits, states(params), step, path=path)
        np.testing.assert_array_equal(out.tokens, logits.argmax(-1))


def test_greedy_ignores_temperature_top_p_top_k_min_p():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(S, V)).astype(np.float32)
    params = [
        SlotParams.make(do_sample=False, temperature=5.0, top_p=0.05, top_k=3, min_p=0.9, seed=1),
        SlotParams.make(do_sample=False, temperature=0.01, seed=2),
        SlotParams.make(do_sample=False, top_k=0, top_p=1.0, seed=3),
        SlotParams.make(do_sample=True, temperature=0.0, top_k=0, seed=4),  # T=0 while sampling: greedy
        SlotParams.make(do_sample=True, temperature=0.0, top_k=10, top_p=0.5, seed=5),
        SlotParams.make(do_sample=False, top_k=100, seed=6),
        SlotParams.make(do_sample=False, temperature=0.0, seed=7),
        SlotParams.make(do_sample=False, temperature=3.0, top_k=50, top_p=0.9, seed=8),
    ]
    state = states(params)
    out, _ = run(logits, state)
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    fast, _ = run(logits, state, greedy_only=True)
    np.testing.assert_array_equal(fast.tokens, out.tokens)
    np.testing.assert_allclose(fast.logprob, out.logprob)


# -------------------------------------------------------------------------------------- reproducibility


def test_seeded_slot_same_alone_or_in_any_batch():
    rng = np.random.default_rng(2)
    row = rng.normal(size=(V,)).astype(np.float32) * 2
    mine = [SlotParams.make(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=1234),
            SlotParams.make(do_sample=True, temperature=1.3, top_k=0, min_p=0.02, seed=99)]
    sort_forcing = SlotParams.make(do_sample=True, top_k=0, seed=7)
    greedy = SlotParams.make(do_sample=False, seed=8)
    narrow = SlotParams.make(do_sample=True, top_k=5, temperature=2.0, seed=9)
    wide = SlotParams.make(do_sample=True, top_k=TOPK_PATH_MAX_K + 1, seed=10)

    for me in mine:
        layouts = [  # (slot of my request, batch)
            (0, [me]),
            (3, [greedy, narrow, sort_forcing, me, wide, greedy, narrow, greedy]),  # sort path under "auto"
            (5, [greedy] * 5 + [me] + [narrow] * 2),  # top-k path when my top_k <= 64
        ]
        runs = []
        for slot, batch in layouts:
            logits = rng.normal(size=(len(batch), V)).astype(np.float32)
            logits[slot] = row
            state = states(batch)
            tokens = []
            for step in range(8):
                out, state = run(logits, state, step)
                tokens.append(int(out.tokens[slot]))
            runs.append(tokens)
        assert all(r == runs[0] for r in runs), runs
        assert len(set(runs[0])) > 1  # the steps really draw fresh noise


def test_top_k_and_sort_paths_agree_for_narrow_slots():
    rng = np.random.default_rng(3)
    n = N_DRAWS
    logits = rng.normal(size=(n, V)).astype(np.float32) * 2
    state = dataclasses.replace(
        init_state(n, V),
        temperature=jnp.asarray(rng.uniform(0.2, 2.0, n), jnp.float32),
        top_k=jnp.asarray(rng.integers(1, TOPK_PATH_MAX_K + 1, n), jnp.int32),
        top_p=jnp.asarray(rng.choice([1.0, 0.9, 0.5], n), jnp.float32),
        min_p=jnp.asarray(rng.choice([0.0, 0.05], n), jnp.float32),
        do_sample=jnp.ones((n,), bool),
        seed=jnp.asarray(rng.integers(0, 2**32, n), jnp.uint32),
    )
    step = rng.integers(0, 1000, n)
    by_top_k, _ = run(logits, state, step, path="topk")
    by_sort, _ = run(logits, state, step, path="sort")
    np.testing.assert_array_equal(by_top_k.tokens, by_sort.tokens)


@pytest.mark.parametrize("k", [5, 20, TOPK_PATH_MAX_K])
def test_two_stage_top_candidates_equal_lax_top_k(k):
    # long rows (several groups, a padded last group), with ties and -inf that must resolve like lax.top_k
    rng = np.random.default_rng(7)
    rows = rng.integers(-4, 5, size=(4, 5003)).astype(np.float32)  # heavy ties
    rows[1] = -np.inf
    rows[2, ::3] = -np.inf
    rows[3] = rng.normal(size=5003)
    values, ids = jax.jit(top_candidates, static_argnums=1)(jnp.asarray(rows), k)
    ref_values, ref_ids = jax.lax.top_k(jnp.asarray(rows), k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(values, ref_values)


def test_different_seeds_give_different_tokens():
    flat = np.zeros(V, np.float32)
    assert len(set(many_draws(flat).tolist())) == V  # seeds 0..n-1 cover all 80 equally likely tokens
    # same seed and step on every slot: one token; same seed, different steps: fresh draws
    n = N_DRAWS
    state = dataclasses.replace(init_state(n, V), do_sample=jnp.ones((n,), bool),
                                seed=jnp.full((n,), 5, jnp.uint32))
    logits = np.zeros((n, V), np.float32)
    same, _ = run(logits, state, 0)
    assert len(set(np.asarray(same.tokens).tolist())) == 1
    steps, _ = run(logits, state, np.arange(n))
    assert len(set(np.asarray(steps.tokens).tolist())) == V


# ---------------------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies(temperature):
    tokens = many_draws(FIXED_LOGITS, temperature=temperature)
    expected = np.exp(FIXED_LOGITS.astype(np.float64) / temperature)
    assert_matches(tokens, expected / expected.sum())


@pytest.mark.parametrize("path", ["auto", "topk", "sort"])
def test_top_k_frequencies(path):
    tokens = many_draws(FIXED_LOGITS, path=path, top_k=3)
    assert set(np.unique(tokens)) == set(SUPPORT[:3])
    assert_matches(tokens, reference_probs(FIXED_LOGITS, top_k=3))


@pytest.mark.parametrize("path,top_k", [("auto", 0), ("sort", 0), ("topk", 50), ("sort", 50)])
def test_top_p_frequencies(path, top_k):
    # cumulative mass before each token: 0, .32, .54, .70, .82 -> top_p=0.75 keeps the first four
    tokens = many_draws(FIXED_LOGITS, path=path, top_k=top_k, top_p=0.75)
    assert set(np.unique(tokens)) == set(SUPPORT[:4])
    probs = np.zeros(V)
    probs[SUPPORT[:4]] = SUPPORT_P[:4] / SUPPORT_P[:4].sum()
    assert_matches(tokens, probs)
    assert_matches(tokens, reference_probs(FIXED_LOGITS, top_k=top_k, top_p=0.75))


@pytest.mark.parametrize("path,top_k", [("auto", 0), ("topk", 64)])
def test_min_p_frequencies(path, top_k):
    # p >= 0.3 * 0.32 = 0.096 keeps the first four tokens
    tokens = many_draws(FIXED_LOGITS, path=path, top_k=top_k, min_p=0.3)
    assert set(np.unique(tokens)) == set(SUPPORT[:4])
    assert_matches(tokens, reference_probs(FIXED_LOGITS, min_p=0.3))


@pytest.mark.parametrize("path", ["auto", "sort"])
def test_warpers_apply_in_transformers_order(path):
    # Temperature 2 flattens the distribution before top_k/top_p/min_p cut it: four tokens survive,
    # where the same cuts at temperature 1 would leave two.
    settings = dict(temperature=2.0, top_k=6, top_p=0.8, min_p=0.55)
    expected = reference_probs(FIXED_LOGITS, **settings)
    assert (expected > 1e-9).sum() == 4
    assert (reference_probs(FIXED_LOGITS, **{**settings, "temperature": 1.0}) > 1e-9).sum() == 2
    assert_matches(many_draws(FIXED_LOGITS, path=path, **settings), expected)


def test_top_p_zero_keeps_only_the_top_token():
    tokens = many_draws(FIXED_LOGITS, top_p=0.0, temperature=3.0)
    assert set(tokens.tolist()) == {SUPPORT[0]}


# ------------------------------------------------------------------------------------ penalty and masks


def full_logprobs(out) -> np.ndarray:
    """Rebuild the log_softmax vectors from num_logprobs=V output."""
    result = np.empty(out.top_ids.shape, np.float32)
    np.put_along_axis(result, np.asarray(out.top_ids), np.asarray(out.top_logprobs), axis=-1)
    return result


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 3  # positive and negative logits
    prompts = [list(rng.integers(0, V, int(rng.integers(1, 12)))) for _ in range(S)]
    penalties = [1.3, 0.7, 2.0, 1.0, 1.05, 0.5, 3.0, 1.2]
    params = [SlotParams.make(repetition_penalty=p) for p in penalties]
    out, _ = run(logits, states(params, prompts), num_logprobs=V)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([prompts[i]])
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, torch.tensor(logits[i : i + 1]))
        np.testing.assert_allclose(full_logprobs(out)[i], torch.log_softmax(ref, -1)[0].numpy(), atol=1e-5)
        assert int(out.tokens[i]) == int(ref.argmax())


def test_repetition_penalty_changes_the_greedy_choice_and_counts_outputs():
    logits = np.zeros((S, V), np.float32)
    logits[:, 10], logits[:, 11] = 4.0, 3.0
    state = states([SlotParams.make(repetition_penalty=2.0)] * S)
    first, state = run(logits, state, 0)
    assert int(first.tokens[0]) == 10
    assert bool(state.seen[0, 10])  # the output joins the penalised set: 4/2 < 3 now
    second, state = run(logits, state, 1)
    assert int(second.tokens[0]) == 11


def test_banned_ids_are_never_chosen():
    banned = [int(SUPPORT[0]), int(SUPPORT[2])]
    params = [SlotParams.make(bad_ids=banned)] + [SlotParams.make(do_sample=True, bad_ids=banned, seed=i)
                                                  for i in range(S - 1)]
    out, _ = run(np.tile(FIXED_LOGITS, (S, 1)), states(params), num_logprobs=V)
    assert int(out.tokens[0]) == SUPPORT[1]
    assert not set(np.asarray(out.tokens).tolist()) & set(banned)
    assert np.all(np.isneginf(full_logprobs(out)[:, banned]))
    # and with sampling, over many draws
    n = N_DRAWS
    state = dataclasses.replace(init_state(n, V), do_sample=jnp.ones((n,), bool),
                                seed=jnp.arange(n, dtype=jnp.uint32),
                                banned=jnp.zeros((n, V), bool).at[:, jnp.asarray(banned)].set(True))
    draws, _ = run(np.tile(FIXED_LOGITS, (n, 1)), state)
    probs = np.exp(FIXED_LOGITS.astype(np.float64))
    probs[banned] = 0
    assert_matches(np.asarray(draws.tokens), probs / probs.sum())


def test_stop_ids_are_banned_only_while_ban_stop():
    eos = int(SUPPORT[0])
    state = states([SlotParams.make(stop_ids=[eos, 2])] * S)
    ban_stop = np.arange(S) % 2 == 0
    out, _ = run(np.tile(FIXED_LOGITS, (S, 1)), state, ban_stop=ban_stop, num_logprobs=V)
    np.testing.assert_array_equal(out.tokens, np.where(ban_stop, SUPPORT[1], eos))
    lp = full_logprobs(out)
    assert np.all(np.isneginf(lp[ban_stop, eos])) and np.all(np.isfinite(lp[~ban_stop, eos]))


# ----------------------------------------------------------------------------------------------- logprobs


def test_logprobs_are_log_softmax_before_temperature():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(S, V)).astype(np.float32) * 2
    params = [SlotParams.make(do_sample=True, temperature=0.5, top_k=20, seed=i) for i in range(S)]
    out, _ = run(logits, states(params), num_logprobs=V)
    ref = torch.log_softmax(torch.tensor(logits), -1)
    top = torch.topk(ref, V)  # most likely first
    np.testing.assert_array_equal(out.top_ids, top.indices.numpy())
    np.testing.assert_allclose(out.top_logprobs, top.values.numpy(), atol=1e-5)
    chosen = ref.gather(1, torch.tensor(np.asarray(out.tokens), dtype=torch.long)[:, None])[:, 0]
    np.testing.assert_allclose(out.logprob, chosen.numpy(), atol=1e-5)
    assert out.top_ids.dtype == jnp.int32 and out.tokens.dtype == jnp.int32


def test_no_logprobs_and_bfloat16_logits():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(S, V)), jnp.bfloat16)
    out, _ = run(logits, init_state(S, V), greedy_only=True)
    assert out.top_ids.shape == (S, 0) and out.top_logprobs.shape == (S, 0)
    assert out.logprob.dtype == jnp.float32
    np.testing.assert_array_equal(out.tokens, np.asarray(logits.astype(jnp.float32)).argmax(-1))


def test_bad_static_arguments_raise():
    args = (jnp.zeros((1, V)), init_state(1, V), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool))
    with pytest.raises(ValueError, match="path"):
        sample(*args, path="fast")
    with pytest.raises(ValueError, match="num_logprobs"):
        sample(*args, num_logprobs=V + 1)


# --------------------------------------------------------------------------------------------- slot state


def test_set_slot_replaces_every_row_of_the_slot():
    old = SlotParams.make(do_sample=True, temperature=0.3, top_k=7, top_p=0.5, min_p=0.1,
                          repetition_penalty=1.5, seed=11, bad_ids=[4, 5], stop_ids=[2])
    state = states([old] * S, prompts=[[1, 2, 3]] * S)
    state = dataclasses.replace(state, seen=state.seen.at[1, 60].set(True))  # as if generated
    new = SlotParams.make(do_sample=False, temperature=1.1, top_k=0, seed=2**32 - 1,
                          bad_ids=[7, V + 5], stop_ids=list(range(10, 20)))  # V+5: out of vocab, dropped
    slot = jnp.asarray(1, jnp.int32)  # traced under jit
    state = set_slot_jit(state, slot, new, jnp.asarray(pad_ids([8, 9, 8, 30])))

    seen = np.asarray(state.seen)
    assert np.flatnonzero(seen[1]).tolist() == [8, 9, 30]
    assert np.flatnonzero(np.asarray(state.banned[1])).tolist() == [7]
    assert np.flatnonzero(np.asarray(state.stop[1])).tolist() == list(range(10, 20))
    assert int(state.seed[1]) == 2**32 - 1 and state.seed.dtype == jnp.uint32
    assert not bool(state.do_sample[1]) and int(state.top_k[1]) == 0
    np.testing.assert_allclose(state.temperature[1], 1.1, rtol=1e-6)
    # the other slots are untouched
    for other in (0, 2, S - 1):
        assert np.flatnonzero(seen[other]).tolist() == [1, 2, 3]
        assert np.flatnonzero(np.asarray(state.banned[other])).tolist() == [4, 5]
        assert int(state.top_k[other]) == 7 and int(state.seed[other]) == 11


def test_slot_params_from_generation_config():
    cfg = GenerationConfig(do_sample=True, temperature=0.6, top_k=30, top_p=0.9, min_p=0.05,
                           repetition_penalty=1.1, random_seed=42, stop_token_ids=[2], bad_token_ids=[13, 14])
    p = SlotParams.from_generation_config(cfg)
    assert (float(p.temperature), int(p.top_k), int(p.seed), bool(p.do_sample)) == (np.float32(0.6), 30, 42, True)
    assert p.stop_ids.tolist() == [2] + [-1] * 7 and p.bad_ids.tolist()[:3] == [13, 14, -1]
    resolved = SlotParams.from_generation_config(cfg, stop_ids=[2, 32000], bad_ids=[])
    assert resolved.stop_ids.tolist()[:3] == [2, 32000, -1] and (resolved.bad_ids == -1).all()
    unseeded = GenerationConfig(do_sample=True)
    assert int(SlotParams.from_generation_config(unseeded, seed=77).seed) == 77
    seeds = {int(SlotParams.from_generation_config(unseeded).seed) for _ in range(4)}
    assert len(seeds) > 1  # fresh random seeds
    assert pad_ids(range(9)).shape == (16,) and pad_ids([]).shape == (8,)

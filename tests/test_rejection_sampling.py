"""Speculative decoding's acceptance rule (Leviathan et al. 2023; Chen et al. 2023): rejection sampling
emits tokens that follow the target distribution p exactly, whatever the draft distribution q
(chi-square and total variation over 200k draws), greedy rows reduce to the longest matching prefix,
and the draws are keyed (batch-independent, reproducible)."""
import torch

from stats_util import chi2_pvalue, total_variation
from tinyinfer.sampling.params import SamplingParams
from tinyinfer.sampling.processors import probabilities
from tinyinfer.sampling.sampler import STREAM_SAMPLE, rejection_sample, sample


def run_rejection(p: torch.Tensor, q: torch.Tensor, n: int, seed: int = 0):
    """p (k+1, V), q (k, V) shared by n rows; drafts drawn from q independently of the sampler's noise."""
    k = q.shape[0]
    g = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], 1)
    seeds = torch.arange(n) * 7 + seed
    steps = torch.full((n,), 3)
    return rejection_sample(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, seeds, steps)


def assert_emits_p(p: torch.Tensor, q: torch.Tensor, n: int = 200_000):
    accepted, tokens = run_rejection(p, q, n)
    k, V = q.shape
    # Shape contract: accepted drafts, then exactly one more token, then -1 padding.
    emitted = (tokens >= 0).sum(1)
    assert torch.equal(emitted, accepted + 1)
    # The token at position j (when emitted) must follow p_j, whatever q_j was.
    for j in range(k + 1):
        toks = tokens[:, j][tokens[:, j] >= 0]
        counts = torch.bincount(toks, minlength=V)
        assert total_variation(counts, p[j]) < 0.01, (j, counts, p[j])
        assert chi2_pvalue(counts, p[j]) > 1e-3, (j, counts, p[j])
    # Acceptance rate of slot 0 is sum_x min(p, q).
    rate = float((accepted > 0).double().mean())
    assert abs(rate - float(torch.minimum(p[0], q[0]).sum())) < 0.005
    return accepted, tokens


def random_dist(g, shape, zeros=0):
    d = torch.rand(shape, generator=g) ** 2
    if zeros:
        d[..., :zeros] = 0
    return d / d.sum(-1, keepdim=True)


def test_rejection_sampler_emits_the_target_distribution_dense_q():
    g = torch.Generator().manual_seed(3)
    assert_emits_p(random_dist(g, (3, 8)), random_dist(g, (2, 8)))


def test_rejection_sampler_with_one_hot_q():
    g = torch.Generator().manual_seed(4)
    p = random_dist(g, (3, 8))
    # n-gram style draft on the target's likeliest token, so later slots get enough samples to test.
    q = torch.nn.functional.one_hot(p[:2].argmax(-1), 8).float()
    assert_emits_p(p, q)


def test_rejection_sampler_with_q_zero_where_p_is_not_and_p_zero_where_q_is_not():
    g = torch.Generator().manual_seed(5)
    p = random_dist(g, (3, 8))
    p[:, 7] = 0
    p = p / p.sum(-1, keepdim=True)
    assert_emits_p(p, random_dist(g, (2, 8), zeros=3))


def test_rejection_sampler_with_top_k_top_p_applied_to_p_and_q():
    g = torch.Generator().manual_seed(6)
    tl, dl = torch.randn(3, 8, generator=g) * 1.5, torch.randn(2, 8, generator=g) * 1.5
    p = probabilities(tl, [SamplingParams(temperature=0.8, top_k=5, top_p=0.9)] * 3, [[]] * 3)
    q = probabilities(dl, [SamplingParams(temperature=1.2, top_k=3)] * 2, [[]] * 2)
    assert (p == 0).any() and (q == 0).any()
    assert_emits_p(p, q)


def test_rejection_sampler_accepts_everything_when_p_equals_q():
    g = torch.Generator().manual_seed(7)
    p = random_dist(g, (3, 8))
    accepted, tokens = run_rejection(p, p[:2].clone(), 20_000)
    assert (accepted == 2).all()
    assert (tokens >= 0).all()


def test_rejection_sampler_greedy_is_longest_prefix_match_plus_target_token():
    V = 6
    argmax = torch.tensor([[1, 4, 2, 0], [1, 4, 2, 0], [3, 3, 3, 3]])  # target argmax per slot
    p = torch.nn.functional.one_hot(argmax, V).float()  # (B, 4, V)
    drafts = torch.tensor([[1, 4, 5], [1, 4, 2], [0, 3, 3]])
    q = torch.nn.functional.one_hot(drafts, V).float()
    accepted, tokens = rejection_sample(p, q, drafts, [1, 2, 3], [0, 0, 0])
    assert accepted.tolist() == [2, 3, 0]
    assert tokens.tolist() == [[1, 4, 2, -1], [1, 4, 2, 0], [3, -1, -1, -1]]


def test_rejection_sampler_is_deterministic_for_a_seed_and_batch_independent():
    g = torch.Generator().manual_seed(8)
    p, q = random_dist(g, (64, 4, 8)), random_dist(g, (64, 3, 8))
    drafts = torch.randint(0, 8, (64, 3), generator=g)
    seeds, steps = torch.arange(64), torch.arange(64) * 3
    a1, t1 = rejection_sample(p, q, drafts, seeds, steps)
    a2, t2 = rejection_sample(p, q, drafts, seeds, steps)
    assert torch.equal(a1, a2) and torch.equal(t1, t2)
    perm = torch.randperm(64, generator=g)
    a3, t3 = rejection_sample(p[perm], q[perm], drafts[perm], seeds[perm], steps[perm])
    assert torch.equal(a3, a1[perm]) and torch.equal(t3, t1[perm])
    _, t4 = rejection_sample(p, q, drafts, seeds + 1, steps)
    assert not torch.equal(t4, t1)


def test_bonus_token_is_the_plain_sample_at_its_step():
    # When every draft is accepted, the bonus token is exactly what plain sampling would draw there.
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(32, 8, generator=g)
    p1 = torch.softmax(logits, -1)
    drafts = torch.zeros(32, 0, dtype=torch.long)
    _, tokens = rejection_sample(p1.unsqueeze(1), torch.zeros(32, 0, 8), drafts, range(32), [5] * 32)
    plain = sample(logits, [SamplingParams()] * 32, [[]] * 32, range(32), [5] * 32, stream=STREAM_SAMPLE)
    assert torch.equal(tokens[:, 0], plain)


def test_rows_with_fewer_drafts_treat_the_rest_as_padding():
    g = torch.Generator().manual_seed(10)
    p, q = random_dist(g, (1, 4, 8)), random_dist(g, (1, 3, 8))
    drafts = torch.randint(0, 8, (1, 3), generator=g)
    for d in range(4):
        # Row with d real drafts, padded to 3 with garbage, equals the same row verified with k = d.
        pad_q = torch.cat([q[:, :d], torch.zeros(1, 3 - d, 8)], 1)
        pad_x = torch.cat([drafts[:, :d], torch.zeros(1, 3 - d, dtype=torch.long)], 1)
        for seed in range(50):
            a, t = rejection_sample(p, pad_q, pad_x, [seed], [4], num_drafts=[d])
            a_ref, t_ref = rejection_sample(p[:, :d + 1], q[:, :d], drafts[:, :d], [seed], [4])
            assert a.tolist() == a_ref.tolist()
            assert t[0, :d + 1].tolist() == t_ref[0].tolist() and (t[0, d + 1:] == -1).all()


def test_one_hot_rule_draws_what_rejection_sample_draws_for_one_hot_q():
    """rejection_sample_one_hot (n-gram / suffix drafts: no p or q tensors) against rejection_sample
    with q = one_hot(drafts) and p = softmax(x): the same drafts kept and the same tokens, draw for
    draw, over random logits (some -inf, as after top-k), draft lengths 0..4, greedy and sampled rows."""
    from tinyinfer.sampling.sampler import rejection_sample_one_hot
    g = torch.Generator().manual_seed(5)
    V, B = 40, 300
    d = torch.randint(0, 5, (B,), generator=g).tolist()
    greedy = (torch.rand(B, generator=g) < 0.2).tolist()
    x = torch.randn(sum(d) + B, V, generator=g) * 2
    x[torch.rand(x.shape, generator=g) < 0.3] = -float("inf")
    x[:, 0] = 1.0                                          # every row keeps a finite logit
    starts = [0]
    for n in d:
        starts.append(starts[-1] + n + 1)
    p_flat = torch.softmax(x, dim=1)
    p_flat[torch.tensor(greedy).repeat_interleave(torch.tensor(d) + 1)] = 0.0
    for b in range(B):                                     # greedy rows: one-hot at the argmax
        if greedy[b]:
            rows = torch.arange(starts[b], starts[b + 1])
            p_flat[rows, x[rows].argmax(dim=1)] = 1.0
    drafts = []
    for b in range(B):                                     # likely tokens, some unlikely
        rows = p_flat[starts[b]:starts[b] + d[b]]
        drafts.append([int(torch.multinomial(r, 1, generator=g)) if torch.rand(1, generator=g) < 0.7
                       else int(torch.randint(0, V, (1,), generator=g)) for r in rows])
    seeds, steps = list(range(100, 100 + B)), [3 + b % 7 for b in range(B)]
    got = rejection_sample_one_hot(x, starts[:-1], drafts, greedy, seeds, steps)
    accepted, tokens = [], []
    for b in range(B):                                     # one row at a time: its own k = d_b
        p = p_flat[starts[b]:starts[b + 1]].unsqueeze(0)
        q = torch.nn.functional.one_hot(torch.tensor(drafts[b], dtype=torch.long), V).float().view(1, d[b], V)
        a, t = rejection_sample(p, q, torch.tensor([drafts[b]], dtype=torch.long).view(1, d[b]),
                                [seeds[b]], [steps[b]])
        accepted.append(int(a))
        tokens.append(t[0, :int(a) + 1].tolist())
    assert got == (accepted, tokens)
    assert 0 < sum(accepted) < sum(d) and any(a < n for a, n in zip(accepted, d))

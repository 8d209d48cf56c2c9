"""Chunk merge operators against a per-chunk loop written for clarity: values, gradients, batches, shards."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_xtoken.align import AlignedPositions, align, merge_log_probs, positions_from_token_chunks

torch.manual_seed(0)


def reference_merge(lp: torch.Tensor, chunk_ids: torch.Tensor, n_chunks: int, mode: str, targets: torch.Tensor) -> torch.Tensor:
    """Loop over chunks; positions in increasing order (the spec of DESIGN.md step 5)."""
    rows = []
    for k in range(n_chunks):
        pos = [p for p in range(lp.shape[0]) if int(chunk_ids[p]) == k]
        if not pos:
            rows.append(torch.full((lp.shape[1],), -math.inf, dtype=lp.dtype))
        elif mode == "chain":
            row = lp[pos[0]]
            for p in pos[1:]:
                row = row + lp[p, targets[p]]
            rows.append(row)
        elif mode == "chain-normalized":  # the chain merge divided by its total mass
            row = lp[pos[0]]
            for p in pos[1:]:
                row = row + lp[p, targets[p]]
            rows.append(row - torch.logsumexp(row, 0))
        elif mode == "logmean":
            rows.append(sum(lp[p] for p in pos) / len(pos))
        else:
            rows.append(torch.log(sum(torch.exp(lp[p]) for p in pos) / len(pos)))
    return torch.stack(rows) if rows else lp.new_zeros(0, lp.shape[1])


def random_case(n: int = 12, v: int = 7, n_chunks: int = 6, dtype=torch.float64, contiguous: bool = True):
    logits = torch.randn(n, v, dtype=dtype)
    if contiguous:
        ids = torch.sort(torch.randint(-1, n_chunks, (n,))).values
    else:
        ids = torch.randint(-1, n_chunks, (n,))
    targets = torch.randint(0, v, (n,))
    return logits, ids, targets


def merged(logits, ids, n_chunks, mode, targets, fn=merge_log_probs):
    lp = torch.log_softmax(logits, -1)
    if fn is merge_log_probs:
        if mode == "chain-normalized":
            return fn(lp, ids, n_chunks, mode="chain", normalize=True)
        return fn(lp, ids, n_chunks, mode=mode, target_log_probs=lp.gather(1, targets[:, None])[:, 0])
    return fn(lp, ids, n_chunks, mode, targets)


MODES = ["chain", "chain-normalized", "mean", "logmean"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_values_match_reference(mode, contiguous, seed):
    torch.manual_seed(seed)
    logits, ids, targets = random_case(contiguous=contiguous)
    got = merged(logits, ids, 6, mode, targets)
    ref = merged(logits, ids, 6, mode, targets, fn=reference_merge)
    assert got.shape == (6, 7)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference_and_gradcheck(mode):
    torch.manual_seed(1)
    logits, ids, targets = random_case(n=9, v=5, n_chunks=4)
    ids[0] = 0  # every chunk non-empty so that the outputs are finite
    ids = torch.sort(torch.cat([ids[:5], torch.tensor([0, 1, 2, 3])])).values
    logits = torch.randn(ids.numel(), 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (ids.numel(),))
    weights = torch.randn(4, 5, dtype=torch.float64)

    def f(x, fn):
        return (merged(x, ids, 4, mode, targets, fn=fn) * weights).sum()

    g = torch.autograd.grad(f(logits, merge_log_probs), logits)[0]
    g_ref = torch.autograd.grad(f(logits, reference_merge), logits)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: merged(x, ids, 4, mode, targets), (logits,))


@pytest.mark.parametrize("mode", ["chain", "mean"])
def test_batches_via_concat(mode):
    torch.manual_seed(2)
    parts, lps, tls, per_seq = [], [], [], []
    for n, k in ((5, 3), (8, 4), (1, 1)):
        ids = torch.sort(torch.randint(-1, k, (n,))).values
        tg = torch.randint(0, 6, (n,))
        parts.append(AlignedPositions(ids, ids.clone(), tg, tg.clone(), k))
        lp = torch.log_softmax(torch.randn(n, 6, dtype=torch.float64), -1)
        lps.append(lp)
        tls.append(lp.gather(1, tg[:, None])[:, 0])
        per_seq.append(merge_log_probs(lp, ids, k, mode=mode, target_log_probs=tls[-1]))
    batch = AlignedPositions.concat(parts)
    assert batch.n_chunks == 8
    got = merge_log_probs(torch.cat(lps), batch.student_chunk_ids, batch.n_chunks, mode=mode, target_log_probs=torch.cat(tls))
    want = torch.cat(per_seq)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])
    ref = reference_merge(torch.cat(lps), batch.student_chunk_ids, 8, mode, batch.student_targets)
    torch.testing.assert_close(got[torch.isfinite(got)], ref[torch.isfinite(ref)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tp", [2, 3])
def test_vocab_shard_merge_is_slice_of_full_merge(mode, tp):
    torch.manual_seed(3)
    logits, ids, targets = random_case(n=14, v=12, n_chunks=5)
    lp = torch.log_softmax(logits, -1)
    tl = lp.gather(1, targets[:, None])[:, 0]  # gathered once (one all-reduce on a real TP group)
    full = merged_shard(lp, ids, 5, mode, tl)
    v = lp.shape[1]
    for r in range(tp):
        a, b = r * v // tp, (r + 1) * v // tp
        shard = merged_shard(lp[:, a:b], ids, 5, mode, tl)
        assert torch.equal(torch.isinf(shard), torch.isinf(full[:, a:b]))
        torch.testing.assert_close(shard[torch.isfinite(shard)], full[:, a:b][torch.isfinite(full[:, a:b])])


def merged_shard(lp, ids, n, mode, tl):
    if mode == "chain-normalized":
        return merge_log_probs(lp, ids, n, mode="chain", normalize=True)
    return merge_log_probs(lp, ids, n, mode=mode, target_log_probs=tl)


def test_side_modes_of_each_merge():
    from nemo_xtoken.align.merge import MERGES, side_modes

    assert MERGES == ("chain", "mean", "reference")
    assert [side_modes(m) for m in MERGES] == [("chain", "chain"), ("mean", "mean"), ("mean", "logmean")]
    with pytest.raises(ValueError, match="merge 'sum'"):
        side_modes("sum")


def test_normalized_chain_sums_to_one_and_keeps_the_chain_ratios():
    torch.manual_seed(4)
    logits, ids, targets = random_case(n=10, v=6, n_chunks=3)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    chain = merged(logits, ids, 3, "chain", targets)
    norm = merged(logits, ids, 3, "chain-normalized", targets)
    torch.testing.assert_close(norm.exp().sum(1), torch.ones(3, dtype=norm.dtype))
    assert (chain.exp().sum(1) < 1 - 1e-6).all()  # the unnormalized chain sums to the continuation probability
    torch.testing.assert_close(norm - norm[:, :1], chain - chain[:, :1])  # same relative probabilities


def test_chain_merge_is_the_probability_of_the_chunk():
    # The chain merge of the true chunk tokens: log p(t1) + log p(t2 | t1) ...
    lp = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    targets = torch.tensor([2, 1, 3])
    out = merge_log_probs(lp, torch.tensor([0, 0, 0]), 1, target_log_probs=lp.gather(1, targets[:, None])[:, 0])
    torch.testing.assert_close(out[0, 2], lp[0, 2] + lp[1, 1] + lp[2, 3])
    # a one-position chunk is its position unchanged, under both merges
    one = merge_log_probs(lp, torch.tensor([-1, 0, -1]), 1, mode="mean")
    torch.testing.assert_close(one[0], lp[1])


def test_merge_input_errors():
    lp = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="merge mode 'sum'"):
        merge_log_probs(lp, torch.zeros(3, dtype=torch.long), 1, mode="sum")
    with pytest.raises(ValueError, match=r"log_probs \[N, V\] and chunk_ids \[N\]"):
        merge_log_probs(lp, torch.zeros(2, dtype=torch.long), 1, mode="mean")
    with pytest.raises(ValueError, match="target_log_probs"):
        merge_log_probs(lp, torch.zeros(3, dtype=torch.long), 1)


# ---- the next-token shift ------------------------------------------------------------------------


def test_positions_from_token_chunks_shift():
    s_chunks = torch.tensor([0, 1, 1, 2])  # tokens a | b c | d
    t_chunks = torch.tensor([0, 1, 2])  # tokens a | bc | d
    s_ids, t_ids = torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 22])
    pos = positions_from_token_chunks(s_chunks, t_chunks, s_ids, t_ids, 3)
    # position p predicts token p+1: its chunk and its target; the last position predicts nothing
    assert pos.student_chunk_ids.tolist() == [1, 1, 2, -1]
    assert pos.student_targets.tolist() == [11, 12, 13, 0]
    assert pos.teacher_chunk_ids.tolist() == [1, 2, -1]
    assert pos.teacher_targets.tolist() == [21, 22, 0]
    # chunk 0 starts at token 0: no position predicts it, so it never counts
    assert pos.chunk_mask().tolist() == [False, True, True]
    masked = positions_from_token_chunks(s_chunks, t_chunks, s_ids, t_ids, 3, student_loss_mask=torch.tensor([1, 1, 0, 1]))
    assert masked.student_chunk_ids.tolist() == [1, 1, -1, -1] and masked.chunk_mask().tolist() == [False, True, False]
    single = positions_from_token_chunks(torch.tensor([0]), torch.tensor([0]), torch.tensor([5]), torch.tensor([6]), 1)
    assert single.student_chunk_ids.tolist() == [-1] and not single.chunk_mask().any()


def test_alignment_positions_merge_end_to_end(llama3, qwen3):
    """Real alignment → positions → merged chunk distributions: chunk `201`/`2 0 1` uses three teacher positions."""
    a, s, t = align("In 201 days", llama3, qwen3, return_ids=True)
    pos = a.to_positions(s, t)
    lp_t = torch.log_softmax(torch.randn(len(t), 50, dtype=torch.float64), -1)
    tt = pos.teacher_targets.clamp(max=49)
    out = merge_log_probs(lp_t, pos.teacher_chunk_ids, pos.n_chunks, target_log_probs=lp_t.gather(1, tt[:, None])[:, 0])
    # teacher tokens In ' ' 2 0 1 ' days': chunk 2 ('201') is predicted by positions 1 (→'2'), 2 (→'0'), 3 (→'1')
    torch.testing.assert_close(out[2], lp_t[1] + lp_t[2, tt[2]] + lp_t[3, tt[3]])
    assert pos.chunk_mask().tolist() == [False, True, True, True]


@pytest.mark.parametrize("mode", ["chain", "mean"])
def test_merge_of_an_empty_side_stays_on_the_graph(mode):
    """No position on a side (an empty batch): the merge still back-propagates (zeros), so the
    losses need no special case and the backward of an empty batch is not an error."""
    lp = torch.zeros(0, 5, requires_grad=True)
    tl = torch.zeros(0, requires_grad=True)
    out = merge_log_probs(lp, torch.zeros(0, dtype=torch.long), 3, mode=mode, target_log_probs=tl)
    assert out.shape == (3, 5) and torch.isneginf(out).all()
    torch.where(torch.isfinite(out), out, torch.zeros(())).sum().backward()
    assert lp.grad is not None and lp.grad.shape == (0, 5)

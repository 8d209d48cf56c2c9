"""partition_kl (reference): zero exactly where the string distributions agree, the `143` target, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemo_xtoken.align.merge import AlignedPositions
from nemo_xtoken.errors import XTokenError
from nemo_xtoken.losses import p_kl, partition_kl
from nemo_xtoken.losses.partition import build_partition_plan
from nemo_xtoken.testing.string_world import World, concat

# (student pattern, teacher pattern): which chunk kinds the texts produce
WORLDS = {
    "1:N (student pairs, teacher characters)": ((2, 2), (1, 1, 1, 1)),
    "N:1 (student characters, teacher pairs)": ((1, 1, 1, 1), (2, 2)),
    "1:1 (pairs on both sides, other ids)": ((2, 2), (2, 2)),
    "1:N, 3 levels": ((3, 1), (1, 1, 1, 1)),
    "M:N (pairs against 1-2-1)": ((2, 2), (1, 2, 1)),
    "M:N (3-1 against 1-3)": ((3, 1), (1, 3)),
}
TEXTS = ["abca$", "abab$", "bcaa$", "cccc$"]


def _world_batch(patterns, seed=0):
    w = World.random(*patterns, seed=seed)
    parts = [w.batch(x)[:3] for x in TEXTS]
    return w, concat(parts)


@pytest.mark.parametrize("name", list(WORLDS))
def test_zero_where_the_string_distributions_agree(name):
    """Both sides derived from one string distribution: every chunk scores 0; a perturbed student does not."""
    w, (s, t, al) = _world_batch(WORLDS[name])
    sp = w.spellings()
    plan = build_partition_plan(al, sp)
    kinds = plan.sizes()
    if name.startswith("M:N"):
        assert kinds["m_to_n_chunks"] > 0
    else:
        assert kinds["level1"] > 0 and kinds["m_to_n_chunks"] == 0
        if "1:1" not in name:
            assert kinds["deeper_levels"] > 0
    per_chunk = partition_kl(s, t, sp, alignment=al, reduction="none")
    counted = al.chunk_mask()
    assert not bool(counted[0]) and not bool(counted[1])  # BOS (starts the text) and the student-only token
    assert per_chunk.abs().max() < 1e-9, per_chunk
    g = torch.Generator().manual_seed(1)
    bumped = s + 0.5 * torch.randn(s.shape, generator=g, dtype=s.dtype)
    worse = partition_kl(bumped, t, sp, alignment=al, reduction="none")
    # every counted chunk sees the difference, but the final `$` (certain in this world: nothing to compare)
    assert int((worse[counted] > 1e-4).sum()) == int(counted.sum()) - len(TEXTS), worse


@pytest.mark.parametrize("name", ["1:N (student pairs, teacher characters)", "N:1 (student characters, teacher pairs)",
                                  "M:N (pairs against 1-2-1)"])
def test_gradcheck_float64(name):
    w = World.random(*WORLDS[name], seed=2)
    s, t, al, _ = w.batch("abcb$")
    sp = w.spellings()
    g = torch.Generator().manual_seed(3)
    x = (s.clamp(min=-30) + 0.3 * torch.randn(s.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: partition_kl(z, t, sp, alignment=al, reduction="sum"), (x,), eps=1e-6, atol=1e-6)


def test_blocked_and_padded_equal_unblocked():
    w, (s, t, al) = _world_batch(WORLDS["1:N, 3 levels"], seed=4)
    sp = w.spellings()
    g = torch.Generator().manual_seed(5)
    s = s.clamp(min=-30) + 0.3 * torch.randn(s.shape, generator=g, dtype=torch.float64)
    pad_s = torch.cat([s, torch.randn(s.shape[0], 3, dtype=s.dtype, generator=g)], 1)  # Megatron-style padded columns
    pad_t = torch.cat([t, torch.randn(t.shape[0], 5, dtype=t.dtype, generator=g)], 1)
    a = pad_s.clone().requires_grad_(True)
    ref = partition_kl(a, pad_t, sp, alignment=al)
    ref.backward()
    b = pad_s.clone().requires_grad_(True)
    blk = partition_kl(b, pad_t, sp, alignment=al, block_size=3)
    blk.backward()
    assert torch.allclose(ref, blk, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert float(a.grad[:, -3:].abs().max()) == 0.0
    unpadded = partition_kl(s, t, sp, alignment=al)
    assert torch.allclose(ref, unpadded, rtol=1e-12)


def test_bad_input_names_what_to_do():
    w = World.random((2, 2), (1, 1, 1, 1))
    sp = w.spellings()
    s, t, al, _ = w.batch("abca$")
    with pytest.raises(XTokenError, match="Spellings"):
        partition_kl(s, t, object(), alignment=al)
    with pytest.raises(XTokenError, match="spellings were built"):
        partition_kl(s, t, sp, alignment=al, student_vocab_size=s.shape[1] + 1)
    with pytest.raises(XTokenError, match="narrower"):
        partition_kl(s[:, :-1], t, sp, alignment=al)


# ---- the real vocabularies: Llama-3 student, Qwen3 teacher --------------------------------------


@pytest.fixture(scope="module")
def spell_llama3_qwen3(llama3, qwen3):
    from nemo_xtoken.vocab.spellings import build_spellings

    return build_spellings(llama3, qwen3)


def _ids(tok, text):
    return tok.tokenizer.encode(text, add_special_tokens=False).ids


def test_143_partition_kl_prefers_the_true_token_where_pkl_prefers_the_first_digit(llama3, qwen3, spell_llama3_qwen3, w_llama3_qwen3):
    """A teacher sure of `1 4 3`: free student logits trained on partition-KL put their top token on `143`;
    trained on P-KL with the built W (chain merge) on `1`, `11` or `111` (the first digit's tokens)."""
    (s143,) = _ids(llama3, "143")
    t_ids = _ids(qwen3, "143")
    assert len(t_ids) == 3
    v_s, v_t = spell_llama3_qwen3.shape
    assert spell_llama3_qwen3.spelling("student", s143) == tuple(t_ids)
    teacher = torch.zeros(3, v_t)
    teacher[torch.arange(3), torch.tensor(t_ids)] = 15.0  # p ≈ 0.96 on each digit
    al = AlignedPositions(torch.tensor([0]), torch.tensor([0, 0, 0]), torch.tensor([s143]), torch.tensor(t_ids), 1)

    def train(loss_fn):
        x = torch.zeros(1, v_s, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.5)
        for _ in range(60):
            opt.zero_grad()
            loss = loss_fn(x)
            loss.backward()
            opt.step()
        return x.detach(), float(loss.detach())

    x_part, v_part = train(lambda x: partition_kl(x, teacher, spell_llama3_qwen3, alignment=al))
    x_pkl, _ = train(lambda x: p_kl(x, teacher, w_llama3_qwen3, alignment=al))
    top_part = llama3.tokenizer.id_to_token(int(x_part.argmax()))
    top_pkl = llama3.tokenizer.id_to_token(int(x_pkl.argmax()))
    assert int(x_part.argmax()) == s143, top_part
    assert top_pkl in ("1", "11", "111"), top_pkl
    p143 = float(torch.softmax(x_part, 1)[0, s143])
    assert p143 > 0.5 and v_part < 0.5, (p143, v_part)


def test_cached_teacher_with_every_id_equals_the_live_teacher():
    """A cached (top-k) teacher enters through its dense rows; with k = V it is the live teacher exactly."""
    from nemo_xtoken.losses.sparse import sparse_from_logits

    w, (s, t, al) = _world_batch(WORLDS["1:N, 3 levels"], seed=6)
    sp = w.spellings()
    g = torch.Generator().manual_seed(7)
    x = s.clamp(min=-30) + 0.3 * torch.randn(s.shape, generator=g, dtype=torch.float64)
    live = partition_kl(x, t, sp, alignment=al)
    cached = partition_kl(x, sparse_from_logits(t, t.shape[1], vocab_size=t.shape[1]), sp, alignment=al)
    assert torch.allclose(live, cached, rtol=1e-9)
    top2 = partition_kl(x, sparse_from_logits(t, 2, vocab_size=t.shape[1]), sp, alignment=al)
    assert not torch.allclose(live, top2, rtol=1e-3)  # a small k changes it (benchmarks/partition_cached.py measures how much)


def test_demo_method_is_opt_in_and_its_spellings_are_reduced_consistently():
    """`partkl_*` only with --methods; reduced spellings are the full ones in the kept ids, cut before a dropped piece."""
    from nemo_xtoken.demo.run import DemoConfig
    from nemo_xtoken.demo.vocab_subset import VocabSubset, reduce_spellings

    assert not any(m.key.startswith("partkl") for m in DemoConfig().selected())
    assert [m.key for m in DemoConfig(methods=("ce", "partkl_qwen3")).selected()] == ["ce", "partkl_qwen3"]
    w = World.random((2, 2), (1, 1, 1, 1))
    sp = w.spellings()
    v_s, v_t = sp.shape
    ssub = VocabSubset(np.arange(2, v_s, dtype=np.int64))  # student: drop BOS and the extra token
    drop = int(np.flatnonzero(np.array(w.teacher_vocab) == "b")[0])
    tsub = VocabSubset(np.array([i for i in range(v_t) if i != drop], dtype=np.int64))  # teacher: drop `b`
    red = reduce_spellings(sp, ssub, tsub)
    assert red.shape == (ssub.size, tsub.size)
    for new, old in enumerate(ssub.kept.tolist()):
        full = sp.spelling("student", old)
        cut = full[: full.index(drop)] if drop in full else full
        assert tuple(tsub.to_old(list(red.spelling("student", new)))) == cut


@pytest.mark.parametrize("path", ["reference", "parallel tp 1"])
def test_nothing_counted_is_exactly_zero_with_zero_gradients(path):
    from nemo_xtoken.parallel import vocab_parallel_partition_kl

    fn = partition_kl if path == "reference" else vocab_parallel_partition_kl
    w = World.random((2, 2), (1, 1, 1, 1))
    sp = w.spellings()
    v_s, v_t = sp.shape
    for n, mask in ((0, None), (4, torch.zeros(4, dtype=torch.bool))):
        x = torch.randn(n, v_s, requires_grad=True)
        loss = fn(x, torch.randn(n, v_t), sp, mask=mask)
        loss.backward()
        assert float(loss) == 0.0 and float(x.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("weighting", ["static", "entropy"])
def test_multi_teacher_reference_and_parallel_agree(weighting):
    """partition_kl as a teacher's loss in multi_teacher (Spellings) and on shards (PartitionTPPlan or Spellings)."""
    from nemo_xtoken.losses import Teacher, multi_teacher
    from nemo_xtoken.parallel import PartitionTPPlan, vocab_parallel_multi_teacher

    w = World.random((2, 2), (1, 1, 1, 1))
    sp = w.spellings()
    s, t, al, _ = w.batch("abca$")
    g = torch.Generator().manual_seed(8)
    s = s.clamp(min=-30) + 0.3 * torch.randn(s.shape, generator=g, dtype=s.dtype)
    t2 = t.clamp(min=-30) + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    a = multi_teacher(s, [t, t2], [Teacher("partition_kl", sp, weight=0.6), Teacher("partition_kl", sp, weight=0.4)],
                      alignments=[al, al], weighting=weighting)
    b = vocab_parallel_multi_teacher(s, [t, t2], [Teacher("partition_kl", PartitionTPPlan.build(sp, 1), weight=0.6),
                                                   Teacher("partition_kl", sp, weight=0.4)], alignments=[al, al], weighting=weighting)
    assert float(a.loss) > 1e-3
    assert torch.allclose(a.loss, b.loss.to(a.loss.dtype), rtol=1e-5) and torch.allclose(a.alphas, b.alphas.to(a.alphas.dtype), rtol=1e-5)

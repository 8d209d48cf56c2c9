"""The run's criterion with the low-traffic H-KL / GOLD / ULD exchange (``distill.tp_exchange``).

* ``XTokenLogitsLoss`` in ``summary`` mode against ``exact`` mode, on one process and on 2 gloo
  ranks: per teacher ``value ≤ exact ≤ value + kd_bound`` (the bound it logs, computed from the
  summaries), the same values on both ranks and as on one process; token-blocked, chunk-aligned,
  adaptive teacher weights and a cached (``SparseTeacher``) teacher included; where the bound is 0
  (every probability in its own interval) values and gradients equal exact mode's.
* ``criterion_from_config`` builds a ``HybridPlan`` once when the mode is on, and a run's TP-2
  criterion then never all-gathers: the bytes its collectives send per token equal what
  ``traffic()`` (``xtoken distill --check``) reports, a small fraction of exact mode's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.distill")

from nemo_xtoken.errors import XTokenError  # noqa: E402
from nemo_xtoken.integration.distill import TeacherSpec, XTokenLogitsLoss  # noqa: E402
from nemo_xtoken.losses.sparse import SparseTeacher, sparse_from_logits  # noqa: E402
from nemo_xtoken.parallel.summary import DEFAULT_BINS, HybridPlan  # noqa: E402
from nemo_xtoken.testing import run_distributed  # noqa: E402
from tests.test_parallel import VS, VS_PAD, VT, VT_PAD, random_alignment, random_projection  # noqa: E402

LOSSES = ("h_kl", "gold", "uld")


def _specs(names=LOSSES) -> list[TeacherSpec]:
    return [TeacherSpec(n, n, random_projection() if n != "uld" else None, 1.0 / (k + 1), VT) for k, n in enumerate(names)]


def _criterion(mode: str, tp: int, names=LOSSES, **kw) -> XTokenLogitsLoss:
    return XTokenLogitsLoss(_specs(names), student_vocab_size=VS, student_padded=VS_PAD, teacher_padded=[VT_PAD] * len(names),
                            tp=tp, student_layout="bsv", tp_exchange=mode, **kw)


def _ladder(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits whose real ids' probabilities all sit in distinct summary intervals.

    One geometric ladder (ratio 1/1.04, over two intervals per step) dealt alternately to the two
    sides at random ids, the remainder on top (split in two on the teacher's side): the counting functions cannot
    cross inside any interval, so the summary's bound is 0 and its value and gradient are exact.
    """
    rho, c = 1 / 1.04, 0.002
    s = torch.full((n, VS_PAD), -1e4)
    t = torch.full((n, VT_PAD), -1e4)
    ladder = c * rho ** np.arange(1, 2 * (VS + VT))
    ps = ladder[0::2][: VS - 1]
    pt = ladder[1::2][: VT - 2]
    ps = np.concatenate([[1 - ps.sum()], ps])  # ≈ 0.98
    pt = np.concatenate([[0.6 * (1 - pt.sum()), 0.4 * (1 - pt.sum())], pt])  # ≈ 0.59, 0.39
    for i in range(n):
        s[i, torch.randperm(VS, generator=g)] = torch.log(torch.from_numpy(ps)).float()
        t[i, torch.randperm(VT, generator=g)] = torch.log(torch.from_numpy(pt)).float()
    return s, t


def make_cases() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    al = random_alignment(rng, VS, VT)
    ns, nt = al.student_chunk_ids.numel(), al.teacher_chunk_ids.numel()
    s, t = torch.randn(ns, VS_PAD, generator=g) * 3, torch.randn(nt, VT_PAD, generator=g) * 3
    ls, lt = _ladder(6, g)
    cached = sparse_from_logits(t, 8, vocab_size=VT)
    cached = SparseTeacher(cached.ids[None], cached.log_probs[None], cached.rest_log_mass[None], VT)
    return [
        dict(tag="aligned", s=s, t=t, align=al, kw={}),
        dict(tag="aligned-blocked-entropy", s=s, t=t, align=al, kw=dict(block_size=3, weighting="entropy", merge="mean")),
        dict(tag="cached", s=s, t=cached, align=al, kw=dict(block_size=4)),
        dict(tag="ladder", s=ls, t=lt, align=None, kw=dict(block_size=None)),
    ]


def _run_case(case: dict, mode: str, rank: int, tp: int) -> dict:
    crit = _criterion(mode, tp, **case["kw"])
    ws = VS_PAD // tp
    s = case["s"][:, rank * ws : (rank + 1) * ws].clone().requires_grad_(True)
    t = case["t"]
    if isinstance(t, torch.Tensor):
        t = t[:, rank * (VT_PAD // tp) : (rank + 1) * (VT_PAD // tp)][None]
    loss = crit(s[None], [t] * len(LOSSES), alignments=[case["align"]] * len(LOSSES))
    loss.backward()
    return {"loss": loss.detach(), "metrics": dict(crit.last_metrics), "grad": s.grad, "exchanges": crit.exchanges}


def _worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [{m: _run_case(c, m, rank, world) for m in ("exact", "summary")} for c in cases]


@pytest.fixture(scope="module")
def cases():
    return make_cases()


@pytest.fixture(scope="module")
def one_process(cases):
    return _worker(0, 1, cases)


@pytest.fixture(scope="module")
def two_ranks(cases, real):
    """Both gloo jobs in one spawn (the ranks' imports dominate): the criterion cases, then the run's criterion."""
    return run_distributed(_two_rank_worker, 2, cases, real, timeout=900)


def _two_rank_worker(rank: int, world: int, cases: list[dict], real: dict) -> dict:
    return {"cases": _worker(rank, world, cases), "counted": _counting_worker(rank, world, real)}


def _check_within_bound(case: dict, out: dict, msg: str) -> None:
    ex, su = out["exact"]["metrics"], out["summary"]["metrics"]
    for name in LOSSES:
        e, v, b = float(ex[f"kd/{name}"]), float(su[f"kd/{name}"]), float(su[f"kd_bound/{name}"])
        tol = 1e-5 * abs(e) + 1e-6
        assert v <= e + tol and e <= v + b + tol, f"{msg} {name}: exact {e}, summary {v}, bound {b}"
        if case["tag"] != "ladder":
            assert b < 0.05 * e, f"{msg} {name}: the bound {b} is not informative (exact {e})"
        assert f"kd_bound/{name}" not in ex  # exact mode has no approximation to report


def test_exchanges_follow_the_mode():
    assert _criterion("exact", 2).exchanges == ["all-gather"] * 3
    assert _criterion("summary", 1).exchanges == ["summary"] * 3
    assert _criterion("auto", 1).exchanges == ["all-gather"] * 3  # one rank: nothing crosses ranks
    crit = _criterion("auto", 2)
    assert crit.exchanges == ["summary"] * 3
    h, gold, uld = crit._teachers
    assert isinstance(h.projection, HybridPlan) and h.projection.relaxed and h.projection.bins == DEFAULT_BINS
    assert isinstance(gold.projection, HybridPlan) and not gold.projection.relaxed
    assert uld.options["summary_bins"] == DEFAULT_BINS
    assert _criterion("summary", 2, summary_bins=64)._teachers[0].projection.bins == 64


def test_bad_settings_name_the_config_key():
    with pytest.raises(XTokenError, match=r"tp_exchange must be one of \['auto', 'exact', 'summary'\] \(config distill.tp_exchange\), got 'fast'"):
        _criterion("fast", 2)
    with pytest.raises(XTokenError, match=r"summary_bins must be ≥ 2 \(config distill.summary_bins\), got 1"):
        _criterion("summary", 2, summary_bins=1)


def test_one_process_summary_within_the_logged_bound(cases, one_process):
    for case, out in zip(cases, one_process):
        _check_within_bound(case, out, case["tag"])
        assert out["summary"]["exchanges"] == ["summary"] * 3 and out["exact"]["exchanges"] == ["all-gather"] * 3
        cos = torch.nn.functional.cosine_similarity(out["summary"]["grad"].flatten(), out["exact"]["grad"].flatten(), dim=0)
        assert float(cos) > 0.9, case["tag"]


def test_blocked_bound_equals_unblocked_bound(cases, one_process, monkeypatch):
    """The HybridPlan goes through the token-blocked path (several blocks per teacher, recomputed in the backward),
    and the blocks record their items' bounds once each: the blocked run logs the unblocked run's bound."""
    from nemo_xtoken.losses import blocked as blocked_mod

    calls = []
    real_apply = blocked_mod._Blocked.apply
    monkeypatch.setattr(blocked_mod._Blocked, "apply", lambda spec, *a: calls.append(len(spec["blocks"])) or real_apply(spec, *a))
    case = dict(cases[0], kw=dict(block_size=3))
    blocked = _run_case(case, "summary", 0, 1)
    assert len(calls) == 3 and min(calls) > 1, calls  # every teacher, several blocks
    for name in LOSSES:
        torch.testing.assert_close(blocked["metrics"][f"kd_bound/{name}"], one_process[0]["summary"]["metrics"][f"kd_bound/{name}"],
                                   rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(blocked["metrics"][f"kd/{name}"], one_process[0]["summary"]["metrics"][f"kd/{name}"], rtol=1e-5, atol=1e-6)


def test_where_the_bound_is_zero_summary_equals_exact(cases, one_process):
    (k,) = [i for i, c in enumerate(cases) if c["tag"] == "ladder"]
    out = one_process[k]
    for name in LOSSES:
        assert float(out["summary"]["metrics"][f"kd_bound/{name}"]) == 0.0, name  # the precondition, from the criterion itself
    torch.testing.assert_close(out["summary"]["loss"], out["exact"]["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["summary"]["grad"], out["exact"]["grad"], rtol=1e-5, atol=1e-7)
    assert float(out["exact"]["grad"].abs().sum()) > 0


def test_two_ranks_equal_one_process_in_both_modes(cases, one_process, two_ranks):
    w = VS_PAD // 2
    for r, per_rank in enumerate(two_ranks):
        for case, out, ref in zip(cases, per_rank["cases"], one_process):
            _check_within_bound(case, out, f"{case['tag']} rank {r}")
            for mode in ("exact", "summary"):
                msg = f"{case['tag']} {mode} rank {r}"
                torch.testing.assert_close(out[mode]["loss"], ref[mode]["loss"], rtol=1e-5, atol=1e-6, msg=msg)
                for key, v in ref[mode]["metrics"].items():
                    torch.testing.assert_close(out[mode]["metrics"][key], v, rtol=1e-5, atol=1e-6, msg=f"{msg} {key}")
                torch.testing.assert_close(out[mode]["grad"], ref[mode]["grad"][:, r * w : (r + 1) * w], rtol=1e-5, atol=1e-6, msg=msg)


# ---- the run's criterion (criterion_from_config) with real tokenizers and W ------------------------------------


def _run_config(tokenizers: dict, w_file: str, overrides: dict):
    from nemo_xtoken.integration.config import config_from_dict

    d = {
        "student": {"tokenizer": tokenizers["llama3"], "seq_length": 32},
        "teachers": [
            {"name": "phi", "tokenizer": tokenizers["o200k"], "projection": w_file, "loss": "h_kl"},
            {"name": "phi_gold", "tokenizer": tokenizers["o200k"], "projection": w_file, "loss": "gold", "weight": 0.5},
            {"name": "phi_uld", "tokenizer": tokenizers["o200k"], "loss": "uld", "weight": 0.25},
        ],
        "distill": {"audit": False, **overrides.get("distill", {})},
        "parallel": {"tensor_model_parallel_size": overrides.get("tp", 2)},
        "train": {"train_iters": 2, "global_batch_size": 2, "micro_batch_size": 1},
    }
    return config_from_dict(d)


STUDENT_PAD, TEACHER_PAD = 128256, 200064  # Llama-3.2-1B and Phi-4-mini output widths


@pytest.fixture(scope="module")
def real(tmp_path_factory, w_llama3_o200k, llama3_path, o200k_path):
    d = tmp_path_factory.mktemp("w")
    return {"tokenizers": {"llama3": llama3_path, "o200k": o200k_path}, "w": str(w_llama3_o200k.save(d / "l3_o200k.safetensors"))}


def _from_config(real: dict, **overrides):
    from nemo_xtoken.integration.config import validate_resources
    from nemo_xtoken.integration.distill import criterion_from_config

    cfg = _run_config(real["tokenizers"], real["w"], overrides)
    rep = validate_resources(cfg)
    tp = cfg.parallel.tensor_model_parallel_size
    crit, _ = criterion_from_config(cfg, rep, tp=tp, student_padded=STUDENT_PAD, teacher_padded=[TEACHER_PAD] * 3)
    return crit


def test_criterion_from_config_holds_hybrid_plans_when_on(real):
    from nemo_xtoken.vocab.projection import Projection

    crit = _from_config(real)  # default: auto at tp 2
    assert crit.tp_exchange == "auto" and crit.exchanges == ["summary"] * 3
    h, gold, uld = crit._teachers
    assert isinstance(h.projection, HybridPlan) and h.projection.relaxed and h.projection.tp == 2
    assert isinstance(gold.projection, HybridPlan) and not gold.projection.relaxed
    assert h.projection.shape == (128256, 200019) and h.projection.teacher_padded == TEACHER_PAD
    assert uld.options["summary_bins"] == DEFAULT_BINS
    for row in crit.traffic():
        assert row["exchange"] == "summary" and row["fraction_of_all_gather"] < 0.2, row
    crit = _from_config(real, distill={"tp_exchange": "exact"})
    assert crit.exchanges == ["all-gather"] * 3 and isinstance(crit._teachers[0].projection, Projection)
    assert "summary_bins" not in crit._teachers[2].options
    assert [r["fraction_of_all_gather"] for r in crit.traffic()] == [pytest.approx(1.0, rel=1e-4)] * 3
    assert _from_config(real, tp=1).exchanges == ["all-gather"] * 3  # auto on one rank
    crit = _from_config(real, distill={"tp_exchange": "summary", "summary_bins": 512})
    assert crit._teachers[0].projection.bins == 512 and crit._teachers[2].options["summary_bins"] == 512


def _counting_worker(rank: int, world: int, real: dict) -> dict:
    """Forward + backward of the run's criterion, every collective's values counted (ring costs, values sent by this rank)."""
    import torch.distributed as dist

    counts: dict = {}
    orig = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_to_all_single")}

    def all_gather(parts, x, *a, **k):
        counts["all_gather_calls"] = counts.get("all_gather_calls", 0) + 1
        counts["values"] += x.numel() * (world - 1)
        return orig["all_gather"](parts, x, *a, **k)

    def all_reduce(x, *a, **k):
        counts["values"] += 2 * (world - 1) / world * x.numel()
        return orig["all_reduce"](x, *a, **k)

    def all_to_all_single(out, x, out_splits=None, in_splits=None, *a, **k):
        row = x[0].numel() if x.shape[0] else 0
        counts["values"] += sum(n for r, n in enumerate(in_splits) if r != rank) * row
        return orig["all_to_all_single"](out, x, out_splits, in_splits, *a, **k)

    g = torch.Generator().manual_seed(11)
    n = 6
    s_full, t_full = torch.randn(n, STUDENT_PAD, generator=g) * 3, torch.randn(n, TEACHER_PAD, generator=g) * 3
    out = {}
    for mode in ("summary", "exact"):
        crit = _from_config(real, distill={"tp_exchange": mode, "block_size": 0})
        ws, wt = STUDENT_PAD // world, TEACHER_PAD // world
        s = s_full[:, rank * ws : (rank + 1) * ws].clone().requires_grad_(True)
        t = t_full[:, rank * wt : (rank + 1) * wt][None]
        counts.update(values=0.0, all_gather_calls=0)
        for name, fn in (("all_gather", all_gather), ("all_reduce", all_reduce), ("all_to_all_single", all_to_all_single)):
            setattr(dist, name, fn)
        try:
            loss = crit(s[:, None], [t] * 3, alignments=[None] * 3)  # Megatron's [S, B, V/tp] student layout
            forward = dict(counts)
            loss.backward()
        finally:
            for name, fn in orig.items():
                setattr(dist, name, fn)
        out[mode] = {"forward": forward, "backward_all_gather_calls": counts["all_gather_calls"] - forward["all_gather_calls"],
                     "traffic": crit.traffic(), "loss": loss.detach(), "n": n}
    return out


def test_a_run_criterion_in_summary_mode_never_all_gathers(two_ranks):
    for rank, out in enumerate(r["counted"] for r in two_ranks):
        su, ex = out["summary"], out["exact"]
        assert su["forward"]["all_gather_calls"] == 0 and su["backward_all_gather_calls"] == 0
        assert ex["forward"]["all_gather_calls"] == 6  # both sides' item rows, per H-KL / GOLD / ULD teacher
        # what the collectives sent per token equals what the criterion reports (--check), on each rank
        for mode, o in (("summary", su), ("exact", ex)):
            sent = o["forward"]["values"] * 4 / o["n"]
            assert sent == pytest.approx(sum(r["bytes_per_rank"][rank] for r in o["traffic"]), rel=1e-9), mode
        assert su["forward"]["values"] < 0.2 * ex["forward"]["values"]
        torch.testing.assert_close(su["loss"], ex["loss"], rtol=1e-3, atol=1e-4)


def test_adaptive_weights_score_a_teacher_through_its_hybrid_plan(cases):
    """Entropy weights need the teacher's real ids: read from the HybridPlan when the spec gives no vocabulary size."""
    case = cases[0]
    alphas = {}
    for mode in ("exact", "summary"):
        specs = [TeacherSpec(n, n, random_projection(), 1.0, None) for n in ("h_kl", "gold")]
        crit = XTokenLogitsLoss(specs, student_vocab_size=VS, student_padded=VS_PAD, teacher_padded=[VT_PAD] * 2, tp=1,
                                student_layout="bsv", tp_exchange=mode, weighting="entropy")
        crit(case["s"][None], [case["t"][None]] * 2, alignments=[case["align"]] * 2)
        alphas[mode] = [crit.last_metrics[f"alpha/{n}"] for n in ("h_kl", "gold")]
    torch.testing.assert_close(alphas["summary"], alphas["exact"], rtol=1e-5, atol=1e-7)  # float32, two code paths

"""Dense brute-force versions of the losses, written independently of ``nemo_xtoken.losses``, and their sanity checks.

Everything is plain loops over small vocabularies with a dense W built entry by entry, in float64;
differentiable so that gradients can be compared too.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def probs(row: torch.Tensor, real: int, temperature: float) -> torch.Tensor:
    """Softmax over the first ``real`` entries, zeros on the padded rest."""
    z = row[:real] / temperature
    e = torch.exp(z - z.max().detach())
    p = e / e.sum()
    return torch.cat([p, row.new_zeros(row.shape[0] - real)])


def dense_w(rows: list[list[tuple[int, float]]], v_s: int, v_t: int) -> torch.Tensor:
    w = torch.zeros(v_s, v_t, dtype=torch.float64)
    for s, entries in enumerate(rows):
        for t, x in entries:
            w[s, t] += x
    return w


def items(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    v_s: int,
    v_t: int,
    temperature: float,
    chunks: dict | None,
    mask: list[bool] | None,
) -> list[tuple[torch.Tensor | None, torch.Tensor | None, bool]]:
    """(p_S, p_T, counted) per item: positions, or chunks given as a dict of hand-written lists."""
    ps = [probs(s_logits[i], v_s, temperature) for i in range(s_logits.shape[0])]
    pt = [probs(t_logits[i], v_t, temperature) for i in range(t_logits.shape[0])]
    if chunks is None:
        out = []
        for i in range(len(ps)):
            out.append((ps[i], pt[i], True if mask is None else bool(mask[i])))
        return out
    out = []
    for k in range(chunks["n_chunks"]):
        sides = []
        for side, p_list, ids, tg in (("student", ps, chunks["s_ids"], chunks["s_tg"]), ("teacher", pt, chunks["t_ids"], chunks["t_tg"])):
            pos = [i for i, c in enumerate(ids) if c == k]
            if not pos:
                sides.append(None)
                continue
            if chunks["merge"] == "chain":
                q = p_list[pos[0]]
                for i in pos[1:]:
                    q = q * p_list[i][tg[i]]
                if side == "teacher":  # the teacher's chunk distribution is normalized
                    q = q / q.sum()
            elif chunks["merge"] == "reference" and side == "teacher":  # exp of the mean log-probability
                logs = [torch.log(p_list[i]) for i in pos]
                q = torch.exp(sum(logs) / len(pos))
            else:
                q = sum(p_list[i] for i in pos) / len(pos)
            sides.append(q)
        out.append((sides[0], sides[1], sides[0] is not None and sides[1] is not None))
    return out


def kl_item(ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    total = ps.new_zeros(())
    for v in range(pt.shape[0]):
        if pt[v] > 0:
            total = total + pt[v] * (torch.log(pt[v]) - torch.log(ps[v]))
    return total


def pkl_item(ps: torch.Tensor, pt: torch.Tensor, w: torch.Tensor, renormalize: bool = False) -> torch.Tensor:
    v_s, v_t = w.shape
    qs = []
    for t in range(v_t):
        q = ps.new_zeros(())
        for s in range(v_s):
            if w[s, t] != 0:
                q = q + ps[s] * w[s, t]
        qs.append(q)
    total = ps.new_zeros(())
    if renormalize:  # the public reference code's value: q / (Σq + 1e-10), log(q + 1e-10); the gradient of log q
        z = sum(qs)
        for t in range(v_t):
            if pt[t] > 0:
                qn = qs[t] / (z + 1e-10)
                exact = torch.log(torch.clamp(qn, min=1e-300))  # q = 0 (no student row reaches t): no gradient
                total = total + pt[t] * (torch.log(pt[t]) - (exact + (torch.log(qn + 1e-10) - exact).detach()))
        return total
    for t in range(v_t):
        if pt[t] > 0:
            total = total + pt[t] * (torch.log(pt[t]) - torch.log(torch.clamp(qs[t], min=EPS)))
    return total


def sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.shape[0], b.shape[0])
    a = torch.sort(a, descending=True).values
    b = torch.sort(b, descending=True).values
    total = a.new_zeros(())
    for i in range(n):
        x = a[i] if i < a.shape[0] else 0.0
        y = b[i] if i < b.shape[0] else 0.0
        total = total + abs(x - y)
    return total


def gold_pairs(rows: list[list[tuple[int, float]]], exact: list[bool]) -> list[tuple[int, int]]:
    """(s, t) for exact rows; one pair per teacher token, the lowest s."""
    best: dict[int, int] = {}
    for s, entries in enumerate(rows):
        if exact[s] and entries:
            t = max(entries, key=lambda e: (e[1], -e[0]))[0]
            if t not in best or s < best[t]:
                best[t] = s
    return sorted((s, t) for t, s in best.items())


def hybrid_item(
    ps: torch.Tensor,
    pt: torch.Tensor,
    groups: dict[int, list[int]],
    v_s: int,
    v_t: int,
    mw: float,
    uw: float,
) -> torch.Tensor:
    """``groups[t]`` = student rows paired with teacher token t."""
    matched = ps.new_zeros(())
    for t, ss in groups.items():
        q = sum(ps[s] for s in ss)
        if pt[t] > 0:
            matched = matched + pt[t] * (torch.log(pt[t]) - torch.log(torch.clamp(q, min=EPS)))
    used_s = {s for ss in groups.values() for s in ss}
    rest_s = torch.stack([ps[s] for s in range(v_s) if s not in used_s]) if len(used_s) < v_s else ps.new_zeros(0)
    rest_t = torch.stack([pt[t] for t in range(v_t) if t not in groups]) if len(groups) < v_t else pt.new_zeros(0)
    return mw * matched + uw * sorted_l1(rest_s, rest_t)


def top1_groups(rows: list[list[tuple[int, float]]]) -> dict[int, list[int]]:
    g: dict[int, list[int]] = {}
    for s, entries in enumerate(rows):
        if entries:
            t = max(entries, key=lambda e: (e[1], -e[0]))[0]
            g.setdefault(t, []).append(s)
    return g


def reduce(values: list[torch.Tensor], counted: list[bool], reduction: str, like: torch.Tensor) -> torch.Tensor:
    vals = [v if c else like.new_zeros(()) for v, c in zip(values, counted)]
    if reduction == "none":
        return torch.stack(vals) if vals else like.new_zeros(0)
    total = sum(vals, like.new_zeros(()))
    if reduction == "sum":
        return total
    n = sum(counted)
    return total / n if n else total * 0.0



# ---- sanity of the brute force itself ---------------------------------------------------------------


def test_bruteforce_kl_zero_on_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = probs(torch.randn(6, generator=g, dtype=torch.float64), 5, 1.0)
    b = probs(torch.randn(6, generator=g, dtype=torch.float64), 5, 1.0)
    assert abs(float(kl_item(a, a))) < 1e-15
    assert float(kl_item(b, a)) > 0
    assert float(a[5]) == 0.0 and abs(float(a.sum()) - 1) < 1e-12


def test_bruteforce_pkl_with_identity_w_is_kl():
    g = torch.Generator().manual_seed(1)
    a = probs(torch.randn(4, generator=g, dtype=torch.float64), 4, 1.0)
    b = probs(torch.randn(4, generator=g, dtype=torch.float64), 4, 1.0)
    w = dense_w([[(i, 1.0)] for i in range(4)], 4, 4)
    assert abs(float(pkl_item(a, b, w)) - float(kl_item(a, b))) < 1e-14


def test_bruteforce_sorted_l1_pads_with_zeros():
    a = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # sorted: (0.6, 0.3, 0.1) vs (0.5, 0.5, 0): 0.1 + 0.2 + 0.1
    assert abs(float(sorted_l1(a, b)) - 0.4) < 1e-15

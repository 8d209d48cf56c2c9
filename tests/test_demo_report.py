"""The demo's report on synthetic results: seeds parsing, merging runs of disjoint seeds, the mechanisms table."""

from __future__ import annotations

import copy

import pytest

from nemo_xtoken.cli.demo_cmds import parse_seeds
from nemo_xtoken.demo.report import direction, mechanisms, merge_results
from nemo_xtoken.errors import XTokenError

METHODS = [{"key": "ce", "label": "CE only", "teachers": [], "learnable_w": False},
           {"key": "pkl_qwen3", "label": "P-KL ← Qwen3", "teachers": [{"side": "qwen3", "loss": "p_kl", "weight": 1.0}], "learnable_w": False}]


def _student(exact: list[float], probe: bool) -> dict:
    c = {"step": list(range(8)), "eval_step": [0, 2, 4, 6, 8], "eval_exact": exact, "scale": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}
    if probe:
        c.update(probe_cos=[1.0, 0.2, 0.4, 0.6, 0.8], probe_ratio=[1.0, 2.0, 2.0, 4.0, 4.0])
    return {"exact": exact[-1], "eval_acc_numeral": 0.1, "eval_acc_word": 0.8, "eval_ce": 1.0, "curves": c,
            **({"eval_kd": {"kd": 0.1, "ce": 1.0}} if probe else {})}


def _run(seeds: list[int], pkl_gain: float) -> dict:
    return {
        "config": {"seeds": seeds, "workers": 2, "student_steps": 8},
        "methods": METHODS,
        "teachers": {"qwen3": {"exact": 0.7}},
        "students": {str(s): {"CE only": _student([0, 0.1, 0.2, 0.3, 0.3], False),
                              "P-KL ← Qwen3": _student([0, 0.1, 0.2, 0.3, 0.3 + pkl_gain], True)} for s in seeds},
        "seconds": {"total": 1.0},
    }


def test_parse_seeds():
    assert parse_seeds("3") == (1, 2, 3) and parse_seeds("2,3") == (2, 3) and parse_seeds("3,") == (3,)
    for bad in ("0", "x", "2,2", "0,1", ","):
        with pytest.raises(XTokenError, match="--seeds"):
            parse_seeds(bad)


def test_merge_joins_disjoint_seeds_and_the_verdict_needs_every_seed():
    merged = merge_results([_run([1], 0.1), _run([2, 3], -0.1)])
    assert list(merged["students"]) == ["1", "2", "3"] and merged["config"]["seeds"] == [1, 2, 3]
    (claim,) = [d for d in direction(merged) if d["claim"] == "P-KL ← Qwen3 > CE only"]
    assert claim["seeds_agreeing"] == 1 and claim["verdict"] == "within seed spread"
    assert direction(merge_results([_run([1], 0.1), _run([2], 0.2)]))[0]["verdict"] == "holds"


def test_merge_refuses_what_is_not_comparable():
    with pytest.raises(XTokenError, match="seed 1 is in two runs"):
        merge_results([_run([1], 0.0), _run([1, 2], 0.0)])
    other = _run([2], 0.0)
    other["config"]["student_steps"] = 9
    with pytest.raises(XTokenError, match="student_steps"):
        merge_results([_run([1], 0.0), other])
    other = _run([2], 0.0)
    other["teachers"]["qwen3"]["exact"] = 0.5
    with pytest.raises(XTokenError, match="teacher qwen3"):
        merge_results([_run([1], 0.0), other])


def test_mechanisms_reads_the_curves():
    m = mechanisms(_run([1, 2], 0.1))
    ce, pkl = m["CE only"], m["P-KL ← Qwen3"]
    assert ce["exact@1"] == pytest.approx(0.3) and ce["exact@0.5"] == pytest.approx(0.2) and "cos_early" not in ce
    assert ce["exact_last_quarter_change"] == pytest.approx(0.0)  # step 8 vs step 6
    assert pkl["exact_last_quarter_change"] == pytest.approx(0.1)
    assert pkl["cos_early"] == pytest.approx(0.3) and pkl["cos_late"] == pytest.approx(0.7)  # step 0 left out
    assert pkl["ratio_early"] == pytest.approx(2.0) and pkl["ratio_late"] == pytest.approx(4.0)
    assert pkl["scale_late"] == pytest.approx(7.5)  # median of the last quarter (7, 8)
    assert copy.deepcopy(m) == mechanisms(_run([1, 2], 0.1))  # a pure function of the results


@pytest.mark.parametrize("argv, needle", [(["--kd-weight", "0"], "--kd-weight"), (["--kd-weight", "-1"], "--kd-weight"),
                                          (["--eval-every", "0"], "--eval-every")])
def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys, argv, needle):
    from nemo_xtoken.cli.main import main

    out = tmp_path / "out"
    assert main(["demo", "-o", str(out), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()  # refused before the audits wrote anything


def test_demo_stops_when_the_audits_fail(tmp_path, capsys, monkeypatch):
    """The audits run in a forked process beside the imports: their failure stops the demo (exit 2) with their traceback."""
    from nemo_xtoken.cli import demo_cmds
    from nemo_xtoken.cli.main import main

    def broken(out):
        print("building W …")
        raise RuntimeError("tokenizer file is damaged")

    monkeypatch.setattr(demo_cmds, "_audits", broken)
    ran = []
    monkeypatch.setattr("nemo_xtoken.demo.run.run_demo", lambda *a, **k: ran.append(1))
    assert main(["demo", "--fast", "--no-progress", "-o", str(tmp_path / "out")]) == 2
    cap = capsys.readouterr()
    assert "W audits failed" in cap.err and "tokenizer file is damaged" in cap.err
    assert "building W" in cap.out  # what the audits printed before failing is shown
    assert not ran  # nothing trained


def _claims_run(values: dict[str, list[float]]) -> dict:
    """A run of the given method keys with per-seed exact answers (labels from the demo's own methods)."""
    from nemo_xtoken.demo.run import EXTRA_METHODS
    from nemo_xtoken.demo.run import METHODS as ALL

    known = {m.key: m for m in ALL + EXTRA_METHODS}
    seeds = [str(s + 1) for s in range(len(next(iter(values.values()))))]
    methods = [{"key": k, "label": known[k].label, "teachers": [], "learnable_w": False} for k in values]
    students = {s: {known[k].label: {"exact": v[i]} for k, v in values.items()} for i, s in enumerate(seeds)}
    return {"methods": methods, "students": students, "config": {}, "teachers": {}}


def test_claim_table_lists_every_claim_with_a_verdict_or_the_command_that_runs_it():
    from nemo_xtoken.demo.report import CLAIMS, format_direction

    r = _claims_run({"ce": [0.30, 0.30, 0.30], "pkl_qwen3": [0.10, 0.12, 0.31], "gold_qwen3": [0.05, 0.06, 0.07],
                     "uld_qwen3": [0.01, 0.02, 0.01]})
    rows = direction(r)
    assert len(rows) == len(CLAIMS)  # no claim left out, whatever ran
    by = {x["claim"]: x for x in rows}
    pkl_ce = by["P-KL ← Qwen3 > CE only"]
    assert pkl_ce["verdict"] == "within seed spread" and pkl_ce["seeds_agreeing"] == 1  # seed 3 disagrees
    assert pkl_ce["difference"]["values"] == pytest.approx([-0.20, -0.18, 0.01])
    assert by["CE only > GOLD ← Qwen3"]["verdict"] == "holds"
    assert by["ULD ← Qwen3 > GOLD ← Qwen3"]["verdict"] == "fails" and by["ULD ← Qwen3 > GOLD ← Qwen3"]["seeds_agreeing"] == 0
    two = by["H-KL ← o200k 0.8 + KL ← Llama-3 0.2 > H-KL ← o200k"]
    assert two["verdict"] == "not run" and two["difference"] is None
    assert two["command"] == "xtoken demo --methods ce,two_teachers,hkl_o200k"
    text = format_direction(r)
    assert all(x["claim"] in text for x in rows) and "not run (xtoken demo --methods ce,two_teachers,hkl_o200k)" in text
    assert text.count("\n") == len(CLAIMS) - 1
    md = format_direction(r, markdown=True)
    assert md.count("\n") == len(CLAIMS) + 1 and "| fails |" in md


def test_dynamic_scaling_is_compared_with_the_best_fixed_weight():
    r = _claims_run({"ce": [0.3, 0.3], "pkl_qwen3": [0.20, 0.25], "pkl_qwen3_w0.5": [0.10, 0.10], "pkl_qwen3_w1": [0.30, 0.22],
                     "pkl_qwen3_w2": [0.15, 0.40]})
    (row,) = [x for x in direction(r) if len(x["worse"]) == 3]
    assert row["compared_with"] == "P-KL ← Qwen3, fixed w=2"  # best mean (0.275 vs 0.26 vs 0.10), one weight for every seed
    assert row["difference"]["values"] == pytest.approx([0.05, -0.15]) and row["verdict"] == "within seed spread"
    r["students"]["2"]["P-KL ← Qwen3, fixed w=2"]["exact"] = 0.2
    r["students"]["2"]["P-KL ← Qwen3, fixed w=1"]["exact"] = 0.3
    (row,) = [x for x in direction(r) if len(x["worse"]) == 3]
    assert row["compared_with"] == "P-KL ← Qwen3, fixed w=1" and row["verdict"] == "fails"

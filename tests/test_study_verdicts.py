"""The studies' verdicts read what they claim: the frontier aim (benchmarks/pareto.py)
judges the main job's point, not a point added at another code target, and a band no
heuristic reaches reads as such; the robustness curves (benchmarks/robustness.py) keep
runs whose defence assumed another f apart, judge an attack against no attack on the
same seeds and set aside runs that predate on-policy rollouts; the federation study (benchmarks/federation.py) keeps each budget and number
of training seeds apart and reads a lead inside the seeds' spread as not shown; the README
names the studies measured before the simulator's last change."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import federation  # noqa: E402
import pareto  # noqa: E402
import robustness  # noqa: E402

OWN, ADDED = -0.3, -0.15


def row(policy, setting, attainment, cost, **extra):
    # 10 % of prompts rejected whatever the policy: ceiling 90 %, band 81 %.
    return {"policy": policy, "setting": setting, "scenario": "diurnal", "slo_attainment_pct": attainment,
            "cost_usd_per_mtok": cost, "goodput_per_usd": 1.0, "rejected_pct": 10.0, "dropped_pct": 0.0, "e2e_mean_ms": 1.0,
            "quality": 1.0, **extra}


def study(*heuristics):
    rows = [row("learned (slo)", 0.9, 80.0, 1.0, seed=0),  # the main job's point (no code_offset: the study's own)
            row("learned (slo)", 0.9, 86.0, 1.5, seed=0, code_offset=ADDED), *heuristics]
    return {"rows": rows, "code_target_offset": OWN}


def test_frontier_aim_judges_the_main_point_and_every_heuristic_in_the_band():
    (a,) = pareto.aims(study(row("static-peak", 0.3, 85.0, 2.0), row("static-peak", 0.2, 88.0, 3.0)))
    assert a["band"] == 81.0
    # The heuristic at 88 % is beaten by no learned point: no learned point reaches 88 %.
    assert not a["frontier_below"] and [h["setting"] for h in a["unbeaten"]] == [0.2]
    # The saving is the main job's point (80 % at 1.0) against the cheapest heuristic reaching
    # 80 %, not the added point's (86 % at 1.5, which only the 3.0 heuristic reaches).
    assert a["main"] == (80.0, 1.0)
    assert a["cheapest"]["setting"] == 0.3 and abs(a["saving_pct"] - 50.0) < 1e-9

    (a,) = pareto.aims(study(row("static-peak", 0.3, 85.0, 2.0)))
    assert a["frontier_below"] and a["contenders"] == 1



def test_points_trained_under_other_settings_join_the_frontier_but_not_the_main_point():
    data = study(row("static-peak", 0.3, 85.0, 1.2))  # cheaper than the added 86 % point at 1.5
    data["rows"].append(row("learned (slo)", 0.9, 86.0, 0.5, seed=0, train_set="env.surge_shared_prob=0.25"))
    (a,) = pareto.aims(data)
    assert a["main"] == (80.0, 1.0)  # not the mean with the other training's point
    assert a["frontier_below"]  # only the other training's 86 % point at 0.5 beats the heuristic
    labels = [(t, d, v) for t, d, v, _ in pareto.learned_groups(data, "diurnal")]
    assert labels == [(0.9, OWN, ""), (0.9, ADDED, ""), (0.9, OWN, "env.surge_shared_prob=0.25")]

def test_main_jobs_runs_at_newer_code_move_the_main_point_and_stay_apart():
    data = study(row("static-peak", 0.3, 85.0, 1.2))
    data["commit"] = "old"
    data["rows"].append(row("learned (slo)", 0.9, 84.0, 0.7, seed=0, commit="new"))
    assert pareto.aims(data)[0]["main"] == (80.0, 1.0)  # until an addition names the new code the main job's
    data["main_label"] = "at new"
    (a,) = pareto.aims(data)
    assert a["main"] == (84.0, 0.7) and abs(a["saving_pct"] - 100.0 * (1 - 0.7 / 1.2)) < 1e-9
    labels = [(t, d, v) for t, d, v, _ in pareto.learned_groups(data, "diurnal")]
    assert labels == [(0.9, OWN, "at new"), (0.9, OWN, ""), (0.9, ADDED, "")]
    # A main job whose config moved the code regions' target: its runs there become the point.
    data["rows"].append(row("learned (slo)", 0.9, 86.0, 0.8, seed=0, commit="newer", code_offset=ADDED))
    data["main_label"], data["main_offset"] = "at newer", ADDED
    assert pareto.aims(data)[0]["main"] == (86.0, 0.8)
    assert [(t, d, v) for t, d, v, _ in pareto.learned_groups(data, "diurnal")][0] == (0.9, ADDED, "at newer")


def test_a_main_point_beyond_every_heuristic_is_set_against_the_closest():
    """Where no heuristic setting reaches the main point's attainment, the saving is against
    the heuristic point that comes closest (it serves fewer requests within their SLO); one
    that reaches it is still the one compared with, however costly."""
    (a,) = pareto.aims(study(row("static-peak", 0.2, 78.0, 2.0), row("reactive", 0.5, 70.0, 0.5)))
    assert a["beyond_reach"] and a["cheapest"]["policy"] == "static-peak" and abs(a["saving_pct"] - 50.0) < 1e-9
    (a,) = pareto.aims(study(row("static-peak", 0.2, 80.5, 1.1), row("reactive", 0.5, 78.0, 0.5)))
    assert not a["beyond_reach"] and a["cheapest"]["policy"] == "static-peak" and a["saving_pct"] < 18.0


def test_band_no_heuristic_reaches_is_met_only_by_a_learned_point_in_it():
    (a,) = pareto.aims(study(row("static-peak", 0.3, 70.0, 2.0)))
    assert a["frontier_below"] and a["contenders"] == 0
    assert "(no heuristic setting reaches the band)" in pareto.render({
        **study(row("static-peak", 0.3, 70.0, 2.0)), "tier": False, "command": "c", "machine": "m", "wall_s": 60.0, "max_drop": 0.01,
        "clusters": 1, "steps": 1, "rounds": 1, "targets": [0.9], "seeds": 1, "slo_margin": 0.03, "drop_margin": 0.005,
        "settings": {}, "eval_seeds": 1})
    below = study(row("static-peak", 0.3, 70.0, 2.0))
    below["rows"] = [r for r in below["rows"] if r.get("code_offset") is None]  # the learned points stop at 80 %
    (a,) = pareto.aims(below)
    assert not a["frontier_below"]


def curve_run(aggregator, f_assumed, f, attack, score):
    return {"method": "m", "aggregator": aggregator, "f_assumed": f_assumed, "f": f, "attack": attack, "strength": 0.0,
            "seed": 0, "env_steps": 100, "score": score}


def test_curves_keep_each_f_with_its_own_no_attack_runs():
    data = {"records": [curve_run("multi_krum", 3, 0, "none", -1.0), curve_run("multi_krum", 3, 3, "alie", -1.05),
                        curve_run("multi_krum", 1, 0, "none", -2.0), curve_run("multi_krum", 1, 1, "alie", -2.1),
                        curve_run("local-only", 0, 0, "none", -1.5)]}
    at = lambda f: sorted((r["f_assumed"], r["f"], r["aggregator"]) for r in robustness.curve_view(data, f)["records"])  # noqa: E731
    assert at(3) == [(0, 0, "local-only"), (3, 0, "multi_krum"), (3, 3, "multi_krum")]
    assert at(1) == [(0, 0, "local-only"), (1, 0, "multi_krum"), (1, 1, "multi_krum")]
    # Each f's kept share is against its own defence's no-attack score: 95 % at f = 3 and at f = 1.
    for f, base, worst in ((3, -1.0, -1.05), (1, -2.0, -2.1)):
        cells = robustness.paired_cells(robustness.curve_view(data, f)["records"], "m", "multi_krum", 100)
        assert cells[("none", 0.0)][0] == base and cells[("alie", 0.0)][:3] == (worst, base, 1)


def test_curves_set_aside_runs_before_on_policy_rollouts_or_the_current_simulator(tmp_path, monkeypatch):
    # 05a6245 trained with the round's starting policy; 15f1154 on-policy on the earlier
    # simulator; the simulator's change itself is current.
    before, earlier, after = ({**curve_run("multi_krum", 3, 0, "none", score), "commit": c}
                              for score, c in ((-9.0, "05a6245"), (-2.0, "15f1154"), (-1.0, robustness.SIMULATOR_CHANGE)))
    monkeypatch.setattr(robustness, "CURVE", tmp_path / "curve.json")
    robustness.CURVE.write_text(robustness.json.dumps({"commands": ["old", "new"], "seconds": 60.0, "records": [before, earlier, after]}))
    data = robustness.load_curve()
    assert data["records"] == [after] and data["set_aside"]["runs"] == 2 and data["commands"] == ["old", "new"]
    # Only the stale run recorded: nothing counts as done, and its commands go with it.
    robustness.CURVE.write_text(robustness.json.dumps({"commands": ["old"], "seconds": 60.0, "records": [before]}))
    data = robustness.load_curve()
    assert data["records"] == [] and data["commands"] == [] and data["set_aside"]["runs"] == 1
    assert robustness.on_policy([before, after, {**after, "commit": "15f1154-dirty"}]) == [after, {**after, "commit": "15f1154-dirty"}]


def test_an_attack_is_judged_against_no_attack_on_its_own_seeds():
    # No attack ran seeds 0 and 1 (-1.0 and -3.0); the attack only seed 0, at -1.5. Against
    # the two-seed mean (-2.0) it would read as harmless; on its own seed it keeps 50 %.
    runs = [(0, "none", -1.0), (1, "none", -3.0), (0, "alie", -1.5), (0, "ipm", -1.1), (1, "ipm", -3.1)]
    data = {"records": [{**curve_run("multi_krum", 3, 0 if a == "none" else 3, a, score), "seed": seed} for seed, a, score in runs]}
    cells = robustness.paired_cells(data["records"], "m", "multi_krum", 100)
    assert cells[("alie", 0.0)][:3] == (-1.5, -1.0, 1)
    ((_, (score, worst)), *_rest) = robustness.best_curve_row(data)
    assert worst == ("alie", 0.0) and score == -1.5
    assert abs(robustness.kept_share(-1.0, -1.5) - 0.5) < 1e-9


def test_kept_share_carries_the_seed_by_seed_standard_error():
    # Seed-by-seed differences -0.1, -0.3, -0.2: sd 0.1, standard error 0.1 / sqrt(3); an
    # unpaired error would add the no-attack runs' own spread (-0.5 .. -1.5) to it.
    runs = [(0, -1.0, -1.1), (1, -0.5, -0.8), (2, -1.5, -1.7)]
    data = {"records": [{**curve_run("multi_krum", 3, 0 if a == "none" else 3, a, score), "seed": seed}
                        for seed, base, hit in runs for a, score in (("none", base), ("alie", hit))]}
    attacked, base, seeds, stderr = robustness.paired_cells(data["records"], "m", "multi_krum", 100)[("alie", 0.0)]
    assert seeds == 3 and abs(stderr - 0.1 / 3 ** 0.5) < 1e-6 and abs(base + 1.0) < 1e-9 and abs(attacked + 1.2) < 1e-9
    assert robustness.kept_text((attacked, base, seeds, stderr)) == "80 +- 6 %"
    assert robustness.keep_verdict(0.8, 0.04) == "not met"
    assert robustness.keep_verdict(0.85, 0.03) == "not met, within two standard errors of 90 %"
    assert robustness.keep_verdict(0.9, 0.2) == "met"


def test_curves_trained_otherwise_stay_apart_and_a_lead_splits_into_reward_and_penalty():
    # Seeds 0 and 1 of a federated row and of Local-only, each also trained with margins.
    def runs(train_set, fed, local):
        out = []
        for seed in (0, 1):
            for (agg, method), (score, reward) in (((("multi_krum", "m")), fed[seed]), (("local-only", "local"), local[seed])):
                r = {**curve_run(agg, 3 if method == "m" else 0, 0, "none", score), "method": method, "seed": seed, "reward": reward}
                out.append({**r, "train_set": train_set} if train_set else r)
        return out

    own = runs("", fed=[(-1.0, -0.4), (-0.6, -0.5)], local=[(-0.7, -0.6), (-0.9, -0.7)])
    margins = runs("objective.slo_margin=0.03", fed=[(-0.3, -0.3), (-0.4, -0.4)], local=[(-0.6, -0.6), (-0.7, -0.7)])
    data = {"records": own + margins}
    recs = robustness.trained_as(data)["records"]
    assert recs == own  # the margin runs never enter the study's own curves
    score, reward, penalty = (robustness.lead_over_local(recs, "m", "multi_krum", 100, part) for part in ("score", "reward", "penalty"))
    # Federation ties on the score (-0.8 against -0.8) but leads on reward by 0.2 and
    # trails by as much on the constraint penalty; the parts add up to the score.
    assert abs(score[0]) < 1e-9 and abs(reward[0] - 0.2) < 1e-9 and abs(penalty[0] + 0.2) < 1e-9
    assert "+0.200" in robustness.lead_parts(recs, "m", "multi_krum", 100)
    # Trained with margins, the same row leads by 0.3 on the score, against Local-only's
    # margin runs only (against the own Local-only runs it would read +0.45).
    (line, *_rest) = [x for x in robustness.other_settings(data) if x.startswith("At ")]
    assert "+0.300" in line and "(2 / 2 seeds)" in line


def test_only_rows_run_at_every_strength_compete_for_best():
    # Row "a" ran ALIE at two strengths and keeps 50 % at the worse one; row "b" ran only
    # the milder strength, where it keeps 100 %. Compared by attack alone, "b" would be
    # the best by its worst cell without having met the strength that hurt "a".
    def run(agg, attack, strength, score):
        return {**curve_run(agg, 3, 0 if attack == "none" else 3, attack, score), "strength": strength}

    data = {"records": [run("a", "none", 0.0, -1.0), run("a", "alie", 1.0, -1.0), run("a", "alie", 2.0, -1.5),
                        run("b", "none", 0.0, -1.0), run("b", "alie", 1.0, -1.0)]}
    ((best, (score, worst)), compared, attacks, *_rest) = robustness.best_curve_row(data)
    assert best == ("m", "a") and compared == [("m", "a")] and worst == ("alie", 2.0) and score == -1.5 and attacks == ["alie"]


def test_pareto_refuses_saved_weights_of_other_runs(tmp_path):
    """--evaluate-only on weights saved for 2 runs, asked for 4: an error naming the file,
    where the evaluation would otherwise read run 1's weights for runs 2 and 3."""
    import argparse

    import jax
    import numpy as np
    import pytest
    from flax import serialization

    args = argparse.Namespace(targets=[0.8, 0.9], seeds=2, steps=100_000, clusters=2, eval_seeds=1, tier=False,
                              code_target_offset=None, set=[])
    _, trainer, _, keys, hps = pareto.frontier_runs(args)
    two = jax.eval_shape(jax.vmap(lambda k, hp: trainer.weights(trainer.init(k, hp))), keys[:2], jax.tree.map(lambda x: x[:2], hps))
    path = tmp_path / "weights.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"weights": serialization.to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), two)),
                                                      "last": {}, "train_s": 1.0}))
    with pytest.raises(ValueError, match=f"{path} holds weights of shape \\(2,"):
        pareto.load_frontier(path, trainer, keys, hps)


def scored(*objectives):
    return {"rows": [{"objective": x} for x in objectives], "train_s": 0.0}


def test_federation_lead_is_met_only_beyond_the_seeds_spread():
    fed = "federated, personal (NNM + multi-Krum f=3, offsets, pull 0.03 annealed)"

    def aim(local, ours):
        return federation.verdict({"Local-only": scored(*local), fed: scored(*ours)})[1].split("same budget): ")[1]

    assert aim([-0.9, -0.8, -0.7], [-0.6, -0.7, -0.5]).startswith("**met**")  # +0.2 against sd 0.1
    assert aim([-0.9, -0.8, -0.7], [-0.75, -0.65, -0.85]).startswith("**not shown**: ahead by +0.050")
    assert aim([-0.9, -0.8, -0.7], [-1.1, -1.0, -0.9]).startswith("**not met**")
    best, gap, _ = federation.lead({"Local-only": scored(-1.0), fed: scored(-0.5), "centralized (pooled data, one policy)": scored(0.0)})
    assert (best, gap) == (fed, 0.5)  # centralized is no federated learner


def test_federation_keeps_each_budget_and_seed_count_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(federation, "OUT", tmp_path / "federation.json")
    score = {}
    monkeypatch.setattr(federation, "same_budget", lambda steps, seeds, learners: {k: scored(score[k]) for k in learners})

    def run(steps, seeds, *learners):
        data = federation.measure(steps, seeds, list(learners))
        data.update(command="cmd", machine="m", wall_s=1.0, commit="c")
        federation.OUT.write_text(federation.json.dumps(data))
        return {(b["steps"], b["seeds"]): {k: v["rows"][0]["objective"] for k, v in b["same_budget"].items()} for b in data["budgets"]}

    score.update({"Local-only": -1.0, "centralized (pooled data, one policy)": -2.0})
    small, large = 3_000_000, 10_000_000
    run(large, 3, "Local-only")
    both = {"Local-only": -1.0, "centralized (pooled data, one policy)": -2.0}
    assert run(large, 3, "centralized (pooled data, one policy)")[large, 3] == both
    score["Local-only"] = -0.5
    assert run(large, 6, "Local-only") == {(large, 3): both, (large, 6): {"Local-only": -0.5}}
    assert list(run(small, 3, "Local-only")) == [(small, 3), (large, 3), (large, 6)]


def test_the_readme_names_studies_measured_on_an_earlier_simulator(tmp_path, monkeypatch):
    import json

    import render_readme
    from bench_common import SIMULATOR_CHANGE

    monkeypatch.setattr(render_readme, "B", tmp_path)
    (tmp_path / "pareto.json").write_text(json.dumps({"rows": [], "additions": [{"commit": "0a9657c"}]}))  # before the change
    # At it; where the runs it set aside are kept is no run of its own.
    (tmp_path / "token_shift.json").write_text(json.dumps({"commit": SIMULATOR_CHANGE, "set_aside": {"commit": "0a9657c"}}))
    (tmp_path / "smooth_shift.json").write_text(json.dumps({"commit": "fb07b8f-dirty"}))  # after it
    (tmp_path / "heterogeneity.json").write_text("{}")  # no commit recorded: cannot show it is current
    assert render_readme.predating(SIMULATOR_CHANGE, render_readme.SIMULATOR_STUDIES, unrecorded=True) == ["pareto", "heterogeneity"]
    assert render_readme.predating(SIMULATOR_CHANGE, render_readme.CLUSTER_STUDIES, unrecorded=False) == ["pareto"]


def test_federation_sets_aside_budgets_measured_on_an_earlier_simulator(tmp_path, monkeypatch):
    from bench_common import SIMULATOR_CHANGE

    monkeypatch.setattr(federation, "OUT", tmp_path / "federation.json")
    monkeypatch.setattr(federation, "same_budget", lambda steps, seeds, learners: {k: scored(-1.0) for k in learners})
    objective = federation.dataclasses.asdict(federation.config(10_000_000, []).objective)
    old = lambda steps, commit: {"steps": steps, "seeds": 3, "commands": ["c"], "commits": [commit],  # noqa: E731
                                 "same_budget": {"Local-only": scored(-5.0)}}
    federation.OUT.write_text(federation.json.dumps({"eval_seeds": federation.EVAL_SEEDS, "objective": objective, "budgets": [
        old(3_000_000, "0a9657c"), old(20_000_000, SIMULATOR_CHANGE)]}))
    data = federation.measure(10_000_000, 3, ["Local-only"])
    # The budget from before the change goes; the one at it stays beside the new one.
    assert [(b["steps"], b["commits"][0]) for b in data["budgets"]][1:] == [(20_000_000, SIMULATOR_CHANGE)]
    assert data["budgets"][0]["steps"] == 10_000_000 and data["set_aside"]["budgets"] == 1
    assert "are set aside: `git show " in federation.render({**data, "budgets": [], "machine": "m", "wall_s": 1.0})


def test_noise_floor_tells_equal_cells_from_run_to_run_noise():
    run = lambda attack, score: {**curve_run("nnm+multi_krum", 3, 0 if attack == "none" else 3, attack, score),  # noqa: E731
                                 "method": "personal-offset0.03"}
    equal = robustness.noise_floor({"records": [run("none", -1.0), run("normaliser_poisoning", -1.0)]})
    assert "exactly at its no-attack score" in equal[0]
    apart = robustness.noise_floor({"records": [run("none", -1.0), run("normaliser_poisoning", -1.1)]})
    assert apart[0].startswith("Noise floor: personal-offset0.03 nnm+multi_krum keeps 90 %")

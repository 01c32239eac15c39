"""`RunSummary`: metrics.json's flat layout from the typed summary, and a resumed attempt's carrying of what only the
attempt that trained measured, equal to the dict operations train() did before the summary was typed."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from finlora.run.summary import RunSummary, print_summary


def summary(**changes) -> RunSummary:
    values = dict(
        run_name="r", adapter_dir="out/adapter", steps=6, best={"best_adapter_dir": "out/adapter_best", "best_step": 3},
        final_train_loss=1.5, final_val_loss=1.25, trainable_params=10, total_params=100, train_examples=24,
        distinct_train_examples=24, truncated_train_examples=0, val_examples=16, wall_time_s=3.0, batching="packed",
        throughput={"padding_fraction": 0.1, "tokens_per_s": 300.0}, step_path="eager",
        step_path_reason="on cpu", compile="eager", compiled={}, profile={"step_ms": 5.0},
        train_prompt="plain", eval_prompt="plain", device="cpu", precision="32-true", gpu_peak_gib=None,
        objective=1.25, objective_metric="val/loss", resumes=[])
    return RunSummary(**(values | changes))


def legacy_keep_earlier(summary: dict, earlier: dict) -> dict:
    """train.keep_earlier_training before the summary was typed, as dict operations, for comparison; with what the
    earlier attempt measured as False or 0 carried too (it was dropped, and the summary printed without it)."""
    if earlier.get("steps") != summary["steps"]:
        return summary
    kept = {k: v for k, v in earlier.items() if not k.startswith("test/") and summary.get(k) in (None, 0, [], {})
            and v is not None}
    return summary | kept | {"training_from_earlier_attempt": True}


def test_flat_layout_spreads_the_groups_in_place():
    flat = summary().to_dict()
    assert list(flat)[:4] == ["run_name", "adapter_dir", "steps", "best_adapter_dir"]
    assert flat["tokens_per_s"] == 300.0 and flat["step_ms"] == 5.0 and "tested" not in flat
    spread = set(RunSummary.SPREAD)
    assert {f.name for f in fields(RunSummary)} - spread - {"tested"} <= set(flat)
    assert not spread & set(flat)


def test_tests_update_the_objective_and_come_last():
    s = summary()
    s.add_tests({"test/fpb/accuracy": 0.5, "test/fpb/n": 8}, "test/fpb/accuracy", 9.0, "out/adapter_best")
    flat = s.to_dict()
    assert list(flat)[-3:] == ["test/fpb/accuracy", "test/fpb/n", "tested"]
    assert flat["objective"] == 0.5 and flat["wall_time_s"] == 9.0
    s.add_tests({"test/fpb/n": 8}, "val/other", 9.0, "x")
    assert s.objective == 0.5  # a metric the test stage did not log keeps the objective


@pytest.mark.parametrize("earlier_changes", [
    {},  # the earlier attempt tested too: its tested and test scores are not carried as scores
    {"steps": 5},  # another step: nothing carried
    {"final_train_loss": 2.0, "brand_new": [1], "tokens_per_s": 0},
])
def test_carry_training_matches_the_dict_merge(tmp_path, earlier_changes):
    earlier = summary().to_dict() | {"tested": "out/adapter_best", "test/fpb/n": 8} | earlier_changes
    (tmp_path / "metrics.json").write_text(json.dumps(earlier))
    resumed = summary(final_train_loss=None, best={}, throughput={"padding_fraction": 0, "tokens_per_s": None},
                      profile={}, objective=None, wall_time_s=1.0)
    expected = legacy_keep_earlier(resumed.to_dict(), earlier)
    resumed.carry_training(tmp_path / "metrics.json")
    assert resumed.to_dict() == expected
    assert list(resumed.to_dict()) == list(expected)
    scores = {"test/fpb/n": 8}
    resumed.add_tests(scores, "val/loss", 2.0, "out/adapter")
    expected.update(scores, objective=scores.get("val/loss", expected["objective"]), wall_time_s=2.0,
                    tested="out/adapter")
    assert list(resumed.to_dict().items()) == list(expected.items())


def test_carry_training_without_an_earlier_file(tmp_path):
    s = summary(final_train_loss=None)
    s.carry_training(tmp_path / "metrics.json")
    assert s.to_dict() == summary(final_train_loss=None).to_dict()


def test_a_resumed_attempt_prints_the_step_profile_it_carried(tmp_path, capsys):
    """A GPU run resumed after its last step (the gate's rerun in a finished run folder): the earlier attempt's step
    profile says `host_bound: False` and no host waits; both are carried, and the summary prints (it failed with
    KeyError: 'host_bound' when a False or a 0 counted as nothing measured)."""
    profile = {"step_ms": 12.2, "step_host_ms": 2.9, "host_bound": False, "host_syncs_per_step": 0.0, "sync_sites": []}
    (tmp_path / "metrics.json").write_text(json.dumps(summary(profile=profile, best={}).to_dict()))
    resumed = summary(final_train_loss=None, profile={}, best={},
                      throughput={"padding_fraction": 0, "tokens_per_s": None})
    resumed.carry_training(tmp_path / "metrics.json")
    flat = resumed.to_dict()
    assert {k: flat[k] for k in profile} == profile and flat["training_from_earlier_attempt"] is True
    print_summary(flat, [])
    assert "bound by the GPU" in capsys.readouterr().out

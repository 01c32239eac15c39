"""`results.sweep_jobs`, the sweep planner built on Hydra's public override parser, plans the jobs Hydra's basic
sweeper runs, in its order: compared with the sweeper's own expansion (a private API, used here as the reference
only) on ranges, choice(), glob, shuffle, sort, quoted values, repeated keys and every override prefix."""

from __future__ import annotations

import random

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from finlora.run.results import sweep_jobs

basic_sweeper = pytest.importorskip("hydra._internal.core_plugins.basic_sweeper",
                                    reason="Hydra's basic sweeper moved: compare with its new home")


class Groups:
    """The options of each config group, as Hydra's config loader lists them for glob()."""

    def get_group_options(self, group, results_filter=None):
        return {"adapter": ["dora", "lora", "none"], "quant": ["4bit", "8bit", "none"]}[group]


CASES = [
    [],
    ["trainer.lr=1e-4"],
    ["adapter.r=4,8,16", "seed=1,2"],
    ["seed=range(3)", "trainer.lr=range(0.5,2,0.5)", "adapter.r=range(16,0,-8)"],
    ["adapter=choice(lora,dora)", "quant=choice(none,8bit)", "trainer.max_steps=5"],
    ["adapter=glob(*)", "quant=glob(*bit,exclude=8*)"],
    ["seed=sort(3,1,2)", "adapter.r=sort(8,4,reverse=true)"],
    ["run_name='a,b','c d'", "logger.tags=[x,y]", "task.name=\"fpb\"", "model.revision='x=y'"],
    ["seed=1,2", "trainer.lr=1e-4", "seed=3,4,5", "+trainer.extra.foo=1,2"],
    ["~logger.tags", "++trainer.extra.bar={a:1,b:[2,3]}", "adapter@alias=lora,dora", "data.seed=null"],
    ["eval.prompt=plain,finlora_inst", r"run_name='it\'s'", "trainer.lr=1e-3,2e-3"],
]


@pytest.mark.parametrize("command", CASES, ids=lambda c: " ".join(c) or "empty")
def test_sweep_jobs_equal_the_basic_sweepers(command):
    parsed = OverridesParser.create(config_loader=Groups()).parse_overrides(command)
    assert sweep_jobs(parsed) == basic_sweeper.BasicSweeper.split_arguments(parsed, None)[0]


def test_shuffled_sweeps_draw_as_the_basic_sweeper_does():
    parsed = OverridesParser.create().parse_overrides(["seed=shuffle(1,2,3,4,5)", "adapter.r=shuffle(range(4))"])
    random.seed(7)
    ours = sweep_jobs(parsed)
    random.seed(7)
    assert ours == basic_sweeper.BasicSweeper.split_arguments(parsed, None)[0]


def test_an_interval_is_refused_as_the_basic_sweeper_refuses_it():
    parsed = OverridesParser.create().parse_overrides(["trainer.lr=interval(0.1,1.0)"])
    with pytest.raises(HydraException) as theirs:
        basic_sweeper.BasicSweeper.split_arguments(parsed, None)
    with pytest.raises(HydraException, match="does not support sweep type") as ours:
        sweep_jobs(parsed)
    assert str(ours.value) == str(theirs.value)


def test_a_glob_without_a_config_loader_is_refused_as_hydra_refuses_it():
    parsed = OverridesParser.create().parse_overrides(["adapter=glob(*)"])
    with pytest.raises(HydraException, match="ConfigLoader is not set"):
        sweep_jobs(parsed)

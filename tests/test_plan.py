"""Stage plans: even split, manual --layers, and validation messages."""

import dataclasses

import pytest

from torch_pp.placement.plan import PlanError, StagePlan, even_plan, parse_layers


def test_even_split_gives_rank0_the_smaller_share():
    plan = even_plan(num_layers=30, num_stages=4)
    assert plan.ranges == ((0, 7), (7, 14), (14, 22), (22, 30))
    assert [len(plan.layers_of(r)) for r in range(4)] == [7, 7, 8, 8]
    assert even_plan(num_layers=30, num_stages=2).ranges == ((0, 15), (15, 30))
    assert even_plan(num_layers=5, num_stages=2).ranges == ((0, 2), (2, 5))
    assert even_plan(num_layers=4, num_stages=1).ranges == ((0, 4),)


def test_plan_is_frozen_and_answers_questions():
    plan = parse_layers("0:10,10:30", num_layers=30)
    assert plan.num_stages == 2 and plan.spec() == "0:10,10:30"
    assert plan.stage_of_layer(9) == 0 and plan.stage_of_layer(10) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_layers = 3
    with pytest.raises(IndexError):
        plan.stage_of_layer(30)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0:10,12:30", "layers 10:12 belong to no stage"),
        ("0:12,10:30", "layers 10:12 are given twice"),
        ("0:0,0:30", "stage 0 (0:0) is empty"),
        ("0:10,10:20", "layers 20:30 belong to no stage"),
        ("0:10,10:31", "has only 30 layers"),
        ("0-10,10:30", "expected START:END"),
        ("5:10,10:30", "layers 0:5 belong to no stage"),
    ],
)
def test_bad_layer_specs_say_what_is_wrong(spec, message):
    with pytest.raises(PlanError) as info:
        parse_layers(spec, num_layers=30)
    assert message in str(info.value)


def test_more_stages_than_layers():
    with pytest.raises(PlanError, match="3 stages for a model with 2 layers"):
        even_plan(num_layers=2, num_stages=3)


def test_world_size_must_match():
    plan = parse_layers("0:10,10:30", num_layers=30)
    plan.check_world_size(2)
    with pytest.raises(PlanError, match="2 stages .* but 3 ranks"):
        plan.check_world_size(3)
    with pytest.raises(PlanError):
        StagePlan(ranges=(), num_layers=4)

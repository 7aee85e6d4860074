"""The training monitor's bounded history and input checks (nodes/monitor.py, without a host: the
module imports only the standard library until a server calls it)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "nodes" / "monitor.py"
_spec = importlib.util.spec_from_file_location("pso_monitor_under_test", _PATH)
monitor = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = monitor  # dataclasses look their module up
_spec.loader.exec_module(monitor)


def test_points_carry_null_for_missing_or_non_finite_values():
    point = monitor.make_point(3, float("nan"), {"implicit_accuracy": 0.5, "margin": float("inf")})
    assert point == [3, None, 0.5, None, None]
    assert json.loads(json.dumps(point)) == point  # valid JSON for a browser (no NaN tokens)
    assert monitor.make_point(1, 0.25, {"implicit_accuracy": 1, "margin": -2.0, "saturated_fraction": 0}) == \
        [1, 0.25, 1.0, -2.0, 0.0]


def test_history_is_thinned_to_every_2nd_4th_step_and_keeps_the_latest():
    run = monitor.Run(prompt_id="p", node_id="1", total=10)
    for step in range(1, 11):
        run.add(monitor.make_point(step, 1.0 / step, {}), max_points=4)
    assert run.stride == 4
    assert [p[0] for p in run.points] == [4, 8]
    assert [p[0] for p in run.history()] == [4, 8, 10]
    assert run.history()[-1][1] == pytest.approx(0.1)


def test_a_long_run_stays_within_the_point_budget():
    run = monitor.Run(prompt_id="p", node_id="1", total=100_000)
    for step in range(1, 100_001):
        run.add([step, 0.0, None, None, None])
    assert monitor.MAX_POINTS // 2 <= len(run.points) <= monitor.MAX_POINTS
    steps = [p[0] for p in run.points]
    assert steps == list(range(run.stride, 100_001, run.stride))[: len(steps)]


def test_the_store_evicts_finished_runs_first_and_finds_the_newest_run_of_a_node():
    store = monitor.MonitorStore(max_runs=2)
    a = monitor.Run(prompt_id="a", node_id="5", total=1, workflow_id="w1", started=1.0, status="finished")
    b = monitor.Run(prompt_id="b", node_id="5", total=1, workflow_id="w2", started=2.0)
    c = monitor.Run(prompt_id="c", node_id="7", total=1, started=3.0)
    assert store.start(a) == [] and store.start(b) == []
    assert store.start(c) == [a]  # running runs outlive a finished one
    assert store.get("a", "5") is None and store.get("b", "5") is b
    assert store.latest(["5", "7", "9"], None) == {"5": b, "7": c}
    assert store.latest(["5", "7"], "w1") == {"7": c}  # b belongs to another workflow; c knows none


def test_a_running_run_whose_prompt_ended_is_reported_stopped():
    run = monitor.Run(prompt_id="p", node_id="3", total=5)
    run.add([1, 0.5, 1.0, 0.1, 0.0])
    assert run.to_json(running_prompts={"p"})["status"] == "running"
    assert run.to_json(running_prompts=set())["status"] == "stopped"
    assert run.to_json(running_prompts=set(), with_points=False).keys() >= {"prompt_id", "node_id", "step"}


@pytest.mark.parametrize(("value", "ok"), [
    ("13", True), ("5:12", True), ("00000000-0000-0000-0000-000005f00001", True), ("train", True),
    ("..", False), ("a..b", False), ("../x", False), ("a/b", False), ("a\\b", False), ("", False),
    (".hidden", False), ("x" * 65, False), ("é", False), ("a b", False), (13, False), (None, False),
])
def test_safe_ids(value, ok):
    assert monitor.is_safe_id(value) is ok


def test_lookup_bodies_are_parsed_strictly():
    assert monitor.parse_lookup(b'{"node_ids": ["3", "3", "5"], "workflow_id": null}') == (["3", "5"], None)
    with pytest.raises(monitor.RequestError, match="larger than 16384") as err:
        monitor.parse_lookup(b" " * (monitor.MAX_BODY_BYTES + 1))
    assert err.value.status == 413
    with pytest.raises(monitor.RequestError, match=r"unknown keys \['extra'\]"):
        monitor.parse_lookup(b'{"node_ids": ["3"], "extra": 1}')


def test_preview_names_are_hex_whatever_the_ids_hold():
    name = monitor.preview_filename("../../etc", "a/b\x00")
    assert name.startswith("preview_") and name.endswith(".jpg")
    assert set(name[len("preview_"):-4]) <= set("0123456789abcdef") and len(name) == 8 + 24 + 4
    assert name != monitor.preview_filename("../../etc", "a/b")

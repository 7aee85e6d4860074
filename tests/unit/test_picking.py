"""pso.picking: the journal of hand-made decisions, pair keys and labels."""

from __future__ import annotations

import json

import pytest

from pso import picking
from pso.picking import PickError, PickJournal

SAMPLING = {"model": {"model_family": "SD15", "latent_height": 8}, "policy": "renoise", "sigmas": [14.6, 0.0]}


def test_pair_seeds_are_explicit_and_distinct():
    seeds = [picking.pair_seeds(10, i) for i in range(4)]
    assert seeds == [(10, 11), (12, 13), (14, 15), (16, 17)]
    with pytest.raises(ValueError, match="seed=-1"):
        picking.pair_seeds(-1, 0)


def test_pair_key_is_stable_and_depends_on_everything_that_makes_the_images():
    key = picking.pair_key("a fox", (1, 2), SAMPLING)
    assert key == picking.pair_key("a fox", [1, 2], dict(reversed(list(SAMPLING.items()))))
    assert len(key) == 20 and int(key, 16) >= 0
    others = {picking.pair_key("a fox.", (1, 2), SAMPLING), picking.pair_key("a fox", (2, 1), SAMPLING),
              picking.pair_key("a fox", (1, 2), {**SAMPLING, "policy": "euler_ancestral"}),
              picking.pair_key("a fox", (1, 2), {**SAMPLING, "sigmas": [14.6, 1.0, 0.0]})}
    assert key not in others and len(others) == 4


def test_label_round_trip_and_foreign_labels():
    key = picking.pair_key("p", (0, 1), SAMPLING)
    assert picking.label_key(picking.pair_label(key)) == key
    for label in (None, "", "landscape", "pick ", "pick xyz", "pick " + key + "0", "Pick " + key):
        assert picking.label_key(label) is None


def test_check_choice_lists_the_valid_choices():
    assert [picking.check_choice(c) for c in picking.CHOICES] == ["left", "right", "tie", "skip"]
    with pytest.raises(PickError, match=r"'both' is not one of \['left', 'right', 'tie', 'skip'\]"):
        picking.check_choice("both")
    with pytest.raises(PickError, match="1 is not one of"):
        picking.check_choice(1)


def test_journal_records_atomically_and_reads_back(tmp_path):
    j = PickJournal(tmp_path)
    assert len(j) == 0 and not (tmp_path / picking.JOURNAL_FILE).exists()
    keys = [picking.pair_key("p", picking.pair_seeds(0, i), SAMPLING) for i in range(3)]
    for key, choice, i in zip(keys, ["left", "tie", "skip"], range(3), strict=True):
        j.record(key, choice, "p", picking.pair_seeds(0, i))
    again = PickJournal(tmp_path)
    assert [(d.key, d.choice, d.seeds) for d in again.decisions.values()] == [
        (keys[0], "left", (0, 1)), (keys[1], "tie", (2, 3)), (keys[2], "skip", (4, 5))]
    assert again.counts() == {"left": 1, "right": 0, "tie": 1, "skip": 1}
    assert again.counts(keys[:1]) == {"left": 1, "right": 0, "tie": 0, "skip": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [picking.JOURNAL_FILE]  # no temporary file left
    data = json.loads((tmp_path / picking.JOURNAL_FILE).read_text())
    assert data["format"] == "comfyui-pso.picks" and data["version"] == 1


def test_a_decision_is_final_and_a_refused_one_changes_no_file(tmp_path):
    j = PickJournal(tmp_path)
    key = picking.pair_key("p", (0, 1), SAMPLING)
    j.record(key, "right", "p", (0, 1))
    before = (tmp_path / picking.JOURNAL_FILE).read_bytes()
    with pytest.raises(PickError, match="already decided \\('right'\\)"):
        j.record(key, "left", "p", (0, 1))
    with pytest.raises(PickError, match="'maybe' is not one of"):
        j.record(picking.pair_key("p", (2, 3), SAMPLING), "maybe", "p", (2, 3))
    assert (tmp_path / picking.JOURNAL_FILE).read_bytes() == before
    assert len(PickJournal(tmp_path)) == 1


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not a readable picks journal"),
    ('{"format": "something else", "version": 1}', "not a comfyui-pso picks journal"),
    ('{"format": "comfyui-pso.picks", "version": 2, "decisions": []}', "update comfyui-pso"),
    ('{"format": "comfyui-pso.picks", "version": 1, "decisions": [{"key": "00"}]}', "malformed decision"),
])
def test_a_damaged_journal_is_refused_with_its_path(tmp_path, content, message):
    (tmp_path / picking.JOURNAL_FILE).write_text(content)
    with pytest.raises(PickError, match=message) as info:
        PickJournal(tmp_path)
    assert str(tmp_path / picking.JOURNAL_FILE) in str(info.value)


def test_sides_are_drawn_per_pair_from_its_seeds_and_mapped_back_to_the_samples():
    """Against position bias: about half of the pairs show seeds[1]'s sample on the left, the same way
    every time; a click on a screen side names the right sample either way."""
    swaps = [picking.shown_swapped(picking.pair_seeds(0, i)) for i in range(400)]
    assert 160 <= sum(swaps) <= 240, sum(swaps)  # a fair coin: 200 +- 2 sigma = 20
    assert swaps == [picking.shown_swapped(picking.pair_seeds(0, i)) for i in range(400)]
    assert swaps[:40] != [picking.shown_swapped(picking.pair_seeds(1000, i)) for i in range(40)]
    assert [picking.preferred_sample(c, False) for c in picking.CHOICES] == [0, 1, None, None]
    assert [picking.preferred_sample(c, True) for c in picking.CHOICES] == [1, 0, None, None]


def test_the_journal_stores_the_side_shown_and_reads_journals_without_it(tmp_path):
    j = PickJournal(tmp_path)
    key = picking.pair_key("p", (0, 1), SAMPLING)
    j.record(key, "left", "p", (0, 1), swapped=True)
    data = json.loads((tmp_path / picking.JOURNAL_FILE).read_text())
    assert data["decisions"][0]["choice"] == "left" and data["decisions"][0]["swapped"] is True
    del data["decisions"][0]["swapped"]  # a journal written before the sides were drawn
    (tmp_path / picking.JOURNAL_FILE).write_text(json.dumps(data))
    assert PickJournal(tmp_path).decisions[key].swapped is False

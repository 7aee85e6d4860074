"""Pure parts of the evaluation node and of the preference import (no ComfyUI).

Facts checked: step lists parse and refuse junk; each named schedule gives the published timesteps
per step count; the table's mean and standard error are the closed-form values; every row of a
Pick-a-Pic file is classified (kept with its winner, tie, unlabelled, bad label, missing image) and
the report lists each skipped row; a table file cannot point outside its folder.
"""

from __future__ import annotations

import json
import math

import pytest
import tiny_rewards
import torch

from pso import evaluation
from pso import preference_import as pref


def test_steps_and_prompts_parse():
    assert evaluation.parse_steps("1, 2,4 ,2") == [1, 2, 4]
    with pytest.raises(ValueError, match="'two' is not an integer"):
        evaluation.parse_steps("1,two")
    with pytest.raises(ValueError, match="0 is outside 1..1000"):
        evaluation.parse_steps("0")
    assert evaluation.parse_prompts(" a \n\n b\n") == ["a", "b"]


def test_step_schedules_give_the_published_timesteps():
    assert evaluation.step_timesteps("trailing", 4) == [999, 749, 499, 249]
    assert evaluation.step_timesteps("trailing", 2) == [999, 499]
    assert evaluation.step_timesteps("trailing", 1) == [999]
    assert evaluation.step_timesteps("lcm", 4) == [999, 759, 499, 259]
    assert evaluation.step_timesteps("turbo", 4) == [999, 899, 799, 699]
    with pytest.raises(ValueError, match="valid: \\['lcm', 'trailing', 'turbo'\\]"):
        evaluation.step_timesteps("karras", 4)


def test_table_shows_mean_and_standard_error():
    r = evaluation.EvalScores()
    r.add("base", 1, "pickscore", torch.tensor([20.0, 21.0, 22.0]))
    r.add("base", 2, "pickscore", torch.tensor([21.0]))
    r.add("lora", 1, "pickscore", torch.tensor([22.0, 22.5, 23.0]))
    mean, sem = r.mean_sem("base", 1, "pickscore")
    assert mean == pytest.approx(21.0) and sem == pytest.approx(1.0 / math.sqrt(3))
    lines = r.markdown().splitlines()
    assert lines[0] == "| model | steps | pickscore |"
    assert lines[2] == "| base | 1 | 21.00 ± 0.58 |" and lines[3] == "| base | 2 | 21.00 ± 0.00 |"
    assert lines[4] == "| lora | 1 | 22.50 ± 0.29 |" and lines[5] == "| lora | 2 |  |"


def test_every_pickapic_row_is_classified_and_reported(tmp_path):
    path = tiny_rewards.write_pickapic_parquet(tmp_path / "p.parquet")
    rows = list(pref.read_rows(path, tmp_path))
    got = [pref.classify(r)[:2] for r in rows]
    assert got == [("kept", 0), ("tie", None), ("kept", 1), ("missing_image", None), ("kept", 1),
                   ("unlabelled", None), ("kept", 0)]  # row 4's bytes are decoded (and refused) later
    assert rows[0].source_0 == "uid0a" and rows[0].prompt == "a red square"
    report = pref.ImportReport(source="p.parquet", rows_read=7, kept=[0, 2, 6], ties=[1], unlabelled=[5],
                               missing_image=[(3, "image 1 empty")], unreadable_image=[(4, "bad")])
    assert report.skipped == 4 and report.summary().splitlines() == [
        "p.parquet: 7 row(s) read, 3 pair(s) kept, 4 skipped",
        "- 1 tie(s) (equal labels) skipped: row 1",
        "- 1 unlabelled row(s) (has_label false) skipped: row 5",
        "- 1 row(s) with a missing image skipped: row 3 (image 1 empty)",
        "- 1 row(s) with an unreadable image skipped: row 4 (bad)"]


def test_labels_outside_zero_one_are_invalid_and_long_lists_are_cut():
    row = pref.PreferenceRow(0, "x", b"a", b"b", 2.0, -1.0)
    assert pref.classify(row) == ("bad_label", None, "label_0=2.0, label_1=-1.0")
    report = pref.ImportReport(source="s", rows_read=30, ties=list(range(30)))
    shown = ", ".join(str(i) for i in range(20))
    assert report.summary().endswith(f"row {shown}, ... (10 more)")


def test_table_files_stay_inside_their_root(tmp_path):
    root = tmp_path / "input"
    (root / "t").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(tiny_rewards.png_bytes((1, 2, 3)))
    (root / "t" / "link").symlink_to(tmp_path)
    (root / "t" / "pairs.jsonl").write_text(json.dumps(
        {"prompt": "x", "image_0": "link/secret.png", "image_1": "b.png", "label_0": 1}) + "\n")
    with pytest.raises(pref.PreferenceImportError, match="resolves to .*secret.png, outside"):
        list(pref.read_rows(root / "t" / "pairs.jsonl", root))
    with pytest.raises(pref.PreferenceImportError, match="unknown preference file type '.txt'"):
        pref.read_rows(root / "t" / "pairs.txt", root)

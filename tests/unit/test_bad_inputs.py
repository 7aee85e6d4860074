"""Bad files and values from outside, at the pure (no ComfyUI) entry points: each is refused with a
message naming the file, the value and the fix, never trained on and never a bare library error.

Facts checked: a shard whose bytes changed at the same size is refused on load (the manifest's
SHA-256), once per shard; an empty dataset says it is empty; an over-long prompt in a manifest or a
caption is refused with its length; JSON nested too deep is a LimitError, not a RecursionError;
a preference table with a 200 KB field, random bytes, a fake parquet, a JSON-object caption or a
duplicated row is reported by name and row.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_dataset import fingerprint, write  # noqa: E402 (the dataset tests' tiny pairs)

from pso import limits
from pso import preference_import as pref
from pso.dataset import PairDataset, PairDatasetError, PairDatasetWriter
from pso.images import TargetImageError, read_prompts, resolve_folder

# -- pair datasets -----------------------------------------------------------------------------------

def _flip_one_byte_at_end(path: Path) -> None:
    """Change the last byte of the file (inside the tensor data), keeping its size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_shard_corrupted_at_the_same_size_is_refused_naming_it(tmp_path):
    write(tmp_path / "ds", 4, shard_size=2)
    shard = tmp_path / "ds" / "shard_00001.safetensors"
    size = shard.stat().st_size
    _flip_one_byte_at_end(shard)
    assert shard.stat().st_size == size
    ds = PairDataset.open(tmp_path / "ds")
    ds.get([0, 1])  # the intact shard loads
    with pytest.raises(PairDatasetError, match=r"shard_00001\.safetensors does not match the SHA-256.*"
                                               r"Restore the shard from a backup or rebuild"):
        ds.get([2])
    # the opt-out reads it (for tools that verify in bulk with PairDataset.verify)
    assert PairDataset.open(tmp_path / "ds", verify=False).get([2])["target"].shape[0] == 1


def test_shards_are_hashed_once_per_opened_dataset(tmp_path, monkeypatch):
    import pso.dataset as pd

    write(tmp_path / "ds", 4, shard_size=2)
    calls = []
    real = pd._sha256
    monkeypatch.setattr(pd, "_sha256", lambda p: calls.append(p.name) or real(p))
    ds = PairDataset.open(tmp_path / "ds", max_cached_shards=1)
    for _ in range(3):
        ds.get([0])
        ds.get([3])  # evicts and reloads shard 0 each round
    assert ds.shard_loads == 6 and sorted(calls) == ["shard_00000.safetensors", "shard_00001.safetensors"]


def test_an_empty_dataset_says_so_and_what_to_do(tmp_path):
    PairDatasetWriter(tmp_path / "empty", fingerprint()).close()
    ds = PairDataset.open(tmp_path / "empty")
    with pytest.raises(PairDatasetError, match=r"empty \(its manifest lists no pairs.*append\) or delete"):
        ds.get(list(range(len(ds))))


def test_a_five_megabyte_prompt_in_a_manifest_is_refused_at_open(tmp_path):
    write(tmp_path / "ds", 2, shard_size=2)
    manifest = tmp_path / "ds" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["items"][1]["prompt"] = "a cat " * 900_000
    manifest.write_text(json.dumps(data))
    with pytest.raises(PairDatasetError, match=r"items\[1\].*5,400,000 characters long, over the limit"):
        PairDataset.open(tmp_path / "ds")
    with pytest.raises(PairDatasetError, match="over the limit"), \
            PairDatasetWriter(tmp_path / "new", fingerprint()) as w:  # and is never written
        w.add(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), "x" * (limits.MAX_PROMPT_CHARS + 1))


def test_an_over_long_caption_file_is_refused_with_its_name(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    (tmp_path / "a.txt").write_text("word " * 3000)
    with pytest.raises(TargetImageError, match=r"caption a\.txt: the prompt is 14,999 characters"):
        read_prompts([image], "")
    (tmp_path / "a.txt").write_text("x" * 10_000_000)  # not even read whole
    with pytest.raises(TargetImageError, match=r"caption a\.txt is 10,000,000 bytes"):
        read_prompts([image], "")


def test_a_300_character_folder_name_is_refused_without_a_bare_oserror(tmp_path):
    with pytest.raises(TargetImageError, match="a name part of 300 characters; file systems allow 255"):
        resolve_folder(tmp_path, "x" * 300)


# -- limits --------------------------------------------------------------------------------------------

def test_deep_json_is_a_limit_error_not_a_recursion_error():
    with pytest.raises(limits.LimitError, match="metadata x nests JSON deeper than Python can read"):
        limits.loads_json("[" * 100_000 + "]" * 100_000, "metadata x")
    with pytest.raises(limits.LimitError, match="deeper than 64 levels"):
        limits.loads_json("[" * 65 + "]" * 65, "body")
    assert limits.loads_json("[" * 64 + "]" * 64, "body") is not None
    with pytest.raises(json.JSONDecodeError):
        limits.loads_json("{", "body")


@pytest.mark.parametrize("name, message", [
    ("x" * 151, "is 151 bytes long"), ("é" * 76, "is 152 bytes long"), (".hidden", "starts with '.'"),
    ("a\nb", "control character"), ("tab\there", "control character")])
def test_names_that_the_file_system_or_file_lists_would_mangle_are_refused(name, message):
    with pytest.raises(limits.LimitError, match=message):
        limits.check_name(name, "file name")
    assert limits.check_name("x" * 150, "file name")


# -- preference tables ---------------------------------------------------------------------------------

def _rows(path: Path):
    return list(pref.read_rows(path, path.parent))


def test_a_csv_with_a_200kb_field_names_the_line_and_the_limits(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("caption,image_0,image_1,label_0\nok,a.png,b.png,1\n"
                     + "y" * 200_000 + ",a.png,b.png,1\n")
    with pytest.raises(pref.PreferenceImportError, match=r"t\.csv line 3: not a readable CSV row .*"
                                                         r"at most 131,072 characters"):
        _rows(table)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_random_bytes_are_reported_as_not_utf8_text(tmp_path, suffix):
    table = tmp_path / f"t{suffix}"
    table.write_bytes(os.urandom(64) + b"\xff\xfe\xfa" * 100)
    with pytest.raises(pref.PreferenceImportError, match=rf"t\{suffix} is not UTF-8 text .*save it as UTF-8"):
        _rows(table)


def test_a_fake_parquet_is_reported_as_unreadable(tmp_path):
    pytest.importorskip("pyarrow")
    fake = tmp_path / "p.parquet"
    fake.write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(pref.PreferenceImportError, match=r"p\.parquet is not a readable parquet file"):
        _rows(fake)


def test_a_json_object_caption_and_deep_json_rows_are_reported(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    table = tmp_path / "t.jsonl"
    rows = [{"caption": {"text": "a cat"}, "image_0": "a.png", "image_1": "b.png", "label_0": 1},
            {"caption": "a cat", "image_0": "a.png", "image_1": "b.png", "label_0": 1}]
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = [pref.classify(r) for r in _rows(table)]
    assert got[0] == ("bad_label", None, "caption is a dict, not text") and got[1][0] == "kept"
    table.write_text(json.dumps(rows[1]) + "\n" + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(pref.PreferenceImportError, match=r"t\.jsonl line 2 nests JSON deeper"):
        _rows(table)


def test_duplicate_rows_have_the_same_key_and_others_do_not(tmp_path):
    a = pref.PreferenceRow(0, "a cat", b"img0", b"img1", 1.0, 0.0)
    same = pref.PreferenceRow(7, "a cat", b"img0", b"img1", 0.0, 1.0)
    other = pref.PreferenceRow(8, "a cat", b"img0", b"img2", 1.0, 0.0)
    assert pref.row_key(a) == pref.row_key(same) != pref.row_key(other)
    report = pref.ImportReport("t", rows_read=2, kept=[0], duplicate=[(7, "same as row 0")])
    assert "- 1 duplicate row(s) (same caption and images as an earlier row) skipped: row 7 (same as row 0)" \
        in report.summary()

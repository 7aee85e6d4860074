"""Facts about pso.dataset: pairs, trajectories and prompts round-trip bit for bit; appends leave old
pairs untouched; a crash at any write leaves a dataset that opens with only complete shards; names
in a manifest cannot leave the folder; reads touch only the shards they need and never hold more
than ``max_cached_shards``; every error names the file or value at fault."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import pso.dataset as pd
import pso.io as pio
from pso.dataset import (
    DatasetFingerprint,
    IncompatibleDatasetError,
    PairDataset,
    PairDatasetError,
    PairDatasetWriter,
    to_pair_batch,
)
from pso.samplers import sample_trajectory
from pso.schedules import FlowSchedule

C, H, W = 2, 4, 4
SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.0])


def fingerprint(**over) -> DatasetFingerprint:
    kw = dict(model_family="sdxl", latent_channels=C, latent_height=H, latent_width=W, latent_format="SDXL",
              sigmas=SIGMAS, sampler="renoise")
    kw.update(over)
    return DatasetFingerprint(**kw)


def trajectories(b: int, seed: int):
    """b real renoise trajectories (float32) of a toy denoiser on a flow schedule."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, H, W, generator=gen)
    return sample_trajectory(lambda x, s, c: 0.5 * x, x, SIGMAS, None, FlowSchedule(), "renoise", gen)


def make_pairs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {"target": torch.randn(n, C, H, W, generator=gen), "reference_traj": trajectories(n, seed + 1),
            "prompts": [f"prompt {seed}-{i}" for i in range(n)]}


def write(folder, n: int, seed: int = 0, shard_size: int = 2, traj: bool = True, **kw):
    p = make_pairs(n, seed)
    with PairDatasetWriter(folder, fingerprint(), shard_size=shard_size, **kw) as w:
        for i in range(n):
            w.add(p["target"][i], None if traj else p["reference_traj"].final[i], p["prompts"][i],
                  reference_traj=p["reference_traj"].select(i) if traj else None)
    return p


def manifest(folder) -> dict:
    return json.loads((folder / pd.MANIFEST_FILE).read_text())


def edit_manifest(folder, fn) -> None:
    data = manifest(folder)
    fn(data)
    (folder / pd.MANIFEST_FILE).write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------
# Round trip and format
# --------------------------------------------------------------------------------------------
def test_round_trip_targets_references_trajectories_prompts_fingerprint(tmp_path):
    folder = tmp_path / "pairs"
    p = make_pairs(5)
    tgt_traj = trajectories(5, 7)
    with PairDatasetWriter(folder, fingerprint(model_hash="sha256:abc"), shard_size=2) as w:
        idx = w.add_batch(None, None, p["prompts"], reference_traj=p["reference_traj"],
                          target_traj=tgt_traj, scores_target=torch.arange(5.0), scores_reference=[-1.0] * 5,
                          target_sources=[f"img{i}.png" for i in range(5)],
                          labels=["a", None, "b", None, "c"])
    assert idx == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(folder)) == ["manifest.json", "shard_00000.safetensors",
                                          "shard_00001.safetensors", "shard_00002.safetensors"]

    ds = PairDataset.open(folder)
    assert len(ds) == 5 and ds.prompts == tuple(p["prompts"])
    assert ds.fingerprint == fingerprint(model_hash="sha256:abc")
    assert ds.fingerprint.sigmas == tuple(SIGMAS.tolist())
    assert [r.target_source for r in ds.records] == [f"img{i}.png" for i in range(5)]
    assert [r.label for r in ds.records] == ["a", None, "b", None, "c"]
    assert [(r.shard, r.row) for r in ds.records][3] == ("shard_00001.safetensors", 1)
    got = ds.get(slice(None))
    assert torch.equal(got["target"], tgt_traj.final)
    assert torch.equal(got["reference"], p["reference_traj"].final)
    assert torch.equal(got["score_target"], torch.arange(5.0))
    assert torch.equal(got["score_reference"], torch.full((5,), -1.0))
    for side, ref in (("reference_traj", p["reference_traj"]), ("target_traj", tgt_traj)):
        t = got[side]
        assert t.policy == "renoise"
        for name in ("sigmas", "latents", "x0", "noise", "mean", "std"):
            assert torch.equal(getattr(t, name), getattr(ref, name)), (side, name)
        # the sampler's invariant survives the round trip bit for bit
        for n in range(t.num_steps):
            assert torch.equal(t.latents[:, n + 1], t.mean[:, n] + t.noise[:, n] * t.std[n])
    m = manifest(folder)
    assert (m["format"], m["version"]) == ("comfyui-pso.pairs", 1)
    assert m["created_by"]["package"] == "comfyui-pso" and m["created_by"]["version"]
    assert "embedding" not in json.dumps(m) and m["items"][0]["prompt"] == "prompt 0-0"
    assert m["trajectories"] == {"reference_traj": {"policy": "renoise", "format": "pso.trajectory/1"},
                                 "target_traj": {"policy": "renoise", "format": "pso.trajectory/1"}}


def test_latent_dtype_and_pair_batch(tmp_path):
    folder = tmp_path / "half"
    p = write(folder, 3, latent_dtype=torch.bfloat16)
    ds = PairDataset(folder)
    got = ds.get([2, 0])
    assert got["target"].dtype == torch.bfloat16
    assert torch.equal(got["target"], p["target"][[2, 0]].to(torch.bfloat16))
    assert got["reference_traj"].latents.dtype == torch.float32  # trajectories are kept exact
    batch = ds.pair_batch([2, 0], cond=torch.tensor([7, 8]))
    assert batch.batch_size == 2 and batch.cond.tolist() == [7, 8]
    assert torch.equal(batch.reference_traj.final, p["reference_traj"].final[[2, 0]])
    with pytest.raises(PairDatasetError, match=r"cond must be a tensor with 2 rows .* got \(3,\)"):
        to_pair_batch(got, torch.zeros(3))


def test_check_loss_names_the_missing_trajectories(tmp_path):
    write(tmp_path / "offline", 2, traj=False)
    offline = PairDataset(tmp_path / "offline")
    assert offline.pair_fields == ("target", "reference")
    offline.check_loss("pso_offline")
    with pytest.raises(PairDatasetError, match=r"'pso_full' needs \['reference_traj'\].*pso_offline"):
        offline.check_loss("pso_full")
    write(tmp_path / "full", 2)
    PairDataset(tmp_path / "full").check_loss("pso_full")


def test_layout_is_fixed_by_the_first_pair(tmp_path):
    p = make_pairs(2)
    with PairDatasetWriter(tmp_path / "d", fingerprint()) as w:
        w.add(p["target"][0], None, "a", reference_traj=p["reference_traj"].select(0))
        with pytest.raises(PairDatasetError, match=r"pair 1 does not match .*stores reference_traj\.latents "
                                                   r"for every pair but this pair has none"):
            w.add(p["target"][1], p["target"][1], "b")
        with pytest.raises(PairDatasetError, match=r"target has shape \(3, 4, 4\).*sdxl at 4x4 latents"):
            w.add(torch.zeros(3, H, W), None, "c", reference_traj=p["reference_traj"].select(1))
        other = sample_trajectory(lambda x, s, c: x, torch.zeros(1, C, H, W), torch.tensor([1.0, 0.0]), None,
                                  FlowSchedule(), "renoise", torch.Generator())
        with pytest.raises(PairDatasetError,
                           match=r"sampled with sigmas \[1.0, 0.0\] .* \[1.0, 0.75, 0.5, 0.0\]"):
            w.add(p["target"][1], None, "d", reference_traj=other)
    assert len(PairDataset(tmp_path / "d")) == 1


def test_fingerprint_validation_names_the_bad_value():
    with pytest.raises(PairDatasetError, match=r"strictly decreasing.*\[0.5, 1.0, 0.0\]"):
        fingerprint(sigmas=[0.5, 1.0, 0.0])
    with pytest.raises(PairDatasetError, match="latent_height must be a positive int, got 0"):
        fingerprint(latent_height=0)


# --------------------------------------------------------------------------------------------
# Append, refusal, compatibility
# --------------------------------------------------------------------------------------------
def test_append_keeps_old_items_and_shard_files(tmp_path):
    folder = tmp_path / "d"
    old = write(folder, 3)
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder) if n.endswith(".safetensors")}
    created = manifest(folder)["created"]
    new = write(folder, 2, seed=5, append=True)

    ds = PairDataset(folder)
    assert len(ds) == 5 and ds.prompts == tuple(old["prompts"] + new["prompts"])
    assert all((folder / n).read_bytes() == b for n, b in before.items())  # listed shards never rewritten
    got = ds.get(range(5))
    assert torch.equal(got["target"], torch.cat([old["target"], new["target"]]))
    assert torch.equal(got["reference_traj"].noise, torch.cat([old["reference_traj"].noise,
                                                               new["reference_traj"].noise]))
    assert manifest(folder)["created"] == created
    # 2 + 1 old rows; the short shard is not topped up (listed shards are immutable): 2 new rows
    assert [(s.file, s.rows) for s in ds.shards] == [("shard_00000.safetensors", 2),
                                                     ("shard_00001.safetensors", 1),
                                                     ("shard_00002.safetensors", 2)]


def test_writer_refuses_an_existing_non_empty_folder(tmp_path):
    folder = tmp_path / "d"
    write(folder, 2)
    before = manifest(folder)
    with pytest.raises(PairDatasetError, match=r"already exists and is not empty.*append=True"):
        PairDatasetWriter(folder, fingerprint())
    assert manifest(folder) == before
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"png")
    with pytest.raises(PairDatasetError, match="already exists and is not empty"):
        PairDatasetWriter(other, fingerprint())
    with pytest.raises(PairDatasetError, match=r"manifest\.json does not exist.*not a pair dataset"):
        PairDatasetWriter(other, fingerprint(), append=True)
    assert os.listdir(other) == ["cat.png"]


def test_incompatible_fingerprint_names_both_models():
    ds_fp = fingerprint(latent_height=128, latent_width=128, latent_channels=4)
    model_fp = fingerprint(model_family="sd15", latent_format="SD15", latent_height=64, latent_width=64,
                           latent_channels=4)
    with pytest.raises(IncompatibleDatasetError) as err:
        ds_fp.check_compatible(model_fp)
    msg = str(err.value)
    assert "built for sdxl at 128x128 latents (1024x1024 px" in msg
    assert "the model is sd15 at 64x64 latents (512x512 px" in msg
    assert "build a new pair dataset" in msg
    # softer mismatches are warnings, not errors
    warnings = ds_fp.check_compatible(fingerprint(latent_height=128, latent_width=128, latent_channels=4,
                                                  sigmas=[1.0, 0.5, 0.0], sampler="euler_ancestral"))
    assert len(warnings) == 2
    assert "[1.0, 0.75, 0.5, 0.0]" in warnings[0] and "[1.0, 0.5, 0.0]" in warnings[0]
    assert "'renoise'" in warnings[1] and "'euler_ancestral'" in warnings[1]
    assert ds_fp.check_compatible(ds_fp) == []


def test_append_refuses_a_different_fingerprint(tmp_path):
    folder = tmp_path / "d"
    write(folder, 2)
    with pytest.raises(IncompatibleDatasetError,
                       match=r"cannot append .*sigmas \[1.0, 0.5, 0.0\].*new folder"):
        PairDatasetWriter(folder, fingerprint(sigmas=[1.0, 0.5, 0.0]), append=True)
    with pytest.raises(IncompatibleDatasetError, match="model family sdxl != sd15"):
        PairDatasetWriter(folder, fingerprint(model_family="sd15"), append=True)
    assert len(PairDataset(folder)) == 2


# --------------------------------------------------------------------------------------------
# Crashes
# --------------------------------------------------------------------------------------------
def test_crash_in_a_shard_write_leaves_only_complete_shards(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    p = make_pairs(4)
    real_save, calls = pd.atomic_save_safetensors, []

    def save_then_crash(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(pd, "atomic_save_safetensors", save_then_crash)
    writer = PairDatasetWriter(folder, fingerprint(), shard_size=2)
    with pytest.raises(OSError, match="disk full"), writer as w:  # __exit__ tries to write the rest: fails
        for i in range(4):
            w.add(p["target"][i], None, p["prompts"][i], reference_traj=p["reference_traj"].select(i))
    assert sorted(os.listdir(folder)) == ["manifest.json", "shard_00000.safetensors"]  # no temp files
    ds = PairDataset(folder)
    assert ds.prompts == tuple(p["prompts"][:2])
    assert torch.equal(ds.get([0, 1])["target"], p["target"][:2])


def test_an_error_in_the_caller_keeps_the_complete_pairs(tmp_path):
    folder = tmp_path / "d"
    p = make_pairs(3)
    with pytest.raises(KeyboardInterrupt), PairDatasetWriter(folder, fingerprint(), shard_size=2) as w:
        for i in range(3):
            w.add(p["target"][i], None, p["prompts"][i], reference_traj=p["reference_traj"].select(i))
        raise KeyboardInterrupt  # e.g. the user cancels the graph
    ds = PairDataset(folder)
    assert ds.prompts == tuple(p["prompts"])  # the buffered third pair was written on the way out
    assert torch.equal(ds.get(2)["target"][0], p["target"][2])


def test_crash_between_shard_and_manifest_hides_the_shard_until_replaced(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    p = make_pairs(4)
    real_replace = os.replace

    def manifest_rename_fails(src, dst):
        if str(dst).endswith("manifest.json") and (folder / "shard_00001.safetensors").exists():
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(pio.os, "replace", manifest_rename_fails)
    w = PairDatasetWriter(folder, fingerprint(), shard_size=2)
    with pytest.raises(OSError, match="power cut"):
        for i in range(4):
            w.add(p["target"][i], None, p["prompts"][i], reference_traj=p["reference_traj"].select(i))
    monkeypatch.undo()  # the process "died" here: no close()
    assert sorted(os.listdir(folder)) == ["manifest.json", "shard_00000.safetensors",
                                          "shard_00001.safetensors"]
    ds = PairDataset(folder)
    assert len(ds) == 2 and [s.file for s in ds.shards] == ["shard_00000.safetensors"]

    extra = write(folder, 1, seed=9, append=True)  # the unlisted shard's name is reused
    ds = PairDataset(folder)
    assert ds.prompts == (*p["prompts"][:2], *extra["prompts"])
    assert torch.equal(ds.get(2)["target"], extra["target"])


# --------------------------------------------------------------------------------------------
# Untrusted manifests and damaged files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["item", "shard"])
def test_path_traversal_in_the_manifest_is_refused(tmp_path, where):
    folder = tmp_path / "d"
    write(folder, 2)

    def evil(m):
        if where == "item":
            m["items"][0]["shard"] = "../../etc/passwd"
        else:
            m["shards"][0]["file"] = "../../etc/passwd"

    edit_manifest(folder, evil)
    with pytest.raises(PairDatasetError, match=re.escape("'../../etc/passwd' is not a plain file name")):
        PairDataset(folder)


def test_future_version_is_refused_with_a_message(tmp_path):
    folder = tmp_path / "d"
    write(folder, 1)
    edit_manifest(folder, lambda m: m.update(version=99))
    with pytest.raises(PairDatasetError,
                       match=r"format version 99.*reads version 1 only: update comfyui-pso"):
        PairDataset(folder)


def test_missing_or_corrupt_manifest_names_the_file(tmp_path):
    with pytest.raises(PairDatasetError, match=r"empty[/\\]manifest\.json does not exist"):
        PairDataset(tmp_path / "empty")
    folder = tmp_path / "d"
    write(folder, 1)
    (folder / "manifest.json").write_text('{"format": "comfyui-pso.pairs", "vers')
    with pytest.raises(PairDatasetError, match=r"d[/\\]manifest\.json is not valid JSON"):
        PairDataset(folder)


def test_damaged_shards_are_named(tmp_path):
    folder = tmp_path / "d"
    write(folder, 4)
    shard = folder / "shard_00001.safetensors"
    good = shard.read_bytes()

    shard.write_bytes(b"\xff" * len(good))  # same size: found when the shard is read (its hash)
    ds = PairDataset(folder)
    ds.get(0)
    with pytest.raises(PairDatasetError, match=r"shard .*shard_00001\.safetensors does not match the SHA"):
        ds.get(2)
    with pytest.raises(PairDatasetError, match=r"shard .*shard_00001\.safetensors cannot be read"):
        PairDataset(folder, verify=False).get(2)  # without the hash, the reader names it

    shard.write_bytes(good[:-8])  # truncated: found on open
    with pytest.raises(PairDatasetError, match=r"shard_00001\.safetensors is \d+ bytes but the manifest"):
        PairDataset(folder)

    shard.unlink()
    with pytest.raises(PairDatasetError, match=r"shard_00001\.safetensors listed in .* is missing"):
        PairDataset(folder)

    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit in the data: only a hash sees it
    ds = PairDataset(folder)
    with pytest.raises(PairDatasetError, match=re.escape("['shard_00001.safetensors']")):
        ds.verify()
    shard.write_bytes(good)
    PairDataset(folder).verify()


# --------------------------------------------------------------------------------------------
# Reading: only the shards needed, bounded memory
# --------------------------------------------------------------------------------------------
def test_get_across_shard_boundaries_returns_the_rows_asked_for(tmp_path):
    folder = tmp_path / "d"
    p = write(folder, 7, shard_size=3)
    ds = PairDataset(folder)
    got = ds.get([5, 1, 3, -5])
    assert got["indices"] == [5, 1, 3, 2]
    assert got["prompts"] == [p["prompts"][i] for i in (5, 1, 3, 2)]
    assert torch.equal(got["target"], p["target"][[5, 1, 3, 2]])
    assert torch.equal(got["reference_traj"].latents, p["reference_traj"].latents[[5, 1, 3, 2]])
    assert ds.shard_loads == 2 and "shard_00002.safetensors" not in ds.cached_shards  # pair 6 not touched
    got["target"].zero_()  # results are copies, not views of the cache
    assert torch.equal(ds.get(5)["target"][0], p["target"][5])
    with pytest.raises(IndexError, match="pair index 7 is out of range for a dataset of 7 pairs"):
        ds.get(7)


def test_memory_is_flat_lru_of_max_cached_shards(tmp_path):
    folder = tmp_path / "d"
    p = write(folder, 10, shard_size=2)
    ds = PairDataset.open(folder, max_cached_shards=2)
    for i in range(10):
        assert torch.equal(ds.get(i)["target"][0], p["target"][i])
        assert len(ds.cached_shards) <= 2
    assert ds.shard_loads == 5  # sequential reads load each shard once

    ds = PairDataset.open(folder, max_cached_shards=2)
    for i in (0, 2, 0, 4):  # shard 0, 1, 0 (hit), 2: the least recently used (shard 1) goes
        ds.get(i)
    assert ds.shard_loads == 3
    assert ds.cached_shards == ("shard_00000.safetensors", "shard_00002.safetensors")


def test_iter_shards_streams_one_shard_at_a_time_and_splits_by_rank(tmp_path):
    folder = tmp_path / "d"
    p = write(folder, 5, shard_size=2)
    ds = PairDataset(folder, max_cached_shards=1)
    batches = list(ds.iter_shards())
    assert [b["indices"] for b in batches] == [[0, 1], [2, 3], [4]]
    assert ds.shard_loads == 3 and len(ds.cached_shards) == 1
    assert torch.equal(torch.cat([b["target"] for b in batches]), p["target"])
    ranks = [[b["indices"] for b in ds.iter_shards(rank=r, world_size=2)] for r in (0, 1)]
    assert ranks == [[[0, 1], [4]], [[2, 3]]]

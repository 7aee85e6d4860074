"""PSO Load Pairs streams a dataset without trajectories into PSO Train: memory holds a few shards,
not the dataset, and training is the same as on the pairs held in memory.

Facts checked: the loaded PairSet's latents are LatentColumn views (no tensor of the dataset's size);
training on them gives bit for bit the losses and LoRA of training on the same pairs in memory; while
training, the dataset never holds more than its cache of shards; a shard corrupted after loading is
refused before training; a resume recognises the same dataset.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from tiny_training import train_node

from extension_loader import load_package


@pytest.fixture(scope="module")
def ext(comfy_inprocess):
    load_package()
    names = ("data_nodes", "train_nodes", "types", "dataset_nodes")
    return {m: importlib.import_module(f"comfyui-pso.nodes.{m}") for m in names}


@pytest.fixture(scope="module")
def preference_pairs(ext):
    """Six tiny-model pairs without trajectories (as preference pairs are)."""
    from pso.schedules import few_step_sigmas
    from pso_test_fixtures import tiny_models

    with torch.inference_mode():
        b = tiny_models.build_bundle("sd15", seed=5)
        g = torch.Generator().manual_seed(0)
        latents = b.model.model.process_latent_in(torch.randn(12, 4, 8, 8, generator=g))
        prompts = ["a red circle", "a blue square"]
        pset = ext["types"].PairSet(
            target=latents[:6].clone(), reference=latents[6:].clone(), reference_traj=None,
            prompt_index=torch.tensor([0, 1, 0, 1, 0, 1]), prompts=prompts,
            conds=[b.clip.encode_from_tokens_scheduled(b.clip.tokenize(p)) for p in prompts],
            sigmas=few_step_sigmas(b.model.get_model_object("model_sampling"), "dmd2"), policy="euler",
            fingerprint=importlib.import_module("comfyui-pso.nodes.pairing").model_fingerprint(
                b.model, (4, 8, 8)))
    return b, pset


def _dataset_module():
    return importlib.import_module("comfyui-pso.pso.dataset")  # the extension's own copy of pso


def _write(ext, pairs, folder, shard_size=2):
    PairDatasetWriter = _dataset_module().PairDatasetWriter  # noqa: N806

    fp = ext["dataset_nodes"].fingerprint_of(pairs)
    with PairDatasetWriter(folder, fp, shard_size=shard_size) as w:
        for i in range(len(pairs)):
            w.add(pairs.target[i], pairs.reference[i], pairs.prompts[int(pairs.prompt_index[i])])


def _train(ext, b, pairs, steps=4, **kw):
    """Preference pairs: beta 50 and references never re-sampled."""
    preference = {"beta": 50.0, "reference_refresh_every": 0}
    return train_node(ext["train_nodes"], b, pairs, steps, **{**preference, **kw})


def test_streamed_pairs_train_exactly_like_pairs_in_memory(ext, preference_pairs, output_dir):
    LatentColumn = _dataset_module().LatentColumn  # noqa: N806
    b, pairs = preference_pairs
    _write(ext, pairs, output_dir / "pso_pairs" / "prefs")
    with torch.inference_mode():
        loaded = ext["dataset_nodes"].PSOLoadPairs.execute("prefs", b.model, b.clip).result[0]
    assert isinstance(loaded.target, LatentColumn) and isinstance(loaded.reference, LatentColumn)
    assert loaded.prompts == pairs.prompts and torch.equal(loaded.prompt_index, pairs.prompt_index)
    assert torch.equal(loaded.target[list(range(6))], pairs.target)
    ds = loaded.target.dataset
    assert ds.max_cached_shards == ext["dataset_nodes"].STREAM_CACHED_SHARDS == 4 and len(ds.shards) == 3
    streamed = _train(ext, b, loaded, steps=6)
    in_memory = _train(ext, b, pairs, steps=6)
    assert streamed[2]["loss"] == in_memory[2]["loss"]
    assert all(torch.equal(streamed[1][k], in_memory[1][k]) for k in in_memory[1])
    assert len(ds.cached_shards) <= 4


def test_a_streamed_dataset_never_holds_more_than_its_cache(ext, preference_pairs, output_dir, monkeypatch):
    b, pairs = preference_pairs
    _write(ext, pairs, output_dir / "pso_pairs" / "prefs1", shard_size=1)  # six one-pair shards
    monkeypatch.setattr(ext["dataset_nodes"], "STREAM_CACHED_SHARDS", 2)
    with torch.inference_mode():
        loaded = ext["dataset_nodes"].PSOLoadPairs.execute("prefs1", b.model, b.clip).result[0]
    ds = loaded.target.dataset
    held = []
    real = ds._load_shard

    def watch(name):
        out = real(name)
        held.append(len(ds.cached_shards))
        return out

    monkeypatch.setattr(ds, "_load_shard", watch)
    _train(ext, b, loaded, steps=5)
    assert held and max(held) <= 2
    assert ds.shard_loads > 6, "shards are read again when needed, not kept"


def test_a_shard_corrupted_after_saving_is_refused_at_load(ext, preference_pairs, output_dir):
    b, pairs = preference_pairs
    folder = output_dir / "pso_pairs" / "prefs2"
    _write(ext, pairs, folder)
    shard = folder / "shard_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shards \['shard_00002\.safetensors'\] .* do not match their "
                                         r"recorded SHA-256"), torch.inference_mode():
        ext["dataset_nodes"].PSOLoadPairs.execute("prefs2", b.model, b.clip)


def test_a_streamed_run_resumes_and_refuses_other_pairs(ext, preference_pairs, output_dir):
    b, pairs = preference_pairs
    _write(ext, pairs, output_dir / "pso_pairs" / "prefs3")
    with torch.inference_mode():
        loaded = ext["dataset_nodes"].PSOLoadPairs.execute("prefs3", b.model, b.clip).result[0]
    first = _train(ext, b, loaded, steps=2)
    run = json.loads(first[3])["checkpoint"].split("/")[-2]
    with pytest.raises(ValueError, match="other pairs"):
        _train(ext, b, dataclasses.replace(pairs, target=pairs.target + 1), steps=4, resume_from=run)
    resumed = _train(ext, b, loaded, steps=4, resume_from=run)
    full = _train(ext, b, loaded, steps=4)
    assert resumed[2]["loss"] == full[2]["loss"]

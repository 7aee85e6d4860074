"""PSO Pick Pairs against a real ComfyUI server, driven through its HTTP routes (no browser).

The node blocks while a person picks; these tests play the person with ``POST /pso/picker/pick`` and
check what reaches the disk: picked pairs in the dataset (preferred sample = target, bit-equal to
what the stock sampler makes with that seed), ties and skips only in the journal, every refused
request leaving the dataset folder untouched, and a session killed midway keeping its picks and
resuming where it stopped.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid

import pytest
import torch
from safetensors.torch import load_file

from pso import picking
from pso.dataset import PairDataset

pytestmark = pytest.mark.server

PROMPTS = ["a red square", "a blue circle"]
SIGMA_SCHEDULE = "dmd2"


def model_nodes() -> dict:
    """Tiny SD1.5-shaped checkpoint, DMD2 sigmas, lcm sampler."""
    return {
        "ckpt": {"class_type": "PSOTestTinyCheckpoint",
                 "inputs": {"family": "sd15", "seed": 0, "prediction": "eps"}},
        "sigmas": {"class_type": "PSOFewStepSigmas",
                   "inputs": {"model": ["ckpt", 0], "schedule": SIGMA_SCHEDULE}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
    }


def train_nodes() -> dict:
    """PSO Train (full PSO, Eq. 5, on the picked pairs' trajectories) -> Plot Loss Graph."""
    return {
        "train": {"class_type": "PSOTrain", "inputs": {
            "model": ["ckpt", 0], "pairs": ["pick", 0], "method": "pso_full", "steps": 2,
            "learning_rate": 1e-2, "beta": 50.0, "lora_rank": 4, "batch_size": 2, "grad_accumulation": 1,
            "seed": 0,
            "reference_refresh_every": 0, "training_dtype": "float32", "gradient_checkpointing": False,
            "checkpoint_every": 0, "preview_every": 0, "lora_target": "attention"}},
        "plot": {"class_type": "LossGraphNode",
                 "inputs": {"loss": ["train", 2], "filename_prefix": "picked"}},
    }


def picker_graph(dataset: str, seed: int = 100, pairs_per_prompt: int = 2) -> dict:
    return {
        **model_nodes(),
        "pick": {"class_type": "PSOPickPairs", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "prompts": "\n".join(PROMPTS), "seed": seed,
            "pairs_per_prompt": pairs_per_prompt, "width": 64, "height": 64, "dataset_name": dataset}},
    }


def stock_sample_graph(prompt: str, seed: int, prefix: str) -> dict:
    """The user's own sampling (SamplerCustomAdvanced), saving the latent."""
    return {
        **model_nodes(),
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}},
        "guider": {"class_type": "BasicGuider",
                   "inputs": {"model": ["ckpt", 0], "conditioning": ["text", 0]}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


def wait_session(server, node: str = "pick", timeout: float = 120) -> dict:
    """The open session of node ``node`` (the node is sampling until it appears)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in server.get_json("/pso/picker/sessions")["sessions"]:
            if s["node"] == node:
                return server.get_json(f"/pso/picker/session/{s['session']}")
        time.sleep(0.2)
    raise AssertionError("no picking session opened:\n" + server.log_tail())


def pick(server, session: str, pair, choice) -> tuple[int, object]:
    return server.post_json("/pso/picker/pick", {"session": session, "pair": pair, "choice": choice})


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its size and modification time."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def seeds_by_side(pair: dict, side: str) -> tuple[int, int]:
    """(preferred seed, other seed) when the person clicks screen ``side`` of a shown pair."""
    win = picking.preferred_sample(side, picking.shown_swapped(pair["seeds"]))
    return pair["seeds"][win], pair["seeds"][1 - win]


def journal(folder) -> dict:
    data = json.loads((folder / "picks.json").read_text())
    return {d["key"]: d for d in data["decisions"]}


@pytest.fixture()
def dataset_name():
    return f"picks_{uuid.uuid4().hex[:8]}"


def test_picking_session_over_http_stores_each_decision_and_refuses_bad_requests(
        comfy_server, dataset_name, comfy_inprocess):
    root = comfy_server.base_dir / "output" / "pso_pairs"
    folder = root / dataset_name
    prompt_id = comfy_server.queue(picker_graph(dataset_name))
    state = wait_session(comfy_server)
    sid = state["session"]
    assert state["total"] == 4 and state["decided"] == 0 and state["dataset"] == dataset_name
    assert [p["prompt"] for p in state["pairs"]] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert [p["seeds"] for p in state["pairs"]] == [[100, 101], [102, 103], [104, 105], [106, 107]]
    # the previews exist where the URLs say (ComfyUI's temp folder)
    for side in ("left", "right"):
        status, headers, body = comfy_server.request(state["pairs"][0][side])
        assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"

    before = snapshot(root)

    def post_raw(body):
        return comfy_server.request("/pso/picker/pick", body, method="POST")

    assert (folder / "manifest.json").is_file() and len(PairDataset.open(folder)) == 0
    refusals = [
        (post_raw(b"{" + b" " * 5000 + b"}"), 413, "larger than"),
        (post_raw(iter([b"{"] + [b" " * 1000] * 6 + [b"}"])), 413, "larger than"),  # chunked, no length
        (post_raw(b'{"session": "' + sid.encode() + b'", "pair": 0,'), 400, "malformed JSON"),
        (post_raw(b"\xff\xfe"), 400, "malformed JSON"),
        (post_raw(b"[" * 4000), 400, "nests JSON deeper"),  # was a RecursionError: HTTP 500
        (post_raw(b"[1, 2]"), 400, "JSON object"),
    ]
    for (status, _, body), want_status, text in refusals:
        assert status == want_status, body
        assert text in json.loads(body)["error"]
    for body, want_status, text in [
        ({"session": sid, "pair": 0, "choice": "middle"}, 400, "'middle' is not one of"),
        ({"session": sid, "pair": True, "choice": "left"}, 400, "integer index"),
        ({"session": sid, "pair": 4, "choice": "left"}, 400, "out of range"),
        ({"session": sid, "pair": 0}, 400, "missing ['choice']"),
        ({"session": sid, "pair": 0, "choice": "left", "path": "../x"}, 400, "unknown ['path']"),
        ({"session": "AAAAAAAAAAAAAAAA", "pair": 0, "choice": "left"}, 404, "no open picking session"),
        ({"session": "../../etc/passwd", "pair": 0, "choice": "left"}, 400, "not a session id"),
    ]:
        status, answer = comfy_server.post_json("/pso/picker/pick", body)
        assert status == want_status, (body, answer)
        assert text in answer["error"], answer
    status, _, body = comfy_server.request("/pso/picker/session/AAAAAAAAAAAAAAAA")
    assert status == 404 and "no open picking session" in json.loads(body)["error"]
    for name, want_status, text in [
        ("../../etc", 400, "not allowed"), ("/etc/passwd", 400, "not allowed"),
        ("a/../../b", 400, "not allowed"), ("..", 400, "not allowed"),
        ("no_such_dataset", 404, "no pair dataset named 'no_such_dataset'"),
    ]:
        query = urllib.parse.quote(name, safe="")
        status, _, body = comfy_server.request(f"/pso/picker/dataset?name={query}")
        assert status == want_status, (name, body)
        assert text in json.loads(body)["error"]
    assert snapshot(root) == before, "a refused request changed the dataset folder"

    # the person decides: left, right, tie, skip; each pick is on disk when its answer comes
    for index, choice in enumerate(["left", "right", "tie", "skip"]):
        status, answer = pick(comfy_server, sid, index, choice)
        assert status == 200, answer
        assert answer["pairs"][index]["choice"] == choice
        assert len(journal(folder)) == index + 1
        assert len(PairDataset.open(folder)) == min(index + 1, 2)
        if index == 0:  # a decision is final
            status, answer = pick(comfy_server, sid, 0, "right")
            assert status == 409 and "already decided" in answer["error"]
    entry = comfy_server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    summary = entry["outputs"]["pick"]["text"][0]
    assert summary.startswith("2 pairs picked (1 left, 1 right), 1 ties, 1 skipped of 4"), summary
    status, answer = pick(comfy_server, sid, 3, "left")
    assert status == 404  # the session closed with its node
    assert comfy_server.get_json(f"/pso/picker/dataset?name={dataset_name}") == {
        "name": dataset_name, "pairs": 2, "decisions": {"left": 1, "right": 1, "tie": 1, "skip": 1}}

    ds = PairDataset.open(folder)
    # the person clicked screen sides; each pair's sides were drawn from its seeds (position bias)
    won = [seeds_by_side(state["pairs"][0], "left"), seeds_by_side(state["pairs"][1], "right")]
    assert [(r.prompt, r.target_source, r.reference_source) for r in ds.records] == [
        (PROMPTS[0], f"seed {w}", f"seed {o}") for w, o in won]
    assert [journal(folder)[r.label.removeprefix("pick ")]["choice"] for r in ds.records] == ["left", "right"]
    assert [journal(folder)[r.label.removeprefix("pick ")]["swapped"] for r in ds.records] == [
        picking.shown_swapped(p["seeds"]) for p in state["pairs"][:2]]
    items = ds.get([0, 1])
    assert torch.equal(items["target"], items["target_traj"].final)
    assert torch.equal(items["reference"], items["reference_traj"].final)
    # the preferred latent is exactly what the user's own sampler makes with that seed
    import comfy.latent_formats

    for i, (prompt, seed) in enumerate([(PROMPTS[0], won[0][0]), (PROMPTS[0], won[1][0])]):
        prefix = f"{dataset_name}_stock{i}"
        comfy_server.run(stock_sample_graph(prompt, seed, prefix))
        (saved,) = (comfy_server.base_dir / "output").glob(f"{prefix}_*.latent")
        stock = load_file(saved)["latent_tensor"]
        inner = comfy.latent_formats.SD15().process_in(stock)
        torch.testing.assert_close(items["target"][i : i + 1], inner, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(items["reference"][i : i + 1], inner, atol=1e-3)


def test_closed_browser_keeps_picks_and_requeue_resumes(comfy_server, dataset_name):
    folder = comfy_server.base_dir / "output" / "pso_pairs" / dataset_name
    graph = {**picker_graph(dataset_name, seed=7), **train_nodes()}  # the picks feed PSO Train
    first = comfy_server.queue(graph)
    state = wait_session(comfy_server)
    assert pick(comfy_server, state["session"], 1, "right")[0] == 200
    assert pick(comfy_server, state["session"], 2, "skip")[0] == 200
    comfy_server.interrupt()  # the person closes the browser and cancels the run
    entry = comfy_server.wait(first)
    assert entry["status"]["status_str"] == "error"
    assert comfy_server.get_json("/pso/picker/sessions")["sessions"] == []
    ds = PairDataset.open(folder)
    first_pairs = state["pairs"]
    w, o = seeds_by_side(first_pairs[1], "right")
    assert [(r.target_source, r.reference_source) for r in ds.records] == [(f"seed {w}", f"seed {o}")]
    assert sorted(d["choice"] for d in journal(folder).values()) == ["right", "skip"]

    second = comfy_server.queue(graph)  # same graph again: only the undecided pairs are asked
    state = wait_session(comfy_server)
    assert state["already_decided"] == 2 and state["total"] == 2
    assert [p["seeds"] for p in state["pairs"]] == [[7, 8], [13, 14]]
    assert pick(comfy_server, state["session"], 0, "left")[0] == 200
    assert pick(comfy_server, state["session"], 1, "tie")[0] == 200
    entry = comfy_server.wait(second)
    assert entry["status"]["status_str"] == "success", entry["status"]
    summary = entry["outputs"]["pick"]["text"][0]
    assert summary.startswith("2 pairs picked (1 left, 1 right), 1 ties, 1 skipped"), summary
    assert entry["outputs"]["plot"]["images"], "PSO Train did not run on the picked pairs"
    ds = PairDataset.open(folder)
    w2, o2 = seeds_by_side(state["pairs"][0], "left")
    assert sorted((r.target_source, r.reference_source) for r in ds.records) == sorted(
        [(f"seed {w}", f"seed {o}"), (f"seed {w2}", f"seed {o2}")])
    assert len(journal(folder)) == 4


def test_a_crash_between_dataset_and_journal_neither_loses_nor_repeats_a_pick(tmp_path, comfy_inprocess):
    """store_decision writes the dataset item first; if the journal write never happens (a crash),
    the pair still counts as decided through its item label, so a new session does not ask again."""
    from extension_loader import load_package

    load_package()
    import importlib

    def own(name):  # the package's own module objects (its classes are the ones isinstance checks)
        return importlib.import_module(f"comfyui-pso.{name}")

    pp, picking = own("nodes.pair_picker"), own("pso.picking")
    sample_trajectory, FlowSchedule = own("pso.samplers").sample_trajectory, own("pso.schedules").FlowSchedule
    DatasetFingerprint = own("pso.dataset").DatasetFingerprint
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    gen = torch.Generator().manual_seed(0)
    traj = sample_trajectory(lambda x, s, c: 0.5 * x, torch.randn(2, 4, 8, 8, generator=gen), sigmas, None,
                             FlowSchedule(), "renoise", gen)
    fp = DatasetFingerprint(model_family="SD15", latent_channels=4, latent_height=8, latent_width=8,
                            latent_format="SD15", sigmas=sigmas, sampler="renoise")
    keys = [picking.pair_key("p", (2 * i, 2 * i + 1), {"t": 1}) for i in range(2)]
    pairs = [pp.PickPair(i, keys[i], "p", (2 * i, 2 * i + 1), ("/l", "/r"), traj) for i in range(2)]
    folder = tmp_path / "ds"
    pp.store_decision(folder, fp, pairs[0], "right")
    (folder / picking.JOURNAL_FILE).unlink()  # the crash: the journal write never happened
    assert pp.decided_keys(folder) == {keys[0]}
    with pytest.raises(pp.PickRefused, match="already decided"):  # e.g. by a second session
        pp.store_decision(folder, fp, pairs[0], "left")
    pp.store_decision(folder, fp, pairs[1], "skip")
    assert pp.decided_keys(folder) == set(keys)
    ds = PairDataset.open(folder)
    assert len(ds) == 1 and ds.records[0].target_source == "seed 1"
    items = ds.get([0])
    assert torch.equal(items["target"][0], traj.final[1])  # right = the second sample preferred
    assert torch.equal(items["reference"][0], traj.final[0])

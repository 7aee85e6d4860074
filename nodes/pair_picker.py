"""PSO Pick Pairs: label pairs of the model's own samples in the browser, stored as they are made.

The node samples two images per pair through the host (``host_sampling.sample_trajectories``,
exactly as the user's SAMPLER / SIGMAS / seed make them), shows them in the node (web/
pso_pair_picker.js) and blocks, as the "image chooser" packs do, until every pair is decided
through ``POST /pso/picker/pick`` (nodes/picker_routes.py). Each decision is written to the pair
dataset when it arrives (one shard per picked pair, then the manifest; ``pso.picking`` journal for
every decision), so closing the browser loses nothing and a re-queued node asks only the pairs not
yet decided. The output is every picked pair of this node's prompts and seeds, read back from the
dataset: preferred sample = target, the other = reference (Eq. 6 preference pairs).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io

from ..pso import dataset as pso_dataset
from ..pso import picking
from ..pso.samplers import Trajectory, cat_trajectories
from . import host_sampling, pairing
from .dataset_nodes import DATASET_ROOT, dataset_path
from .types import PAIRS_TYPE, PairSet

logger = logging.getLogger(__name__)

EVENT = "pso.picker"  # websocket event: a session's state, sent on open, on every decision and on close
PREVIEW_SUBFOLDER = "pso_picker"  # under ComfyUI's temp folder (emptied when ComfyUI starts)
POLL_SECONDS = 0.1


class PickRefused(Exception):
    """A decision the session refuses; ``status`` is the HTTP status the route answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PickPair:
    """One pair of a session. traj: 2 trajectories (samples of seeds[0] and seeds[1]); images: their
    previews in that order; ``swapped``: seeds[1]'s sample is shown on the left (pso.picking.shown_swapped:
    the side of each sample is drawn per pair against position bias)."""

    index: int
    key: str
    prompt: str
    seeds: tuple[int, int]
    images: tuple[str, str]  # /view URLs of the previews of seeds[0] and seeds[1]
    traj: Trajectory
    choice: str | None = None  # the screen side the person chose (or tie / skip)
    swapped: bool = False

    def public(self) -> dict:
        left, right = self.images[::-1] if self.swapped else self.images
        return {"index": self.index, "prompt": self.prompt, "seeds": list(self.seeds),
                "left": left, "right": right, "swapped": self.swapped, "choice": self.choice}


class PickerSession:
    """The pairs one node run waits on, and how a decision reaches the dataset."""

    def __init__(self, node: str, dataset_name: str, folder: Path, fingerprint, pairs: list[PickPair],
                 already: int) -> None:
        self.id = secrets.token_urlsafe(12)  # 16 characters of [A-Za-z0-9_-]
        self.node, self.dataset_name, self.folder = str(node), dataset_name, folder
        self.fingerprint, self.pairs, self.already = fingerprint, pairs, already
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.open = True
        # Every change counts up: a page keeps the newest state of a session (the answer to the last
        # pick can arrive after the close event, and must not re-open the panel).
        self.version = 0

    @property
    def decided(self) -> int:
        return sum(p.choice is not None for p in self.pairs)

    @property
    def finished(self) -> bool:
        return self.decided == len(self.pairs)

    def state(self) -> dict:
        return {"session": self.id, "node": self.node, "dataset": self.dataset_name, "open": self.open,
                "version": self.version, "folder": f"output/{DATASET_ROOT}/{self.dataset_name}",
                "total": len(self.pairs), "decided": self.decided, "already_decided": self.already,
                "choices": list(picking.CHOICES), "pairs": [p.public() for p in self.pairs]}

    def pick(self, index: int, choice: str) -> dict:
        """Record one decision on disk (dataset first, then journal), then in memory; returns the state."""
        with self.lock:
            if not self.open:
                raise PickRefused(409, f"session {self.id} is closed (its node finished or was cancelled); "
                                  "re-queue the node to label the remaining pairs")
            if not 0 <= index < len(self.pairs):
                raise PickRefused(400, f"pair {index} is out of range: session {self.id} has "
                                  f"{len(self.pairs)} pairs (0..{len(self.pairs) - 1})")
            pair = self.pairs[index]
            if pair.choice is not None:
                raise PickRefused(409, f"pair {index} is already decided ({pair.choice!r}); a decision is "
                                  "final")
            store_decision(self.folder, self.fingerprint, pair, choice)
            pair.choice = choice
            self.version += 1
        self.changed.set()
        return self.state()

    def close(self) -> None:
        with self.lock:
            self.open = False
            self.version += 1
        self.changed.set()


_SESSIONS: dict[str, PickerSession] = {}
_SESSIONS_LOCK = threading.Lock()


def get_session(session_id: str) -> PickerSession | None:
    with _SESSIONS_LOCK:
        return _SESSIONS.get(session_id)


def open_sessions() -> list[PickerSession]:
    with _SESSIONS_LOCK:
        return list(_SESSIONS.values())


def send_state(session: PickerSession) -> None:
    """Broadcast the session's state to every open frontend (no-op without a running server)."""
    server = sys.modules.get("server")  # ComfyUI's server module, when one is running
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(EVENT, session.state())


#: One writer at a time per dataset folder (docs/pair-dataset-format.md): sessions of several nodes
#: may label into the same dataset, so every decision is written under this lock.
_WRITE_LOCK = threading.Lock()


def store_decision(folder: Path, fingerprint, pair: PickPair, choice: str) -> None:
    """Write one decision: a picked pair becomes a dataset item (its own shard, then the manifest,
    both atomic) labelled with the pair key; then the journal records the choice. A pair decided
    meanwhile (by another session on the same dataset) is refused before anything is written."""
    picking.check_choice(choice)
    with _WRITE_LOCK:
        if pair.key in decided_keys(folder):
            raise PickRefused(409, f"pair {pair.index} ({pair.prompt!r}, seeds {list(pair.seeds)}) was "
                              f"already decided in {folder.name}, by another session on the same dataset")
        _write_decision(folder, fingerprint, pair, choice)


def _write_decision(folder: Path, fingerprint, pair: PickPair, choice: str) -> None:
    win = picking.preferred_sample(choice, pair.swapped)
    if win is not None:
        lose = 1 - win
        with pso_dataset.PairDatasetWriter(folder, fingerprint, shard_size=1, append=True) as writer:
            writer.add(None, None, pair.prompt, target_traj=pair.traj.select(win),
                       reference_traj=pair.traj.select(lose), target_source=f"seed {pair.seeds[win]}",
                       reference_source=f"seed {pair.seeds[lose]}", label=picking.pair_label(pair.key))
    # read fresh: shared file
    picking.PickJournal(folder).record(pair.key, choice, pair.prompt, pair.seeds, swapped=pair.swapped)


# --------------------------------------------------------------------------------------------
# Planning and sampling
# --------------------------------------------------------------------------------------------
def plan_pairs(prompts: str, seed: int, pairs_per_prompt: int) -> list[tuple[str, tuple[int, int]]]:
    """(prompt, seeds) of every pair: each non-empty line, ``pairs_per_prompt`` times, seeds from
    :func:`pso.picking.pair_seeds`."""
    lines = [line.strip() for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise ValueError("prompts is empty: write one prompt per line (each gets pairs_per_prompt pairs)")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    flat = [p for p in lines for _ in range(pairs_per_prompt)]
    return [(p, picking.pair_seeds(seed, i)) for i, p in enumerate(flat)]


def sampling_key(model, sampler, sigmas: torch.Tensor, latent_shape: tuple[int, int, int]) -> dict:
    """What decides a pair's images besides prompt and seeds (part of each pair key)."""
    policy = host_sampling.policy_for_sampler(sampler, model.get_model_object("model_sampling"))
    return {"model": pairing.model_fingerprint(model, latent_shape), "policy": policy,
            "sigmas": [round(float(s), 6) for s in sigmas.flatten().tolist()]}


def dataset_fingerprint(sampling: dict, shape: tuple[int, int, int], sigmas: torch.Tensor):
    """The pair dataset fingerprint of the pairs a session samples."""
    return pso_dataset.DatasetFingerprint(
        model_family=sampling["model"]["model_family"], latent_channels=shape[0], latent_height=shape[1],
        latent_width=shape[2], latent_format=sampling["model"]["latent_format"],
        sigmas=sigmas.detach().float().cpu().clone(), sampler=sampling["policy"])


def sample_pair(model, cond, sampler, sigmas, latent_shape, seeds) -> Trajectory:
    """Both samples of one pair, one host sampling run per seed; a Trajectory of 2 (left, right)."""
    trajs = []
    for s in seeds:
        latent = {"samples": torch.zeros((1, *latent_shape))}
        traj, _ = host_sampling.sample_trajectories(model, cond, None, 1.0, sampler, sigmas, latent, s)
        trajs.append(traj.to("cpu"))
    return cat_trajectories(trajs)


def save_previews(model, vae, traj: Trajectory, stem: str) -> tuple[str, str]:
    """Decode both samples, save PNGs under temp/pso_picker; returns their /view URLs."""
    import folder_paths
    from PIL import Image

    images = vae.decode(model.model.process_latent_out(traj.final.to(torch.float32)))[..., :3]
    folder = Path(folder_paths.get_temp_directory()) / PREVIEW_SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for side, image in zip(("left", "right"), images, strict=True):
        name = f"{stem}_{side}.png"
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        Image.fromarray(pixels).save(folder / name)
        urls.append(f"/view?filename={name}&subfolder={PREVIEW_SUBFOLDER}&type=temp")
    return urls[0], urls[1]


def sample_pairs(model, clip, vae, sampler, sigmas, shape, todo: list[tuple[str, tuple[int, int], str]]):
    """Sample and preview the pairs still to decide, ``todo`` = [(prompt, seeds, key)]; progress and
    Cancel per sample."""
    import comfy.model_management
    import comfy.utils

    conds = {p: pairing.encode_prompt(clip, p) for p in pairing.unique_in_order([p for p, _, _ in todo])}
    pbar, token, pairs = comfy.utils.ProgressBar(max(len(todo), 1)), secrets.token_hex(4), []
    for i, (prompt, seeds, key) in enumerate(todo):
        comfy.model_management.throw_exception_if_processing_interrupted()
        traj = sample_pair(model, conds[prompt], sampler, sigmas, shape, seeds)
        images = save_previews(model, vae, traj, f"{token}_{i:03d}")
        pairs.append(PickPair(i, key, prompt, seeds, images, traj, swapped=picking.shown_swapped(seeds)))
        pbar.update_absolute(i + 1, len(todo))
    return pairs


def decided_keys(folder: Path) -> set[str]:
    """Keys of pairs decided in a dataset folder: picked items' labels plus the journal."""
    keys = set(picking.PickJournal(folder).decisions)
    if (folder / pso_dataset.MANIFEST_FILE).exists():
        keys |= {k for r in pso_dataset.PairDataset.open(folder).records if (k := picking.label_key(r.label))}
    return keys


def picked_pairs(folder: Path, keys: set[str], model, clip) -> PairSet:
    """The dataset's picked pairs whose key is in ``keys``, as PSO_PAIRS (target = preferred)."""
    ds = pso_dataset.PairDataset.open(folder)
    idx = [i for i, r in enumerate(ds.records) if picking.label_key(r.label) in keys]
    if not idx:
        raise ValueError(f"no pair of this node was picked in {folder} (every one was a tie or skipped): "
                         "nothing to train on; change the seed or prompts and pick again")
    items = ds.get(idx)
    prompts = pairing.unique_in_order(items["prompts"])
    return PairSet(
        target=items["target"].float(), reference=items["reference"].float(),
        reference_traj=items["reference_traj"],
        prompt_index=torch.tensor([prompts.index(p) for p in items["prompts"]]), prompts=prompts,
        conds=[pairing.encode_prompt(clip, p) for p in prompts],
        sigmas=torch.tensor(ds.fingerprint.sigmas, dtype=torch.float32), policy=ds.fingerprint.sampler,
        fingerprint=pairing.model_fingerprint(model, tuple(items["target"].shape[1:])))


def wait_for_picks(session: PickerSession) -> None:
    """Block until every pair is decided; Cancel (interrupt) raises, as for any long node."""
    import comfy.model_management
    import comfy.utils

    pbar = comfy.utils.ProgressBar(len(session.pairs))
    while not session.finished:
        session.changed.wait(POLL_SECONDS)
        session.changed.clear()
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(session.decided, len(session.pairs))


def run_session(session: PickerSession) -> None:
    """Register the session, tell the frontend, wait; always unregister and announce the close."""
    with _SESSIONS_LOCK:
        _SESSIONS[session.id] = session
    try:
        send_state(session)
        wait_for_picks(session)
    finally:
        session.close()
        with _SESSIONS_LOCK:
            _SESSIONS.pop(session.id, None)
        send_state(session)


class PSOPickPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSOPickPairs",
            display_name="PSO Pick Pairs (label in the browser)",
            category="PSO/data",
            description=(
                "Samples two images per pair from your model for each prompt (seeds seed+2i and seed+2i+1, "
                "your sampler and SIGMAS) and shows them in this node: click the better one (or Tie / Skip; "
                "keys 1 or Left, 2 or Right, T, S). Every decision is saved at once in the pair dataset, so "
                "closing the browser loses nothing; re-queue to continue where you stopped. Outputs the "
                "picked pairs (preferred = target) for PSO Train: use pso_offline or pso_full with "
                "reference_refresh_every 0."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The distilled model whose samples you label."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts."),
                io.Vae.Input("vae", tooltip="VAE that decodes the samples so you can see them."),
                io.Sampler.Input("sampler", tooltip="The sampler you run the model with: lcm (DMD2, LCM), "
                                 "euler_ancestral (Turbo) or euler (Lightning, Hyper, schnell)."),
                io.Sigmas.Input("sigmas",
                                tooltip="The few-step SIGMAS you sample with (PSO Few-Step Sigmas)."),
                io.String.Input("prompts", default="", multiline=True,
                                tooltip="One prompt per line; each gets pairs_per_prompt pairs."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Pair i's two images use seeds seed+2i and seed+2i+1; keep it fixed to "
                             "resume a session."),
                io.Int.Input("pairs_per_prompt", default=2, min=1, max=64,
                             tooltip="How many pairs to show for each prompt."),
                io.Int.Input("width", default=512, min=16, max=4096, step=8,
                             tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=16, max=4096, step=8,
                             tooltip="Image height in pixels."),
                io.String.Input("dataset_name", default="picked_pairs",
                                tooltip=f"Pair dataset under output/{DATASET_ROOT} that picks are appended "
                                "to (created if missing; one dataset per model)."),
            ],
            outputs=[PAIRS_TYPE.Output(display_name="pairs", tooltip="The pairs picked for these prompts and "
                                       "seeds (preferred = target, other = reference), for PSO Train."),
                     io.String.Output(display_name="summary", tooltip="How many pairs were picked, tied and "
                                      "skipped, and the dataset's size.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_name, **kwargs):
        try:
            folder = dataset_path(dataset_name)
        except ValueError:
            return None  # execute reports the bad name
        files = (folder / pso_dataset.MANIFEST_FILE, folder / picking.JOURNAL_FILE)
        return tuple(os.stat(f).st_mtime_ns if f.exists() else None for f in files)

    @classmethod
    def execute(cls, model, clip, vae, sampler, sigmas, prompts, seed, pairs_per_prompt, width, height,
                dataset_name) -> io.NodeOutput:
        folder = dataset_path(dataset_name)
        plan = plan_pairs(prompts, seed, pairs_per_prompt)
        shape = (model.model.latent_format.latent_channels, height // 8, width // 8)
        sampling = sampling_key(model, sampler, sigmas, shape)
        keys = [picking.pair_key(p, s, sampling) for p, s in plan]
        fp = dataset_fingerprint(sampling, shape, sigmas)
        pso_dataset.PairDatasetWriter(folder, fp, shard_size=1, append=True).close()  # refuses a mismatch
        done = decided_keys(folder)
        todo = [(p, s, k) for (p, s), k in zip(plan, keys, strict=True) if k not in done]
        pairs = sample_pairs(model, clip, vae, sampler, sigmas, shape, todo)
        if pairs:
            already = len(plan) - len(pairs)
            run_session(PickerSession(cls.hidden.unique_id, dataset_name, folder, fp, pairs, already))
        counts = picking.PickJournal(folder).counts(keys)
        out = picked_pairs(folder, set(keys), model, clip)
        summary = (f"{len(out)} pairs picked ({counts['left']} left, {counts['right']} right), "
                   f"{counts['tie']} ties, {counts['skip']} skipped of {len(plan)}; "
                   f"{DATASET_ROOT}/{dataset_name} holds {len(pso_dataset.PairDataset.open(folder))} pairs")
        return io.NodeOutput(out, summary, ui={"text": [summary]})

"""Labelling pairs by hand: which of two samples of the model a person prefers.

A picking session shows two samples of the same prompt (different seeds) side by side; the person
chooses ``left`` or ``right`` (that sample becomes the pair's *target*, the other its *reference*,
as in the preference pairs of offline PSO, Eq. 6), or ``tie`` / ``skip`` (no pair). Each decision is
stored the moment it is made, so closing the browser or stopping ComfyUI loses nothing, and a new
session for the same pairs skips the ones already decided.

Where decisions live (docs/pair-dataset-format.md, "Picked pairs"): a picked pair is an item of the
pair dataset whose ``label`` is ``"pick <key>"``; every decision, ties and skips included, is also
recorded in the dataset folder's ``picks.json`` journal (rewritten atomically). A pair counts as
decided when its key is in either, so a crash between the two writes never asks twice nor loses a
pick.

Position bias: people tend to prefer one side. Each pair is shown with its two samples in an order
drawn from its seeds (:func:`shown_swapped`: about half of the pairs show the first seed's sample on
the right), and the journal stores what the person clicked (``choice``, the screen side) with
``swapped``; :func:`preferred_sample` maps the two back to the sample that becomes the target.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import atomic_write_json
from .limits import LimitError, loads_json

__all__ = ["CHOICES", "JOURNAL_FILE", "Decision", "PickError", "PickJournal", "check_choice", "label_key",
           "pair_key", "pair_label", "pair_seeds", "preferred_sample", "shown_swapped"]

#: choice -> what it means. The single source of truth for the route, the node and the messages.
CHOICES: dict[str, str] = {
    "left": "the left sample is better: it becomes the target, the right one the reference",
    "right": "the right sample is better: it becomes the target, the left one the reference",
    "tie": "both are equally good or bad: no pair is stored",
    "skip": "not decided: no pair is stored",
}
#: Choices that store a pair in the dataset.
PICKED = ("left", "right")
JOURNAL_FILE = "picks.json"
JOURNAL_FORMAT = "comfyui-pso.picks"
JOURNAL_VERSION = 1
LABEL_PREFIX = "pick "
_KEY = re.compile(r"^[0-9a-f]{20}$")


class PickError(ValueError):
    """A decision that cannot be recorded (unknown choice, a bad journal file)."""


def shown_swapped(seeds: Sequence[int]) -> bool:
    """Whether a pair is shown with its second sample (``seeds[1]``) on the left.

    Drawn from the pair's seeds (a hash, so the same pair is always shown the same way: a reloaded
    page or a resumed session shows what was shown before), about half of all pairs.
    """
    digest = hashlib.sha256(f"pso-picker-side:{int(seeds[0])}:{int(seeds[1])}".encode()).digest()
    return bool(digest[0] & 1)


def preferred_sample(choice: str, swapped: bool) -> int | None:
    """Which sample of the pair (0 = ``seeds[0]``, 1 = ``seeds[1]``) the screen side ``choice`` shows;
    None for tie and skip."""
    if check_choice(choice) not in PICKED:
        return None
    return int((choice == "right") != bool(swapped))


def check_choice(choice: Any) -> str:
    """``choice`` if it is one of :data:`CHOICES`, else a PickError listing the valid ones."""
    if not isinstance(choice, str) or choice not in CHOICES:
        raise PickError(f"choice {choice!r} is not one of {list(CHOICES)}")
    return choice


def pair_seeds(seed: int, pair: int) -> tuple[int, int]:
    """The noise seeds of pair ``pair`` (0-based over all prompts) of a session started at ``seed``:
    ``(seed + 2 pair, seed + 2 pair + 1)``, so every sample can be re-made with RandomNoise(seed)."""
    if pair < 0 or seed < 0:
        raise ValueError(f"seed and pair must be >= 0, got seed={seed}, pair={pair}")
    return seed + 2 * pair, seed + 2 * pair + 1


def pair_key(prompt: str, seeds: Sequence[int], sampling: dict[str, Any]) -> str:
    """A short stable id of one pair: prompt, both seeds and how they were sampled.

    ``sampling`` holds what else decides the two images and is JSON-serialisable (model family and
    latent size, sampler policy, sigmas rounded to 6 digits). Returns 20 hex digits (80 bits).
    """
    blob = json.dumps({"prompt": prompt, "seeds": [int(s) for s in seeds], "sampling": sampling},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def pair_label(key: str) -> str:
    """The dataset item label of a picked pair."""
    return LABEL_PREFIX + key


def label_key(label: str | None) -> str | None:
    """The pair key in a dataset item label written by :func:`pair_label`, else None."""
    if label and label.startswith(LABEL_PREFIX) and _KEY.match(label[len(LABEL_PREFIX):]):
        return label[len(LABEL_PREFIX):]
    return None


@dataclass(frozen=True)
class Decision:
    """One person's decision on one pair (a journal entry)."""

    key: str
    choice: str
    prompt: str
    seeds: tuple[int, int]
    time: str
    swapped: bool = False  # seeds[1]'s sample was shown on the left (journals before it: never)

    def __post_init__(self) -> None:
        if not (isinstance(self.key, str) and _KEY.match(self.key)):
            raise PickError(f"pair key {self.key!r} must be 20 hex digits (pso.picking.pair_key)")
        check_choice(self.choice)
        if not isinstance(self.prompt, str):
            raise PickError(f"prompt must be a string, got {self.prompt!r}")
        ints = all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)
        if len(self.seeds) != 2 or not ints:
            raise PickError(f"seeds must be two ints, got {self.seeds!r}")


class PickJournal:
    """The ``picks.json`` of a dataset folder: every decision made there, by pair key.

    ``PickJournal(folder)`` reads the file if it exists; :meth:`record` adds one decision and
    rewrites the file atomically (``pso.io.atomic_write_json``). A key is decided once: recording it
    again raises.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / JOURNAL_FILE
        self.decisions: dict[str, Decision] = self._read()

    def _read(self) -> dict[str, Decision]:
        if not self.path.exists():
            return {}
        try:
            data = loads_json(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, LimitError) as exc:
            raise PickError(f"{self.path} is not a readable picks journal ({exc}); move it away to start "
                            "a new one (the picked pairs themselves are in the dataset)") from exc
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT:
            raise PickError(f"{self.path} is not a comfyui-pso picks journal (format {JOURNAL_FORMAT!r} "
                            "expected)")
        if data.get("version") != JOURNAL_VERSION:
            raise PickError(f"{self.path} has version {data.get('version')!r}; this comfyui-pso reads "
                            f"version {JOURNAL_VERSION}: update comfyui-pso")
        out = {}
        for entry in data.get("decisions", []):
            try:
                d = Decision(entry["key"], entry["choice"], entry["prompt"], tuple(entry["seeds"]),
                             entry["time"], bool(entry.get("swapped", False)))
            except (KeyError, TypeError) as exc:
                raise PickError(f"{self.path} has a malformed decision {entry!r}: {exc}") from exc
            out[d.key] = d
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.decisions

    def __len__(self) -> int:
        return len(self.decisions)

    def counts(self, keys: Iterable[str] | None = None) -> dict[str, int]:
        """How many decisions of each choice (among ``keys`` if given)."""
        wanted = None if keys is None else set(keys)
        out = dict.fromkeys(CHOICES, 0)
        for d in self.decisions.values():
            if wanted is None or d.key in wanted:
                out[d.choice] += 1
        return out

    def record(self, key: str, choice: str, prompt: str, seeds: Sequence[int],
               swapped: bool = False) -> Decision:
        """Add one decision (``choice`` is the screen side, ``swapped`` how the pair was shown) and
        rewrite the journal atomically; returns it."""
        if key in self.decisions:
            raise PickError(f"pair {key} was already decided ({self.decisions[key].choice!r})")
        d = Decision(key, check_choice(choice), prompt, (int(seeds[0]), int(seeds[1])),
                     datetime.now(timezone.utc).isoformat(timespec="seconds"), bool(swapped))
        decisions = {**self.decisions, key: d}
        atomic_write_json(self.path, {
            "format": JOURNAL_FORMAT, "version": JOURNAL_VERSION,
            "decisions": [{**asdict(x), "seeds": list(x.seeds)} for x in decisions.values()],
        })
        self.decisions = decisions  # only once the file holds it
        return d

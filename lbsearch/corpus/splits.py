"""Deterministic train / calibration / held-out splits of whole documents, by group."""
from __future__ import annotations

import hashlib

from ..errors import LBSearchError

SPLITS = ("train", "calibration", "heldout")


def bucket(group, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, group)."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(group, seed: int, heldout_fraction: float, calibration_fraction: float) -> str:
    """The split a group belongs to; :func:`split_corpus` and the healing corpus's filter agree on it."""
    u = bucket(group, seed)
    return "heldout" if u < heldout_fraction else "calibration" if u < heldout_fraction + calibration_fraction \
        else "train"


def split_corpus(ds, cfg) -> dict:
    """Deterministic split of whole documents by a hash of (seed, group): same corpus and seed, same
    split. The group is the document's ``group`` column when there is one (the prompt a teacher
    answer answers, so no prompt is in two splits), else its index. A corpus of a few groups whose
    hashes leave a split empty is split by hash rank instead (:func:`_by_rank`)."""
    groups = list(ds["group"] if "group" in ds.column_names else range(len(ds)))
    names = [split_of(g, cfg.seed, cfg.heldout_fraction, cfg.calibration_fraction) for g in groups]
    if set(names) != set(SPLITS):
        names = _by_rank(groups, cfg) or names
    splits = {s: ds.select([i for i, n in enumerate(names) if n == s]) for s in SPLITS}
    for name, part in splits.items():
        if len(part) == 0:
            raise LBSearchError(f"corpus too small: split {name!r} is empty ({len(ds)} documents); "
                                "give more data (data.corpus_tokens)")
    return splits


def _by_rank(groups: list, cfg) -> list[str] | None:
    """Splits by the rank of each group's hash: the lowest go to held-out, the next to calibration, in
    their fractions of the distinct groups but at least one each (None below three groups)."""
    distinct = sorted(set(groups), key=lambda g: bucket(g, cfg.seed))
    if len(distinct) < 3:
        return None
    held = max(1, round(cfg.heldout_fraction * len(distinct)))
    cal = max(1, min(round(cfg.calibration_fraction * len(distinct)), len(distinct) - held - 1))
    name = {g: "heldout" if i < held else "calibration" if i < held + cal else "train" for i, g in enumerate(distinct)}
    return [name[g] for g in groups]


def held_out_groups(ds, splits: dict) -> frozenset:
    """Groups of ``ds`` outside the train split: the healing corpus must draw none of them."""
    if "group" not in ds.column_names:
        return frozenset()
    return frozenset(g for name in ("heldout", "calibration") for g in splits[name]["group"])

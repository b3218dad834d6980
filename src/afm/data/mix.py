"""Source mixing: named mixtures that weight groups of curated documents.

A mixture gives each group of documents a share of the output's characters. A group is a source name
(`dict-gcide`) or a kind (`kind:code`: every document whose `meta["kind"]` is code). A group whose
share asks for more than it has is repeated (up to `max_repeat` times, deterministically: whole copies,
then a seeded sample for the fraction); one that has more is sampled down. Weights that are negative or
name a group no document belongs to are errors before any work starts.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from afm.data.document import Document, read_jsonl
from afm.data.heldout import document_heldout
from afm.errors import AFMError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mixture:
    name: str
    weights: dict[str, float]
    description: str = ""

    def validate(self) -> None:
        if not self.weights:
            raise AFMError(f"mixture {self.name!r} has no weights")
        bad = {k: w for k, w in self.weights.items() if not isinstance(w, int | float) or w < 0}
        if bad:
            raise AFMError(f"mixture {self.name!r}: weights must be non-negative numbers, got {bad}")
        if sum(self.weights.values()) <= 0:
            raise AFMError(f"mixture {self.name!r}: the weights sum to zero")


MIXTURES: dict[str, Mixture] = {
    "pretrain": Mixture("pretrain", {"kind:prose": 0.40, "kind:code": 0.20, "kind:multilingual": 0.20,
                                     "kind:math": 0.12, "kind:conversation": 0.08},
                        "general pre-training: prose, code, 11 languages, reasoning"),
    "midtrain": Mixture("midtrain", {"kind:math": 0.35, "kind:code": 0.35, "kind:prose": 0.15,
                                     "kind:multilingual": 0.10, "kind:conversation": 0.05},
                        "mid-training: math, code and structured reasoning first"),
    "sft": Mixture("sft", {"kind:conversation": 0.6, "kind:math": 0.2, "kind:multilingual": 0.2},
                   "supervised fine-tuning sources: conversations, worked problems, translations"),
}


def get_mixture(name: str) -> Mixture:
    try:
        return MIXTURES[name]
    except KeyError:
        raise AFMError(f"unknown mixture {name!r}; known: {', '.join(MIXTURES)}") from None


def group_of(doc: Document, keys: set[str]) -> str | None:
    """The mixture group a document belongs to: its source if named, else its kind."""
    if doc.source in keys:
        return doc.source
    kind = f"kind:{doc.meta.get('kind')}"
    return kind if kind in keys else None


@dataclass
class MixPlan:
    mixture: Mixture
    files: list[Path]
    available: dict[str, int]  # characters per group
    counts: dict[str, int]  # documents per group
    repeats: dict[str, float] = field(default_factory=dict)  # how many times each group is used
    seed: int = 0
    heldout: float = 0.0  # the fraction of documents held out for evaluation (afm.data.heldout)
    heldout_seed: int = 0

    def to_json(self) -> dict:
        return {"mixture": self.mixture.name, "weights": self.mixture.weights, "available_chars": self.available,
                "documents": self.counts, "repeats": self.repeats, "seed": self.seed, "heldout": self.heldout,
                "heldout_seed": self.heldout_seed}

    def training_docs(self, path: Path) -> Iterator[Document]:
        for doc in read_jsonl(path):
            if not document_heldout(doc, self.heldout, self.heldout_seed):
                yield doc


def plan_mixture(files: list[Path], mixture: Mixture, *, total_chars: int | None = None, max_repeat: float = 4.0,
                 seed: int = 0, heldout: float = 0.0, heldout_seed: int = 0) -> MixPlan:
    """Measure each group in the curated files and decide how many times to use it.

    `total_chars` defaults to the largest output no group needs more than `max_repeat` passes for.
    Documents held out by afm.data.heldout at `heldout` (fraction) and `heldout_seed` are left out.
    """
    mixture.validate()
    if not 0 <= heldout < 1:
        raise AFMError(f"heldout must be a fraction in [0, 1), got {heldout}")
    keys = set(mixture.weights)
    available = dict.fromkeys(keys, 0)
    counts = dict.fromkeys(keys, 0)
    probe = MixPlan(mixture, list(files), {}, {}, heldout=heldout, heldout_seed=heldout_seed)
    for path in files:
        for doc in probe.training_docs(path):
            g = group_of(doc, keys)
            if g is not None:
                available[g] += len(doc.text)
                counts[g] += 1
    missing = sorted(k for k in keys if counts[k] == 0 and mixture.weights[k] > 0)
    if missing:
        raise AFMError(
            f"mixture {mixture.name!r} weights group(s) {missing} that no curated document belongs to; "
            "name a source or a kind:<kind> that exists, or set their weight to 0"
        )
    total_w = sum(mixture.weights.values())
    shares = {k: w / total_w for k, w in mixture.weights.items() if w > 0}
    if total_chars is None:
        total_chars = int(min(available[k] * max_repeat / s for k, s in shares.items()))
    repeats = {}
    for k, s in shares.items():
        r = s * total_chars / available[k]
        if r > max_repeat:
            log.warning("mixture %s: group %s would repeat %.1f times; capped at %.1f", mixture.name, k, r, max_repeat)
            r = max_repeat
        repeats[k] = r
    return MixPlan(mixture, list(files), available, counts, repeats, seed, heldout, heldout_seed)


def iter_mixture(plan: MixPlan) -> Iterator[Document]:
    """The mixture's documents: each group in full `floor(repeats)` times, then a seeded sample of
    round(fraction x documents) of it. Deterministic for a given plan."""
    keys = set(plan.mixture.weights)
    for group in sorted(plan.repeats):
        r = plan.repeats[group]
        whole, frac = int(r), r - int(r)
        n = plan.counts[group]
        sample = set(random.Random(f"{plan.seed}:{group}").sample(range(n), round(frac * n)))
        for epoch in range(whole + (1 if sample else 0)):
            i = 0
            for path in plan.files:
                for doc in plan.training_docs(path):
                    if group_of(doc, keys) != group:
                        continue
                    if epoch < whole or i in sample:
                        yield doc
                    i += 1


def load_mixture_file(path: str | Path) -> Mixture:
    """A mixture from a JSON file: {"name": ..., "weights": {group: weight}}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return Mixture(str(data.get("name", path.stem)), {str(k): float(v) for k, v in data["weights"].items()},
                       str(data.get("description", "")))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise AFMError(f"{path}: not a valid mixture file ({e}); expected {{\"weights\": {{group: weight}}}}") from e

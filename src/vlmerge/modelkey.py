"""Which model a result row is about (`ModelKey`), and the merge convention that names the twins.

Light on purpose (no pandas, no torch): the merge methods ask it which input α = 0 and 1 are.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from vlmerge.layout import CheckpointRef

# The merge convention (docs/architecture.md, "Merge convention"): α is the weight of the TEXT twin,
# θ = α·θ_text + (1−α)·θ_mm.
TEXT_ALPHA = 1.0  # an unmerged text twin's α
MM_ALPHA = 0.0  # an unmerged multimodal twin's α
UNMERGED = "none"  # the method of an unmerged twin's rows
TEXT_RUN = "text"
# Sung et al.'s modality-expert models: a merge of one is method `experts_<method>`, the unmerged
# expert model is run `experts`, and the distances between its experts name them `experts:<expert>`.
EXPERT_METHOD_PREFIX = "experts_"
EXPERT_DISTANCE_PREFIX = "experts:"


def study_key(variant: str, k_seed: int | None = None) -> str:
    """The study column of a studied model: its expert variant and K_seed (Sung et al.'s settings), or
    variant `maa` without K_seed for the agnostic model trained from scratch. The analysis reads
    the study's identity from this field alone, never from experiment or folder names."""
    return json.dumps({"variant": variant} | ({} if k_seed is None else {"k_seed": k_seed}), sort_keys=True)


MAA_VARIANT = "maa"  # the study key's variant of the agnostic baseline (MAA)


def expert_distance_run(expert: str) -> str:
    """The run column of one expert in the distances between experts: `experts:language`, …"""
    return EXPERT_DISTANCE_PREFIX + expert


def checkpoint_run(path: Path) -> dict[str, Any]:
    """experiment, run and words seen of a run checkpoint, from its path and trainer_state.json."""
    state_path = path / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    ref = CheckpointRef.parse(path)
    return {
        "experiment": ref.experiment if ref else "",
        "run": state.get("run") or (ref.run if ref else path.name),
        "words": state.get("words_seen"),
    }


@dataclasses.dataclass(frozen=True)
class ModelKey:
    """Which model a row is about: a merge of a pair, or one unmerged twin (method 'none').

    Its fields are the model columns of every dataset (`MODEL_FIELDS`); the writer fills them
    and the analysis indexes and deduplicates by them (`DEDUPE`).
    """

    experiment: str = ""
    text_run: str = ""
    mm_run: str = ""
    text_words: int | None = None
    mm_words: int | None = None
    method: str = UNMERGED
    alpha: float | None = None
    method_params: str = "{}"
    # Which model of `vlmerge study` this is (Sung et al.): `study_key`'s JSON, or "" outside a study.
    study: str = ""

    @classmethod
    def of_directory(cls, path: Path) -> ModelKey:
        """From a merge's merge.json, a run checkpoint's trainer_state.json, or nothing (foreign)."""
        record_path = path / "merge.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            key = cls.of_pair(checkpoint_run(Path(record["inputs"]["text"]["path"])),
                              checkpoint_run(Path(record["inputs"]["mm"]["path"])),
                              record["method"], json.dumps(record["params"], sort_keys=True))
            return dataclasses.replace(key, alpha=record["alpha"])
        if (path / "trainer_state.json").is_file():
            return cls.twin(checkpoint_run(path))
        return cls(text_run=path.name)

    @classmethod
    def of_pair(cls, text: dict[str, Any], mm: dict[str, Any], method: str, params: str, study: str = "") -> ModelKey:
        """A merge of two run checkpoints (see checkpoint_run); α is set per row."""
        return cls(text["experiment"] or mm["experiment"], text["run"], mm["run"], text["words"], mm["words"],
                   method, None, params, study)

    @classmethod
    def twin(cls, run: dict[str, Any], study: str = "") -> ModelKey:
        """A twin on its own: α = 1 for the text run, α = 0 for the multimodal one (and any other run)."""
        if run["run"] == TEXT_RUN:
            return cls(run["experiment"], text_run=run["run"], text_words=run["words"], alpha=TEXT_ALPHA, study=study)
        return cls(run["experiment"], mm_run=run["run"], mm_words=run["words"], alpha=MM_ALPHA, study=study)

    def columns(self, item_id: str) -> dict[str, Any]:
        return {"item_id": item_id, **dataclasses.asdict(self)}


# A model is named by these columns (item_id aside: the same model may come from several items);
# a merged pair by the same without alpha; a checkpoint pair without the method too. The study key
# describes a model (it follows from its checkpoints, as the experiment does) but does not name it.
MODEL = ["experiment", "method", "method_params", "text_run", "mm_run", "text_words", "mm_words", "alpha"]
PAIR = MODEL[:-1]
CHECKPOINT_PAIR = ["experiment", "text_run", "mm_run", "text_words", "mm_words"]
assert set(MODEL) | {"study"} == {f.name for f in dataclasses.fields(ModelKey)}

"""Small helpers around Hugging Face transformers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError

# The model types of our image-taking models (`vlmerge.model`) and where their language model's
# tensors live, here so that code reading a model folder knows them without importing transformers.
MODEL_TYPE = "vlmerge_llava"
EXPERT_MODEL_TYPE = "vlmerge_llava_experts"
TEXT_PREFIX = "model.language_model."


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' advice (e.g. to install torchvision) and its progress bars."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_model_config(path: Path) -> dict[str, Any]:
    """A model folder's `config.json` (`path`) as a mapping; one line when it is not a JSON object."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise VlmergeError(f"{path}: not UTF-8 text (byte {e.start}); expected a model's JSON config") from None
    except json.JSONDecodeError as e:
        raise VlmergeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a model's config") from None
    if not isinstance(config, dict):
        raise VlmergeError(f"{path}: expected a JSON object (a model's config), got a {type(config).__name__}")
    return config

"""vlmerge: train a vision-language model and its text-only twin, merge, evaluate, analyse.

`import vlmerge` stays light (no torch, no transformers). `import vlmerge.model` registers the
model with transformers' Auto classes, so that `AutoModelForImageTextToText.from_pretrained`
loads a run's checkpoints.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def code_version() -> str:
    """The package version plus the git commit of the checkout it runs from, when there is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}" if commit else __version__

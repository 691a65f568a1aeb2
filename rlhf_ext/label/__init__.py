"""Collecting preference feedback: a local web app for human labelling (`app`), an AI judge (`judge`),
pair sampling from a policy (`pairs`) and export into the `prompt`/`chosen`/`rejected`/`margin` rows
that the reward trainer reads (`export`). All state lives in one SQLite file (`store`).

The web app needs the `label` extra (`pip install rlhf_ext[label]`: fastapi, uvicorn); the rest needs
only the core dependencies.
"""

from rlhf_ext.label.store import FeedbackStore, load_pairs

__all__ = ["FeedbackStore", "load_pairs"]

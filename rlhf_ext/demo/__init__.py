"""The demo: the whole RLHF pipeline on a toy task with a hidden judge (`rlhf-ext demo`, `make demo`).

`task` is the world (reviews, the hidden true score, the noisy annotator), `pipeline` runs the stages,
`sampling` samples and judges policies, `report` writes the report folder.
"""

"""The three tasks behind the entry scripts and console commands, each a `run.Task`.

`pretrain` (`run_mae.py`, `medmae-pretrain`), `classify` (`run_classification.py`, `medmae-classify`) and
`segment` (`run_segmentation.py`, `medmae-segment`) each hold their argument dataclasses, a `setup` that
builds data and model, and a `report` that scores and plots; `run` holds the sequence they share.
"""

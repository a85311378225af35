"""The search behind ``python -m pipelines.tune``: its options (:mod:`.options`), one trial (:mod:`.trial`), its
MLflow runs (:mod:`.runs`) and what a finished search yields (:mod:`.results`)."""

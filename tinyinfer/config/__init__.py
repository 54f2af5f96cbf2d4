"""The bottom package: what a checkpoint's config.json says (`model.py` ModelConfig, `fields.py` typed
and range-checked reads, `families.py` each architecture's own fields) and the errors every layer
above raises for bad input (`errors.py`). It imports nothing else of tinyinfer."""

"""Frozen-backbone features of labeled pairs, shared by the workflows that need them: the pair
steps (`pairs`), the feature cache (`cache`) and the check pass that fills it (`check`).
Training reads the cache every epoch; prototype heads and discovery read it once."""

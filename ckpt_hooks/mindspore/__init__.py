"""MindSpore: strategy layouts, offline resharding (``transform_checkpoints`` without a copy of
the whole model), a save callback and an on-the-fly load for a running network."""

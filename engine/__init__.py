"""Merge Explorer engine: a plain library (no UI imports) for merging fine-tuned CLIP vision towers.

Data flows one way: checkpoints -> task vectors -> method(config) -> merged weights ->
evaluation -> results -> figures. See README for the CLI.
"""

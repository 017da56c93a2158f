"""Analyses of task vectors and merges: sign conflicts, magnitude distributions."""

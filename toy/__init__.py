"""The worlds in miniature, where the whole method trains on a CPU in minutes, and the paper's studies run on
them (run_toy.py drives both)."""

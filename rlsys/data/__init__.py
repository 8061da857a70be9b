"""Datasets: the EpisodeBench turn-level reader and a synthetic generator (``rlsys.data.synth``)."""

from rlsys.data.episodebench import DataError, TurnExample, load_examples, parse_row, read_rows

__all__ = ["DataError", "TurnExample", "load_examples", "parse_row", "read_rows"]

"""Reporting: the leaderboard built from a results folder's records, and every file written from it.

Layers, each importing only those below it (tests/test_layering.py checks it):

- ``stats``: the paired, clustered bootstrap and the seed-aware interval;
- ``rows``: which records make which row; ``samples``: a cell's per-question scores and clusters;
- ``board``: the data model (``Board``, ``Run``, ``build_board``, what ran); ``aggregate``: the
  board over several runs;
- ``describe``: the words and numbers the writers share;
- the writers: ``text`` (md, csv, tex), ``page`` (html), ``plots``, ``contrasts``;
- ``write``: writes every file of a board at once.

The report reads records (``harness.records``) and scheme names (``harness.quant.config``); it
knows nothing of the runner, the workers, perf or the CLI, which call it.
"""

from .aggregate import aggregate, read_runs
from .board import Board, Run, build_board
from .write import write_aggregate, write_board, write_leaderboard

__all__ = ["Board", "Run", "aggregate", "build_board", "read_runs", "write_aggregate", "write_board",
           "write_leaderboard"]

"""Tools that are not benchmarks: the corpus generator, search and averaging grids, the full-size rehearsal,
the cost model, the GPU acceptance check. Run from the repository root: `python -m tools.<name>`."""

"""One-off studies whose conclusions are in BENCHMARKS.md: each chose a default and says which in its opening
comment. Still runnable (``python -m benchmarks.studies.NAME``); not benchmarks a user runs (those are one level up)."""

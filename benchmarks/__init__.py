"""Speed benchmarks of the harness (not part of the tests); see docs/benchmarks.md for the recorded figures."""

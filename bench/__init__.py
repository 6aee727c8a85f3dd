"""instructkit's benchmarks: `python -m bench SUITE [--quick]`. Every number is measured side by
side with its peers in the same run and printed as a table; raw timings go to bench/results/."""

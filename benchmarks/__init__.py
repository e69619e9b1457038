"""leakguard's benchmarks: ``python -m benchmarks`` prints every cost side by side with its baseline."""

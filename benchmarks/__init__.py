"""Benchmarks of ssam_kernels: kernels (``python -m benchmarks.kernels``) and optimizer steps
(``python -m benchmarks.step``), against the baselines users would pick instead. Run from the
repository root; results go to ``benchmarks/results/<device>/``."""

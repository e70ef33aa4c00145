"""Benchmarks of sde_diffusion, run from the repository root as modules::

    python -m benchmarks.samplers --quick
    python -m benchmarks.sampler_family --help

They import the library (its test problems and metrics are :mod:`sde_diffusion.testing`); the
library never imports them. Shared helpers are in :mod:`benchmarks.common`; results in RESULTS.md.
"""

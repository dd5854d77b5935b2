"""Benchmarks run from a checkout, outside the package: the speed benchmark (``bench``), the
released FVAE formulation it times ours against (``released_fvae``, also the tests' oracle) and the
frozen-stem cache's wall-time comparison (``stem_cache``)."""

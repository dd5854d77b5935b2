"""Analyses over run records: group-accuracy reports (``aggregate``, ``tables``, ``plots``,
``html``) and latent-space analyses of trained runs (``latents``, ``probes``, ``tsne``).

Submodules are imported on demand; this package import pulls in nothing heavy.
"""

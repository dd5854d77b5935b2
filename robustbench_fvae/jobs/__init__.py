"""The jobs that write a run record: a training run (``train``, JTT's stage 1 included) and a
last-layer refit of a finished run (``last_layer``; DFR, :mod:`robustbench_fvae.dfr`, is one
kind). Each goes through ``record.store.run_job``."""

"""The jobs that write a run record: a training run (``train``, JTT's stage 1 included); DFR,
a derived run, is :mod:`robustbench_fvae.dfr`. Each goes through ``record.store.run_job``."""

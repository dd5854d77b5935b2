"""The machinery of one training run: the model and its resolved config (``model``), data
loading and evaluation (``evaluate``), checkpoints (``checkpoint``) and the epoch loop
(``loop``). The jobs that use it are in :mod:`robustbench_fvae.jobs`."""

"""robustbench_fvae: spurious-correlation robustness benchmark for PEFT on ViTs."""
__version__ = "0.1.0"

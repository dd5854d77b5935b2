"""Search-space pieces that several methods share (sweep-spec distribution syntax)."""

from __future__ import annotations

# Every adapter method's learning rate: a decade around the released default 5e-3.
ADAPTER_LR_SPACE = {"lr": {"log_uniform": [1.0e-3, 1.0e-2]}}
# The reconstruction weight α of the FVAE family: the range the earlier FVAE grid searched.
ALPHA_SPACE = {"alpha": {"log_uniform": [0.1, 1.0]}}

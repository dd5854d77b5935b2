"""Old import path of the run record: a re-export of :mod:`robustbench_fvae.record`.

Kept for one release so that notebooks and outside scripts importing ``robustbench_fvae.records``
keep working; the package itself imports from ``robustbench_fvae.record.{io,schema,store,view}``.
"""

from __future__ import annotations

import os  # noqa: F401  (tests patch ``records.os.replace``: the writers' os module)

from robustbench_fvae.record.io import (  # noqa: F401
    RecordError,
    RecordNotFoundError,
    append_jsonl,
    exclusive_lock,
    read_json,
    write_bytes_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from robustbench_fvae.record.schema import (  # noqa: F401
    CONFIG_FILE,
    DONE_FILE,
    HISTORY_FILE,
    LOCK_SUFFIX,
    METRICS_FILE,
    PREDICTION_COLUMNS,
    PREDICTION_SPLITS,
    RECORD_VERSION,
    config_record,
    dataset_info_dict,
    environment_info,
    epochs_from_one,
    predictions_path,
    read_history,
    read_predictions,
    recompute_metrics,
    write_predictions_csv,
)
from robustbench_fvae.record.store import (  # noqa: F401
    RunInUseError,
    is_done,
    lock_path,
    mark_done,
    run_dir,
    run_lock,
)
from robustbench_fvae.record.view import (  # noqa: F401
    RunRecord,
    iter_runs,
    load_run,
)

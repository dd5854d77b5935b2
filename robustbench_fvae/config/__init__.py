"""A run's settings: the typed config and its hash (:mod:`.fields`), every default in one table
(:mod:`.defaults`), flat names for flags and sweep specs (:mod:`.flat`), and resolution with all
checks (:mod:`.resolve`, imported on its own: it reads the method and dataset registries).

No torch import anywhere in this package.
"""

from .defaults import (  # noqa: F401
    ALGORITHMS,
    CACHEABLE_RECIPES,
    GROUPDRO_SAMPLERS,
    JTT_DEFAULTS,
    JTT_SYNTH_DEFAULT,
    REAL_DEFAULTS,
    SELECTION_RULES,
    STEM_CACHE_CHOICES,
    SYNTH_DEFAULTS,
)
from .fields import (  # noqa: F401
    AdapterConfig,
    ConfigError,
    RunConfig,
    TrainConfig,
    canonical_json,
    config_hash,
    setting,
)
from .flat import (  # noqa: F401
    RUN_FIELDS,
    config_from_settings,
    flat_setting_names,
    parse_peft_options,
)

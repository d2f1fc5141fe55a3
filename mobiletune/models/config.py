"""Model configuration, re-exported: ``ModelConfig`` and ``ConfigError`` live in
``mobiletune.families.config`` (standard library only), the presets and the family list in
the family specs (``mobiletune/families/``)."""

from mobiletune.families import FAMILIES, PRESETS, preset  # noqa: F401
from mobiletune.families.config import ConfigError, ModelConfig  # noqa: F401

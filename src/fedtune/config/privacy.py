"""The ``privacy`` section: client-level DP, local DP-SGD and secure aggregation (off by default)."""

from __future__ import annotations

from fedtune.config.base import Section


class PrivacyConfig(Section):
    pass

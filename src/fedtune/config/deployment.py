"""The ``deployment`` section: networked server/client settings (used by ``fedtune server``/``client``)."""

from __future__ import annotations

from fedtune.config.base import Section


class DeploymentConfig(Section):
    pass

"""Networked deployment: certificates, the ``fedtune server`` / ``fedtune client`` glue and commands."""

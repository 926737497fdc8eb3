"""Shared test setup: no model hub, a private cache per session, few threads."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------- gRPC tests


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with server and client certificates for the gRPC tests, one set per test module."""
    from _grpc_support import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def procs(tmp_path):
    """Real server and client processes started by one test, all killed when it ends."""
    from _grpc_support import Procs

    started = Procs(tmp_path)
    yield started
    started.kill_all()

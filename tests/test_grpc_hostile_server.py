"""A hostile server cannot make a participant run code: the model a participant builds comes from its own
--config, or is a built-in name; a server that names a ``module:callable`` is refused before anything is
imported. And a malformed revocation list is refused at start (naming the line), while on reload the last
good list stays in force."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import yaml
from rich.console import Console

from fedtune.config import parse_config
from fedtune.config.deployment import DeploymentConfig
from fedtune.core.messages import FitInstruction
from fedtune.deploy.participant import trusted_config, worker_factory
from fedtune.errors import UpdateRejected
from fedtune.transport.grpc.auth import Authenticator, AuthError, RevocationListError
from fedtune.transport.grpc.client import ClientTLS, Joined, Participant, ParticipantError
from fedtune.transport.grpc.server import GrpcServerTransport, ServerTLS

CNN = {"kind": "module", "factory": "fedtune.models.cnn:digits_cnn", "lora": None}
DATA = {"source": "digits", "partition": {"kind": "iid", "num_clients": 2}}


def _rogue(marker) -> dict:
    """A server config whose model 'factory' would run a shell command on whoever builds it."""
    return {
        "model": {
            "kind": "module",
            "factory": "os:system",
            "factory_kwargs": {"command": f"touch {marker}"},
            "lora": None,
        },
        "data": DATA,
    }


def _serve_and_join(pki, config_yaml: str, local=None) -> tuple[int, str]:
    """A real server that sends ``config_yaml`` at Join; a real participant joins it. (exit code, output)"""
    dep = DeploymentConfig(
        port=0,
        tls_ca=str(pki / "ca.pem"),
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        min_clients=1,
        poll_s=0.3,
        heartbeat_s=0.5,
    )
    server = GrpcServerTransport(dep, tls=ServerTLS.from_config(dep), config_yaml=config_yaml)
    port = server.start()
    console = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        tls = ClientTLS.from_paths(pki / "ca.pem", pki / "clients/client_000.pem", pki / "clients/client_000.key")
        make = worker_factory("partition:client_000", local_config=local, console=console)
        code = Participant(f"127.0.0.1:{port}", tls, make_worker=make, reconnect_timeout_s=30, console=console).run()
    finally:
        server.stop()
    return code, console.export_text()


def test_a_rogue_server_cannot_make_a_participant_run_its_factory(pki, tmp_path):
    marker = tmp_path / "pwned"
    code, out = _serve_and_join(pki, yaml.safe_dump(_rogue(marker)))
    assert code == 2
    assert "runs no code named by the server" in out and "'os:system'" in out
    assert not marker.exists()


def test_a_rogue_server_is_refused_by_a_participant_with_its_own_config(pki, tmp_path):
    marker = tmp_path / "pwned"
    local = parse_config({"model": CNN, "data": DATA})
    code, out = _serve_and_join(pki, yaml.safe_dump(_rogue(marker)), local=local)
    assert code == 2 and "refusing to train a configuration it did not agree to" in out
    assert "model.factory='os:system'" in out
    assert not marker.exists()


def test_without_config_only_builtin_models_are_accepted():
    text = {"source": "text", "path": "notes.txt"}
    for model, data in (({"name": "tiny-llama"}, text), (CNN, DATA)):
        server = parse_config({"model": model, "data": data})
        assert trusted_config(server, None) is server
    for model, data, words in (
        ({"name": "/home/me/private-model"}, text, "not a built-in model"),
        ({"name": "someone/hub-model"}, text, "not a built-in model"),
        ({"kind": "module", "factory": "builtins:eval", "lora": None}, DATA, "runs no code named by the server"),
    ):
        with pytest.raises(ParticipantError, match=words):
            trusted_config(parse_config({"model": model, "data": data}), None)


def test_with_config_the_pinned_sections_are_the_participants_own():
    mine = parse_config({"model": CNN, "client": {"lr": 0.05}, "data": DATA, "run": {"name": "mine"}})
    server = parse_config({"model": CNN, "client": {"lr": 0.05}, "data": DATA, "run": {"name": "theirs"}})
    used = trusted_config(server, mine)
    assert used.model is mine.model and used.client is mine.client and used.seed == mine.seed
    assert used.run.name == "theirs"  # sections that run nothing stay the server's


class _Ctx:
    def __init__(self, cn: str) -> None:
        self.cn = cn

    def auth_context(self) -> dict:
        return {"x509_common_name": [self.cn.encode()]}


@pytest.mark.parametrize(
    ("text", "line"),
    [("ok\nserial:zz\n", 2), ("a\n\nbad\x07name\n", 3), ("# c\n" + "x" * 65 + "\n", 2), ("serial:-5\n", 1)],
)
def test_a_malformed_revocation_list_is_refused_at_start_naming_the_line(tmp_path, text, line):
    path = tmp_path / "revoked.txt"
    path.write_text(text)
    with pytest.raises(RevocationListError, match=rf"revoked.txt:{line}: "):
        Authenticator(allowed=None, revocation_list=path)


def test_on_reload_a_malformed_list_keeps_the_last_good_one(tmp_path, caplog):
    path = tmp_path / "revoked.txt"
    path.write_text("mallory\n")
    auth = Authenticator(allowed=None, revocation_list=path)
    assert auth.identify(_Ctx("alice")) == "alice"
    with pytest.raises(AuthError, match="revoked"):
        auth.identify(_Ctx("mallory"))
    path.write_text("mallory\nserial:not-hex\n")
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime, however coarse the file system's clock
    with caplog.at_level(logging.ERROR, logger="fedtune.server"):
        assert auth.identify(_Ctx("alice")) == "alice"  # calls go on
        with pytest.raises(AuthError, match="revoked"):
            auth.identify(_Ctx("mallory"))  # and the last good list is still enforced
        assert auth.identify(_Ctx("alice")) == "alice"
    errors = [r.getMessage() for r in caplog.records if "stays in force" in r.getMessage()]
    assert len(errors) == 1 and "revoked.txt:2: bad serial" in errors[0]
    path.unlink()  # an unreadable list: also logged, also the last good one
    with pytest.raises(AuthError, match="revoked"):
        auth.identify(_Ctx("mallory"))
    path.write_text("alice\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    with pytest.raises(AuthError, match="revoked"):
        auth.identify(_Ctx("alice"))  # a fixed file is read again
    assert auth.identify(_Ctx("mallory")) == "mallory"


def test_parameters_for_another_model_layout_are_refused_by_the_participant():
    """What the server sends is checked against the model built here: the spec digest, then the length."""
    config = parse_config({"model": CNN, "data": DATA, "client": {"local_steps": 1}, "run": {"threads": 1}})
    joined = Joined("s", "alice", yaml.safe_dump(config.model_dump(mode="json")), 5.0, 0.5, None, None, {})  # type: ignore[arg-type]
    worker = worker_factory("partition:client_000", console=Console(quiet=True))(joined)
    params, digest = worker.current_params(), worker.view.spec.digest
    train = config.client
    with pytest.raises(UpdateRejected, match="differs from this client's"):
        worker.fit(FitInstruction("alice", 1, params, "f" * 16, 0, train))
    with pytest.raises((UpdateRejected, ValueError)):
        worker.fit(FitInstruction("alice", 1, np.zeros(params.size + 1, np.float32), digest, 0, train))

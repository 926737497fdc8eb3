"""Deployment glue without processes: certificates, a participant's local data, the pinned-config check,
and the deployment config's validation."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedtune.config import parse_config
from fedtune.config.schema import DataConfig
from fedtune.deploy.certs import CertError, create_pki, revoke
from fedtune.deploy.participant import check_pinned, load_local_split
from fedtune.errors import ConfigError, DataError
from fedtune.transport.grpc.auth import read_revocations
from fedtune.transport.grpc.client import ParticipantError


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_chain_names_and_key_permissions(tmp_path):
    issued = create_pki(tmp_path, ["a", "b"], hosts=["fl.example.org", "10.0.0.5"])
    ca, server = _cert(issued.ca), _cert(issued.server_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(h) for h in ("127.0.0.1", "10.0.0.5")}
    for name, (cert_path, key_path) in issued.clients.items():
        cert = _cert(cert_path)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        cert.verify_directly_issued_by(ca)
        assert key_path.stat().st_mode & 0o777 == 0o600
    server.verify_directly_issued_by(ca)
    # a second call adds clients under the same CA
    more = create_pki(tmp_path, ["c"])
    _cert(more.clients["c"][0]).verify_directly_issued_by(ca)


def test_revocation_list_round_trip(tmp_path):
    issued = create_pki(tmp_path, ["a"])
    revoke(tmp_path, "a")
    serial = _cert(issued.clients["a"][0]).serial_number
    with open(issued.revocation_list, "a") as fh:
        fh.write(f"serial:{serial:x}  # lost laptop\n")
    names, serials = read_revocations(issued.revocation_list)
    assert names == {"a"} and serials == {serial}


@pytest.mark.parametrize("name", ["", "a b", "../x", "-lead", "x" * 65])
def test_bad_client_names_are_refused(tmp_path, name):
    with pytest.raises(CertError, match="client name"):
        create_pki(tmp_path, [name])


def test_local_text_file_is_split_temporally(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"p{i}" for i in range(10)))
    cfg = DataConfig(source="text", path="server-side", test_fraction=0.2)
    split = load_local_split(cfg, str(path), seed=0, client_id="a", cache_dir=tmp_path)
    assert split.train == [f"p{i}" for i in range(8)] and split.test == ["p8", "p9"]


def test_local_jsonl_and_csv_use_the_seeded_split(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    (tmp_path / "local.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source="instruct", path="x", partition={"kind": "iid", "num_clients": 2}, test_fraction=0.3)
    a = load_local_split(cfg, str(tmp_path / "local.jsonl"), seed=1, client_id="a", cache_dir=tmp_path)
    again = load_local_split(cfg, str(tmp_path / "local.jsonl"), seed=1, client_id="a", cache_dir=tmp_path)
    other = load_local_split(cfg, str(tmp_path / "local.jsonl"), seed=1, client_id="b", cache_dir=tmp_path)
    assert (len(a.train), len(a.test)) == (7, 3) and a == again and a.test != other.test

    (tmp_path / "labelled.csv").write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(9)))
    cfg = DataConfig(source="classification", path="x", partition={"kind": "iid", "num_clients": 2})
    split = load_local_split(cfg, str(tmp_path / "labelled.csv"), seed=0, client_id="a", cache_dir=tmp_path)
    assert len(split.train) + len(split.test) == 9
    (tmp_path / "named.csv").write_text("text,label\nx,spam\ny,ham\n")
    with pytest.raises(DataError, match="integer class ids"):
        load_local_split(cfg, str(tmp_path / "named.csv"), seed=0, client_id="a", cache_dir=tmp_path)


def test_local_data_errors_name_the_input(tmp_path):
    cfg = DataConfig(source="digits", partition={"kind": "iid", "num_clients": 2})
    with pytest.raises(DataError, match="built-in corpus"):
        load_local_split(cfg, str(tmp_path), seed=0, client_id="a", cache_dir=tmp_path)
    with pytest.raises(DataError, match="has no client 'client_009'"):
        load_local_split(cfg, "partition:client_009", seed=0, client_id="a", cache_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_local_split(
            DataConfig(source="text", path="x"), str(tmp_path / "nope.txt"), seed=0, client_id="a", cache_dir=tmp_path
        )


def test_partition_shard_is_the_simulated_clients_share(tmp_path):
    from fedtune.data.sources import load_federated

    cfg = DataConfig(source="digits", partition={"kind": "iid", "num_clients": 3})
    shard = load_local_split(cfg, "partition:client_001", seed=5, client_id="x", cache_dir=tmp_path)
    expected = load_federated(cfg, seed=5, cache_dir=tmp_path).clients["client_001"]
    for mine, theirs in ((shard.train, expected.train), (shard.test, expected.test)):
        assert [r.label for r in mine] == [r.label for r in theirs]
        assert all((a.x == b.x).all() for a, b in zip(mine, theirs, strict=True))


def test_pinned_config_refuses_a_different_server():
    mine = parse_config({"model": {"name": "tiny-llama"}, "client": {"lr": 0.01}})
    check_pinned(mine, parse_config({"model": {"name": "tiny-llama"}, "client": {"lr": 0.01}, "run": {"name": "x"}}))
    with pytest.raises(ParticipantError, match=r"client.lr=0.5 but this participant's --config says 0.01"):
        check_pinned(mine, parse_config({"model": {"name": "tiny-llama"}, "client": {"lr": 0.5}}))


@pytest.mark.parametrize(
    ("deployment", "message"),
    [
        ({"tls_ca": "ca.pem"}, "set all of deployment.tls_ca"),
        ({"min_clients": 3, "allowed_clients": ["a", "b"]}, "can never be met"),
        ({"codec": "zip"}, "deployment.codec"),
        ({"heartbeat_s": 0}, "deployment.heartbeat_s"),
        ({"port": 70000}, "deployment.port"),
        ({"hearbeat_s": 1}, "deployment.hearbeat_s: unknown key"),
        ({"heartbeat_s": 5, "idle_timeout_s": 9}, "idle_timeout_s=9 would close connections"),
        ({"max_clients": 8, "max_connections": 4}, "max_connections is below deployment.max_clients"),
        ({"max_streams_per_client": 0}, "deployment.max_streams_per_client"),
        ({"upload_timeout_s": 0}, "deployment.upload_timeout_s"),
        ({"max_unauthenticated": 4, "max_unauthenticated_per_address": 5}, "per_address exceeds"),
        ({"max_unauthenticated_per_address": 0}, "deployment.max_unauthenticated_per_address"),
    ],
)
def test_deployment_config_errors_name_the_key(deployment, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"deployment": deployment})


def test_resource_limit_defaults_scale_with_max_clients():
    from fedtune.config.deployment import DeploymentConfig
    from fedtune.transport.grpc.limits import server_options

    dep = DeploymentConfig(max_clients=10, max_streams_per_client=3)
    assert (dep.rpc_limit, dep.connection_limit) == (10 * 4 + 16, 4 * 10 + 64)
    options = dict(server_options(dep))
    assert options["grpc.server_handshake_timeout_ms"] == 10_000 and options["grpc.max_connection_idle_ms"] == 600_000
    assert options["grpc.max_allowed_incoming_connections"] == 104 and options["grpc.max_concurrent_streams"] == 7

"""Misbehaving participants for the process-level gRPC tests (run as ``python grpc_fault_client.py``).

slow  the real participant loop, but training in round --slow-round hangs (so the test can kill the
      process mid-round, deterministically)
evil  speaks the protocol by hand and answers each round with a different bad result:
      1 garbage bytes, 2 NaN values, 3 wrong shape, 4 a valid update sent twice, 5 an oversized payload;
      prints the server's reply for each (REPLY ...) so the test can check the client was told why
inflate  enrolled but hostile: answers every round with a finite update of 1e30s claiming 10^12 examples (the
      attack of issue #13 item 2), and refuses to evaluate; with --declare N it declares N examples at Join
      (a lie: its replies claim 10^12)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def slow(args: argparse.Namespace) -> int:
    from fedtune.deploy.participant import worker_factory
    from fedtune.transport.grpc.client import ClientTLS, Participant

    make = worker_factory(args.data)

    def make_slow(joined):
        worker = make(joined)
        fit = worker.fit

        def hanging_fit(instr):
            if instr.round == args.slow_round:
                print(f"FAULT: training round {instr.round}", flush=True)
                time.sleep(120)
            return fit(instr)

        worker.fit = hanging_fit
        return worker

    tls = ClientTLS.from_paths(args.ca, args.cert, args.key)
    return Participant(args.server, tls, make_worker=make_slow, reconnect_timeout_s=60).run()


def _evil_update(task, attack: str):
    from fedtune.core.messages import ClientUpdate
    from fedtune.transport.codecs import build_codec
    from fedtune.transport.grpc import protocol

    n = task.tensors["params"].size
    delta = np.zeros(n, np.float32)
    if attack == "nan":
        delta[::7] = np.nan
    elif attack == "shape":
        delta = np.zeros(n + 3, np.float32)
    elif attack == "oversized":
        delta = np.zeros(400_000, np.float32)  # 1.6 MB against deployment.max_message_mb = 1
    elif attack == "inflate":
        delta = np.full(n, 1e30, np.float32)  # finite, but a float32 sum weighted by 10^12 overflows
    count = 10**12 if attack == "inflate" else 1
    update = ClientUpdate("evil", task.header.round, count, delta, task.header.spec_digest, {"train_loss": 1.0})
    payload, _ = protocol.update_payload(
        update, task_id=task.header.task_id, session="", codec=build_codec("none"), residual=None
    )
    return payload


def evil(args: argparse.Namespace) -> int:
    from _grpc_support import Heartbeats, RawClient
    from fedtune.transport.grpc import protocol
    from fedtune.transport.grpc.proto import fedtune_pb2 as pb

    attacks = {1: "garbage", 2: "nan", 3: "shape", 4: "duplicate", 5: "oversized"}
    if args.mode == "inflate":
        attacks = {}
    client = RawClient(int(args.server.rsplit(":", 1)[1]), Path(args.cert).parents[1], Path(args.cert).stem)
    client.join(wait=True, declared_examples=args.declare)
    beats = Heartbeats(client, 0.3)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        task = client.pull()
        kind, rnd = task.header.kind, task.header.round
        if kind == pb.SHUTDOWN:
            print("EVIL: shutdown", flush=True)
            beats.end()
            return 0
        if kind == pb.EVALUATE:
            client.push(
                protocol.failure_payload(
                    "evil does not evaluate", task_id=task.header.task_id, round_idx=rnd, session=""
                )
            )
        if kind != pb.FIT:
            continue
        attack = attacks.get(rnd, "inflate" if args.mode == "inflate" else "duplicate")
        if attack == "garbage":
            replies = [client.push_raw([b"\x08\x01 this is not protobuf \xff\xfe", b"\x00" * 64])]
        elif attack == "duplicate":
            payload = _evil_update(task, attack)
            replies = [client.push(payload), client.push(payload)]
        else:
            replies = [client.push(_evil_update(task, attack))]
        for reply in replies:
            print(f"REPLY round={rnd} attack={attack} accepted={reply.accepted} reason={reply.reason}", flush=True)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["slow", "evil", "inflate"])
    parser.add_argument("--server", required=True)
    parser.add_argument("--data", default="")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--slow-round", type=int, default=0)
    parser.add_argument("--declare", type=int, default=0)
    args = parser.parse_args()
    return slow(args) if args.mode == "slow" else evil(args)


if __name__ == "__main__":
    sys.exit(main())

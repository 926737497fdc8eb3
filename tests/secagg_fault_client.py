"""A participant that misbehaves at one SecAgg stage (run as ``python secagg_fault_client.py MODE ...``).

die     exit at once (as if killed) when the --stage task of round --round arrives: for ``unmask``, after its
        masked input was sent and before any unmasking share
refuse  answer the --stage task of round --round with a failure (a dropout that keeps the process alive,
        so it takes part again in the next round)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["die", "refuse"])
    parser.add_argument("--stage", required=True, choices=["advertise", "share", "masked", "consistency", "unmask"])
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--server", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    args = parser.parse_args()

    from fedtune.deploy.participant import worker_factory
    from fedtune.privacy.errors import SecAggAbort
    from fedtune.transport.grpc.client import ClientTLS, Participant

    class Faulty(Participant):
        def respond_secagg(self, peer, stage, message):
            if stage == args.stage and self._secagg is not None and self._secagg[0] == args.round:
                print(f"FAULT: {args.mode} at {stage} of round {args.round}", flush=True)
                if args.mode == "die":
                    os._exit(17)
                raise SecAggAbort(f"injected refusal at {stage}")
            return super().respond_secagg(peer, stage, message)

    tls = ClientTLS.from_paths(args.ca, args.cert, args.key)
    return Faulty(args.server, tls, make_worker=worker_factory(args.data), reconnect_timeout_s=60).run()


if __name__ == "__main__":
    sys.exit(main())

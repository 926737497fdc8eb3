"""Networked transport: time per round and bytes on the wire over gRPC on loopback, against the in-process
simulation doing the same training, and codec / wire-format throughput.

For each K in --clients: the same configuration (the demo, examples/shakespeare_smollm2.yaml, with its K
largest roles, all K sampled every round, evaluation only after the last) runs
  * in-process: ``fedtune.run.session.simulate`` (one resident model, clients one after another), and
  * over gRPC: a ``fedtune server`` process and K ``fedtune client`` processes on 127.0.0.1 with mutual TLS,
    each client holding only its own role (``--data partition:<role>``).
The steady round is the median of rounds 2..R from metrics.jsonl (round 1 includes each process's warm-up);
bytes are what the round record says (gRPC: bytes actually streamed; in-process: the float32 payload sizes).
Every process uses 1 torch thread. For K above --tiny-above the model is ``tiny-llama`` (a K-process
SmolLM2 federation does not fit this machine's memory), which the results table says.

    .venv/bin/python benchmarks/transport.py                      # full run, prints a table
    .venv/bin/python benchmarks/transport.py --write-docs         # ... and updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/transport.py --clients 2 --codecs-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_section

from fedtune.config.load import apply_overrides, parse_config, read_yaml
from fedtune.deploy.certs import create_pki
from fedtune.transport.codecs import CODEC_NAMES, build_codec
from fedtune.transport.grpc import wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb

# ------------------------------------------------------------------------------------------- codecs


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def codec_throughput(mib: int) -> list[dict]:
    """GB/s of float32 input for encode and decode of each codec, and for the wire format."""
    n = mib * 2**20 // 4
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    rows = []
    for name in CODEC_NAMES:
        codec = build_codec(name, block=256, fraction=0.01)
        enc, _ = codec.encode(x, None)
        t_enc = _best(lambda codec=codec: codec.encode(x, None))
        t_dec = _best(lambda codec=codec, enc=enc: codec.decode(enc, n))
        rows.append(
            {
                "what": f"codec {name}",
                "encode_gbps": x.nbytes / t_enc / 1e9,
                "decode_gbps": x.nbytes / t_dec / 1e9,
                "wire_bytes": enc.nbytes,
                "ratio": x.nbytes / enc.nbytes,
            }
        )
    payload = wire.Payload(pb.Header(kind=pb.FIT_RESULT), {}, {"delta/values": x})
    chunks = list(wire.encode(payload, chunk_bytes=1 << 20))
    limits = wire.Limits(1 << 34)
    t_enc = _best(lambda: [c.SerializeToString() for c in wire.encode(payload, chunk_bytes=1 << 20)])
    raw = [c.SerializeToString() for c in chunks]
    t_dec = _best(lambda: wire.decode(raw, limits))
    rows.append(
        {
            "what": "wire format (SHA-256, 1 MiB chunks, protobuf)",
            "encode_gbps": x.nbytes / t_enc / 1e9,
            "decode_gbps": x.nbytes / t_dec / 1e9,
            "wire_bytes": sum(map(len, raw)),
            "ratio": 1.0,
        }
    )
    return rows


# ------------------------------------------------------------------------------------------- rounds


def _config(base: dict, k: int, rounds: int, tiny: bool, out_dir: Path) -> dict:
    sets = [
        f"data.max_clients={k}", f"federation.clients_per_round={k}", f"federation.rounds={rounds}",
        "eval.every=100000", "eval.baseline=false", "eval.sample_prompt=null", "run.plot=false", "run.threads=1",
        f"run.out_dir={out_dir}",
    ]  # fmt: skip
    if tiny:
        sets += ["model.name=tiny-llama", "model.lora.top_layers=null"]
    return apply_overrides(base, sets)


def _steady(run_dir: Path, *, parallel: bool) -> dict:
    """Median over rounds 2..R of the round time and of the time not spent training.

    Not training = round time - training time, where training time is the clients' summed fit_seconds
    in-process (one after another) and the slowest client's over gRPC (they train at the same time).
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in records if r.get("kind") == "round" and r["round"] >= 1]
    later = [r for r in rounds if r["round"] >= 2] or rounds[-1:]
    fits: dict[int, list[float]] = {}
    for r in records:
        if r.get("kind") == "client":
            fits.setdefault(r["round"], []).append(r.get("fit_seconds", 0.0))
    training = {n: (max(f) if parallel else sum(f)) for n, f in fits.items()}
    return {
        "steady_round_s": statistics.median(r["seconds"] for r in later),
        "not_training_s": statistics.median(r["seconds"] - training.get(r["round"], 0.0) for r in later),
        "round1_s": rounds[0]["seconds"],
        "bytes_per_round": statistics.median(r["bytes_down"] + r["bytes_up"] for r in rounds),
        "clients_ok": min(r["clients_ok"] for r in rounds),
    }


def run_inprocess(cfg: dict) -> dict:
    from fedtune.run.session import simulate

    result = simulate(parse_config(cfg, source="benchmark"), show_progress=False)
    return _steady(result.run_dir, parallel=False)


def run_grpc(cfg: dict, k: int, work: Path, codec: str, timeout: float) -> dict:
    from fedtune.data.cache import default_cache_dir
    from fedtune.data.sources import load_federated

    config = parse_config(cfg, source="benchmark")
    roles = list(load_federated(config.data, seed=config.seed, cache_dir=default_cache_dir(None)).clients)
    names = [f"p{i:02d}" for i in range(len(roles))]  # role ids are not certificate names
    pki = work / "pki"
    if not (pki / "ca.pem").exists():
        create_pki(pki, [f"p{i:02d}" for i in range(64)])
    port = _free_port()
    dep = {
        "port": port,
        "tls_ca": str(pki / "ca.pem"),
        "tls_cert": str(pki / "server.pem"),
        "tls_key": str(pki / "server.key"),
        "min_clients": len(roles),
        "codec": codec,
        "heartbeat_s": 5.0,
        "missed_heartbeats": 6,
        "quorum_timeout_s": timeout,
        "round_timeout_s": timeout,
        "shutdown_grace_s": 10,
    }
    cfg = {**cfg, "deployment": dep, "run": {**cfg["run"], "out_dir": str(work / f"grpc-{k}-{codec}")}}
    path = work / f"grpc-{k}-{codec}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = work / f"logs-{k}-{codec}"
    logs.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "fedtune.cli"]
    procs = [_popen([*cli, "server", str(path), "--quiet"], logs / "server.log", env)]
    for name, role in zip(names, roles, strict=True):
        cert, key = pki / "clients" / f"{name}.pem", pki / "clients" / f"{name}.key"
        args = ["client", "--server", f"127.0.0.1:{port}", "--data", f"partition:{role}"]
        args += ["--ca", str(pki / "ca.pem"), "--cert", str(cert), "--key", str(key)]
        procs.append(_popen([*cli, *args], logs / f"{name}.log", env))
    try:
        if procs[0].wait(timeout) != 0:
            raise RuntimeError(f"server failed; see {logs / 'server.log'}")
        for p in procs[1:]:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    run_dir = next((work / f"grpc-{k}-{codec}").glob("*"))
    return _steady(run_dir, parallel=True)


def _popen(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------- report


def _table(rounds: list[dict], codecs: list[dict]) -> str:
    lines = [
        "| K clients | model | transport | steady round, s | not training, s | round 1, s | "
        "kB per client per round (down + up) | round time gRPC / in-process | load avg |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rounds:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        lines.append(
            f"| {r['k']} | {r['model']} | {r['transport']} | {r['steady_round_s']:.2f} | {r['not_training_s']:.2f} | "
            f"{r['round1_s']:.2f} | {r['bytes_per_round'] / r['k'] / 1e3:.1f} | {ratio} | {r['load']:.1f} |"
        )
    lines += ["", "| codec | encode GB/s | decode GB/s | bytes on the wire / float32 |", "| --- | ---: | ---: | ---: |"]
    for c in codecs:
        enc = "zero-copy" if c["what"] == "codec none" else f"{c['encode_gbps']:.2f}"
        lines.append(f"| {c['what']} | {enc} | {c['decode_gbps']:.2f} | {1 / c['ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "shakespeare_smollm2.yaml"))
    parser.add_argument("--clients", default="2,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny-above", type=int, default=8, help="use tiny-llama for K above this")
    parser.add_argument("--wire-codecs", default="none,int8", help="codecs to run over gRPC (first is the baseline)")
    parser.add_argument("--codec-mib", type=int, default=64)
    parser.add_argument("--codecs-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--out", default=None, help="write raw results as JSON here")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--from-json", default=None, help="comma-separated --out files to report together")
    args = parser.parse_args()

    rounds: list[dict] = []
    if args.from_json:
        saved = [json.loads(Path(p).read_text()) for p in args.from_json.split(",")]
        rounds = [r for s in saved for r in s["rounds"]]
        codecs = saved[-1]["codecs"]
    else:
        codecs = codec_throughput(args.codec_mib)
    if not args.codecs_only and not args.from_json:
        base = read_yaml(args.config)
        work = Path(tempfile.mkdtemp(prefix="fedtune-transport-bench-"))
        for k in [int(c) for c in args.clients.split(",")]:
            tiny = k > args.tiny_above
            model = "tiny-llama" if tiny else base.get("model", {}).get("name", "?")
            cfg = _config(base, k, args.rounds, tiny, work / f"inprocess-{k}")
            inproc = {"k": k, "model": model, "transport": "in-process", "load": _load(), **run_inprocess(cfg)}
            rounds.append(inproc)
            print(json.dumps(inproc), flush=True)
            for codec in args.wire_codecs.split(","):
                row = {
                    "k": k,
                    "model": model,
                    "transport": f"gRPC+TLS, codec {codec}",
                    "load": _load(),
                    **run_grpc(cfg, k, work, codec, args.timeout),
                }
                row["ratio"] = row["steady_round_s"] / inproc["steady_round_s"]
                rounds.append(row)
                print(json.dumps(row), flush=True)
    table = _table(rounds, codecs)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rounds, "codecs": codecs}, indent=1))
    if args.write_docs:
        write_section("Networked transport", _docs(table, args))


def _docs(table: str, args: argparse.Namespace) -> str:
    return f"""
What it measures: the cost of running the demo federation over the network instead of in one process.
For K = 2, 8 and 32 clients, the demo configuration (`examples/shakespeare_smollm2.yaml`: SmolLM2-135M,
LoRA r=8 on the attention of the top 8 blocks, 245,760 trainable float32 values, 5 local AdamW steps of
4 x 64 tokens; here with its K largest roles, all K sampled every round, R = 3 rounds) runs
in-process (`simulate`) and as a `fedtune server` process plus K `fedtune client` processes on 127.0.0.1
with mutual TLS, each client holding only its own role. For K = 32 the model is `tiny-llama` (2 layers,
hidden size 32). A SmolLM2 client process holds about 0.45 GB once it has built the model (measured peak
RSS), so 32 of them need 15 GB or more of this shared 23 GB machine, and 32 SmolLM2 trainers on its 2 cores
would take hours per configuration. Every process uses 1 torch thread.

* *steady round*: the median round time over rounds 2..R. Round 1 includes each process's warm-up.
  Round R also includes the final evaluation, on 10 held-out roles with 3 examples each.
* *not training*: round time minus training time. Training time is the sum of the clients' `fit_seconds`
  in-process, where clients run one after another, and the slowest client's over gRPC, where they train
  at the same time. It is the time spent on everything else: serialising, TLS, streaming, decoding,
  validation and aggregation.
* *kB per client per round*: what the round record counts: the global vector down plus the update up.
  Over gRPC this is the bytes actually streamed, framing included. In-process it is the float32 sizes.
* *round time gRPC / in-process*: below 1 means the network run was faster. K client processes train in
  parallel on the machine's cores, while the simulation trains them one after another. The *not training*
  column is the transport's own cost.

**Contention:** other engineers' jobs shared this 2-core machine (the load average is in the last column).
The absolute times are therefore inflated, and noisy from round to round. Read the bytes columns and the
codec throughput as exact, and the timings as indicative only.

Codec throughput: encode and decode GB/s of float32 input, best of 3, on a {args.codec_mib} MiB vector,
single-threaded NumPy. *Wire format* is the full path of one payload: SHA-256, 1 MiB chunks, protobuf
serialisation, then parsing, reassembly and verification. gRPC's TLS and HTTP/2 come on top of that.

Commands ({time.strftime("%Y-%m-%d")}):

```bash
.venv/bin/python benchmarks/transport.py --clients 2,8 --rounds 3 --out a.json
.venv/bin/python benchmarks/transport.py --clients 32 --rounds 3 --wire-codecs none --out b.json
.venv/bin/python benchmarks/transport.py --from-json a.json,b.json --write-docs   # this section
```

The streaming test in `tests/test_grpc_transport.py` (`-m slow`) moves a 2.2 GB vector down and back up
through one TLS connection on the same machine.

{table}
"""


if __name__ == "__main__":
    main()

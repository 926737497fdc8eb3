"""Secure aggregation cost: per-client and server time and bytes vs clients and dropout, and the upload
expansion over plain 16/32-bit uploads, beside Bonawitz et al. 2017's published 1.73x.

    .venv/bin/python benchmarks/secagg.py [--quick] [--write docs/BENCHMARKS.md]
    .venv/bin/python benchmarks/secagg.py --availability [--write docs/BENCHMARKS.md]   # abort rates only

Every run is the real protocol (fedtune.privacy.secagg): X25519, ChaCha20-Poly1305, Shamir over
GF(2^521 - 1), ChaCha20 masks, every message encoded to bytes. Clients drop with the given probability
before a uniformly chosen stage. Values are 16-bit (value_bits=16), so the field is 2^b with
b = 16 + ceil(log2 n), and the masked vector travels bit-packed to b bits a value. Vectors are shortened
for large n to keep the run under ten minutes (the table says d); per-client upload bytes scale exactly
with d (b / 8 bytes a value), so the expansion is also given at Bonawitz et al.'s d = 2^20: the measured
non-vector bytes plus the encoded size of a 2^20-value masked input.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from fedtune.config import secagg_bounds
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg import availability
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.driver import STAGES, Traffic, random_dropouts, run_protocol
from fedtune.privacy.secagg.messages import MaskedInput, PublicParams, encode, packed_size
from fedtune.privacy.secagg.quantize import field_for
from fedtune.privacy.secagg.server import SecAggServer

THRESHOLD = 0.55  # of each neighbourhood; above 1/2 as the protocol requires, low enough for 30% dropout
BONAWITZ = {"clients": 2**10, "values": 2**20, "bits": 16, "expansion": 1.73}


def secagg_plus_degree(n: int) -> int:
    """k = 4 ceil(log2 n) (capped at n - 1): logarithmic, as in Bell et al. 2020."""
    return min(n - 1, 4 * math.ceil(math.log2(n)))


def vector_length(n: int) -> int:
    return 2**16 if n <= 100 else 2**14


def exact_dropouts(ids: list[str], rate: float, rng: np.random.Generator) -> dict[str, str]:
    """round(rate * n) clients, chosen at random, each dropping before a uniformly chosen stage."""
    chosen = rng.choice(len(ids), size=round(rate * len(ids)), replace=False)
    return {ids[i]: STAGES[int(rng.integers(len(STAGES)))] for i in sorted(chosen.tolist())}


def one_run(n: int, d: int, k: int | None, dropout: float, seed: int) -> dict:
    spec = field_for(n, value_bits=16)
    params = PublicParams(1, d, False, (), 1.0, 0.0, spec.modulus_bits, spec.levels, THRESHOLD, k or 0, b"bench")
    rng = np.random.default_rng(seed)
    ids = [f"client{i:04d}" for i in range(n)]
    clients = {
        cid: SecAggClient(cid, rng.uniform(-1, 1, d).astype(np.float32), params, rng=np.random.default_rng([seed, i]))
        for i, cid in enumerate(ids)
    }
    server = SecAggServer(params, ids)
    drops = exact_dropouts(ids, dropout, np.random.default_rng([seed, 99]))
    traffic = Traffic()
    started = time.perf_counter()
    try:
        result = run_protocol(clients, server, drop_before=drops, traffic=traffic)
        ok = bool(np.array_equal(result.total, sum(clients[c].plain.astype(np.int64) for c in result.survivors)))
        outcome = "ok" if ok else "WRONG SUM"
    except SecAggAbort as err:
        outcome = f"abort ({str(err).split('aborted: ')[-1]})"
    wall = time.perf_counter() - started
    full = [c for c in ids if c not in drops]  # clients that took part in every stage
    masked_bytes = len(encode(MaskedInput(ids[0], np.zeros(d, spec.dtype), spec.modulus_bits)))
    up = statistics.mean(traffic.up[c] for c in full) if full else float("nan")
    return {
        "n": n,
        "k": k or n - 1,
        "d": d,
        "dropout": dropout,
        "dropped": len(drops),
        "outcome": outcome,
        "client_s": statistics.mean(traffic.client_seconds[c] for c in full) if full else float("nan"),
        "server_s": server.seconds,
        "wall_s": wall,
        "up": up,
        "down": statistics.mean(traffic.down[c] for c in full) if full else float("nan"),
        "overhead": up - masked_bytes,  # everything a full participant sends besides its masked vector
        "header": masked_bytes - packed_size(d, spec.modulus_bits),  # the MaskedInput message's own framing
        "field_bits": spec.modulus_bits,
    }


def expansion(row: dict, d: int, plain_bits: int) -> float:
    """Upload bytes of a full participant over a plain upload of d values of ``plain_bits`` bits."""
    return (row["overhead"] + row["header"] + packed_size(d, row["field_bits"])) / (d * plain_bits / 8)


def masked_input_bytes(cid: str, d: int, bits: int) -> int:
    """The encoded size of a real masked input of d uniform field elements (what a client uploads)."""
    values = np.random.default_rng(0).integers(0, 1 << bits, d, dtype=np.uint64).astype(np.uint32)
    return len(encode(MaskedInput(cid, values, bits)))


def bonawitz_setting() -> list[dict]:
    """Our upload expansion at 2^10 clients, 2^20 values, 16 bits: the non-vector bytes of a small-d run
    (only MaskedInput depends on d) plus an encoded 2^20-value masked input. The complete graph at
    n = 1024 would take too long in pure Python, so its key-sharing bytes are computed from per-neighbour
    sizes measured at n = 64."""
    rows = []
    small = one_run(64, 256, None, 0.0, seed=7)
    per_neighbour = (small["overhead"] - one_run(64, 256, 8, 0.0, seed=7)["overhead"]) / (63 - 8)
    plus = one_run(1024, 64, secagg_plus_degree(1024), 0.0, seed=7)
    for name, overhead in (
        ("SecAgg (complete graph), extrapolated", plus["overhead"] + per_neighbour * (1023 - plus["k"])),
        (f"SecAgg+ (k = {plus['k']}), key sharing measured at d = 64", plus["overhead"]),
    ):
        d, bits = BONAWITZ["values"], plus["field_bits"]
        upload = overhead + masked_input_bytes("client0000", d, bits)
        rows.append(
            {
                "setting": name,
                "field_bits": bits,
                "vs16": upload / (d * 2),
                "vs32": upload / (d * 4),
                # the wire format before bit-packing: the same vector in uint32 words
                "words_vs16": (upload - packed_size(d, bits) + 4 * d) / (d * 2),
            }
        )
    return rows


def fmt_bytes(n: float) -> str:
    if n != n:
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def render(rows: list[dict], bonawitz: list[dict], seconds: float, command: str) -> str:
    lines = [
        "## Secure aggregation",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on this machine: "
        f"{platform_line()}). Real protocol, 16-bit values, threshold {THRESHOLD} of each neighbourhood, "
        "exactly round(dropout * n) clients drop, each before a uniformly chosen stage. "
        "*client s* and *up/down* are means over the clients that "
        "took part in all five stages; *server s* is the server's compute (routing, folding, reconstruction, "
        "unmasking). The masked vector travels bit-packed to the field width b (the *field* column, 2^b). "
        "d is shortened for n > 100 (time scales with d; bytes exactly by b / 8 B per value).",
        "",
        "| clients n | graph k | field | d | dropout | dropped | outcome | client s | server s | up / client "
        "| down / client | expansion vs 16-bit | vs 32-bit |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        graph = "complete" if r["k"] == r["n"] - 1 else str(r["k"])
        lines.append(
            f"| {r['n']} | {graph} | 2^{r['field_bits']} | {r['d']} | {r['dropout']:.0%} | {r['dropped']} | "
            f"{r['outcome']} | "
            f"{r['client_s']:.3f} | {r['server_s']:.3f} | {fmt_bytes(r['up'])} | {fmt_bytes(r['down'])} | "
            f"{expansion(r, r['d'], 16):.3f}x | {expansion(r, r['d'], 32):.3f}x |"
        )
    lines += [
        "",
        f"Beside Bonawitz et al. 2017 ({BONAWITZ['clients']} clients, 2^20 values of 16 bits; their reported "
        f"upload expansion {BONAWITZ['expansion']}x over sending the data in the clear):",
        "",
        "| setting | field | expansion vs 16-bit (bit-packed) | vs 32-bit | Bonawitz et al. "
        "| vs 16-bit in uint32 words (before packing) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for b in bonawitz:
        lines.append(
            f"| {b['setting']} | 2^{b['field_bits']}, {b['field_bits']} bits a value | {b['vs16']:.3f}x "
            f"| {b['vs32']:.3f}x | {BONAWITZ['expansion']}x | {b['words_vs16']:.3f}x |"
        )
    aborted = any(r["outcome"].startswith("abort") for r in rows)
    lines += [
        "",
        expansion_prose(bonawitz)
        + "SecAgg+ cuts per-client key agreement, sharing and masking from n - 1 neighbours to "
        "k = O(log n): client time grows linearly with n on the complete graph and slowly with SecAgg+ "
        "(what remains is the O(n) roster each client reads). With 30% dropout a k-neighbourhood can fall "
        "below its threshold t, and the round then aborts cleanly"
        + (" (as one run above did)" if aborted else "")
        + ": choose k and `threshold` for the dropout rate expected.",
        "",
    ]
    return "\n".join(lines)


def expansion_prose(bonawitz: list[dict]) -> str:
    """The Bonawitz comparison in words, from the measured rows ("" without them, e.g. --quick)."""
    if not bonawitz:
        return ""
    complete, plus = bonawitz  # the order bonawitz_setting returns
    bits = plus["field_bits"]
    return (
        f"Our upload is dominated by the masked vector: the field must hold the sum of n 16-bit values "
        f"(2^{bits} for 2^10 clients), and each value travels in exactly {bits} bits. The measured upload "
        f"expansion over a plain 16-bit upload is {plus['vs16']:.3f}x (SecAgg+) to {complete['vs16']:.3f}x "
        f"(complete graph), beside Bonawitz et al.'s {BONAWITZ['expansion']}x (in 32-bit words, before "
        f"bit-packing: {plus['words_vs16']:.3f}x to {complete['words_vs16']:.3f}x). "
        f"The vector alone is {bits}/16 = {bits / 16:.3f}x; the rest "
        "is key sharing (an AEAD ciphertext of two Shamir shares per neighbour, plus keys and commitment), "
        "which grows with the number of neighbours. "
    )


def platform_line() -> str:
    import os
    import platform

    load = os.getloadavg()[0]  # other jobs share the CPUs: times are only comparable at a similar load
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs at a load average of {load:.1f}, "
        f"Python {platform.python_version()}"
    )


def write_section(path: Path, section: str, *, title: str = "## Secure aggregation") -> None:
    """Replace (or append) only the section headed ``title``; other sections are left alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def availability_rows(n: int, dropout: float, target: float, rounds: int, real_rounds: int) -> list[dict]:
    """Abort rates at ``dropout``: the parameters chosen for ``target`` against fixed ones, each over
    ``rounds`` simulated rounds (the real graph and checks, availability.simulate_aborts) and, for the chosen
    ones, ``real_rounds`` rounds of the real protocol (d = 16, each client dropping with probability
    ``dropout`` before a uniformly chosen stage)."""
    chosen = secagg_bounds.plan(n, dropout=dropout, failure_probability=target)
    wary = secagg_bounds.plan(n, dropout=dropout, failure_probability=target, corrupt=0.05)
    wary_k = secagg_bounds.degree(n, wary.neighbours)
    margin = 2 * secagg_bounds.shares_needed(wary.threshold, wary_k) - wary_k  # colluders the round withstands - 1
    settings = [
        (
            f"chosen for {target:g} (k = {chosen.neighbours or 'complete'}, t just above k/2)",
            chosen.neighbours,
            chosen.threshold,
        ),
        (
            f"chosen for {target:g} with expected_corrupt 0.05 (k = {wary.neighbours or 'complete'}, "
            f"2t - k = {margin})",
            wary.neighbours,
            wary.threshold,
        ),
        ("former defaults (k = 8, threshold 2/3)", 8, 2 / 3),
        ("k = 8, threshold 0.55", 8, 0.55),
        ("complete graph, threshold 2/3", 0, 2 / 3),
    ]
    rows = []
    for i, (name, k, threshold) in enumerate(settings):
        rate = availability.simulate_aborts(n, k, threshold, dropout, rounds, np.random.default_rng([n, i]))
        real = real_aborts(n, k, threshold, dropout, real_rounds) if i == 0 and real_rounds else None
        t = secagg_bounds.shares_needed(threshold, secagg_bounds.degree(n, k))
        rows.append(
            {
                "n": n,
                "setting": name,
                "t": t,
                "rate": rate,
                "rounds": rounds,
                "real": real,
                "bound": secagg_bounds.abort_bound(n, k, threshold, dropout),
            }
        )
        print(
            f"availability n={n} {name}: {rate:.4f} of {rounds} simulated rounds abort"
            + (f", real protocol {real[0]} of {real[1]}" if real else ""),
            flush=True,
        )
    return rows


def real_aborts(n: int, k: int, threshold: float, dropout: float, rounds: int) -> tuple[int, int]:
    spec = field_for(n, value_bits=16)
    ids = [f"client{i:04d}" for i in range(n)]
    aborted = 0
    for r in range(rounds):
        params = PublicParams(1, 16, False, (), 1.0, 0.0, spec.modulus_bits, spec.levels, threshold, k, bytes([r]))
        rng = np.random.default_rng([r, 5])
        clients = {c: SecAggClient(c, rng.uniform(-1, 1, 16).astype(np.float32), params, rng=rng) for c in ids}
        try:
            run_protocol(clients, SecAggServer(params, ids), drop_before=random_dropouts(ids, dropout, rng))
        except SecAggAbort:
            aborted += 1
    return aborted, rounds


def render_availability(rows: list[dict], dropout: float, seconds: float, command: str) -> str:
    lines = [
        "## SecAgg availability",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min). Each client drops with probability {dropout:.0%} before "
        "a uniformly chosen stage; a round aborts when any check of the server or the clients fails. *simulated*: "
        "the real neighbour graph and threshold checks without the cryptography "
        "(`fedtune.privacy.secagg.availability.simulate_aborts`, checked round by round against the real "
        "protocol in `tests/test_secagg_availability.py`); *real*: the full protocol (d = 16). *bound*: the "
        "bound the parameters are chosen by (docs/PRIVACY.md). *95% upper*: the rule-of-three / Wilson upper "
        "confidence limit of the simulated rate.",
        "",
        "| clients n | parameters | t | simulated aborts | 95% upper | real protocol aborts | bound |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        aborts = round(r["rate"] * r["rounds"])
        real = f"{r['real'][0]} of {r['real'][1]}" if r["real"] else "-"
        lines.append(
            f"| {r['n']} | {r['setting']} | {r['t']} | {aborts} of {r['rounds']} ({r['rate']:.2%}) | "
            f"{upper95(aborts, r['rounds']):.2%} | {real} | {min(r['bound'], 1.0):.3g} |"
        )
    return "\n".join([*lines, ""])


def upper95(k: int, n: int) -> float:
    """Wilson score upper limit (3 / n, the rule of three, at k = 0)."""
    if k == 0:
        return 3.0 / n
    p, z = k / n, 1.96
    centre = p + z * z / (2 * n)
    return min(1.0, (centre + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n up to 50 only (a smoke test)")
    parser.add_argument("--write", type=Path, help="update this markdown file's '## Secure aggregation' section")
    parser.add_argument(
        "--availability", action="store_true", help="only the abort-rate table ('## SecAgg availability')"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    if args.availability:
        rows = availability_rows(100, 0.3, 0.01, rounds=2000, real_rounds=0 if args.quick else 5)
        rows += availability_rows(1000, 0.3, 0.01, rounds=100 if args.quick else 300, real_rounds=0)
        command = "python benchmarks/secagg.py --availability" + (" --quick" if args.quick else "")
        section = render_availability(rows, 0.3, time.perf_counter() - started, command + " --write docs/BENCHMARKS.md")
        if args.write:
            write_section(args.write, section, title="## SecAgg availability")
        else:
            sys.stdout.write(section)
        return
    sizes = [10, 50] if args.quick else [10, 50, 100, 200, 500]
    plan = [(n, secagg_plus_degree(n), p) for n in sizes for p in (0.0, 0.1, 0.3)]
    plan += [(n, None, p) for n in sizes if 10 < n <= 100 for p in (0.0, 0.3)]  # the original, complete graph
    rows = []
    for n, k, p in sorted(plan, key=lambda x: (x[0], -(x[1] or x[0]), x[2])):
        row = one_run(n, vector_length(n), k, p, seed=n)
        rows.append(row)
        print(
            f"n={n:4d} k={row['k']:4d} d={row['d']:6d} dropout={p:.0%} {row['outcome']:>8s} "
            f"client {row['client_s']:.3f}s server {row['server_s']:.3f}s up {fmt_bytes(row['up'])}",
            flush=True,
        )
    bonawitz = [] if args.quick else bonawitz_setting()
    for b in bonawitz:
        print(f"{b['setting']}: {b['vs16']:.3f}x vs 16-bit, {b['vs32']:.3f}x vs 32-bit", flush=True)
    seconds = time.perf_counter() - started
    command = "python benchmarks/secagg.py" + (" --quick" if args.quick else "") + " --write docs/BENCHMARKS.md"
    section = render(rows, bonawitz, seconds, command)
    if args.write:
        write_section(args.write, section)
    else:
        sys.stdout.write(section)


if __name__ == "__main__":
    main()

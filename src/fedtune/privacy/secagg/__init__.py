"""Secure aggregation: Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS) with the sparse neighbour graph of Bell et al. 2020 ("Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS), in the malicious-server variant (signed advertisements, client-side
parameter floors, a consistency round before unmasking).

    crypto.py     X25519 + HKDF key agreement, ChaCha20-Poly1305 AEAD, ChaCha20 mask streams
    shamir.py     t-of-n Shamir sharing over the prime field GF(2^521 - 1)
    graph.py      the SecAgg+ k-regular neighbour graph (Harary graph over a seeded permutation)
    quantize.py   stochastic quantisation into Z_R, R = 2^b <= 2^32, so n clients cannot wrap
    messages.py   the protocol's ten messages and their byte encoding (no pickle)
    identity.py   identity keys and trust: mTLS certificates against the CA, or a registry (simulation)
    policy.py     a client's floors under the parameters the server proposes
    deploy.py     a gRPC participant's peer: its certificate key, the CA, its own floors
    client.py     one client's protocol state machine
    server.py     the server's state machine: it only ever sees masked vectors and shares
    driver.py     the in-process driver (simulation) and the Summer that DP-FedAvg / SecureAggregation use
"""

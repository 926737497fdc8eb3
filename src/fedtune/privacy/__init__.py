"""Privacy: client-level DP-FedAvg with an accountant, local DP-SGD, and secure aggregation.

The math (clipping, noise, accounting, quantisation, masking, secret sharing) is pure and works on flat
NumPy buffers; the stateful parts are thin wrappers whose state lives in ServerState. See docs/PRIVACY.md
for every guarantee with its assumptions.
"""

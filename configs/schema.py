"""Typed configuration schema: one dataclass per owner, composed by `ExperimentConfig`.

NOTE: this module imports nothing from the project and nothing heavy (no torch), so
`launch/` and tools can import it cheaply. Every field has a documented default;
`__post_init__` validates ranges so a bad config fails before any work starts.
Loading YAML into these classes (unknown keys, wrong types) lives in `configs/loading.py`.
"""

from __future__ import annotations

import datetime as dt
import difflib
import typing
from dataclasses import dataclass, field
from typing import Literal

from configs.names import ACTION_TABLE, ACTOR_TABLE, FEATURE_TABLE, TABLE_NAMES, TARGET_TABLE

LogFormat = Literal["auto", "snap", "inter", "csv", "parquet"]
Precision = Literal["fp32", "bf16"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def did_you_mean(value: object, options: typing.Iterable[object], prefix: str = "") -> str:
    """'; did you mean X?' naming the option closest to a mistyped key or value (a key
    shown with its section `prefix`), or ''."""
    by_text = {str(o): o for o in options}
    close = difflib.get_close_matches(str(value), list(by_text), n=1)
    if not close:
        return ""
    shown = prefix + close[0] if prefix else by_text[close[0]]
    return f"; did you mean {shown!r}?"


@dataclass(kw_only=True)
class DataConfig:
    """Where the interaction log is and how to read, split and batch it."""

    path: str
    """Required (no default). Log file, or a directory of parquet files. Relative paths are resolved from
    the directory you run in; `embedded:collegemsg` names the log shipped in the package."""

    format: LogFormat = "auto"
    """`snap` (whitespace `SRC DST [TS]`, `#` comments), `inter` (RecBole tab-separated
    with a `name:type` header), `csv` (header with named columns), `parquet` (file or
    directory), or `auto` to choose from the file extension. Text logs may be
    gzip-compressed; `auto` looks past a `.gz` suffix (`log.csv.gz` is csv)."""

    actor_column: str | None = None
    """Column holding the actor (who acts). Default per format: `user_id` for .inter,
    `actor` for csv/parquet; SNAP logs are positional (column 1)."""

    target_column: str | None = None
    """Column holding the target (whom / what is acted on). Default: `item_id` for
    .inter, `target` for csv/parquet; SNAP column 2."""

    action_column: str | None = None
    """Column holding the action type (event type or rating). Default: `rating` for
    .inter, `action` for csv/parquet, when present; absent means every action is 0 (a
    warning says so, naming a column that looks like one, e.g. `rating`)."""

    timestamp_column: str | None = None
    """Column holding the event time in seconds, in [0, 2^62) (or a parquet datetime).
    Default: `timestamp` when present, SNAP column 3; absent means row order is time
    order (a warning says so, naming a column that looks like one, e.g. `time`)."""

    header: bool = True
    """csv only: the first row names the columns. `false` reads the columns by position,
    as in `source,target,rating,time` dumps: 2 columns are actor,target; 3 are
    actor,target,timestamp (as SNAP); 4 are actor,target,action,timestamp. The
    `*_column` options cannot be set then (there are no names)."""

    id_type: Literal["int", "str"] = "int"
    """Raw ID type: `int` rejects non-integer IDs with an error naming the line;
    `str` accepts any non-empty token."""

    shared_id_space: bool | None = None
    """Actors and targets are the same kind of entity (people messaging people), so
    they share one ID table. `None` means: yes for SNAP graph logs, no otherwise."""

    on_bad_rows: Literal["error", "drop"] = "error"
    """`error` stops at the first bad row, naming file, line and field. `drop` skips
    bad rows and reports how many were dropped, by reason."""

    drop_duplicate_events: bool = False
    """Drop exact duplicate (actor, target, action, timestamp) events, reporting the
    count. Off by default: the benchmark protocol keeps every event."""

    max_len: int = 50
    """History length the encoder attends over: the last `max_len` events before each
    example (truncation happens at batch time; storage is jagged and never padded)."""

    freq_exponent: float = 0.75
    """Sampling distribution for logQ: q(i) proportional to count(i) ** freq_exponent."""

    freq_count_floor: float = 1.0
    """Counts below this are raised to it before the exponent, so no candidate has q = 0."""

    active_since_fraction: float = 0.0
    """Active pool (random-negative pool): targets last seen after this fraction of
    the log's time range. 0 keeps every target."""

    active_since_date: str | None = None
    """Alternative to `active_since_fraction`: an ISO date (`2004-06-01`); targets last
    seen on or after it form the active pool."""

    target_features_path: str | None = None
    """Optional table of sparse target features (csv with a header, RecBole `.item`, or
    parquet): an ID column (`target_features_id_column`) and categorical columns; a cell
    may hold several tokens separated by `target_features_separator`. The candidate
    tower adds the mean of a target's feature-token embeddings to its ID embedding."""

    target_features_id_column: str = "target"
    """Column of `target_features_path` holding the raw target ID (`item_id` for .item)."""

    target_features_separator: str = "|"
    """Separator of several tokens in one cell (RecBole `token_seq` uses a space)."""

    partitions: int = 64
    """P: the prepared dataset splits the events into P files by a hash of the actor (and,
    in a shared ID space, P more by the target); each rank reads only its partitions, so P
    should be a multiple of (or much larger than) the number of ranks. Fixed when the
    dataset is prepared: changing it prepares the dataset again."""

    prepared_path: str | None = None
    """Where the prepared dataset lives (`python -m data.prepare` writes it; the trainer
    prepares it when missing or stale). Default: `<output_dir>/<name>/prepared`. Runs that
    differ only in settings applied at read time (`max_len`, the logQ exponent, features)
    may share one by pointing here."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.path: expected a log file or directory, got an empty string")
        _require(
            self.header or self.format in ("auto", "csv"),
            f"data.header: only csv logs can be read without a header row (data.format is {self.format})",
        )
        named = [f"data.{n}_column" for n in ("actor", "target", "action", "timestamp") if getattr(self, f"{n}_column")]
        _require(
            self.header or not named,
            f"data.header: without a header the columns are positional, so {', '.join(named)} cannot name one",
        )
        _require(self.max_len >= 1, f"data.max_len: expected >= 1, got {self.max_len}")
        _require(self.partitions >= 1, f"data.partitions: expected >= 1, got {self.partitions}")
        _require(self.freq_exponent >= 0, f"data.freq_exponent: expected >= 0, got {self.freq_exponent}")
        _require(self.freq_count_floor > 0, f"data.freq_count_floor: expected > 0, got {self.freq_count_floor}")
        _require(
            0.0 <= self.active_since_fraction < 1.0,
            f"data.active_since_fraction: expected a fraction in [0, 1), got {self.active_since_fraction}",
        )
        _require(
            self.active_since_date is None or self.active_since_fraction == 0.0,
            "data.active_since_date and data.active_since_fraction: set at most one of them",
        )
        if self.active_since_date is not None:
            try:
                dt.datetime.fromisoformat(self.active_since_date)
            except ValueError:
                raise ValueError(
                    f"data.active_since_date: expected an ISO date like 2004-06-01, got {self.active_since_date!r}"
                ) from None


@dataclass(kw_only=True)
class LoaderConfig:
    """How training examples are batched and shared between ranks."""

    batch_size: int = 128
    """Examples per rank per step."""

    num_workers: int = 0
    """DataLoader worker processes (0 builds batches in the training process)."""

    num_rand_negs: int = 0
    """Random negatives per example drawn from the active pool in the loader, so their
    embedding lookups join the batch's."""

    min_history: int = 1
    """Training examples need at least this many earlier events of the actor."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"loader.batch_size: expected >= 1, got {self.batch_size}")
        _require(self.num_workers >= 0, f"loader.num_workers: expected >= 0, got {self.num_workers}")
        _require(self.num_rand_negs >= 0, f"loader.num_rand_negs: expected >= 0, got {self.num_rand_negs}")
        _require(self.min_history >= 0, f"loader.min_history: expected >= 0, got {self.min_history}")


@dataclass(kw_only=True)
class ModelConfig:
    """The two-tower model: ID tables, the query tower's history encoder, the candidate tower."""

    embedding_dim: int = 64
    """D: width of ID embeddings, of the HSTU stream and of both towers' outputs."""

    encoder: Literal["transformer", "hstu"] = "hstu"
    """History encoder of the query tower."""

    num_layers: int = 2
    """Encoder blocks (HSTU or transformer layers)."""

    num_heads: int = 2
    """Attention heads per block; embedding_dim must be divisible by it."""

    dropout: float = 0.3
    """Dropout in the encoders and towers. The public logs are small (tens of thousands of
    events), so the rate is on the high side; an early CollegeMsg comparison of 0.3 and
    0.1 was within noise and it has not been re-measured at the current default."""

    activation: Literal["gelu", "swiglu"] = "gelu"
    """Activation of the towers' MLPs (and the transformer's feed-forward): GELU, or
    SwiGLU, a gated unit with its own weights."""

    causal: bool = False
    """Transformer only: causal attention (SASRec-style). HSTU is always causal."""

    pooling: Literal["mean", "last"] = "mean"
    """Transformer only: history vector = mean over valid tokens, or the newest token."""

    history_projection: bool = True
    """Transformer only: project the 2D-wide history vector to D with a small GELU MLP
    (off: a single linear map)."""

    film: bool = True
    """HSTU: the actor's vector drives FiLM on every token, x' = x * (1 + gamma) + beta."""

    time_features: bool = False
    """Cyclic time features (sin/cos of hour of day and weekday) on every token and on
    the query (when the next event happens). Off by default: over 3 seeds they cost
    ml-100k 0.014 NDCG@10 (13%, every seed lower) and the SASRec-style baseline 0.12 on
    CollegeMsg, and buy the default 0.002 there (0.3%); the time gaps (gap-to-next-event
    feature, RAB) carry the timing either way. Turn them on for a log with a daily or
    weekly rhythm worth learning."""

    relative_attention_bias: bool = True
    """HSTU: learned relative attention bias from log-bucketed time gaps plus relative
    positions (RAB)."""

    num_time_buckets: int = 64
    """Log-spaced buckets for time gaps (RAB and the gap-to-next-event feature)."""

    shared_id_table: bool | None = None
    """One ID table for actors and targets. `None`: follow the log (on for social logs,
    where actors and targets are the same people)."""

    repeat_scoring: bool = True
    """Repeat-aware re-scoring: a learned bonus for targets in the actor's history
    (from count, recency and time since last contact), trained with the history's
    targets as extra negatives. Retrieval stays a dot product; the bonus re-scores the
    actor's own past targets (a re-scoring stage over at most max_len items)."""

    repeat_window: int = 500
    """History events the repeat re-scorer looks at (0: data.max_len). Batches then carry
    max(data.max_len, repeat_window) events and the encoder sees the last data.max_len:
    counting past contacts is cheap, attention over long histories is not."""

    incoming_window: int = 500
    """In a shared ID space (messaging, trust: actors and targets are the same people), the
    re-scorer also scores the people whose events reached the actor before the query's
    time, up to this many of the latest such events (people write back). 0 turns it off;
    logs with separate actor and target IDs (ratings) never have it."""

    merged_contact_stream: bool = True
    """In a shared ID space, the re-scorer also reads each contact's recency and decayed
    counts over the actor's own and incoming events merged in time order (the statistic
    of the two-way recency-frequency rule), not only per direction. No effect where
    `incoming_window` is 0 or actors and targets are separate IDs."""

    actor_idle_feature: bool = False
    """The re-scorer also reads the actor's idle time: hours from its newest contact event
    (own or incoming) to the query's time, the same for every contact of the query. It
    tells a reply mid-conversation from a return after a day (models/repeat.py
    history_items). Off: its ablation row (actor_idle, 3 seeds) is -0.002 NDCG@10 on
    CollegeMsg and +0.004 on ml-100k, though a ranker over the contacts gained 0.005 from
    it on CollegeMsg (bench/contact_ceiling.py)."""

    contact_activity: bool = True
    """In a shared ID space, the re-scorer also reads each contact's own recent activity
    with anyone, from the released events of other people: hours since its newest event
    sent or received before the query's time, and its events in the hour, the day and ever
    before (data/activity.py). A contact mid-conversation with someone else is likelier to
    answer now than one silent for a week; neither the actor's history nor its incoming
    events show it. On by default since 2026-12-05: up on every log with contacts (paired
    test NDCG@10, same CPU: CollegeMsg +0.0031 over 6 seeds, 4 up; its later half +0.0077
    and the trust-like log +0.0063, every seed up; README, "Ablation"). A rank holds the
    activity of its own partitions' people, so each step (and each query chunk of an
    evaluation) looks the batch's contacts up across ranks; it cost CollegeMsg's step
    about 13%. No effect where `incoming_window` is 0 or actors and targets are separate
    IDs (ratings: the model is bitwise the one without it)."""

    contact_offset_on_validation: bool = True
    """After training, at the best model, choose one offset added to every contact's score
    (in logits, among models/repeat.py CONTACT_OFFSETS) by validation NDCG@10, and keep it
    with the model: the test, the export and predict use it. Why: on CollegeMsg's later
    half the model ranked the newest contact below other candidates where the two-way rule
    does not (README, "Logs it was not tuned on"), and an offset chosen on validation (the
    query before the test query, as the rules' half-lives are chosen) recovered part of it
    on every log where a contact can be the target. On by default since 2026-12-05: its
    ablation row (no_contact_offset) was up on every seed of every log with contacts and
    never down (ml-100k and its likes chose 0: the same figures). Why the learned balance
    sits low is not established: new contacts are only a little commoner among training
    events than among test queries (CollegeMsg: 23% against 20%). Costs, once after
    training, one validation pass whose count is made at each of the 7 offsets (the
    queries, the candidate vectors and the scores computed once; bench/contact_offset.py:
    7.4-7.6x faster than one validation per offset on CollegeMsg, 3.1-3.2x at 1e6
    candidates, where the counts dominate): where a validation is long
    (configs/synthetic-scale.yaml ranks 1e7 candidates) cap it with eval.max_queries or
    set this off. No effect without `repeat_scoring` (there is no contact score)."""

    repeat_explore: bool = False
    """Split a contact's score into its order among the actor's contacts and one
    propensity per query (RepeatNet's repeat / explore split, models/repeat.py): the order
    is learned by a softmax over the contacts alone, the propensity by the main loss, and
    the contact's cosine is dropped from its score. Why: one MLP trained in the full
    softmax must at once order the contacts and set how much any contact beats a new
    candidate, and on CollegeMsg's later half the balance came out low (README, "Logs it
    was not tuned on"). Off: with `contact_offset_on_validation` it clears the two-way rule
    there (0.6874 against 0.6834, 3 seeds) and lifts the trust-like derived log, but is
    level on CollegeMsg and ml-100k (README, Ablation), the logs defaults are chosen on."""

    def __post_init__(self) -> None:
        _require(
            self.repeat_scoring or not self.repeat_explore,
            "model.repeat_explore: needs model.repeat_scoring (there are no contact scores to split)",
        )
        _require(self.repeat_window >= 0, f"model.repeat_window: expected >= 0, got {self.repeat_window}")
        _require(self.incoming_window >= 0, f"model.incoming_window: expected >= 0, got {self.incoming_window}")
        _require(self.embedding_dim >= 2, f"model.embedding_dim: expected >= 2, got {self.embedding_dim}")
        _require(self.num_layers >= 1, f"model.num_layers: expected >= 1, got {self.num_layers}")
        _require(self.num_heads >= 1, f"model.num_heads: expected >= 1, got {self.num_heads}")
        _require(
            self.embedding_dim % self.num_heads == 0,
            f"model.embedding_dim ({self.embedding_dim}) must be divisible by model.num_heads ({self.num_heads})",
        )
        _require(0.0 <= self.dropout < 1.0, f"model.dropout: expected a fraction in [0, 1), got {self.dropout}")
        _require(self.num_time_buckets >= 2, f"model.num_time_buckets: expected >= 2, got {self.num_time_buckets}")


@dataclass(kw_only=True)
class HardNegativesConfig:
    """Keep only the top-k hardest negatives per source, with a curriculum on k."""

    enabled: bool = False
    """Off by default until it is shown to help (see bench/ablation.py)."""

    topk_start: int = 64
    """k at step 0: the hardest this many negatives of each source are kept (easy start)."""

    topk_end: int = 8
    """k after num_steps: fewer, harder negatives."""

    schedule: Literal["linear", "cosine"] = "linear"
    """How k moves from topk_start to topk_end over num_steps."""

    num_steps: int = 1000
    """Steps over which k goes from topk_start to topk_end (then stays at topk_end)."""

    def __post_init__(self) -> None:
        _require(self.topk_start >= 1 and self.topk_end >= 1, "loss.hard_negatives.topk_start/topk_end: expected >= 1")
        _require(self.num_steps >= 1, f"loss.hard_negatives.num_steps: expected >= 1, got {self.num_steps}")


@dataclass(kw_only=True)
class LossConfig:
    """Sampled softmax on cosine similarity with temperature, logQ and masks."""

    temperature: float = 0.1
    """tau: logits are cosine / tau."""

    logq_correction: bool = True
    """Subtract log q (expected appearances of the column in its negative source)."""

    logq_estimator: Literal["static", "streaming"] = "static"
    """In-batch q from the data layer's training frequencies (`static`), or from the
    streaming estimator of Yi et al. 2019 (hashed last-seen step and EMA of gaps)."""

    streaming_num_buckets: int = 1 << 20
    """Streaming estimator: hash buckets of the last-seen step (collisions share a bucket)."""

    streaming_ema: float = 0.01
    """Streaming estimator: EMA rate of each bucket's gap between appearances."""

    mask_history: bool = False
    """Mask negatives that are targets in the actor's own history."""

    similarity_mask_threshold: float = 0.99
    """Mask in-batch negatives whose similarity to the positive exceeds this."""

    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    """Top-k hard negative mining per negative source with a curriculum (off by default)."""

    temporal_weight: float = 0.5
    """Weight of temporal pretraining at the first step (temporal_decay lowers it after):
    every history position predicts the next event (one causal pass). 0 turns it off.
    With a constant weight the logs disagreed on it (README Ablation, previous default: 0
    was +0.006 NDCG@10 on CollegeMsg, -0.008 on ml-100k)."""

    temporal_last_k: int = 0
    """Temporal loss only on the last K positions of each history (0 = all)."""

    temporal_decay: Literal["none", "linear"] = "linear"
    """Schedule of temporal_weight over the run. "linear" (the default since 2026-12-04):
    from temporal_weight at the first step down to 0 at the run's last (train.max_epochs,
    or train.max_steps): pretraining that hands the end of the run to the main loss
    alone. "none": constant. With optim.sparse_lr it makes the default of 2026-12-04
    (README Ablation): the tables' higher rate lifted ml-100k but cost CollegeMsg 0.009
    under a constant weight, and lost nothing there under the decayed one."""

    def __post_init__(self) -> None:
        _require(self.temperature > 0, f"loss.temperature: expected > 0, got {self.temperature}")
        _require(self.temporal_weight >= 0, f"loss.temporal_weight: expected >= 0, got {self.temporal_weight}")
        _require(self.temporal_last_k >= 0, f"loss.temporal_last_k: expected >= 0, got {self.temporal_last_k}")
        _require(0 < self.streaming_ema <= 1, f"loss.streaming_ema: expected in (0, 1], got {self.streaming_ema}")
        _require(self.streaming_num_buckets >= 1, "loss.streaming_num_buckets: expected >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    """Dense parameters: AdamW with warm-up and decay. ID tables: TorchRec's fused sparse
    optimizer, applied in backward (the same code path once the tables are sharded)."""

    lr: float = 1e-3
    """Peak learning rate of the dense parameters (AdamW), reached after warm-up."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay of the dense parameters."""
    warmup_steps: int = 100
    """Linear warm-up of the dense learning rates from lr / warmup_steps to lr."""
    decay: Literal["cosine", "linear", "none"] = "cosine"
    """Decay after warm-up, down to `min_lr_ratio * lr` at the end of training."""
    min_lr_ratio: float = 0.1
    """Dense learning rate at the end of training, as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the dense gradients' global norm (0 turns clipping off)."""
    repeat_lr: float = 1e-2
    """Learning rate of the repeat re-scoring MLP. Its bonus has to grow until it can
    outweigh the similarity (tens of logits) before the ID tables overfit; at the dense
    rate it gets there too late (measured on CollegeMsg, see the notes)."""
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "adam"] = "rowwise_adagrad"
    """Optimizer of the ID tables, run in backward: row-wise Adagrad keeps one accumulator
    per row, so its state is D times smaller than Adagrad's or Adam's, which matters for
    tables of millions of rows. Sharded (under torchrun / torchx, even one rank) it is
    TorchRec's fused FBGEMM kernel, which updates only the rows a batch looked up. In a
    plain single process the optimizer steps the table's dense gradient: every row each
    step, and Adam's momentum then keeps moving rows the batch did not touch, so `adam`
    there is not the sharded `adam` (the Adagrads are, up to float rounding: a zero
    gradient moves no row)."""
    sparse_lr: float = 0.05
    """Learning rate of the ID tables, constant (no warm-up or decay): the optimizer runs
    inside backward, and (row-wise) Adagrad's accumulators already shrink a row's steps
    as it is updated. 0.05 since 2026-12-04 (was 0.02), with loss.temporal_decay "linear":
    +0.012 NDCG@10 on ml-100k, every seed up, and no loss on CollegeMsg (README Ablation)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr: expected > 0, got {self.lr}")
        _require(self.sparse_lr > 0, f"optim.sparse_lr: expected > 0, got {self.sparse_lr}")
        _require(self.repeat_lr > 0, f"optim.repeat_lr: expected > 0, got {self.repeat_lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay: expected >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps: expected >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio: expected in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip >= 0, f"optim.grad_clip: expected >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    """How long to train, when to validate and when to stop."""

    max_epochs: float = 10.0
    """Upper bound on training, in epochs of the training examples."""
    max_steps: int = 0
    """Upper bound in steps (0: no bound beyond max_epochs)."""
    eval_every_steps: int = 0
    """Validate every N steps (0: once per epoch)."""
    patience: int = 3
    """Stop after this many validations without a better validation NDCG@10."""
    log_every_steps: int = 50
    """Plain log lines (and TensorBoard scalars) every N steps."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms on CPU: same config and seed, same numbers."""
    num_threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    keep_checkpoints: int = 2
    """A checkpoint (torch.distributed.checkpoint) is written to <run>/checkpoints at every
    validation; the newest this many are kept (0: write none)."""
    resume: bool = False
    """Continue from the newest checkpoint of the run directory that verifies against its
    manifest, if any (same as `trainer/main.py --resume`); written by any number of ranks,
    read by any number. Refused when the checkpoint was written under another config
    (keys that only extend the run, such as `train.max_steps`, may change)."""
    overwrite: bool = False
    """Replace an earlier run in the run directory (same as `trainer/main.py --overwrite`).
    Without it (or `resume`) a run into a directory that holds another run is refused."""
    precision: Precision = "fp32"
    """"fp32", or "bf16": the towers' matmuls under bf16 autocast in training (GPUs with
    bf16, CPUs with AMX or AVX512-BF16; elsewhere bf16 is emulated and slow). Each tower's
    output vector, the similarities, the losses, the optimizers and evaluation stay fp32."""
    release_memory_every_steps: int = 50
    """Every this many steps, and before each evaluation, hand the free pages of the C
    heap back to the system (glibc `malloc_trim`; nothing elsewhere); 0 never. Without
    it a rank's resident memory grows with every step's differently shaped temporaries,
    0.7 GB over 2,400 steps of the synthetic scale log; every 50 steps costs about 2% of
    the throughput (trainer/allocators.py). It changes no number the run computes."""
    max_nonfinite_steps: int = 10
    """A step whose loss (on any rank) or dense gradient norm is NaN or inf is skipped: no
    parameter moves, a warning is logged and TensorBoard counts it (`nonfinite_steps`).
    After this many such steps in a row training stops with an error; the checkpoints
    written before stay as they are."""

    def __post_init__(self) -> None:
        _require(self.max_epochs > 0, f"train.max_epochs: expected > 0, got {self.max_epochs}")
        _require(self.max_steps >= 0, f"train.max_steps: expected >= 0, got {self.max_steps}")
        _require(self.eval_every_steps >= 0, f"train.eval_every_steps: expected >= 0, got {self.eval_every_steps}")
        _require(self.patience >= 1, f"train.patience: expected >= 1, got {self.patience}")
        _require(self.log_every_steps >= 1, f"train.log_every_steps: expected >= 1, got {self.log_every_steps}")
        _require(self.num_threads >= 0, f"train.num_threads: expected >= 0, got {self.num_threads}")
        _require(self.keep_checkpoints >= 0, f"train.keep_checkpoints: expected >= 0, got {self.keep_checkpoints}")
        _require(
            not (self.resume and self.overwrite),
            "train.resume and train.overwrite: set at most one (--resume continues the run, --overwrite replaces it)",
        )
        _require(
            self.release_memory_every_steps >= 0,
            f"train.release_memory_every_steps: expected >= 0 (0 = never), got {self.release_memory_every_steps}",
        )
        _require(
            self.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps: expected >= 1, got {self.max_nonfinite_steps}"
        )


@dataclass(kw_only=True)
class BaselineConfig:
    """The simple baselines every quality table carries (../shared/BENCHMARK.md)."""

    recency_half_life_events: float | Literal["auto"] = "auto"
    """Both recency-frequency baselines (the actor's own events, and two-way: its own and
    those that reached it): an event's weight halves for every this many newer events in
    the stream; `inf` weighs every event alike (a plain count). `auto` (the default, the
    protocol's rule): each baseline takes, of 1, 5, 20 and inf, the half-life with the best
    validation NDCG@10 (the shorter of equals), and the results name it. A number fixes it
    for both and skips the four validation passes (1 = the reference figures' value); for
    candidate sets so large that each full ranking costs minutes."""

    def __post_init__(self) -> None:
        _require(
            self.recency_half_life_events == "auto" or self.recency_half_life_events > 0,
            f"baselines.recency_half_life_events: expected 'auto' or a number > 0 (inf: no decay), "
            f"got {self.recency_half_life_events}",
        )


@dataclass(kw_only=True)
class EvalConfig:
    """Full-ranking evaluation (../shared/BENCHMARK.md)."""

    query_chunk_size: int = 1024
    """Queries scored at once; memory is bounded by query_chunk_size x candidate_chunk_size.
    The query vectors are encoded a chunk at a time, and a batch of another size rounds
    the encoder's matrix products differently: another size can move a candidate that
    sits within rounding of the target by a rank (measured: 1 rank of 1,077 with chunks
    of 1 or 3), so compare runs at the same size. An exact tie with the target still
    counts against the model at any size."""

    candidate_chunk_size: int = 1024
    """Candidates scored at once, rounded up to a multiple of 16; every chunk on every rank
    is this wide, so a tie stays a tie (trainer/evaluation.py CandidateChunks). Small on purpose: a 1024 x 1024 block of scores (4 MB)
    is still in cache when the ranking counts over it, and the matmul keeps most of its
    speed (bench/eval.py, 1e6 candidates, D 256, 2 cores: 1024 x 1024 reached 2.7x the
    scores per second of 256 x 65536)."""

    exclude_seen: bool = False
    """Exclude the actor's past targets from the candidates. Benchmark numbers are
    reported without it."""

    max_queries: int = 0
    """Evaluate a fixed random sample of this many evaluated actors (0: all of them, as
    the benchmark protocol asks). Every candidate is still ranked for each; for logs of
    millions of actors, where one exact validation over all of them costs hours. The
    results report how many actors were evaluated."""

    max_held_vectors_gb: float = 0.5
    """Candidate vectors a rank holds during an evaluation, at most (GB): up to this size
    they are computed once per evaluation and kept; beyond it (1.28 GB per rank for 1e7
    rows x D 64 on 2 ranks) each block of 8,192 (trainer/scoring.py VECTOR_BLOCK_ROWS)
    is computed from the rank's own table rows when it is scored, about twice per query
    chunk, and only two blocks are held.
    The metrics are the same either way (trainer/scoring.py CandidateVectors)."""

    def __post_init__(self) -> None:
        _require(self.query_chunk_size >= 1, f"eval.query_chunk_size: expected >= 1, got {self.query_chunk_size}")
        _require(self.max_held_vectors_gb >= 0, f"eval.max_held_vectors_gb: expected >= 0, got {self.max_held_vectors_gb}")
        _require(
            self.candidate_chunk_size >= 1,
            f"eval.candidate_chunk_size: expected >= 1, got {self.candidate_chunk_size}",
        )
        _require(self.max_queries >= 0, f"eval.max_queries: expected >= 0 (0 = every actor), got {self.max_queries}")


SHARDING_TYPES = ("row_wise", "table_wise", "column_wise", "table_row_wise")


@dataclass(kw_only=True)
class DistributedConfig:
    """Several ranks (launched by torchrun / torchx): how the ID tables are sharded."""

    sharding: dict[str, str] = field(
        default_factory=lambda: {
            TARGET_TABLE: "row_wise",
            ACTOR_TABLE: "row_wise",
            ACTION_TABLE: "table_wise",
            FEATURE_TABLE: "table_wise",
        }
    )
    """Sharding type per table, handed to TorchRec's planner as a constraint: the large ID
    tables row-wise (every rank holds a slice of rows), the small ones whole on one rank.
    A table left out is placed as the planner chooses. `data_parallel` is not offered:
    TorchRec 1.8's data-parallel EmbeddingCollection fails on sequence lookups (measured)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl when CUDA is available, else gloo."""

    def __post_init__(self) -> None:
        for table, kind in self.sharding.items():
            _require(
                table in TABLE_NAMES,
                f"distributed.sharding.{table}: unknown table{did_you_mean(table, TABLE_NAMES)} "
                f"(tables: {', '.join(TABLE_NAMES)})",
            )
            _require(
                kind in SHARDING_TYPES,
                f"distributed.sharding.{table}: expected one of {', '.join(SHARDING_TYPES)}, got {kind!r}"
                f"{did_you_mean(kind, SHARDING_TYPES)}",
            )


@dataclass(kw_only=True)
class ExperimentConfig:
    """A complete, named run."""

    name: str
    """Required (no default). Run name: outputs go to `<output_dir>/<name>/`."""

    data: DataConfig
    """Required (no default): at least `data.path`."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """Batching and random negatives (LoaderConfig's defaults)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The towers and the history encoder (ModelConfig's defaults)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Sampled softmax, logQ, masks, hard negatives, temporal loss (LossConfig's defaults)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Dense and sparse optimizers, schedule, clipping (OptimConfig's defaults)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, validation, early stopping, checkpoints (TrainConfig's defaults)."""
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    """The baselines beside the model in every results table (BaselineConfig's defaults)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Full-ranking evaluation (EvalConfig's defaults)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Sharding and backend on several ranks (DistributedConfig's defaults)."""

    seed: int = 0
    """Seed for shuffling, sampling and initialisation."""

    output_dir: str = "runs"
    """Parent directory of run directories."""

    @property
    def history_window(self) -> int:
        """Events of history each batch carries: the encoder's and the re-scorer's needs."""
        return max(self.data.max_len, self.model.repeat_window if self.model.repeat_scoring else 0)

    def __post_init__(self) -> None:
        _require(
            not (self.loss.temporal_weight > 0 and self.model.encoder == "transformer" and not self.model.causal),
            "loss.temporal_weight > 0 needs a causal encoder (every position predicts the next event): "
            "set model.causal=true, or model.encoder=hstu, or loss.temporal_weight=0",
        )
        hard = self.loss.hard_negatives
        if hard.enabled:
            _require(
                max(hard.topk_start, hard.topk_end) <= self.loader.batch_size + self.loader.num_rand_negs,
                f"loss.hard_negatives.topk_start/topk_end ({hard.topk_start}/{hard.topk_end}): larger than the "
                f"negatives available ({self.loader.batch_size} in-batch + {self.loader.num_rand_negs} random)",
            )
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                 f"name: expected a plain run name without '/', got {self.name!r}")

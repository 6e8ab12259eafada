"""The train-task module: two-tower retrieval with mixed negatives.

    forward(actor, next_action, history, next_timestamp)  -> query vectors (request time)
    encode_queries(...)                                   -> query vectors + repeat bonuses
    candidate_vectors(ids)                                -> candidate vectors
    train_forward(batch)                                  -> RetrievalOutput(loss, losses, telemetry)

Model code is written as if it ran on one device: the ID tables are one TorchRec
`EmbeddingCollection` (sharded from outside by DistributedModelParallel), and the
only cross-rank operation, gathering the in-batch negatives, is the `gather` callable.

Who owns what: `models/embeddings.py` looks every ID up (one collection call) and hands
the towers plain tensors; `models/towers.py` encodes; `models/samplers.py` holds the
negative sources and their q; `models/losses.py` the sampled softmax; this module wires
them into one step: towers, sources, loss, temporal loss.

Shape suffixes: B batch, L history positions, N flat history events, R random
negatives per example, H history columns per example, U history pairs, D width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from configs.names import (
    ACTOR,
    HISTORY_TARGET,
    HISTORY_TIMESTAMP,
    INCOMING_SOURCE,
    INCOMING_TIMESTAMP,
    NEXT_ACTION,
    NEXT_TIMESTAMP,
)
from configs.schema import LossConfig, ModelConfig
from data.activity import ContactActivity
from data.batches import Batch
from models.embeddings import IdEmbeddings, LookedUp, TargetRows, VocabularySizes
from models.length_groups import Jagged, JaggedHistory, from_blocks, length_groups, to_block
from models.losses import (
    LossSettings,
    contact_order_loss,
    hard_topk_schedule,
    sampled_softmax_loss,
    temporal_weight_at,
)
from models.repeat import ContactEvents, HistoryItems, RepeatScorer, contact_keys, history_items
from models.samplers import (
    ContactNegatives,
    Gather,
    InBatchNegativesSampler,
    RandomNegativesSampler,
    RowShare,
    SampledNegatives,
    StreamingFrequencyEstimator,
    identity_gather,
    mixture_log_q,
)
from models.towers import CandidateTower, QueryInputs, QueryTower


@dataclass
class RetrievalOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    telemetry: dict[str, float] = field(default_factory=dict)


@dataclass
class ContactBonus:
    """Per (row, contact) pair: the query's cosine, the bonus added to it (logits) and,
    with `model.repeat_explore`, the contacts' order (logits, for its own loss)."""

    cosine_U: torch.Tensor
    bonus_U: torch.Tensor
    order_U: torch.Tensor | None


@dataclass
class QueryEncoding:
    """What scoring a query needs: its vector and the bonus of each of its history targets."""

    query_BD: torch.Tensor
    history: HistoryItems | None
    bonus_U: torch.Tensor | None


class TwoTowerRetrieval(nn.Module):
    def __init__(
        self,
        model_config: ModelConfig,
        loss_config: LossConfig,
        sizes: VocabularySizes,
        *,
        max_len: int,
        target_log_p: torch.Tensor,
        pool_size: int,
        target_log_p_share: RowShare | None = None,
        active_pool_mask: torch.Tensor | None = None,
        gather: Gather = identity_gather,
        count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | None = None,
        target_feature_offsets: torch.Tensor | None = None,
        target_feature_tokens: torch.Tensor | None = None,
        bf16_towers: bool = False,
        reads_incoming: bool = False,
        reads_activity: bool = False,
    ) -> None:
        """`active_pool_mask` [T] bool: the random negatives' pool, for the mixture's logQ
        correction (needed only when random negatives are drawn). `bf16_towers`: run the
        towers under bf16 autocast in `train_forward` (train.precision = "bf16").
        `reads_incoming`: its batches carry the events that reached each actor (the
        re-scorer then also reads the merged two-way stream, `model.merged_contact_stream`).
        `reads_activity`: its batches carry each contact's own recent activity
        (`Batch.contact_activity`, `model.contact_activity`), which the re-scorer reads.
        `target_feature_offsets` [T + 1] / `target_feature_tokens` [M]: each target's sparse
        feature tokens (jagged), when the log has them (`sizes.num_feature_tokens` > 0).
        `target_log_p_share`: `target_log_p` holds only these targets' rows (a share read
        for one of several ranks), read through every rank.
        `gather` / `count_sum`: the cross-rank operations (trainer/distributed.py); identity
        and None in one process."""
        super().__init__()
        self.model_config, self.loss_config, self.sizes, self.max_len = model_config, loss_config, sizes, max_len
        # The loss's fixed settings, read from the config once.
        self.loss_settings = LossSettings(
            temperature=loss_config.temperature,
            logq_correction=loss_config.logq_correction,
            mask_history=loss_config.mask_history,
            similarity_mask_threshold=loss_config.similarity_mask_threshold,
            count_sum=count_sum,
        )
        dim = model_config.embedding_dim
        self.embeddings = IdEmbeddings(
            sizes, dim, max_len, device=device,
            target_feature_offsets=target_feature_offsets, target_feature_tokens=target_feature_tokens,
        )
        self.query_tower = QueryTower(model_config, max_len)
        self.candidate_tower = CandidateTower(model_config)
        merged_stream = model_config.merged_contact_stream and reads_incoming
        self.repeat = (
            RepeatScorer(
                dim, merged_stream=merged_stream, actor_idle=model_config.actor_idle_feature,
                contact_offset=model_config.contact_offset_on_validation,
                repeat_explore=model_config.repeat_explore, activity=reads_activity,
            )
            if model_config.repeat_scoring
            else None
        )
        self.contacts = ContactNegatives() if self.repeat is not None else None
        if loss_config.logq_estimator == "streaming":
            estimator = StreamingFrequencyEstimator(loss_config.streaming_num_buckets, loss_config.streaming_ema)
            self.in_batch = InBatchNegativesSampler(estimator=estimator, gather=gather)
        else:
            self.in_batch = InBatchNegativesSampler(log_p=target_log_p, gather=gather, log_p_share=target_log_p_share)
        self.random = RandomNegativesSampler(pool_size, active_pool_mask)
        # Needs a causal encoder: configs/schema.py checks that, once, for every config.
        self.temporal = loss_config.temporal_weight > 0
        self.temporal_decay_steps = 0
        """Steps over which temporal_weight falls to 0 (0: constant); the trainer sets it
        to the run's length when loss.temporal_decay is "linear"."""
        # train.precision = "bf16": the towers run under bf16 autocast while training.
        self.bf16_towers = bf16_towers
        # The curriculum's position; a buffer so checkpoints carry it.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ lookups

    @property
    def has_features(self) -> bool:
        return self.embeddings.has_features

    def _candidates(self, rows: TargetRows, in_train_forward: bool = False) -> torch.Tensor:
        with self._tower_autocast(rows.target_ND.device, in_train_forward):
            return self.candidate_tower(rows.target_ND, rows.feature_ND)

    def _tower_autocast(self, device: torch.device, in_train_forward: bool) -> torch.autocast:
        """bf16 autocast around a tower inside `train_forward` when `bf16_towers`
        (train.precision). Only the towers: their outputs are fp32 unit vectors, so the
        similarities and the losses (logits up to 1 / tau = 20, where bf16 keeps 2-3
        digits) stay fp32; request-time encoding and evaluation always run in fp32."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16_towers and in_train_forward)

    def _query_inputs(self, looked_up: LookedUp, history: KeyedJaggedTensor, next_timestamp: torch.Tensor) -> QueryInputs:
        """`history` is the encoder window (`IdEmbeddings.encoder_window`), kept jagged."""
        jagged_history = JaggedHistory(
            target_ND=looked_up.history.target_ND,
            action_ND=looked_up.history_action_ND,
            timestamp_N=history[HISTORY_TIMESTAMP].values(),
            jagged=Jagged(history[HISTORY_TARGET].lengths().to(torch.int64)),
        )
        return QueryInputs(jagged_history, looked_up.actor_BD, looked_up.next_action_BD, next_timestamp)

    def _history_items(
        self, history: KeyedJaggedTensor, next_timestamp: torch.Tensor, incoming: KeyedJaggedTensor | None,
        activity_UF: torch.Tensor | None = None,
    ) -> HistoryItems:
        reads_activity = self.repeat is not None and self.repeat.activity
        if reads_activity and activity_UF is None:
            raise ValueError(
                "the re-scorer reads each contact's activity (model.contact_activity), but the batch carries none: "
                "look it up with with_contact_activity(batch, trainer/build.py contact_activity(...))"
            )
        outgoing, received = contact_sources(history, incoming)
        return history_items(
            outgoing,
            next_timestamp,
            self.sizes.num_id_rows,
            received,
            # Without the re-scorer (loss.mask_history alone) only the pairs themselves are read.
            merged_stream=self.repeat is not None and self.repeat.merged_stream,
            actor_idle=self.repeat is not None and self.repeat.actor_idle,
            query_features=self.repeat is not None and self.repeat.repeat_explore,
            activity_UF=activity_UF if reads_activity else None,
        )

    def with_contact_activity(self, batch: Batch, activity: ContactActivity | None) -> Batch:
        """`batch` with its contacts' own recent activity (`Batch.contact_activity`), looked
        up now: collective on several ranks, so every rank calls it for each batch it
        builds. Without a lookup (the re-scorer does not read it): `batch` as is."""
        if activity is None:
            return batch
        stride = self.sizes.num_id_rows
        keys = contact_keys(*contact_sources(batch.history, batch.incoming), stride)
        rows = keys // stride
        times = batch.query_values(NEXT_TIMESTAMP)[rows]
        return dataclasses.replace(batch, contact_activity=activity(keys - rows * stride, times))

    # ---------------------------------------------------------------- inference

    def encode_queries(
        self,
        actor: torch.Tensor,
        next_action: torch.Tensor,
        history: KeyedJaggedTensor,
        next_timestamp: torch.Tensor | None = None,
        incoming: KeyedJaggedTensor | None = None,
        contact_activity: torch.Tensor | None = None,
    ) -> QueryEncoding:
        """Query vectors [B, D] and repeat bonuses from request-time information only.
        `next_timestamp` defaults to the time of each actor's newest history event;
        `incoming` (INCOMING_KEYS, see data/batches.py) adds the actor's incoming contacts;
        `contact_activity` their own recent activity (`Batch.contact_activity`)."""
        if next_timestamp is None:
            next_timestamp = _newest_timestamp(history)
        items = (
            self._history_items(history, next_timestamp, incoming, contact_activity) if self.repeat is not None else None
        )
        encoder_history = self.embeddings.encoder_window(history)
        empty = torch.zeros((actor.shape[0], 0), dtype=torch.int64, device=actor.device)
        looked_up = self.embeddings.lookup_batch(actor, next_action, encoder_history, empty, _contact_ids(items))
        query = self.query_tower(self._query_inputs(looked_up, encoder_history, next_timestamp)).query_BD
        if items is None:
            return QueryEncoding(query, None, None)
        contact_vectors_UD = self._candidates(looked_up.contacts)
        bonus = self._bonus(items, query, contact_vectors_UD, looked_up.next_action_BD)
        return QueryEncoding(query, items, bonus.bonus_U)

    def _bonus(
        self, items: HistoryItems, query_BD: torch.Tensor, contact_vectors_UD: torch.Tensor, next_action_BD: torch.Tensor
    ) -> ContactBonus:
        """Cosine and repeat bonus per history pair, the bonus in logit units. The scorer's
        output is in cosine units and divided by tau like the similarity: with tau = 0.1 a
        bonus that must outweigh the similarity needs only O(1) weights, which Adam reaches
        in hundreds of steps (at lr 1e-3 it would need tens of thousands to reach O(1/tau)).
        With `repeat_explore` the bonus replaces the cosine by order + propensity
        (models/repeat.py): the cosine is subtracted, the order enters detached and is
        returned for its own loss."""
        tau = self.loss_settings.temperature
        cosine_U = (query_BD[items.row_U] * contact_vectors_UD).sum(-1)
        order_U = None
        if self.repeat.repeat_explore:
            order_U = self.repeat(items, cosine_U.detach(), next_action_BD) / tau
            propensity_B = self.repeat.contact_propensity(items, next_action_BD) / tau
            bonus_U = order_U.detach() + propensity_B[items.row_U] - cosine_U / tau
        else:
            bonus_U = self.repeat(items, cosine_U, next_action_BD) / tau
        if self.repeat.contact_offset is not None:
            bonus_U = bonus_U + self.repeat.contact_offset
        return ContactBonus(cosine_U, bonus_U, order_U)

    def set_contact_offset(self, offset: float) -> None:
        """Set the logit added to every contact's score (model.contact_offset_on_validation)."""
        if self.repeat is None or self.repeat.contact_offset is None:
            raise ValueError("set_contact_offset: this model has no contact offset (model.contact_offset_on_validation)")
        self.repeat.contact_offset.fill_(offset)

    def forward(
        self,
        actor: torch.Tensor,
        next_action: torch.Tensor,
        history: KeyedJaggedTensor,
        next_timestamp: torch.Tensor | None = None,
        incoming: KeyedJaggedTensor | None = None,
        contact_activity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.encode_queries(actor, next_action, history, next_timestamp, incoming, contact_activity).query_BD

    def candidate_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """[N] target IDs -> [N, D] unit vectors."""
        return self._candidates(self.embeddings.lookup_targets(ids))

    def candidate_vectors_of_rows(self, target_ND: torch.Tensor) -> torch.Tensor:
        """[N, D] rows of the target table (a model without target features) -> [N, D]
        unit vectors: `candidate_vectors` for a caller that read the rows itself."""
        if self.has_features:
            raise ValueError("candidate_vectors_of_rows: this model's candidates have features; use candidate_vectors")
        return self._candidates(TargetRows(target_ND))

    # ------------------------------------------------------------------ training

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the ID tables' (whose optimizer runs inside backward), in
        `named_parameters` order (the order the gradient norm sums them in)."""
        children = [module for module in self.children() if module is not self.embeddings]
        return [*self.parameters(recurse=False), *(p for module in children for p in module.parameters())]

    def dense_parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the towers', the repeat re-scorer's): the re-scorer learns at its own rate
        (optim.repeat_lr)."""
        repeat = list(self.repeat.parameters()) if self.repeat is not None else []
        repeat_ids = {id(p) for p in repeat}
        return [p for p in self.dense_parameters() if id(p) not in repeat_ids], repeat

    def current_hard_topk(self) -> int | None:
        hard = self.loss_config.hard_negatives
        if not hard.enabled:
            return None
        return hard_topk_schedule(int(self.training_step), hard.topk_start, hard.topk_end, hard.num_steps, hard.schedule)

    def train_forward(self, batch: Batch, telemetry: bool = True) -> RetrievalOutput:
        """Loss of one batch (main next-target loss + temporal pretraining), and with
        `telemetry` the loss's telemetry (it costs passes over every logit: the trainer
        asks for it on the steps it logs)."""
        random_ids_BR = batch.random_negatives
        batch_size, num_random = random_ids_BR.shape
        actor, next_action = batch.query_values(ACTOR), batch.query_values(NEXT_ACTION)
        next_timestamp = batch.query_values(NEXT_TIMESTAMP)
        candidates_BC = torch.cat([batch.target[:, None], random_ids_BR], dim=1)
        items = None
        if self.repeat is not None or self.loss_config.mask_history:
            incoming = batch.incoming if self.repeat is not None else None
            items = self._history_items(batch.history, next_timestamp, incoming, batch.contact_activity)
        encoder_history = self.embeddings.encoder_window(batch.history)
        looked_up = self.embeddings.lookup_batch(
            actor, next_action, encoder_history, candidates_BC, _contact_ids(items if self.repeat is not None else None)
        )
        inputs = self._query_inputs(looked_up, encoder_history, next_timestamp)
        with self._tower_autocast(actor.device, in_train_forward=True):
            query = self.query_tower(inputs, all_positions=self.temporal)

        candidate_BCD = self._candidates(looked_up.candidates, in_train_forward=True).reshape(batch_size, 1 + num_random, -1)
        positive_BD, random_BRD = candidate_BCD[:, 0], candidate_BCD[:, 1:]
        sources = [self.in_batch(batch.target, positive_BD)]
        if num_random:
            sources.append(self.random(random_ids_BR, random_BRD))
        # One sample from every sampled source: each column corrected by its count under all.
        sources = mixture_log_q(sources)

        # What changes from step to step: the curriculum's k, and whether to report.
        settings = dataclasses.replace(self.loss_settings, hard_topk=self.current_hard_topk(), telemetry=telemetry)
        positive_bonus_B = None
        if self.repeat is not None:
            contact_vectors_UD = self._candidates(looked_up.contacts, in_train_forward=True)
            bonus = self._bonus(items, query.query_BD, contact_vectors_UD, looked_up.next_action_BD)
            sources.append(self.contacts(items, bonus.cosine_U, bonus.bonus_U))
            index_B, found_B = items.find(torch.arange(batch_size, device=actor.device), batch.target)
            # A batch whose rows have no contacts at all (every row an actor's first event)
            # has no pair to index: its targets get no bonus.
            positive_bonus_B = (
                torch.where(found_B, bonus.bonus_U[index_B], 0.0)
                if bonus.bonus_U.numel()
                else torch.zeros(batch_size, device=actor.device)
            )

        main = sampled_softmax_loss(
            query.query_BD[:, None],
            positive_BD[:, None],
            batch.target[:, None],
            sources,
            settings,
            positive_bonus_BP=None if positive_bonus_B is None else positive_bonus_B[:, None],
            history_contains=items.contains if items is not None else None,
        )
        losses = {"main": main.loss}
        telemetry = dict(main.telemetry)
        total = main.loss
        if self.repeat is not None and bonus.order_U is not None:
            # repeat_explore: the contacts' order, learned among the contacts alone.
            losses["contact_order"] = contact_order_loss(
                items.row_U, bonus.order_U, index_B, found_B, self.loss_settings.count_sum
            )
            total = total + losses["contact_order"]
        if self.temporal:
            temporal = self._temporal_loss(query.positions_PD, inputs.history, looked_up, encoder_history, sources, settings)
            losses["temporal"] = temporal.loss
            telemetry.update({f"temporal/{k}": v for k, v in temporal.telemetry.items() if k.startswith("sim/")})
            weight = temporal_weight_at(int(self.training_step), self.loss_config.temporal_weight, self.temporal_decay_steps)
            total = total + weight * temporal.loss
        if self.training:
            self.training_step += 1
        return RetrievalOutput(loss=total, losses=losses, telemetry=telemetry)

    def _temporal_loss(
        self,
        positions_PD: torch.Tensor,
        jagged_history: JaggedHistory,
        looked_up: LookedUp,
        history: KeyedJaggedTensor,
        sources: list[SampledNegatives],
        settings: LossSettings,
    ):
        """Every history position j predicts the history event j + 1, in one pass over the
        flat positions (no padding). The last position predicts the batch's target and is
        the main loss's job. `loss.temporal_last_k` keeps each row's last k pairs."""
        events = jagged_history.jagged
        pairs_B = (events.lengths - 1).clamp(min=0)
        if self.loss_config.temporal_last_k:
            pairs_B = pairs_B.clamp(max=self.loss_config.temporal_last_k)
        pairs = Jagged(pairs_B)
        row_M = pairs.rows()
        # Pair m of row b is its position j = length - 1 - pairs + (m's index in the row).
        j_M = torch.arange(pairs.total, device=row_M.device) - pairs.offsets[row_M] + (events.lengths - 1 - pairs_B)[row_M]
        query_MD = positions_PD[jagged_history.positions.offsets[row_M] + j_M]
        next_event_M = events.offsets[row_M] + j_M + 1
        positive_MD = self._candidates(looked_up.history, in_train_forward=True)[next_event_M]
        positive_ids_M = history[HISTORY_TARGET].values()[next_event_M]
        temporal_sources = [
            _per_pair(source, query_MD, row_M, pairs) for source in sources if not source.certain
        ]
        return sampled_softmax_loss(
            query_MD[:, None], positive_MD[:, None], positive_ids_M[:, None], temporal_sources, settings
        )


def _per_pair(source: SampledNegatives, query_MD: torch.Tensor, row_M: torch.Tensor, pairs: Jagged) -> SampledNegatives:
    """A negative source of the main loss, for the temporal pairs: shared columns as they
    are; per-example columns become each pair's row's, with the pair-column cosines
    computed per length group of pairs (one bmm per group, no [pairs, N, D] gather)."""
    if not source.per_example:
        return source
    groups = length_groups(pairs.lengths, 0.0, 64.0)
    blocks, entries = [], []
    for group in groups:
        group_entries = group.entries(pairs)
        block_MD = to_block(query_MD, group_entries, len(group.rows), group.width)
        blocks.append(torch.bmm(block_MD, source.embeddings[group.rows].transpose(1, 2)))
        entries.append(group_entries)
    cosine_MN = from_blocks(blocks, entries, pairs.total)
    valid = None if source.valid is None else source.valid[row_M]
    return dataclasses.replace(
        source, ids=source.ids[row_M], embeddings=None, log_q=source.log_q[row_M], valid=valid, cosine=cosine_MN
    )


def contact_sources(
    history: KeyedJaggedTensor, incoming: KeyedJaggedTensor | None
) -> tuple[ContactEvents, ContactEvents | None]:
    """A batch's contacts as the re-scorer reads them: its history's targets and, when
    given, the senders of its incoming events."""
    received = None
    if incoming is not None:
        source = incoming[INCOMING_SOURCE]
        received = ContactEvents(source.values(), incoming[INCOMING_TIMESTAMP].values(), source.lengths())
    target = history[HISTORY_TARGET]
    return ContactEvents(target.values(), history[HISTORY_TIMESTAMP].values(), target.lengths()), received


def _contact_ids(items: HistoryItems | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The re-scorer's contacts as the lookup takes them: (target [U], example [U])."""
    return None if items is None else (items.target_U, items.row_U)


def _newest_timestamp(history: KeyedJaggedTensor) -> torch.Tensor:
    jagged = history[HISTORY_TIMESTAMP]
    lengths = jagged.lengths()
    ends = torch.cumsum(lengths, 0) - 1
    values = jagged.values()
    if values.numel() == 0:
        return torch.zeros_like(lengths)
    return torch.where(lengths > 0, values[ends.clamp(min=0)], 0)

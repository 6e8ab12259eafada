"""The names every layer shares: the KeyedJaggedTensor keys of a batch (data/batches.py
builds them, models/ reads them) and the ID tables (models/embeddings.py builds them,
the sharding config and trainer/distributed.py name them). Here, at the bottom of the
layers, so that no two files spell one of them apart.

    batch KJT        keys                                   one value per
    history          HISTORY_TARGET, HISTORY_ACTION,         history event
                     HISTORY_TIMESTAMP
    query            ACTOR, NEXT_ACTION, NEXT_TIMESTAMP      example
    incoming         INCOMING_SOURCE, INCOMING_TIMESTAMP     event that reached the actor

The lookup KJT of the embedding collection (models/embeddings.py) adds the features that
look tables up: CANDIDATE_TARGET, CONTACT_TARGET and the feature-token lookups.
"""

from __future__ import annotations

# ---------------------------------------------------------------- batch KJT keys
HISTORY_TARGET = "history_target"
HISTORY_ACTION = "history_action"
HISTORY_TIMESTAMP = "history_timestamp"
ACTOR = "actor"
NEXT_ACTION = "next_action"
NEXT_TIMESTAMP = "next_timestamp"
INCOMING_SOURCE = "incoming_source"
INCOMING_TIMESTAMP = "incoming_timestamp"

HISTORY_KEYS = (HISTORY_TARGET, HISTORY_ACTION, HISTORY_TIMESTAMP)
QUERY_KEYS = (ACTOR, NEXT_ACTION, NEXT_TIMESTAMP)
INCOMING_KEYS = (INCOMING_SOURCE, INCOMING_TIMESTAMP)

# ---------------------------------------------------------------- lookup-only features
CANDIDATE_TARGET = "candidate_target"
CANDIDATE_FEATURE = "candidate_feature"
HISTORY_FEATURE = "history_feature"
CONTACT_TARGET = "contact_target"
CONTACT_FEATURE = "contact_feature"

# ---------------------------------------------------------------- ID tables
TARGET_TABLE = "target_ids"
ACTOR_TABLE = "actor_ids"
ACTION_TABLE = "action_types"
FEATURE_TABLE = "target_features"
TABLE_NAMES = (TARGET_TABLE, ACTOR_TABLE, ACTION_TABLE, FEATURE_TABLE)

"""The ID tables' optimizer settings per table."""

from __future__ import annotations

import pytest

from configs.names import ACTOR_TABLE
from tests.trainer.smoke import config_trainer


def _lr_by_table(trainer) -> dict[str, float]:
    return {
        name.rsplit(".", 2)[-2]: optimizer.param_groups[0]["lr"]
        for name, optimizer in trainer._sparse_optimizers().items()
    }


@pytest.mark.parametrize("actor_table_lr", [None, 0.05])
def test_the_actor_table_alone_takes_its_own_learning_rate(actor_table_lr):
    overrides = ["optim.sparse_lr=0.02"] + ([f"optim.actor_table_lr={actor_table_lr}"] if actor_table_lr else [])
    lrs = _lr_by_table(config_trainer("ml-100k", *overrides))  # actors and targets apart: an actor table
    assert ACTOR_TABLE in lrs and len(lrs) >= 3
    assert lrs.pop(ACTOR_TABLE) == (actor_table_lr or 0.02)
    assert set(lrs.values()) == {0.02}

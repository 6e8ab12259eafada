"""`launch/components.py:train` parses as a torchx component and builds the dist.ddp job it documents."""

from __future__ import annotations

from torchx.components.component_test_base import ComponentTestCase
from torchx.specs.finder import get_component

from launch import components


class TrainComponentTest(ComponentTestCase):
    def test_train_parses_like_the_torchx_cli_does_with_its_docstring_as_help(self):
        self.validate(components, "train")  # `torchx run launch/components.py:train --help`
        # The CLI also lints the source (annotated arguments, AppDef return) and refuses on any error.
        self.assertEqual(get_component(f"{components.__file__}:train").validation_errors, [])


def test_train_runs_trainer_main_as_a_module_with_the_config_flags_and_overrides_on_every_rank():
    app = components.train("output_dir=/tmp/runs", "train.max_steps=4", config="smoke", j="2x8", resume=True)
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.num_replicas == 2
    command = role.args[-1]
    assert "--nnodes 2 --nproc_per_node 8" in command
    assert command.endswith("-m trainer.main --config smoke --resume output_dir=/tmp/runs train.max_steps=4")
    assert app.name == "smoke"


def test_train_passes_no_run_directory_flags_unless_asked_and_defaults_to_collegemsg_on_two_local_ranks():
    app = components.train()
    command = app.roles[0].args[-1]
    assert command.endswith("-m trainer.main --config collegemsg")
    assert "--nnodes 1 --nproc_per_node 2" in command
    assert app.name == "collegemsg"
    assert components.train(overwrite=True).roles[0].args[-1].endswith("--config collegemsg --overwrite")


def test_train_names_the_job_after_a_config_given_as_a_path():
    assert components.train(config="configs/smoke.yaml").name == "smoke"


def test_train_does_not_mutate_the_callers_env_and_passes_it_to_every_rank():
    env = {"OMP_NUM_THREADS": "1"}
    app = components.train(env=env, max_retries=3, image="registry/nextrec:1")
    assert env == {"OMP_NUM_THREADS": "1"}
    (role,) = app.roles
    assert role.env["OMP_NUM_THREADS"] == "1" and role.max_retries == 3 and role.image == "registry/nextrec:1"

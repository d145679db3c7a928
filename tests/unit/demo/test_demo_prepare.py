"""The demo's profiles, reward spec and the configs it writes for each role."""

from __future__ import annotations

from pathlib import Path

from coderepair.coordinator.config import load_config as load_coordinator_config
from coderepair.demo.prepare import DEMO_REWARD, DemoPlan, _write_configs, profile_for
from coderepair.protocol.identity import Identity
from coderepair.protocol.reward import RewardSpec
from coderepair.protocol.task import TaskSet, write_taskset
from coderepair.trainer.config import load_run_config
from coderepair.worker.models import build_tiny_model


def test_demo_reward_is_a_valid_spec_with_dense_credit_below_a_pass() -> None:
    spec = RewardSpec.model_validate(DEMO_REWARD)
    assert spec.shaping_total > 0
    assert spec.fail_reward + spec.shaping_total <= spec.pass_reward


def test_tiny_profile_is_small_and_the_real_one_uses_its_budget() -> None:
    tiny, real = profile_for(True), profile_for(False)
    assert tiny.max_steps <= 5 and tiny.group_size >= 2
    assert real.max_steps > 100  # the time budget ends the real demo, not a step count
    assert len(real.problems) > len(tiny.problems)
    # A pretrained model warm-starts on other problems than it is rewarded on; the tiny
    # random one can only learn the patches of its RL tasks.
    assert real.warm_tasks > 0 and tiny.warm_tasks == 0
    assert tiny.train_tasks + tiny.heldout_tasks <= len(tiny.problems) * tiny.max_per_problem


def test_written_configs_load_with_each_roles_own_loader(tmp_path: Path) -> None:
    from coderepair.coordinator.tasks.repo import load_fixtures

    model = build_tiny_model(tmp_path / "model")
    tasks = tmp_path / "tasks.jsonl"
    write_taskset(TaskSet.from_tasks(load_fixtures(), builder_version="t", split_rule="t"), tasks)
    key = tmp_path / "keys" / "trainer.pem"
    trainer = Identity.load_or_create(key)
    run = tmp_path / "run"
    plan = DemoPlan(
        workdir=tmp_path,
        profile=profile_for(True),
        tasks_path=tasks,
        base_model=model,
        start_model=model,
        coordinator_toml=run / "coordinator.toml",
        trainer_toml=run / "trainer.toml",
        trainer_dir=run / "trainer",
        grpc_address="127.0.0.1:50999",
        dashboard_url="http://127.0.0.1:50998/",
        db_path=run / "coordinator.db",
        sandbox="bubblewrap",
        facts={},
    )
    _write_configs(plan, trainer.public_key_hex, key, 50998)

    coordinator = load_coordinator_config(plan.coordinator_toml, {})
    (demo_run,) = coordinator.runs
    assert demo_run.trainer_public_key == trainer.public_key_hex
    assert demo_run.group_size == plan.profile.group_size
    assert str(coordinator.server.listen) == plan.grpc_address
    assert coordinator.dashboard.port == 50998
    cfg = load_run_config(plan.trainer_toml)
    assert cfg.coordinator is not None and cfg.coordinator.address == plan.grpc_address
    assert cfg.group_size == demo_run.group_size and cfg.max_steps == plan.profile.max_steps
    assert cfg.key_file == key and cfg.output_dir == plan.trainer_dir

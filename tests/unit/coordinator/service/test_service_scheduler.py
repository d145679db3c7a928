"""The task pool's bookkeeping (`service.scheduler.TaskPool`): which tasks are held."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coderepair.coordinator.service.scheduler import PooledTask, TaskPool


def _pool(n: int) -> TaskPool:
    tasks = [PooledTask(f"t{i}", f"prompt {i}", (1, 2, i), b"{}") for i in range(n)]
    return TaskPool(tasks, chat_template_sha256="c" * 64, seed=1)


def test_a_lease_holds_its_tasks_until_given_back() -> None:
    pool = _pool(3)
    first = pool.reserve(2)
    assert first is not None
    pool.bind(first, "L1")
    second = pool.reserve(5)
    assert second is not None and len(second.tasks) == 1  # only one task was free
    pool.bind(second, "L2")
    assert pool.reserve(1) is None
    assert pool.leases() == {
        "L1": tuple(t.task_id for t in first.tasks),
        "L2": (second.tasks[0].task_id,),
    }
    pool.give_back("L1")
    pool.give_back("L1")  # giving back twice, or an unknown lease, frees nothing more
    pool.give_back("nope")
    assert pool.leases() == {"L2": (second.tasks[0].task_id,)}
    assert pool.held_count() == 1 and pool.free_count() == 2


def test_resync_takes_the_database_s_leases_and_keeps_newer_binds() -> None:
    pool = _pool(4)
    old = pool.reserve(1)
    assert old is not None
    pool.bind(old, "gone")
    generation = pool.generation()
    fresh = pool.reserve(1)
    assert fresh is not None
    pool.bind(fresh, "new")  # bound after the snapshot below was read
    # The snapshot: "gone" was closed elsewhere, "other" is another replica's lease.
    pool.resync({"other": ["t3"]}, generation)
    assert pool.leases() == {"other": ("t3",), "new": (fresh.tasks[0].task_id,)}
    pool.give_back("other")
    assert pool.leases() == {"new": (fresh.tasks[0].task_id,)}


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("lease"), st.integers(1, 4)),
        st.tuples(st.just("cancel"), st.integers(1, 4)),
        st.tuples(st.just("give_back"), st.integers(0, 12)),
        st.tuples(st.just("resync"), st.integers(0, 12)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_the_pool_agrees_with_a_model_of_open_leases(ops: list[tuple[str, int]]) -> None:
    """Whatever the order of leases, cancels, give-backs and resyncs: no task is in two
    open leases, `leases()` names exactly the held tasks, and the counts add up."""
    pool = _pool(8)
    model: dict[str, tuple[str, ...]] = {}
    names = 0
    for op, arg in ops:
        if op == "lease":
            reservation = pool.reserve(arg)
            if reservation is None:
                assert pool.free_count() == 0
                continue
            ids = tuple(t.task_id for t in reservation.tasks)
            assert len(set(ids)) == len(ids)
            assert not set(ids) & {t for held in model.values() for t in held}
            names += 1
            pool.bind(reservation, f"L{names}")
            model[f"L{names}"] = ids
        elif op == "cancel":
            reservation = pool.reserve(arg)
            if reservation is not None:
                pool.cancel(reservation)
        elif op == "give_back":
            pool.give_back(f"L{arg}")
            model.pop(f"L{arg}", None)
        else:  # the database drops the lease with this number, as another replica did
            model.pop(f"L{arg}", None)
            pool.resync(dict(model), pool.generation())
        assert pool.leases() == model
        held = [t for ids in model.values() for t in ids]
        assert len(held) == len(set(held))
        assert pool.held_count() == len(held)
        assert pool.free_count() == 8 - len(held)

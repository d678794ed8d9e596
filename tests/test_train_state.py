"""A run's resumable position: checkpoint client state both ways, and the remap to another layout."""

from __future__ import annotations

import itertools

import pytest

from offline_kd.train.state import Layout, TrainState, remap_for_layout, resume_state, schedule_change

SCHED = {"type": "WarmupDecayLR", "params": {"total_num_steps": 24, "warmup_num_steps": 2}}


def test_client_state_round_trip():
    state = TrainState(step=9, epoch=1, micro_pos=6, layout=Layout(2, 4, 2), scheduler=SCHED)
    client = state.to_client_state(epoch_micro_batches=24, metrics={"loss": 1.5})
    assert client == {
        "step": 9, "epoch": 1, "micro_pos": 6, "metrics": {"loss": 1.5}, "scheduler": SCHED, "layout": [2, 4, 2],
    }  # fmt: skip
    assert TrainState.from_client_state(client) == state


def test_a_finished_epoch_is_saved_as_the_start_of_the_next():
    state = TrainState(step=12, epoch=0, micro_pos=24, layout=Layout(1, 4, 2))
    client = state.to_client_state(epoch_micro_batches=24, metrics={})
    assert (client["epoch"], client["micro_pos"]) == (1, 0)
    assert (state.epoch, state.micro_pos) == (0, 24)  # saving does not move the run


def test_checkpoints_of_earlier_versions_load():
    # the client dict that training wrote before TrainState existed (same keys), and one without layout
    old = {"step": 6, "epoch": 0, "micro_pos": 12, "metrics": {"step": 6, "loss": 2.0}, "scheduler": SCHED,
           "layout": [1, 4, 2]}  # fmt: skip
    assert TrainState.from_client_state(old) == TrainState(6, 0, 12, Layout(1, 4, 2), SCHED)
    older = {"step": 6, "epoch": 0, "micro_pos": 12}
    state, warnings = resume_state(older, Layout(1, 4, 2), SCHED)
    assert state == TrainState(6, 0, 12, Layout(1, 4, 2), SCHED) and warnings == []


def test_same_layout_is_an_exact_continuation():
    state = TrainState(step=9, epoch=1, micro_pos=6, layout=Layout(2, 4, 2))
    moved, warning = remap_for_layout(state, Layout(2, 4, 2))
    assert moved == state and warning is None


def test_another_rank_count_continues_after_the_same_sequences():
    state = TrainState(step=4, epoch=1, micro_pos=8, layout=Layout(1, 4, 2), scheduler=SCHED)
    moved, warning = remap_for_layout(state, Layout(2, 2, 2))
    # 8 micro-batches × 1 rank × 4 = 32 sequences = 8 micro-batches × 2 ranks × 2
    assert moved == TrainState(step=4, epoch=1, micro_pos=8, layout=Layout(2, 2, 2), scheduler=SCHED)
    assert warning == (
        "checkpoint made with (ranks, micro, accumulation) = (1, 4, 2), now (2, 2, 2): continuing epoch 1 "
        "after ~32 sequences; the data order is not an exact continuation"
    )
    assert state.layout == Layout(1, 4, 2)  # the input is not modified


def test_a_partial_optimizer_step_is_rounded_down():
    state = TrainState(step=3, epoch=0, micro_pos=6, layout=Layout(1, 4, 2))
    moved, _ = remap_for_layout(state, Layout(2, 4, 2))  # 24 sequences = 3 micro-batches of 2×4
    assert moved.micro_pos == 2


@pytest.mark.parametrize(
    "saved, new",
    list(itertools.permutations([Layout(1, 4, 2), Layout(2, 2, 2), Layout(4, 3, 1), Layout(3, 8, 4)], 2)),
)
def test_remap_never_skips_data_and_starts_on_a_step_boundary(saved, new):
    for micro_pos in range(0, 40, saved.accumulation):
        moved, warning = remap_for_layout(TrainState(micro_pos=micro_pos, layout=saved), new)
        consumed = micro_pos * saved.ranks * saved.micro
        resumed_at = moved.micro_pos * new.ranks * new.micro
        assert moved.micro_pos % new.accumulation == 0
        assert consumed - new.ranks * new.micro * new.accumulation < resumed_at <= consumed
        assert warning is not None


def test_schedule_change_is_warned_about():
    other = {"type": "WarmupDecayLR", "params": {"total_num_steps": 9, "warmup_num_steps": 1}}
    assert schedule_change(None, SCHED) is None and schedule_change(SCHED, SCHED) is None
    assert schedule_change(SCHED, other) == (
        f"resuming with a different LR schedule than the checkpoint's: {other} (was {SCHED}); "
        "pass the same --schedule-steps/--max-steps to continue the original schedule"
    )
    client = TrainState(9, 0, 6, Layout(1, 4, 2), SCHED).to_client_state(24, {})
    state, warnings = resume_state(client, Layout(2, 2, 2), other)
    assert state.scheduler == other and state.layout == Layout(2, 2, 2) and state.micro_pos == 6
    assert [w.split(":")[0] for w in warnings] == [
        "resuming with a different LR schedule than the checkpoint's",
        "checkpoint made with (ranks, micro, accumulation) = (1, 4, 2), now (2, 2, 2)",
    ]


def test_next_epoch():
    state = TrainState(step=12, epoch=0, micro_pos=24)
    state.next_epoch()
    assert (state.step, state.epoch, state.micro_pos) == (12, 1, 0)

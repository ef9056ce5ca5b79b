"""The push and pull plans (job/syncplan.py) and checkpoint units (job/units.py), without a bucket."""

from __future__ import annotations

import os
from pathlib import Path

from job import units
from job.syncplan import LocalState, plan_pull, plan_push

CKPT = "checkpoints/pretext/ckpt"


def _index(latest: int, *named: int) -> str:
    lines = [f'model_checkpoint_path: "ckpt-{latest}"']
    lines += [f'all_model_checkpoint_paths: "ckpt-{n}"' for n in (*named, latest)]
    return "\n".join(lines) + "\nall_model_checkpoint_timestamps: 1.7e9\n"


def _unit(step: int, best: bool = True) -> list[str]:
    names = [f"ckpt-{step}.index", f"ckpt-{step}.data-00000-of-00001", f"ckpt-{step}.history.json"]
    return [f"{CKPT}/{name}" for name in names + ([f"ckpt-{step}.best.weights.h5"] if best else [])]


def test_parse_index_and_unit_membership() -> None:
    index = units.parse_index('model_checkpoint_path: "/abs/dir/ckpt-6"\nall_model_checkpoint_paths: "ckpt-4"\n')
    assert index.latest == "ckpt-6" and index.named == ("ckpt-4", "ckpt-6")
    assert units.unit_of("ckpt-6.best.weights.h5") == "ckpt-6" and units.unit_of("ckpt-6.index") == "ckpt-6"
    assert units.unit_of("checkpoint") is None and units.unit_of(".tmp-ab12cd34-ckpt-6.history.json") is None
    assert units.unit_of("events.out.tfevents.1700000000.host.1.v2") is None
    two_shards = {"ckpt-6.index", "ckpt-6.data-00000-of-00002", "ckpt-6.data-00001-of-00002"}
    assert units.is_complete("ckpt-6", two_shards)
    assert not units.is_complete("ckpt-6", two_shards - {"ckpt-6.data-00001-of-00002"})
    assert not units.is_complete("ckpt-6", two_shards - {"ckpt-6.index"})


def test_an_epoch_ending_mid_push_never_publishes_a_checkpoint_with_older_companions() -> None:
    """The push read the index while it named ckpt-4; epoch 3 then ended and wrote ckpt-6 and its companions.
    Before: history.json and best.weights.h5 one folder up were plain files (epoch 2's went up while the index
    said ckpt-4 of epoch 2... or the other way round) and nothing tied them to a checkpoint."""
    local = {*_unit(2), *_unit(4), *_unit(6), f"{CKPT}/checkpoint", "logs/pretext/events"}
    plan = plan_push(changed=local, local=local, remote=set(), indexes={f"{CKPT}/checkpoint": _index(4, 2)})
    (unit,) = plan.units
    assert unit.held_back is None and unit.latest == "ckpt-4"
    # Every file of the checkpoints the index names goes up before it, companions included...
    assert set(unit.uploads) == {*_unit(2), *_unit(4)}
    # ...and the newer checkpoint waits for the index that names it.
    assert set(plan.waiting) == set(_unit(6)) and plan.data == ["logs/pretext/events"]


def test_a_latest_checkpoint_missing_a_file_is_not_published() -> None:
    local = {*_unit(4)} - {f"{CKPT}/ckpt-4.data-00000-of-00001"}
    plan = plan_push(changed=local, local=local, remote=set(), indexes={f"{CKPT}/checkpoint": _index(4)})
    (unit,) = plan.units
    assert unit.held_back and unit.uploads == [] and unit.deletes == []


def test_checkpoints_the_index_dropped_are_deleted_in_the_bucket() -> None:
    """Before: every checkpoint ever written stayed in the bucket (and every resume downloaded them all)."""
    remote = {*_unit(2), *_unit(4), f"{CKPT}/checkpoint", "model/backbone.keras"}
    local = {*_unit(4), *_unit(6)}
    plan = plan_push(changed=set(_unit(6)), local=local, remote=remote, indexes={f"{CKPT}/checkpoint": _index(6, 4)})
    (unit,) = plan.units
    assert set(unit.uploads) == set(_unit(6)) and set(unit.deletes) == set(_unit(2))


def test_completion_markers_go_last() -> None:
    changed = {"checkpoints/pretext/done.json", "model/backbone.keras"}
    plan = plan_push(changed=changed, local=changed, remote=set(), indexes={})
    assert plan.data == ["model/backbone.keras"] and plan.completions == ["checkpoints/pretext/done.json"]


def _states(**by_state: set[str]) -> dict[str, LocalState]:
    return {rel: LocalState[name.upper()] for name, rels in by_state.items() for rel in rels}


def test_a_resume_pulls_only_the_latest_checkpoint() -> None:
    """Before: pull() downloaded every object under the prefix, every checkpoint ever written."""
    states = _states(missing={*_unit(4), *_unit(6), f"{CKPT}/checkpoint", "config.json"})
    plan = plan_pull(states, remote_indexes={f"{CKPT}/checkpoint": _index(6, 4)}, local_indexes={})
    assert set(plan.downloads) == {*_unit(6), "config.json"} and plan.markers == [f"{CKPT}/checkpoint"]
    assert set(plan.skipped) == set(_unit(4))


def test_the_bucket_unit_decides_not_file_times() -> None:
    """A local checkpoint file that differs from the published unit is replaced; local checkpoints the
    adopted index does not name are removed."""
    states = _states(
        same={f"{CKPT}/checkpoint", *_unit(6)[1:]},
        other={_unit(6)[0]},  # e.g. a torn or stale ckpt-6.index, whatever its mtime
        unpublished={*_unit(8)},  # written here after the index the bucket has (killed before its index)
    )
    plan = plan_pull(states, remote_indexes={f"{CKPT}/checkpoint": _index(6)}, local_indexes={})
    assert plan.downloads == [_unit(6)[0]] and plan.markers == []
    assert set(plan.removes) == set(_unit(8))


def test_this_mirrors_newer_whole_checkpoint_is_kept() -> None:
    """A same-VM rerun after a failed final push keeps the newer local checkpoint (its index changed here,
    the bucket's is the one this mirror saw); the push then publishes it."""
    states = _states(ours={f"{CKPT}/checkpoint"}, same={*_unit(6)}, unpublished={*_unit(8)})
    remote_indexes = {f"{CKPT}/checkpoint": _index(6)}
    plan = plan_pull(states, remote_indexes, local_indexes={f"{CKPT}/checkpoint": _index(8, 6)})
    assert plan.kept == [f"{CKPT}/checkpoint"] and plan.downloads == [] and plan.removes == []
    # Its latest checkpoint incomplete: the bucket's unit is adopted instead.
    incomplete = {**states}
    del incomplete[_unit(8)[1]]
    plan = plan_pull(incomplete, remote_indexes, local_indexes={f"{CKPT}/checkpoint": _index(8, 6)})
    assert plan.markers == [f"{CKPT}/checkpoint"] and set(plan.removes) == set(_unit(8)) - {_unit(8)[1]}


def test_files_deleted_in_the_bucket_leave_the_mirror() -> None:
    """A --force elsewhere cleared the stage in the bucket: this mirror's old done.json must not come back."""
    states = _states(gone={"checkpoints/pretext/done.json"}, unpublished={"report/report.md"},
                     ours={"model/backbone.keras"})
    plan = plan_pull(states, remote_indexes={}, local_indexes={})
    assert plan.removes == ["checkpoints/pretext/done.json"] and plan.kept == ["model/backbone.keras"]


def test_companions_stamped_adopted_and_swept(tmp_path: Path) -> None:
    best = tmp_path / "best.weights.h5"
    best.write_bytes(b"epoch 1")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    units.stamp(ckpt / "ckpt-2", [{"epoch": 1}], best)
    best.with_name("new").write_bytes(b"epoch 2")
    os.replace(best.with_name("new"), best)  # how atomic_path replaces the best weights on improvement
    units.stamp(ckpt / "ckpt-4", [{"epoch": 1}, {"epoch": 2}], best)
    first = units.companions(ckpt / "ckpt-2")
    assert first is not None and first.history == [{"epoch": 1}]
    assert first.best_weights is not None and first.best_weights.read_bytes() == b"epoch 1"  # the link kept it
    units.adopt_best_weights(first, best)
    assert best.read_bytes() == b"epoch 1"
    units.stamp(ckpt / "ckpt-6", [], None)
    nothing = units.companions(ckpt / "ckpt-6")
    assert nothing is not None and nothing.best_weights is None
    units.adopt_best_weights(nothing, best)
    assert not best.exists()  # no best yet at that checkpoint: none from a later epoch either
    assert units.companions(ckpt / "ckpt-9") is None  # a checkpoint from before companions
    units.sweep(ckpt, [str(ckpt / "ckpt-4"), str(ckpt / "ckpt-6")])
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ckpt-4.best.weights.h5", "ckpt-4.history.json", "ckpt-6.history.json"]

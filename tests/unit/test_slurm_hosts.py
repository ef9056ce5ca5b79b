"""The Slurm cluster in Slurm's task order: host lists, tasks per node, ports per job, the fail-fast check."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from job.errors import JobError
from job.slurm import block_layout, expand_hostlist, expand_tasks_per_node, first_port, slurm_task

BASE, COUNT = 20000, 10000


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("gpu[9-10]", ["gpu9", "gpu10"]),  # numeric order, as Slurm lays tasks out (TF's resolver sorts gpu10 first)
    ("gpu[009-011]", ["gpu009", "gpu010", "gpu011"]),
    ("cpu[01-02,7,10-11]", ["cpu01", "cpu02", "cpu7", "cpu10", "cpu11"]),  # each range keeps its own width
    ("n[001-10]", [f"n{i:03d}" for i in range(1, 11)]),
    ("gpu[9-10],cpu3,login[1-2]", ["gpu9", "gpu10", "cpu3", "login1", "login2"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a-b.example.org", ["a-b.example.org"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts
    if shutil.which("scontrol"):  # Slurm's own expansion agrees
        shown = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30)
        assert shown.stdout.split() == hosts


@pytest.mark.parametrize("text", ["gpu[9-10", "gpu[a-b]", "gpu[10-9]", "gpu]1[", ""])
def test_malformed_hostlist_is_one_error(text):
    with pytest.raises(JobError, match="Slurm node list"):
        expand_hostlist(text)


@pytest.mark.parametrize("text, counts", [
    ("1", [1]),
    ("4", [4]),
    ("2(x3)", [2, 2, 2]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("1,3(x2),2", [1, 3, 3, 2]),
])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["2(3)", "x2", "2(x)", ""])
def test_malformed_tasks_per_node_is_one_error(text):
    with pytest.raises(JobError, match="SLURM_STEP_TASKS_PER_NODE"):
        expand_tasks_per_node(text)


def test_block_layout_follows_the_node_list():
    assert block_layout(["gpu9", "gpu10"], [2, 1]) == [("gpu9", 0), ("gpu9", 1), ("gpu10", 0)]
    with pytest.raises(JobError, match="2 node"):
        block_layout(["gpu9", "gpu10"], [2])


def _env(procid: int, node: str, local: int, **extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": "3",
           "SLURM_STEP_NODELIST": "gpu[9-10]", "SLURM_STEP_TASKS_PER_NODE": "2,1",
           "SLURMD_NODENAME": node, "SLURM_LOCALID": str(local)}
    env.update(extra)
    return env


def test_every_task_builds_the_same_cluster_in_slurm_order():
    tasks = [slurm_task(_env(i, node, local), BASE, COUNT)
             for i, (node, local) in enumerate([("gpu9", 0), ("gpu9", 1), ("gpu10", 0)])]
    first = first_port(4242, 2, BASE, COUNT)
    expected = [f"gpu9:{first}", f"gpu9:{first + 1}", f"gpu10:{first}"]
    assert [t.workers for t in tasks] == [expected] * 3
    assert [(t.task_id, t.host, t.port) for t in tasks] == [(0, "gpu9", first), (1, "gpu9", first + 1),
                                                           (2, "gpu10", first)]


def test_job_step_variables_win_over_the_job_allocation():
    env = _env(0, "gpu9", 0, SLURM_JOB_NODELIST="gpu[1-20]", SLURM_TASKS_PER_NODE="1(x20)")
    assert [w.split(":")[0] for w in slurm_task(env, BASE, COUNT).workers] == ["gpu9", "gpu9", "gpu10"]


def test_a_task_elsewhere_than_its_block_position_fails_fast():
    # --distribution=cyclic puts task 1 on gpu10: its address in block order would be another task's.
    with pytest.raises(JobError, match=r"task 1 runs on gpu10 as local task 0, but .* puts it on gpu9 as local "
                                       r"task 1: .*--distribution=block"):
        slurm_task(_env(1, "gpu10", 0), BASE, COUNT)


def test_a_task_count_that_does_not_fit_the_nodes_fails_fast():
    with pytest.raises(JobError, match="does not fit"):
        slurm_task(_env(0, "gpu9", 0, SLURM_STEP_NUM_TASKS="4"), BASE, COUNT)


def test_ports_come_from_the_job_id_within_the_range():
    ports = {job: first_port(job, 4, BASE, COUNT) for job in range(1000, 1000 + COUNT // 4)}
    assert all(BASE <= p and p + 4 <= BASE + COUNT for p in ports.values())
    assert all((p - BASE) % 4 == 0 for p in ports.values())  # blocks do not overlap
    assert len(set(ports.values())) == len(ports)  # any COUNT // 4 consecutive jobs: no collision
    assert first_port(7, 2, BASE, 2) == BASE  # a range of exactly one block (the Slurm test pins its ports so)
    with pytest.raises(JobError, match="runtime.slurm_port_count = 2 is fewer than the 3 tasks"):
        first_port(7, 3, BASE, 2)

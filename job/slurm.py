"""The cluster of a multi-task Slurm job step, in Slurm's own task order (no TensorFlow here).

Slurm's default (block) distribution gives task 0 .. n0-1 to the step's first node, the next n1 tasks to
the second, and so on, in the order of the step's node list. TensorFlow's SlurmClusterResolver sorts the
host names instead (`gpu10` before `gpu9`), so a task can take another's address and the job hangs: this
module expands the node list and the tasks per node itself, keeps Slurm's order, and checks that this
task's place in it is the node and local index Slurm says it runs on.

Ports: each job takes its own block in [base, base + count) (runtime.slurm_port_base and
runtime.slurm_port_count), derived from SLURM_JOB_ID, so that two jobs sharing a node do not collide:
first = base + (job_id mod ⌊count / T⌋) · T, where T is the most tasks the step runs on one node, and
task i of a node listens on first + i.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from job.errors import JobError

RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
REPEAT_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")  # SLURM_STEP_TASKS_PER_NODE items: "2(x3)" or "1"
LAUNCH_FIX = "launch every task with `srun` inside the job, with the default --distribution=block"


@dataclass(frozen=True)
class SlurmTask:
    """This task's place in the step's cluster: every worker's address in task order, and its own index."""

    workers: list[str]  # "host:port", index = SLURM_PROCID
    task_id: int
    host: str
    port: int


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list → host names, in its order: "gpu[9-10],cpu[001-002,7]" → gpu9, gpu10,
    cpu001, cpu002, cpu007. Several bracket groups in one name give their product ("r[1-2]n[1-2]")."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        pieces = re.split(r"(\[[^\]]*\])", item)
        choices = [_expand_brackets(piece, text) if piece.startswith("[") else [piece] for piece in pieces]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    if not hosts:
        raise JobError(f"the Slurm node list {text!r} is empty: {LAUNCH_FIX}.")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        if depth not in (0, 1):
            raise JobError(f"the Slurm node list {text!r} is malformed: {LAUNCH_FIX}.")
    if depth:
        raise JobError(f"the Slurm node list {text!r} is malformed: {LAUNCH_FIX}.")
    items.append("".join(current))
    return [item for item in items if item]


def _expand_brackets(group: str, text: str) -> list[str]:
    """"[001-003,7]" → 001, 002, 003, 7 (a range keeps the width of its lower bound, as Slurm does)."""
    values = []
    for part in group[1:-1].split(","):
        match = RANGE_RE.match(part.strip())
        if not match:
            raise JobError(f"the Slurm node list {text!r} has a malformed range {part!r}: {LAUNCH_FIX}.")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise JobError(f"the Slurm node list {text!r} has a descending range {part!r}: {LAUNCH_FIX}.")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE → tasks on each node, in node-list order: "2(x3),1" → [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.strip().split(","):
        match = REPEAT_RE.match(item.strip())
        if not match:
            raise JobError(f"SLURM_STEP_TASKS_PER_NODE={text!r} is malformed: {LAUNCH_FIX}.")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def block_layout(hosts: list[str], tasks_per_node: list[int]) -> list[tuple[str, int]]:
    """(host, local index) of every task, by task id, under Slurm's block distribution."""
    if len(hosts) != len(tasks_per_node):
        raise JobError(f"the Slurm step lists {len(hosts)} node(s) but tasks for {len(tasks_per_node)}: "
                       f"{LAUNCH_FIX}.")
    return [(host, local) for host, count in zip(hosts, tasks_per_node) for local in range(count)]


def first_port(job_id: int, most_tasks_per_node: int, base: int, count: int) -> int:
    """The first port of this job's block in [base, base + count): one port per task of a node."""
    if most_tasks_per_node > count:
        raise JobError(f"runtime.slurm_port_count = {count} is fewer than the {most_tasks_per_node} tasks this job "
                       "runs on one node: raise it.")
    slots = count // most_tasks_per_node
    return base + (job_id % slots) * most_tasks_per_node


def slurm_task(env: Mapping[str, str], port_base: int, port_count: int) -> SlurmTask:
    """This task's cluster from the Slurm environment; a one-line JobError when Slurm placed this task
    elsewhere than its block position (another --distribution, or a task not started by srun)."""
    nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    per_node = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(per_node)
    layout = block_layout(expand_hostlist(nodelist), counts)
    task_id = int(env["SLURM_PROCID"])
    tasks = int(_first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    if tasks != len(layout) or not 0 <= task_id < tasks:
        raise JobError(f"Slurm task {task_id} of {tasks} does not fit nodes {nodelist} with {per_node} task(s) "
                       f"each: {LAUNCH_FIX}.")
    host, local = layout[task_id]
    node, local_id = env.get("SLURMD_NODENAME"), env.get("SLURM_LOCALID")
    if (node is not None and node != host) or (local_id is not None and int(local_id) != local):
        raise JobError(f"Slurm task {task_id} runs on {node} as local task {local_id}, but block order over "
                       f"{nodelist} ({per_node}) puts it on {host} as local task {local}: {LAUNCH_FIX}.")
    job_id = int(_first(env, "SLURM_JOB_ID", "SLURM_JOBID"))
    first = first_port(job_id, max(counts), port_base, port_count)
    workers = [f"{name}:{first + index}" for name, index in layout]
    return SlurmTask(workers=workers, task_id=task_id, host=host, port=first + local)


def _first(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    raise JobError(f"{names[0]} is not set in this Slurm task: {LAUNCH_FIX}.")

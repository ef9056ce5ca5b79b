"""The traced training function: several optimisation steps per call, metrics summed and the step counted
in-graph (`runtime.steps_per_loop`), and where a call's steps end (`loop_length`)."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from job.optim import ParamGroup, scale_loss

Batch = dict[str, tf.Tensor]
# objective(batch, training) -> (per-example loss, already weighted; {metric: (sum, count)})
Objective = Callable[[Batch, bool], tuple[tf.Tensor, dict[str, tuple[tf.Tensor, tf.Tensor]]]]


def loop_length(step: int, steps_per_loop: int, epoch_end: int, periods: tuple[int, ...]) -> int:
    """How many steps the next call runs from `step`: at most `steps_per_loop`, and it ends on the epoch's end
    or the next multiple of any of `periods` (log and checkpoint steps) if one comes first."""
    end = min(step + steps_per_loop, epoch_end, *((step // p + 1) * p for p in periods))
    return end - step


def make_train_loop(
    strategy: tf.distribute.Strategy, objective: Objective, groups: list[ParamGroup], xla: bool, looped: bool
) -> Callable:
    """The traced training function: `(iterator, steps, stop, counter) -> ({metric: (sum, count)}, stop agreed)`.

    Runs `steps` optimisation steps on batches pulled from the distributed `iterator` in one `tf.function` call,
    adds each to `counter` (the global step) in-graph, sums the metrics over replicas and steps in-graph, and
    agrees the stop flag over workers once per call. `looped`: the steps run in a `tf.range` loop and `steps` is
    a tensor, so one trace serves every length; otherwise a call runs one step (`steps` must be 1) and the
    graph holds no loop (runtime.steps_per_loop = 1, the default: the graph of one step, as before).
    """
    variables = [v for g in groups for v in g.variables]

    def replica_step(batch):
        with tf.GradientTape() as tape:
            per_example, metrics = objective(batch, True)
            loss = tf.nn.compute_average_loss(per_example)
            scaled = scale_loss(groups, loss)
        gradients = tape.gradient(scaled, variables)
        offset = 0
        for group in groups:
            count = len(group.variables)
            group.optimizer.apply_gradients(zip(gradients[offset : offset + count], group.variables))
            offset += count
        return metrics

    replica_fn = tf.function(replica_step, jit_compile=xla)

    def one_step(iterator, counter) -> dict:
        metrics = strategy.run(replica_fn, args=(next(iterator),))
        counter.assign_add(1)
        return {
            name: tuple(tf.cast(strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None), tf.float64) for t in pair)
            for name, pair in metrics.items()
        }

    def agreed(stop):
        """Every worker learns whether any worker was asked to stop, so all stop after the same step."""
        stops = strategy.run(tf.identity, args=(stop,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, stops, axis=None) > 0

    @tf.function
    def train_step(iterator, steps, stop, counter):
        del steps  # always 1
        return one_step(iterator, counter), agreed(stop)

    @tf.function
    def train_loop(iterator, steps, stop, counter):
        # One call site of the step (the model is traced and optimised once): each step's metrics, flattened,
        # go to a TensorArray summed after the loop; `structure` is set when the loop body is traced.
        structure = {}
        steps = tf.cast(steps, tf.int32)
        rows = tf.TensorArray(tf.float64, size=steps, infer_shape=False)
        for i in tf.range(steps):
            structure["metrics"] = one_step(iterator, counter)
            rows = rows.write(i, tf.stack(tf.nest.flatten(structure["metrics"])))
        totals = tf.reduce_sum(rows.stack(), axis=0)
        count = len(tf.nest.flatten(structure["metrics"]))
        return tf.nest.pack_sequence_as(structure["metrics"], tf.unstack(totals, num=count)), agreed(stop)

    return train_loop if looped else train_step

"""The fixed cost of a call: what fastequiv adds to a small batch, beyond the model.

Interatomic potentials train on small batches, a few to a few dozen structures of tens of
atoms, where the model is cheap and fastequiv's own cost per call is what a user pays. A
graph batch of ``graphs`` structures of ``atoms`` atoms (positions, a species index, the
batch index and ``num_graphs``) goes through a trivial model (``forces = pos @ W``, the
energy their per-graph sum: a few microseconds on the stacked batch), K = 8, one torch
thread, and every variant runs interleaved in each round, so the differences come from the
same conditions:

* the floors: ``model`` alone on the ``K * B`` stacked graphs (no grad), and ``model
  step`` (forward and backward of a plain loss of its outputs);
* ``equivariance_error``, ``twirl_loss`` forward + backward, and the
  :class:`~fastequiv.EquivarianceMonitor` call (``every=1``, no grad), each through the hot
  path (:class:`fastequiv.stacking.CallPlan`) and through the steps it replaces (the
  reference path: ``stack``, ``twirl_reduce``, the torch estimators), with ``reference`` in
  their name;
* ``equivariance_error design`` and ``twirl_loss design``: the same calls with a rotation
  design of as many copies (``rotations="design:1"``, 4 rotations, ``replicates=2``), through
  the hot path (:mod:`fastequiv.design_twirl`) and the general design path (``reference``).

For each: the median time of a call, its cost beyond the floor (``twirl_loss`` against
the model step, the others against the model; the median over rounds of the difference in
the same round, with quartiles), and the torch ops a call issues outside the model, counted
with ``torch.profiler``: the top-level ops of the forward (the dispatcher calls Python
makes; each is a kernel launch or an allocation on a GPU) plus, for ``twirl_loss``, the
autograd nodes between the loss and the model's outputs.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

import fastequiv as fe
from fastequiv import design_twirl, twirl

__all__ = ["SIZES", "K", "DESIGN", "fixed_cost"]

K = 8
#: the design calls' rotations: design:1 (4 rotations) turned twice, K copies
DESIGN = {"rotations": "design:1", "replicates": 2}
#: (graphs, atoms) per device type and mode
SIZES = {
    "cpu": {"smoke": [(2, 5)], "quick": [(4, 20), (32, 30), (256, 30)], "full": [(4, 20), (32, 30), (256, 30)]},
    "cuda": {"smoke": [(2, 5)], "quick": [(4, 20), (32, 30), (256, 30)], "full": [(4, 20), (32, 30), (256, 30)]},
}
ROUNDS = {"smoke": 1, "quick": 15, "full": 31}
CALL_TIME = {"smoke": 0.0, "quick": 0.01, "full": 0.02}  # seconds of calls timed per variant and round
MODEL_SCOPE = "fixed-cost model"


class _Batch:
    """The graph batch, its target, the model and the calls of one size."""

    def __init__(self, graphs: int, atoms: int, device):
        g = torch.Generator().manual_seed(0)
        N = graphs * atoms
        self.inputs = {"pos": torch.randn(N, 3, generator=g).to(device),
                       "z": torch.randint(1, 5, (N,), generator=g).to(device),
                       "batch": torch.arange(graphs).repeat_interleave(atoms).to(device), "num_graphs": graphs}
        self.target = {"energy": torch.randn(graphs, generator=g).to(device),
                       "forces": torch.randn(N, 3, generator=g).to(device)}
        self.stacked = {"pos": self.inputs["pos"].repeat(K, 1), "z": self.inputs["z"].repeat(K),
                        "batch": self.inputs["batch"].repeat(K), "num_graphs": K * graphs}
        self.W = torch.randn(3, 3, generator=g).to(device).requires_grad_()
        self.scope = False  # the model marks its ops for the profiler
        self.spec = fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch", "num_graphs": "num_graphs"},
                            output={"energy": "scalar", "forces": "vector"})
        self.monitor = fe.EquivarianceMonitor(self.model, spec=self.spec, every=1, samples=K)

    def model(self, pos, z, batch, num_graphs):
        with torch.profiler.record_function(MODEL_SCOPE) if self.scope else contextlib.nullcontext():
            f = pos @ self.W
            return {"energy": torch.zeros(num_graphs, dtype=f.dtype, device=f.device).index_add_(0, batch, f[:, 0]),
                    "forces": f}

    def floor(self):
        with torch.no_grad():
            return self.model(**self.stacked)

    def floor_step(self):
        out = self.model(**self.stacked)
        loss = out["energy"].sum() + out["forces"].sum()
        loss.backward()
        return loss

    def equivariance_error(self):
        return fe.equivariance_error(self.model, self.inputs, self.target, spec=self.spec, samples=K, seed=1)

    def twirl_loss_forward(self):
        return fe.twirl_loss(self.model, self.inputs, self.target, spec=self.spec, samples=K, seed=1)[0]

    def twirl_loss(self):
        loss = self.twirl_loss_forward()
        loss.backward()
        return loss

    def equivariance_error_design(self):
        return fe.equivariance_error(self.model, self.inputs, self.target, spec=self.spec, seed=1, **DESIGN)

    def twirl_loss_design_forward(self):
        return fe.twirl_loss(self.model, self.inputs, self.target, spec=self.spec, seed=1, **DESIGN)[0]

    def twirl_loss_design(self):
        loss = self.twirl_loss_design_forward()
        loss.backward()
        return loss

    def monitored(self):
        return self.monitor(0, self.inputs, self.target)


@contextlib.contextmanager
def _through_the_steps(on: bool):
    """The reference path: no call is planned (i.i.d. or with a design)."""
    if not on:
        yield
        return
    planned = twirl.call_plan, design_twirl.call_plan
    twirl.call_plan = design_twirl.call_plan = lambda *args, **kwargs: None
    try:
        yield
    finally:
        twirl.call_plan, design_twirl.call_plan = planned


def _backward_nodes(loss: torch.Tensor, outputs: list) -> int:
    """Autograd nodes between ``loss`` and the model's ``outputs`` (theirs excluded)."""
    stop = {o.grad_fn for o in outputs if o.grad_fn is not None}
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return sum(type(n).__name__ != "AccumulateGrad" for n in seen)


def _count_ops(batch: _Batch, name: str, fn, reference: bool) -> dict:
    """Torch ops of one call outside the model (see module docs)."""
    from torch.profiler import ProfilerActivity, profile

    training = name.startswith("twirl_loss")
    forward = {"twirl_loss": batch.twirl_loss_forward, "twirl_loss design": batch.twirl_loss_design_forward}.get(name, fn)
    with _through_the_steps(reference):
        forward()  # the call that plans, outside the profile
        batch.scope = True
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                result = forward()
        finally:
            batch.scope = False
        events = prof.events()
        scopes = [e.time_range for e in events if e.name == MODEL_SCOPE]

        def in_model(e):
            return any(s.start <= e.time_range.start and e.time_range.end <= s.end for s in scopes)

        ops = [e.name for e in events if e.cpu_parent is None and e.name != MODEL_SCOPE and not in_model(e)]
        counts = {"ops_forward": len(ops), "ops": ops}
        if training:
            outputs = []
            batch.model = _recording(batch.model, outputs)
            try:
                loss = forward()
            finally:
                del batch.model  # the class's method again
            counts["ops_backward"] = _backward_nodes(loss, [t for out in outputs for t in out.values()])
            loss.backward()
        del result
    return counts


def _recording(model, outputs: list):
    def call(**kwargs):
        out = model(**kwargs)
        outputs.append(out)
        return out

    return call


def _time_calls(fn, sync, seconds: float) -> float:
    """Seconds a call, over enough calls to fill ``seconds`` (one call in smoke mode)."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n


def fixed_cost(mode: str = "quick", device=None, *, rounds: int | None = None, threads: int = 1, log=None) -> dict:
    """Time every variant of :data:`SIZES` (see module docs); ``threads`` torch threads."""
    from .timing import synchronizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rounds = rounds or ROUNDS[mode]
    seconds = CALL_TIME[mode]
    sync = synchronizer(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    result = {"mode": mode, "device": str(device), "K": K, "threads": threads, "rounds": rounds, "sizes": []}
    try:
        for graphs, atoms in SIZES[device.type][mode]:
            batch = _Batch(graphs, atoms, device)
            calls = {"equivariance_error": batch.equivariance_error, "twirl_loss": batch.twirl_loss,
                     "monitor": batch.monitored, "equivariance_error design": batch.equivariance_error_design,
                     "twirl_loss design": batch.twirl_loss_design}
            variants = {"model": (batch.floor, False), "model step": (batch.floor_step, False)}
            for name, fn in calls.items():
                variants[name] = (fn, False)
                variants[f"{name} (reference)"] = (fn, True)
            for fn, reference in variants.values():  # warm up: plans, allocator, caches
                with _through_the_steps(reference):
                    for _ in range(1 if mode == "smoke" else 20):
                        fn()
            times = {name: [] for name in variants}
            for r in range(rounds):
                for name, (fn, reference) in variants.items():
                    with _through_the_steps(reference):
                        times[name].append(_time_calls(fn, sync, seconds))
            size = {"graphs": graphs, "atoms": atoms, "rows": K * graphs * atoms, "variants": {}}
            for name, (fn, reference) in variants.items():
                floor = "model step" if name.startswith("twirl_loss") else "model"
                beyond = sorted(t - f for t, f in zip(times[name], times[floor]))
                v = {"median_ms": 1e3 * statistics.median(times[name])}
                if name not in ("model", "model step"):
                    quartile = lambda q: 1e3 * beyond[min(len(beyond) - 1, round(q * (len(beyond) - 1)))]  # noqa: E731
                    v.update(beyond_ms=1e3 * statistics.median(beyond), beyond_q1=quartile(0.25),
                             beyond_q3=quartile(0.75), floor=floor,
                             **_count_ops(batch, name.split(" (")[0], fn, reference))
                size["variants"][name] = v
            result["sizes"].append(size)
            if log:
                log(f"  {graphs} graphs x {atoms} atoms: " + ", ".join(
                    f"{k} {v.get('beyond_ms', v['median_ms']):.3f} ms" for k, v in size["variants"].items()))
    finally:
        torch.set_num_threads(before)
    return result

"""``fastequiv demo``: how much of a plain transformer's held-out loss is equivariance error.

A small point-cloud transformer (plain torch: per-atom embedding of centred coordinates
and species, a few self-attention layers whose attention logits get a learned bias from
the pair distances, a per-atom force head; nothing equivariant) learns the forces of small
atom clusters under a Morse pair potential with a smooth cutoff, with random-rotation
augmentation. The clusters (5 to 8 atoms of two species) and their exact forces (autograd
of the analytic energy) are generated, so nothing is downloaded; ``--data FILE`` trains on
your own structures with forces instead (any file ``ase.io.read`` takes).

The protocol is the usual one for a force field: a fixed, finite training set
(``--train-size``, default 500 structures), reshuffled every epoch, each structure seen
under a fresh random rotation every time it is drawn; a fixed held-out set
(``--held-out``, default 2048 structures, the same for every ``--seed``); AdamW with a
short warmup and a cosine decay of the learning rate to 0; and the evaluated model is an
exponential moving average (EMA) of the weights (``--ema-decay``, default 0.999, with the
usual warmup of the decay; ``--no-ema`` evaluates the raw weights). ``--train-size 0``
draws fresh structures every step instead (infinite data).

Every training step the loss is :func:`fastequiv.twirl_loss` with K=2 stacked rotated
copies, whose decomposition ``L_total = L_mean + L_equiv`` comes with no extra forward
pass. Every ``--eval-every`` steps (and at a few early steps) the evaluated model is
decomposed with :func:`fastequiv.equivariance_error`, K=8 and fixed rotations, on the
held-out set and on a fixed subset of the training set (``--train-eval``, default 512
structures). At the end the raw weights are decomposed too, and the demo writes
``log.csv`` (every logged value) and ``decomposition.png`` into ``--out``.

``L_mean`` is the error of the rotation-averaged (twirled) model; ``L_equiv`` is how much
the prediction changes with the orientation of the input. The log separates what moves
``pct = L_equiv / L_total``: held-out ``L_mean`` carries the generalisation gap of a model
fit to a finite training set (a heavy-tailed one: a few held-out structures hold much of
it) while ``L_equiv`` is about the same on held-out and training structures, so pct is
lower on held-out data; and ``L_equiv`` falls as training goes on and the learning rate
decays, with the EMA carrying much less of it than the raw weights while the learning rate
is high. The README quotes runs with the defaults.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import time
from typing import NamedTuple, Optional

import torch
from torch import nn

import fastequiv as fe

__all__ = ["ForceTask", "PointTransformer", "Datasets", "datasets", "load_structures", "run", "add_arguments",
           "main"]

SPECIES = 2
# Morse parameters per species pair (AA, AB, BB): well depth, width, equilibrium distance.
_DEPTH = torch.tensor([[1.0, 0.8], [0.8, 0.6]])
_WIDTH = torch.tensor([[1.0, 0.9], [0.9, 0.8]])
_R0 = torch.tensor([[1.0, 1.15], [1.15, 1.3]])
_CUTOFF = 3.0
# the radial features of the model on --data structures (Angstrom)
_DATA_CUTOFF = 6.0
# the held-out set and the rotations of every evaluation do not depend on --seed
_HELDOUT_SEED = 10_000
_EVAL_ROTATIONS_SEED = 7
# what --diagnostics logs (fastequiv.diagnostics.log_dynamics)
DYNAMICS = ("cos", "norm_mean", "norm_equiv", "top_eig_mean", "top_eig_equiv")
_EVAL_SAMPLES = 8


def morse_energy(pos: torch.Tensor, species: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Energy ``(B,)`` of clusters ``pos`` ``(B, N, 3)`` under a Morse pair potential.

    ``V(r) = D ((1 - exp(-a (r - r0)))^2 - 1) fc(r)`` with species-pair parameters and the
    smooth cutoff ``fc(r) = (1 + cos(pi r / rc)) / 2`` for ``r < rc`` (0 beyond), so energy
    and forces are continuous. Padded atoms (``mask`` False) take no part.
    """
    N = pos.shape[1]
    rel = pos[:, :, None] - pos[:, None, :]
    eye = torch.eye(N, dtype=torch.bool, device=pos.device)
    pair = mask[:, :, None] & mask[:, None, :] & ~eye
    # sqrt has an infinite derivative at 0: keep excluded pairs (diagonal, padding) away from it
    r = torch.sqrt((rel ** 2).sum(-1) + (~pair).to(pos.dtype))
    si, sj = species[:, :, None], species[:, None, :]
    D, a, r0 = (p.to(pos)[si, sj] for p in (_DEPTH, _WIDTH, _R0))
    fc = torch.where(r < _CUTOFF, 0.5 * (1 + torch.cos(math.pi * r / _CUTOFF)), torch.zeros_like(r))
    v = D * ((1 - torch.exp(-a * (r - r0))) ** 2 - 1) * fc
    return 0.5 * (v * pair).sum(dim=(1, 2))


class ForceTask:
    """Random clusters of ``atoms`` (a range) atoms and their exact Morse forces.

    Positions are Gaussian with a spread that keeps the density of a cluster about
    constant; forces are ``-dE/dpos`` by autograd, divided by one fixed scale so that their
    mean square is about 1 (losses are then in units of the force variance).
    """

    def __init__(self, atoms: tuple[int, int] = (5, 8), device="cpu", dtype=torch.float32):
        self.atoms, self.device, self.dtype = atoms, torch.device(device), dtype
        g = torch.Generator().manual_seed(12345)
        _, _, mask, f = self._draw(1024, g, scale=1.0)
        self.scale = float((f.pow(2).sum(-1).sum() / mask.sum() / 3).sqrt())

    def _draw(self, B: int, generator: torch.Generator, scale: float):
        lo, hi = self.atoms
        n = torch.randint(lo, hi + 1, (B,), generator=generator)
        mask = torch.arange(hi)[None, :] < n[:, None]
        species = torch.randint(0, SPECIES, (B, hi), generator=generator) * mask
        spread = 0.55 * n.to(torch.float64).pow(1 / 3)[:, None, None]
        pos = (torch.randn(B, hi, 3, generator=generator, dtype=torch.float64) * spread) * mask[..., None]
        pos.requires_grad_(True)
        energy = morse_energy(pos, species, mask)
        (grad,) = torch.autograd.grad(energy.sum(), pos)
        forces = -grad / scale
        cast = dict(device=self.device, dtype=self.dtype)
        return pos.detach().to(**cast), species.to(self.device), mask.to(self.device), forces.to(**cast)

    def batch(self, B: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
        """``({"pos", "species", "mask"}, forces)`` for ``B`` fresh clusters, padded to the largest size."""
        pos, species, mask, forces = self._draw(B, generator, self.scale)
        return {"pos": pos, "species": species, "mask": mask}, forces


class _Block(nn.Module):
    """One pre-norm transformer layer: multi-head self-attention with an additive bias on
    the attention logits, then a GELU MLP, each in a residual branch."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, N, W = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        h = h + self.proj(a.transpose(1, 2).reshape(B, N, W))
        return h + self.mlp(self.norm2(h))


class PointTransformer(nn.Module):
    """A plain transformer on atoms: nothing in it knows about rotations.

    Each atom is embedded from its coordinates relative to the cluster's centroid (a linear
    map of the raw x, y, z) plus a learned species embedding; pre-norm self-attention layers
    mix the atoms, with a learned bias on the attention logits from Gaussian features of the
    pair distances (one per head and layer; padded atoms are masked out); a linear head
    reads a 3D force per atom. The distances only steer which atoms attend to which: every
    vector the model reads or writes goes through unconstrained linear maps and
    nonlinearities, so a rotated input is not a rotated output unless training makes it so.
    """

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 3, species: int = SPECIES,
                 radial: int = 16, cutoff: float = _CUTOFF):
        super().__init__()
        self.heads, self.layers = heads, layers
        self.embed_pos = nn.Linear(3, width)
        self.embed_species = nn.Embedding(species, width)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, radial), persistent=False)
        self.gamma = (radial / cutoff) ** 2
        self.pair_bias = nn.Linear(radial, heads * layers)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 3))

    def forward(self, pos: torch.Tensor, species: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask[..., None].to(pos.dtype)
        centre = (pos * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        h = self.embed_pos(pos - centre) + self.embed_species(species)
        # invariant attention biases from the pair distances, (B, layers * heads, N, N)
        r = ((pos[:, :, None] - pos[:, None, :]) ** 2).sum(-1).add(1e-12).sqrt()
        bias = self.pair_bias(torch.exp(-self.gamma * (r[..., None] - self.centres) ** 2)).permute(0, 3, 1, 2)
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded atoms are never attended to
        for i, block in enumerate(self.blocks):
            h = block(h, bias[:, i * self.heads:(i + 1) * self.heads])
        # padded atoms' rows carry no meaning: their force is 0
        return torch.where(mask[..., None], self.head(h), torch.zeros((), dtype=pos.dtype, device=pos.device))


SPEC = fe.Spec(inputs={"pos": "position", "species": "scalar", "mask": "scalar"}, output="vector", mask="mask")

Structures = tuple  # ({"pos": (B, N, 3), "species": (B, N), "mask": (B, N)}, forces (B, N, 3))


def _take(structures: Structures, idx: torch.Tensor) -> Structures:
    inputs, forces = structures
    return {k: v[idx] for k, v in inputs.items()}, forces[idx]


def _count(structures: Optional[Structures]) -> int:
    return 0 if structures is None else int(structures[1].shape[0])


def load_structures(path: str, device="cpu", dtype=torch.float32) -> tuple[dict, torch.Tensor, dict]:
    """Read structures with forces from any file ``ase.io.read(path, index=":")`` takes.

    Returns ``(inputs, forces, info)``: ``inputs`` is ``{"pos", "species", "mask"}`` padded
    to the largest structure, species are indices into ``info["elements"]`` (the atomic
    numbers present, sorted), forces come from ``atoms.get_forces()`` in the file's units.
    Periodic cells are not used: every structure is an isolated cluster to the model
    (``info["periodic"]`` counts the structures that had one).
    """
    try:
        import ase.io
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('--data needs ase: pip install "fastequiv[ase]"') from e
    frames = ase.io.read(path, index=":")
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise ValueError(f"{path}: no structures")
    elements = sorted({int(z) for atoms in frames for z in atoms.numbers})
    index = {z: i for i, z in enumerate(elements)}
    B, N = len(frames), max(len(atoms) for atoms in frames)
    pos = torch.zeros(B, N, 3, dtype=torch.float64)
    forces = torch.zeros(B, N, 3, dtype=torch.float64)
    species = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, atoms in enumerate(frames):
        n = len(atoms)
        try:
            f = atoms.get_forces()
        except RuntimeError:
            f = atoms.arrays.get("forces")
            if f is None:
                raise ValueError(f"{path}: structure {b} has no forces") from None
        pos[b, :n] = torch.as_tensor(atoms.get_positions(), dtype=torch.float64)
        forces[b, :n] = torch.as_tensor(f, dtype=torch.float64)
        species[b, :n] = torch.tensor([index[int(z)] for z in atoms.numbers])
        mask[b, :n] = True
    info = {"elements": elements, "periodic": sum(bool(atoms.pbc.any()) for atoms in frames)}
    cast = dict(device=torch.device(device), dtype=dtype)
    inputs = {"pos": pos.to(**cast), "species": species.to(cast["device"]), "mask": mask.to(cast["device"])}
    return inputs, forces.to(**cast), info


class Datasets(NamedTuple):
    """The data of one run; every set is ``({"pos", "species", "mask"}, forces)``.

    ``train`` is None for infinite data (``task`` then draws fresh training batches);
    ``train_eval`` is the fixed subset of ``train`` decomposed during training (its first
    structures, which are in random order). ``heldout`` does not depend on the seed.
    """

    train: Optional[Structures]
    heldout: Structures
    train_eval: Optional[Structures]
    task: Optional[ForceTask]
    species: int
    cutoff: float
    description: str


def datasets(train_size: Optional[int] = None, held_out: int = 2048, train_eval: int = 512, seed: int = 0,
             device="cpu", data: Optional[str] = None) -> Datasets:
    """The training, held-out and training-evaluation sets of a run.

    Synthetic (``data=None``): ``train_size`` Morse clusters (default 500; 0: none, fresh
    clusters every step) drawn from a generator seeded by ``seed``, and ``held_out``
    clusters from a fixed generator. ``data=FILE``: the file's structures (see
    :func:`load_structures`) in a fixed random order: the first ``min(held_out, 20%)``
    are held out, the next ``train_size`` (default: all the rest) are the training set;
    forces are divided by their root mean square over the training set.
    """
    if held_out < 1:
        raise ValueError(f"held_out must be >= 1, got {held_out}")
    if train_size is not None and train_size < 0:
        raise ValueError(f"train_size must be >= 0, got {train_size}")
    dev = torch.device(device)
    if data is None:
        task = ForceTask(device=dev)
        train_size = 500 if train_size is None else train_size
        heldout = task.batch(held_out, torch.Generator().manual_seed(_HELDOUT_SEED))
        train = task.batch(train_size, torch.Generator().manual_seed(seed)) if train_size else None
        what = f"{train_size} training clusters" if train_size else "fresh training clusters every step"
        species, cutoff = SPECIES, _CUTOFF
        description = f"Morse forces of 5-8 atom clusters: {what}, {held_out} held-out clusters"
    else:
        if train_size == 0:
            raise ValueError("--train-size 0 (fresh data every step) needs the generated clusters, not --data")
        inputs, forces, info = load_structures(data, device=dev)
        n = forces.shape[0]
        if n < 2:
            raise ValueError(f"{data}: {n} structure(s); a training and a held-out set need at least 2")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_HELDOUT_SEED)).to(dev)
        n_held = max(1, min(held_out, n // 5))
        rest = order[n_held:]
        rest = rest[:train_size] if train_size is not None else rest
        heldout, train = _take((inputs, forces), order[:n_held]), _take((inputs, forces), rest)
        m = train[0]["mask"]
        scale = float(train[1][m].pow(2).mean().sqrt().clamp_min(1e-12))
        train, heldout = (train[0], train[1] / scale), (heldout[0], heldout[1] / scale)
        task, species, cutoff = None, len(info["elements"]), _DATA_CUTOFF
        from ase.data import chemical_symbols

        elems = "".join(chemical_symbols[z] for z in info["elements"])
        description = (f"{data} ({n} structures of {elems}, forces / {scale:.4g}): {_count(train)} for training, "
                       f"{n_held} held out")
        if info["periodic"]:
            description += f"; the cells of {info['periodic']} periodic structures are ignored"
    sub = None if train is None else _take(train, torch.arange(min(train_eval, _count(train)), device=dev))
    if sub is not None and _count(sub) == 0:
        sub = None
    return Datasets(train, heldout, sub, task, species, cutoff, description)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Indices of training batches, forever: a fresh permutation of ``range(n)`` every epoch
    (a batch may span the end of one epoch and the start of the next)."""
    queue = torch.empty(0, dtype=torch.long)
    while True:
        while queue.numel() < batch_size:
            queue = torch.cat([queue, torch.randperm(n, generator=generator)])
        yield queue[:batch_size]
        queue = queue[batch_size:]


class _EMA:
    """An exponential moving average of a model's weights, with the warmup of the decay
    that torch_ema (used by MACE and fairchem) applies: ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so the first steps are not averaged with the random init."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1 - d)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)


def _tail_share(per_sample: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the sum of ``per_sample`` held by its largest ``fraction`` of entries."""
    v = per_sample.detach().double().flatten()
    k = max(1, round(fraction * v.numel()))
    total = float(v.sum())
    return float(v.topk(k).values.sum()) / total if total > 0 else float("nan")


def _eval_steps(steps: int, every: int) -> list[int]:
    """Steps at which the evaluated model is decomposed: 0, every ``every`` steps, the end,
    and a few early steps where the loss moves fast."""
    early = [s for s in (50, 250, 500) if s < every]
    return sorted({0, steps, *early, *range(every, steps, every)} & set(range(steps + 1)))


def run(steps: int = 5000, samples: int = 2, equiv_weight: float = 0.0, device: str = "cpu", seed: int = 0,
        out: str = "fastequiv-out", batch_size: int = 32, eval_every: int = 1000, held_out: int = 2048,
        lr: float = 2e-3, progress: bool = True, plot: bool = True, train_size: Optional[int] = None,
        ema: bool = True, ema_decay: float = 0.999, train_eval: int = 512, data: Optional[str] = None,
        announce=None, diagnostics: int = 0) -> dict:
    """Train the demo model and write its log; returns the paths, the curves and the models.

    Returns:
        ``{"csv", "png" (or None), "heldout": [(step, total, mean, equiv, pct)], "train": the same
        on the training subset ([] without a training set), "final": {split: values} of the
        evaluated model at the end, "final_raw": the same for the raw weights, "model": the
        trained model, "ema_model": its EMA (None with ``ema=False``), "datasets", "seconds",
        "train_seconds", "lr": {step: learning rate at each evaluation}}``; values are
        :meth:`fastequiv.Decomposition.to_dict` plus ``mean_worst1pct`` (the share of
        ``L_mean`` held by the worst 1% of structures). ``announce``, if given, is called
        with the :class:`Datasets` before training starts. ``diagnostics > 0`` also logs,
        every that many steps, :func:`fastequiv.diagnostics.log_dynamics` of the evaluated
        model on the first 64 held-out structures (the cosine of the gradients of L_mean and
        L_equiv and the top Hessian eigenvalue of each) as rows with ``split="dynamics"``.
    """
    if isinstance(diagnostics, bool) or not isinstance(diagnostics, int) or diagnostics < 0:
        raise ValueError(f"diagnostics must be an int >= 0 (steps between logs; 0: off), got {diagnostics!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate L_equiv, got {samples}")
    if batch_size < 1 or eval_every < 1:
        raise ValueError(f"batch_size and eval_every must be >= 1, got {batch_size} and {eval_every}")
    if ema and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
    dev = torch.device(device)
    sets = datasets(train_size, held_out, train_eval, seed, dev, data)
    if announce is not None:
        announce(sets)
    torch.manual_seed(seed)
    model = PointTransformer(species=sets.species, cutoff=sets.cutoff).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    data_gen = torch.Generator().manual_seed(seed + 1)  # the order of the training structures
    rot_gen = torch.Generator().manual_seed(seed + 2)  # the seeds of the training loss's rotations
    averaged = _EMA(model, ema_decay) if ema else None
    name = "ema" if ema else "raw"
    batches = _batches(_count(sets.train), batch_size, data_gen) if sets.train is not None else None
    evals = set(_eval_steps(steps, eval_every))
    splits = [(s, v) for s, v in (("train", sets.train_eval), ("heldout", sets.heldout)) if v is not None]
    rows: list = []
    curves: dict = {"train": [], "heldout": []}
    lrs: dict = {}

    def evaluate(step: int, net: nn.Module, label: str) -> dict:
        was_training = net.training
        net.eval()
        res = {}
        for split, (inputs, target) in splits:
            with torch.no_grad():
                d = fe.equivariance_error(net, inputs, target, spec=SPEC, samples=_EVAL_SAMPLES,
                                          seed=_EVAL_ROTATIONS_SEED, chunk_size=None if data is None else 8192)
            vals = {**d.to_dict(), "mean_worst1pct": _tail_share(d.per_sample.mean)}
            rows.append({"step": step, "split": split, "model": label, "lr": opt.param_groups[0]["lr"], **vals})
            res[split] = vals
        net.train(was_training)
        return res

    def dynamics(step: int, net: nn.Module, label: str) -> None:
        inputs, target = _take(sets.heldout, torch.arange(min(64, _count(sets.heldout)), device=dev))
        flags = [p.requires_grad for p in net.parameters()]  # the EMA copy keeps no gradients
        try:
            for p in net.parameters():
                p.requires_grad_(True)
            vals = fe.diagnostics.log_dynamics(net, inputs, target, spec=SPEC, samples=_EVAL_SAMPLES,
                                               seed=_EVAL_ROTATIONS_SEED, max_iter=12)
        finally:
            for p, flag in zip(net.parameters(), flags):
                p.requires_grad_(flag)
        rows.append({"step": step, "split": "dynamics", "model": label, "lr": opt.param_groups[0]["lr"],
                     **{k: vals[k] for k in DYNAMICS}})

    bar = _progress(steps, progress)
    start = time.perf_counter()
    eval_seconds = 0.0
    final: dict = {}
    for step in range(steps + 1):
        if step in evals:
            t0 = time.perf_counter()
            final = evaluate(step, averaged.model if averaged else model, name)
            eval_seconds += time.perf_counter() - t0
            lrs[step] = opt.param_groups[0]["lr"]
            for split, vals in final.items():
                curves[split].append((step, vals["total"], vals["mean"], vals["equiv"], vals["pct"]))
            if bar is not None:
                h = final["heldout"]
                bar.set_postfix_str(f"held-out L_total {h['total']:.4f} pct {100 * h['pct']:.1f}%")
        if diagnostics and (step % diagnostics == 0 or step == steps):
            t0 = time.perf_counter()
            dynamics(step, averaged.model if averaged else model, name)
            eval_seconds += time.perf_counter() - t0
        if step == steps:
            break
        if batches is not None:
            inputs, target = _take(sets.train, next(batches).to(dev))
        else:
            inputs, target = sets.task.batch(batch_size, data_gen)
        loss, d = fe.twirl_loss(model, inputs, target, spec=SPEC, samples=samples, equiv_weight=equiv_weight,
                                generator=rot_gen, check_finite=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if averaged is not None:
            averaged.update(model)
        stats = torch.stack([d.total, d.mean, d.equiv, d.pct]).tolist()  # one host copy per step
        rows.append({"step": step, "split": "batch", "model": "raw", "lr": lr_now, "total": stats[0],
                     "mean": stats[1], "equiv": stats[2], "pct": stats[3]})
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_description(f"step {step} batch L_total {stats[0]:.4f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    final_raw = evaluate(steps, model, "raw") if averaged is not None else final

    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "log.csv")
    fields = ["step", "split", "model", "lr", "total", "mean", "equiv", "pct", "total_stderr", "mean_stderr",
              "equiv_stderr", "mean_worst1pct"] + (list(DYNAMICS) if diagnostics else [])
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    png_path = _plot(rows, os.path.join(out, "decomposition.png"), samples, name) if plot else None
    return {"csv": csv_path, "png": png_path, "heldout": curves["heldout"], "train": curves["train"],
            "final": final, "final_raw": final_raw, "model": model,
            "ema_model": averaged.model if averaged else None, "datasets": sets, "seconds": seconds,
            "train_seconds": seconds - eval_seconds, "lr": lrs,
            "dynamics": [r for r in rows if r["split"] == "dynamics"]}


def _progress(steps: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", dynamic_ncols=True)


def _smooth(values: list, window: int) -> list:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot(rows: list, path: str, samples: int, name: str = "ema") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    evaluated = "EMA weights" if name == "ema" else "raw weights"
    dyn = [r for r in rows if r["split"] == "dynamics"]
    fig, axes = plt.subplots(1, 3 if dyn else 2, figsize=(18 if dyn else 12, 5.4))
    ax_pct, ax_loss = axes[0], axes[1]
    if dyn:
        ax_dyn = axes[2]
        xs = [r["step"] for r in dyn]
        ax_dyn.plot(xs, [r["top_eig_mean"] for r in dyn], marker="o", ms=3, color="C2", label="top eigenvalue, L_mean")
        ax_dyn.plot(xs, [r["top_eig_equiv"] for r in dyn], marker="o", ms=3, color="C3",
                    label="top eigenvalue, L_equiv")
        ax_dyn.set_yscale("symlog", linthresh=1e-3)
        ax_dyn.set_ylabel("largest Hessian eigenvalue (Lanczos)")
        ax_cos = ax_dyn.twinx()
        ax_cos.plot(xs, [r["cos"] for r in dyn], ls="--", color="0.4", label="cos(grad L_mean, grad L_equiv)")
        ax_cos.set_ylim(-1, 1)
        ax_cos.set_ylabel("gradient cosine (dashed)", color="0.4")
        ax_dyn.set_title("training dynamics (64 held-out structures)")
        ax_dyn.legend(fontsize=7, loc="upper left")
    batch = [r for r in rows if r["split"] == "batch"]
    if batch:
        window = max(1, min(50, len(batch) // 20))
        ax_pct.plot([r["step"] for r in batch], [100 * v for v in _smooth([r["pct"] for r in batch], window)],
                    color="0.75", lw=1, label=f"training batches (raw weights, K={samples}, running mean)")
    styles = {"heldout": ("-", "o", "held-out"), "train": ("--", "s", "training set")}
    for split, (ls, marker, label) in styles.items():
        pts = [r for r in rows if r["split"] == split and r["model"] == name]
        if not pts:
            continue
        xs = [r["step"] for r in pts]
        ax_pct.plot(xs, [100 * r["pct"] for r in pts], ls=ls, marker=marker, ms=4, color="C3" if split == "heldout"
                    else "C1", label=f"{label} ({evaluated}, K={_EVAL_SAMPLES})")
        for key, color in (("total", "C0"), ("mean", "C2"), ("equiv", "C3")):
            ax_loss.plot(xs, [max(r[key], 1e-12) for r in pts], ls=ls, marker=marker, ms=3, color=color,
                         label=f"{label} L_{key}")
        raw = [r for r in rows if r["split"] == split and r["model"] == "raw" and name != "raw"]
        if raw:
            ax_pct.plot([raw[-1]["step"]], [100 * raw[-1]["pct"]], marker="x", ms=9, mew=2, ls="none",
                        color="C3" if split == "heldout" else "C1", label=f"{label}, raw weights at the end")
    ax_pct.axhline(5, color="0.5", lw=0.8, ls=":")
    ax_pct.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    ax_pct.set_ylim(bottom=0)
    ax_pct.set_ylabel("share of the loss due to equivariance error")
    ax_pct.set_title("pct = L_equiv / L_total")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("MSE (units of the force variance)")
    ax_loss.set_title("L_total = L_mean + L_equiv  (solid: held-out, dashed: training set)")
    lrs = [(r["step"], r["lr"]) for r in batch]
    if lrs:
        ax_lr = ax_loss.twinx()
        ax_lr.plot(*zip(*lrs), color="0.6", lw=0.8, ls=":")
        ax_lr.set_ylabel("learning rate (dotted)", color="0.5")
        ax_lr.tick_params(axis="y", colors="0.5")
        ax_lr.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_xlim(left=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=5000, help="training steps (default 5000)")
    parser.add_argument("--batch-size", type=int, default=32, help="structures per training step (default 32)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="structures in the fixed training set (default 500; with --data all but the held-out "
                             "ones); 0: fresh clusters every step (infinite data)")
    parser.add_argument("--held-out", type=int, default=2048,
                        help="structures in the held-out set (default 2048; with --data at most a fifth of the file)")
    parser.add_argument("--train-eval", type=int, default=512,
                        help="training structures decomposed at each evaluation (default 512)")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="train on your structures with forces instead (any file ase.io.read takes, e.g. extxyz; "
                             "needs ase)")
    parser.add_argument("--samples", type=int, default=2, help="K, rotated copies per structure in the training loss")
    parser.add_argument("--equiv-weight", type=float, default=0.0, help="weight of L_equiv added to the loss")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warmup then cosine to 0)")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="decay of the exponential moving average of the weights that is evaluated (default 0.999)")
    parser.add_argument("--ema", dest="ema", action="store_true", default=True,
                        help="evaluate the EMA of the weights (the default)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="evaluate the raw weights")
    parser.add_argument("--eval-every", type=int, default=1000,
                        help="steps between evaluations (default 1000, and at steps 50, 250 and 500)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the training set, its order, the rotations and the init; the held-out set is fixed")
    parser.add_argument("--out", default="fastequiv-out", help="folder for log.csv and decomposition.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--diagnostics", type=int, default=0, metavar="STEPS",
                        help="every STEPS steps, log the cosine of the gradients of L_mean and L_equiv and the top "
                             "Hessian eigenvalue of each (fe.diagnostics; 0: off, the default)")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def _worst(n: int) -> str:
    k = max(1, round(0.01 * n))
    return f"{k} of {n}"


def summary(res: dict, ema: bool = True) -> list[str]:
    """What the run shows, in sentences whose numbers and verbs come from the run."""
    lines = []
    held, train = res["final"]["heldout"], res["final"].get("train")
    held_n = _count(res["datasets"].heldout)
    evaluated = "the EMA weights" if ema else "the raw weights"
    lines.append(f"At the end ({evaluated}):")
    if train is not None:
        r_mean, r_equiv = _ratio(held["mean"], train["mean"]), _ratio(held["equiv"], train["equiv"])
        gap = ("the generalisation gap of a model fit to a finite training set" if r_mean > 1.2
               else "no generalisation gap to speak of")
        lines.append(f"- L_mean, the error of the rotation-averaged model: held-out {held['mean']:.4g}, training set "
                     f"{train['mean']:.4g} ({r_mean:.1f}x): {gap}. It is heavy-tailed: the worst 1% of held-out "
                     f"structures ({_worst(held_n)}) hold {100 * held['mean_worst1pct']:.0f}% of held-out L_mean "
                     f"(training set: {100 * train['mean_worst1pct']:.0f}%).")
        same = 0.67 < r_equiv < 1.5
        lines.append(f"- L_equiv, the part that changes with the orientation: held-out {held['equiv']:.3g}, training "
                     f"set {train['equiv']:.3g} ({r_equiv:.2f}x)"
                     + (": about the same on structures the model has and has not seen." if same else "."))
        why = (" Held-out pct is lower because held-out L_mean is larger, not because L_equiv is smaller."
               if held["pct"] < train["pct"] and r_mean > r_equiv else "")
        lines.append(f"- pct = L_equiv / L_total: held-out {100 * held['pct']:.1f}%, training set "
                     f"{100 * train['pct']:.1f}%.{why}")
    else:
        lines.append(f"- No fixed training set (fresh structures every step), so no generalisation gap: held-out "
                     f"L_mean {held['mean']:.4g} (the worst 1% of held-out structures, {_worst(held_n)}, hold "
                     f"{100 * held['mean_worst1pct']:.0f}% of it), L_equiv {held['equiv']:.3g}, pct "
                     f"{100 * held['pct']:.1f}%.")
    rows = [r for r in res["heldout"] if r[0] > 0]
    if len(rows) >= 2:
        end = rows[-1]
        mid = min(rows[:-1], key=lambda r: abs(r[0] - end[0] / 2))
        lr = res.get("lr", {})
        falls = ": it fell as training went on and the learning rate decayed." if end[3] < mid[3] / 1.2 else "."
        lines.append(f"- Held-out L_equiv was {mid[3]:.3g} at step {mid[0]} (lr {lr.get(mid[0], math.nan):.2g}) "
                     f"and {end[3]:.3g} at the end (lr {lr.get(end[0], math.nan):.2g}){falls}")
    if ema:
        raw = res["final_raw"]["heldout"]
        lines.append(f"- The raw weights end at held-out L_equiv {raw['equiv']:.3g}, L_mean {raw['mean']:.4g}, pct "
                     f"{100 * raw['pct']:.1f}% (EMA: {held['equiv']:.3g}, {held['mean']:.4g}, "
                     f"{100 * held['pct']:.1f}%).")
    return lines


def main(args: argparse.Namespace) -> int:
    if args.data is None:
        print(f"fastequiv {fe.__version__} demo: a plain transformer learns Morse forces of 5-8 atom clusters "
              f"with random-rotation augmentation")
    else:
        print(f"fastequiv {fe.__version__} demo: a plain transformer learns the forces in {args.data} with "
              f"random-rotation augmentation")
    evaluated = f"an EMA of the weights (decay {args.ema_decay:g})" if args.ema else "the raw weights"

    def announce(sets: Datasets) -> None:
        print(f"data: {sets.description}")
        print(f"training: {args.steps} steps of {args.batch_size}, AdamW lr {args.lr:g} with warmup and cosine decay "
              f"to 0, loss fe.twirl_loss with K={args.samples} rotated copies (fresh rotations for every structure "
              f"and step)" + (f" + {args.equiv_weight:g} L_equiv" if args.equiv_weight else ""))
        print(f"evaluated: {evaluated}, decomposed with fe.equivariance_error (K={_EVAL_SAMPLES}, fixed rotations) "
              f"every {args.eval_every} steps on the held-out set"
              + (f" and {_count(sets.train_eval)} training structures" if sets.train_eval is not None else ""),
              flush=True)

    res = run(steps=args.steps, samples=args.samples, equiv_weight=args.equiv_weight, device=args.device,
              seed=args.seed, out=args.out, batch_size=args.batch_size, eval_every=args.eval_every,
              held_out=args.held_out, lr=args.lr, progress=not args.no_progress, train_size=args.train_size,
              ema=args.ema, ema_decay=args.ema_decay, train_eval=args.train_eval, data=args.data, announce=announce,
              diagnostics=args.diagnostics)
    train = {r[0]: r for r in res["train"]}
    print(f"{'':>17}{'held-out':^37}" + (f"   {'training set (' + str(len(res['datasets'].train_eval[1])) + ')':^37}"
                                            if train else ""))
    head = f"{'L_total':>9} {'L_mean':>9} {'L_equiv':>9} {'pct':>7}"
    lrs = res["lr"]
    print(f"{'step':>6} {'lr':>8}  {head}" + (f"   {head}" if train else ""))
    for step, total, mean, equiv, pct in res["heldout"]:
        line = f"{step:>6} {lrs.get(step, 0.0):>8.2e}  {total:>9.4f} {mean:>9.4f} {equiv:>9.5f} {100 * pct:>6.2f}%"
        if step in train:
            _, t, m, e, p = train[step]
            line += f"   {t:>9.4f} {m:>9.4f} {e:>9.5f} {100 * p:>6.2f}%"
        print(line)
    for line in summary(res, ema=args.ema):
        print(line)
    if args.diagnostics:
        print(f"{'step':>6} {'cos(grad L_mean, grad L_equiv)':>32} {'top eig L_mean':>15} {'top eig L_equiv':>16}")
        for r in res["dynamics"]:
            print(f"{r['step']:>6} {r['cos']:>32.3f} {r['top_eig_mean']:>15.4g} {r['top_eig_equiv']:>16.4g}")
    # the first evaluation after which pct stays below 5% up to the end
    below: Optional[int] = None
    for step, *_, pct in res["heldout"]:
        below = (step if below is None else below) if pct < 0.05 else None
    if below is not None:
        print(f"The equivariance error stays below 5% of the held-out loss from step {below} on.")
    else:
        print(f"The equivariance error is still {100 * res['heldout'][-1][4]:.1f}% of the held-out loss at the end.")
    print(f"done in {res['seconds']:.0f} s ({res['train_seconds']:.0f} s training, the rest evaluations); "
          f"wrote {os.path.abspath(res['csv'])}")
    if res["png"]:
        print(f"plot: {os.path.abspath(res['png'])}")
    return 0


"""EquivarianceCallback: the decomposition of a Lightning training run, logged to any logger.

::

    from fastequiv.lightning import EquivarianceCallback
    trainer = lightning.Trainer(callbacks=[EquivarianceCallback()], logger=CSVLogger("logs"))
    trainer.fit(module)          # a module holding a fe.adapt'ed model or one fe.adapt knows (NequIP's)

A plain LightningModule says how its model rotates and what its batches hold::

    EquivarianceCallback(spec=fe.Spec(inputs={"pos": "position"}, output="vector"),
                         unpack_batch=lambda batch: (batch["inputs"], batch["forces"]))

What it logs, to every logger of the trainer:

* at the end of each validation epoch, through ``pl_module.log_dict`` (so checkpointing and
  early stopping can monitor it too), the decomposition of the validation set (every
  validation batch, or the first ``val_max_batches``, pooled sample by sample as one
  decomposition: :func:`fastequiv.estimators.pool`), under ``prefix`` (``"equiv/"``):
  ``equiv/total``, ``equiv/mean``, ``equiv/equiv``, ``equiv/pct``, their standard errors
  ``equiv/total_stderr``, ... and per head ``equiv/forces/pct``, ... (with several
  validation dataloaders each key ends in ``/dataloader_idx_<i>``, as Lightning names
  them). This held-out number is the headline. Validation batch ``i`` is rotated by Philox
  stream ``seed + i`` in every epoch, so epochs differ only by the model.
* every ``every_n_steps`` training steps, the same keys under ``train_prefix``
  (``"equiv_train/"``) for a slice of the training batch as the training step receives
  it (``fraction`` or ``max_samples`` of its samples, graphs for a graph batch), measured
  before the step with Philox stream ``seed + global_step``, so the values belong to the
  parameters the step's loss sees. These go to ``trainer.loggers`` at that step, as
  Lightning's ``LearningRateMonitor`` logs: a value given to ``pl_module.log`` on some
  steps only is sent again, unchanged, at every later logging step of the epoch, which
  would show stale numbers between two measurements.

The keys are those of :meth:`fastequiv.Decomposition.to_dict` and of
:class:`fastequiv.EquivarianceMonitor`, so a plain loop logging either gets the same
dashboard. Under DDP (``trainer.world_size > 1``) every value is that of the union of the
ranks' samples (:mod:`fastequiv.distributed`; ``sync=False`` keeps each rank's own).

Measuring changes nothing the training uses: the model is measured in eval mode with
every submodule's mode restored (BatchNorm statistics untouched), under ``no_grad`` (a
model that takes forces by autograd gets no parameter gradient), with fixed Philox
streams (torch's global random state is never drawn from), and the optimiser never sees it.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import torch
from torch import nn

try:
    from lightning.pytorch import Callback
except ImportError:  # where only the older package name is installed
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("fastequiv.lightning needs Lightning: pip install lightning (or pytorch-lightning)") from None

from . import distributed
from .adapted import Adapted
from .adapters import adapt, family_of
from .estimators import pool
from .groups import SEED_MAX
from .monitor import batch_size, first_samples, logged_values
from .spec import Spec
from .twirl import equivariance_error

__all__ = ["EquivarianceCallback", "find_model"]


class EquivarianceCallback(Callback):
    """Log the equivariance-error decomposition during ``trainer.fit`` (see module docs).

    Args:
        model: what to measure: ``None`` (an adapted model or a model of a codebase
            :func:`fastequiv.adapt` supports among the module's attributes, or the module
            itself with ``spec=``), the dotted name of an attribute of the module
            (``"model.sole_model"``), or a module.
        spec: a :class:`fastequiv.Spec` for a model that is not adapted.
        unpack_batch: ``batch -> (inputs, target)``; by default an adapted model reads its
            codebase's batch (``model.targets(batch)``), else the batch must be a pair.
        adapt_options: options for :func:`fastequiv.adapt` where the callback adapts the
            model itself (``{"stress": True}``).
        every_n_steps: measure training steps ``s`` (``trainer.global_step``, from 0) with
            ``(s + 1) % every_n_steps == 0``, Lightning's own logging steps when it equals
            ``log_every_n_steps``; default 50; 0: never. Nothing is measured without a logger.
        fraction, max_samples: the share, or the number, of the training batch's first
            samples (graphs) measured; default ``fraction=0.125``. A graph batch that is
            not a dict of tensors (a PyG ``Batch``) is measured whole.
        samples: K rotations per sample (default 8; every element for a finite group).
        validation: decompose the validation set at the end of each validation epoch.
        val_max_batches: at most this many validation batches per dataloader (default all).
        prefix, train_prefix: the keys' prefixes for validation and training values.
        seed: the Philox streams (see module docs).
        sync: reduce over the ranks; default: when ``trainer.world_size > 1``.
        process_group: the group for ``sync``.
        chunk_size, backend: as in :func:`fastequiv.equivariance_error`.
        **kwargs: ``loss``, ``loss_weights``, ``rotations``, ``replicates`` of
            :func:`fastequiv.equivariance_error` (validation pools a design's batches like any
            others, its ``rotation_stderr`` in quadrature: :func:`fastequiv.estimators.pool`).
    """

    def __init__(self, *, model: Any = None, spec: Optional[Spec] = None,
                 unpack_batch: Optional[Callable[[Any], tuple]] = None, adapt_options: Optional[dict] = None,
                 every_n_steps: int = 50, fraction: Optional[float] = None,
                 max_samples: Optional[int] = None, samples: Optional[int] = None, validation: bool = True,
                 val_max_batches: Optional[int] = None, prefix: str = "equiv/", train_prefix: str = "equiv_train/",
                 seed: int = 0, sync: Optional[bool] = None, process_group=None, chunk_size: Optional[int] = None,
                 backend: str = "auto", **kwargs: Any):
        if spec is not None and not isinstance(spec, Spec):
            raise ValueError(f"spec must be a fastequiv.Spec or None, got {type(spec).__name__}")
        if model is not None and not (isinstance(model, str) or callable(model)):
            raise ValueError(f"model must be None, an attribute name of the LightningModule or a module, got "
                             f"{type(model).__name__}")
        if unpack_batch is not None and not callable(unpack_batch):
            raise ValueError(f"unpack_batch must be a function batch -> (inputs, target), got {unpack_batch!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an int >= 0 (0: no training steps), got {every_n_steps!r}")
        if fraction is not None and max_samples is not None:
            raise ValueError(f"give fraction or max_samples, not both (got fraction={fraction!r}, "
                             f"max_samples={max_samples!r})")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        if val_max_batches is not None and (isinstance(val_max_batches, bool) or not isinstance(val_max_batches, int)
                                            or val_max_batches < 1):
            raise ValueError(f"val_max_batches must be an int >= 1 or None, got {val_max_batches!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if sync is not None and not isinstance(sync, bool):
            raise ValueError(f"sync must be a bool or None, got {sync!r}")
        if not isinstance(prefix, str) or not isinstance(train_prefix, str) or prefix == train_prefix:
            raise ValueError(f"prefix and train_prefix must be two different str (the keys of validation and of "
                             f"training values), got {prefix!r} and {train_prefix!r}")
        for name in ("generator", "mask", "sync", "eval_mode", "check_finite"):
            if name in kwargs:
                raise ValueError(f"{name}= is not a callback option (got {name}={kwargs[name]!r})")
        self.model, self.spec, self.unpack_batch, self.adapt_options = model, spec, unpack_batch, adapt_options or {}
        self.every_n_steps, self.samples, self.validation = every_n_steps, samples, validation
        self.fraction = 0.125 if fraction is None and max_samples is None else fraction
        self.max_samples, self.val_max_batches = max_samples, val_max_batches
        self.prefix, self.train_prefix, self.seed = prefix, train_prefix, seed
        self.sync, self.process_group = sync, process_group
        self.kwargs = dict(kwargs, chunk_size=chunk_size, backend=backend)
        self._measured = None   # (model, spec or None) once found
        self._last_step = -1    # gradient accumulation: a step's first micro-batch only
        self._val: dict = {}    # dataloader index -> that epoch's decompositions

    # -- Lightning hooks ----------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if not every or (step + 1) % every or step == self._last_step or not trainer.loggers:
            return
        self._last_step = step
        d = self.measure(pl_module, batch, seed=(self.seed + step) % SEED_MAX, part=True,
                         sync=self._syncs(trainer))
        values = logged_values(d, self.train_prefix)
        values = dict(zip(values, torch.stack([v.reshape(()) for v in values.values()]).tolist()))  # one host copy
        for logger in trainer.loggers:  # each logs on rank 0 only
            logger.log_metrics(values, step=step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not self.validation or trainer.sanity_checking:
            return
        if self.val_max_batches is not None and batch_idx >= self.val_max_batches:
            return
        d = self.measure(pl_module, batch, seed=(self.seed + batch_idx) % SEED_MAX, part=False, sync=False)
        self._val.setdefault(dataloader_idx, []).append(d)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._val:
            return
        several = len(trainer.num_val_batches) > 1
        for idx, parts in sorted(self._val.items()):
            d = pool(parts)
            if self._syncs(trainer):
                d = distributed.all_reduce(d, valid=d.valid, head_valid={h: hd.valid for h, hd in d.heads.items()},
                                           group=self.process_group)
            values = logged_values(d, self.prefix)
            if several:
                values = {f"{k}/dataloader_idx_{idx}": v for k, v in values.items()}
            pl_module.log_dict(values, on_step=False, on_epoch=True, batch_size=1, add_dataloader_idx=False)
        self._val = {}

    # -- measuring ----------------------------------------------------------------------------

    def measure(self, pl_module, batch, *, seed: int, part: bool, sync: bool = False):
        """The decomposition of ``batch`` (its first samples with ``part``) for the model of
        ``pl_module``, with the rotations of Philox stream ``seed``."""
        if self._measured is None:
            self._measured = find_model(pl_module, self.model, self.spec, self.adapt_options)
        model, spec = self._measured
        inputs, target = self._unpack(batch, model)
        if spec is None:
            inputs = model.prepare(inputs)  # the tensors the adapted model's spec names
        if part:
            inputs, target = self._first(inputs, target, spec or model.spec)
        return equivariance_error(model, inputs, target, spec=spec, samples=self.samples, seed=seed,
                                  check_finite=False, sync=sync, process_group=self.process_group, **self.kwargs)

    def _unpack(self, batch, model):
        if self.unpack_batch is not None:
            out = self.unpack_batch(batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(f"unpack_batch must return (inputs, target), got {type(out).__name__}"
                                 + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
            return out
        if isinstance(model, Adapted):
            return batch, model.targets(batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch
        raise ValueError(f"the batch is a {type(batch).__name__}, not an (inputs, target) pair: pass "
                         "unpack_batch=lambda batch: (inputs, target) to EquivarianceCallback")

    def _first(self, inputs, target, spec: Spec):
        if spec.graph and not isinstance(inputs, dict):
            return inputs, target  # a batch object: measured whole
        B = batch_size(inputs, spec)
        n = min(B, self.max_samples) if self.max_samples is not None else max(1, math.ceil(self.fraction * B))
        return first_samples(inputs, target, spec, n)

    def _syncs(self, trainer) -> bool:
        return trainer.world_size > 1 if self.sync is None else self.sync


def find_model(pl_module: nn.Module, model: Any = None, spec: Optional[Spec] = None,
               adapt_options: Optional[dict] = None) -> tuple:
    """``(model, spec)`` the callback measures: with ``spec``, the named model (or the
    LightningModule itself) and that spec; without, an adapted model and ``None`` (its own
    spec): ``model`` adapted, or the one attribute of ``pl_module`` that is adapted or that
    :func:`fastequiv.adapt` adapts, looking into a ``ModuleDict`` of one model (NequIP's
    ``NequIPLightningModule.model``)."""
    options = adapt_options or {}
    if isinstance(model, str):
        try:
            model = operator.attrgetter(model)(pl_module)
        except AttributeError:
            raise ValueError(f"model={model!r} names no attribute of the {type(pl_module).__name__}") from None
    if spec is not None:
        return (pl_module if model is None else model), spec
    if model is not None:
        return adapt(model, **options), None
    if isinstance(pl_module, Adapted):
        return pl_module, None
    found = {}
    for name, child in pl_module.named_children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)) and len(child) == 1:
            key, child = next(iter(child.named_children()))
            name = f"{name}.{key}"
        if isinstance(child, Adapted):
            found[name] = child
        elif family_of(child) is not None:
            try:
                found[name] = adapt(child, **options)
            except ValueError:
                pass  # a codebase's other modules (losses, metrics, EMA weights)
    if len(found) == 1:
        return next(iter(found.values())), None
    if found:
        raise ValueError(f"the {type(pl_module).__name__} holds several models fastequiv can measure "
                         f"({sorted(found)}): name one with model=")
    raise ValueError(f"found no model to measure in the {type(pl_module).__name__}: none of its attributes is "
                     "adapted (fe.adapt) or of a codebase fe.adapt supports. Pass spec=fe.Spec(...) (the module "
                     "itself is measured, or the attribute named by model=) and, unless batches are "
                     "(inputs, target) pairs, unpack_batch=")

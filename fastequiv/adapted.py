"""Adapted models: a codebase's model that carries its own Spec and reads its own batches.

:func:`fastequiv.adapt` (in :mod:`fastequiv.adapters`, one file per codebase) returns an
:class:`Adapted` module. The measuring functions, the loss, the monitor, ``Twirled`` and
``lie_derivative`` take one without ``spec=``::

    model = fe.adapt(mace_model)                     # MACE, NequIP, SevenNet, ...
    d = fe.equivariance_error(model, batch, model.targets(batch))

An adapted model is the contract between the two sides:

* :meth:`Adapted.prepare` turns the batch as it comes out of the codebase's own data
  pipeline into the inputs its :attr:`spec` describes (graph tensors by role, cells,
  shifts), which fastequiv stacks K times like any other inputs. It is idempotent:
  prepared inputs come back as they are.
* :meth:`Adapted.forward` takes those (stacked) inputs, rebuilds what the codebase's
  model expects, calls it, and returns a dict of heads (energy, forces, stress as
  ``(B, 3, 3)``), whatever the model itself returns.
* :meth:`Adapted.targets` reads the labels a batch carries, as a dict of heads in the
  frame of the unrotated batch.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from .spec import Spec

__all__ = ["Adapted", "bind", "own_spec"]


class Adapted(nn.Module):
    """Base class of the adapters (see module docs): ``model`` is the codebase's module
    (a submodule: parameters, modes and devices follow it), ``spec`` the Spec of the
    prepared inputs and of the heads :meth:`forward` returns."""

    family = "custom"  # the codebase, as fastequiv.adapters lists it

    def __init__(self, model: Callable, spec: Spec):
        super().__init__()
        if not isinstance(spec, Spec):
            raise ValueError(f"spec must be a fastequiv.Spec, got {type(spec).__name__}")
        self.model = model
        self.spec = spec

    def prepare(self, batch: Any) -> Any:
        """The inputs :attr:`spec` describes, from a batch of the codebase's data pipeline."""
        raise NotImplementedError(f"{type(self).__name__} does not define prepare()")

    def forward(self, inputs: Any) -> dict:  # noqa: D401
        """The heads of the codebase's model on (stacked) prepared inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def targets(self, batch: Any) -> dict:
        """The labels ``batch`` carries, one per head of :attr:`spec`."""
        raise NotImplementedError(f"{type(self).__name__} cannot read labels from a batch: pass target= yourself")

    def extra_repr(self) -> str:
        return f"family={self.family!r}, heads={self.spec.output_names()}"


def own_spec(model: Callable, spec: Optional[Spec]) -> Spec:
    """The spec a measuring function uses: an adapted model's own, else the caller's."""
    if isinstance(model, Adapted):
        if spec is not None and spec is not model.spec:
            raise ValueError(f"the model is adapted ({model.family}) and carries its own spec; leave spec= out "
                             f"(got spec={spec!r})")
        return model.spec
    own = getattr(model, "spec", None)
    if spec is None and isinstance(own, Spec) and callable(getattr(model, "prepare", None)):
        return own  # e.g. Twirled(fe.adapt(model))
    if spec is None:
        raise ValueError("spec= is required: pass fe.Spec(inputs=..., output=...) describing how the model's inputs "
                         "and outputs rotate, or adapt a model of a supported codebase with fe.adapt(model), "
                         "which carries its own spec")
    return spec


def bind(model: Callable, inputs: Any, spec: Optional[Spec]) -> tuple[Spec, Any]:
    """``(spec, inputs)`` for a measuring function: an adapted model's own spec and its
    prepared inputs, or the caller's spec and inputs as they are."""
    spec = own_spec(model, spec)
    prepare = getattr(model, "prepare", None)
    if callable(prepare) and spec is getattr(model, "spec", None):
        return spec, prepare(inputs)
    return spec, inputs

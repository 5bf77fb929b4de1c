"""``fastequiv audit``: how equivariant a trained potential is, structure by structure,
with its numerical rounding told apart from learned symmetry breaking.

::

    from fastequiv.audit import audit
    a = audit(mace_model, ase.io.read("test.xyz", ":"), samples=8)
    a.rows[0]["forces_equiv"], a.rows[0]["forces_floor"], a.rows[0]["forces_equiv_f64"]
    a = audit(mace_model, structures, rotations="design:3", replicates=3)   # a rotation design

or, from a shell, ``fastequiv audit model.model test.xyz --out audit-out``. Modules:
:mod:`~fastequiv.audit.measure` (the audit of a list), :mod:`~fastequiv.audit.heads` (the
per-structure numbers), :mod:`~fastequiv.audit.table` (CSV, JSON,
summary, report), :mod:`~fastequiv.audit.plots`, :mod:`~fastequiv.audit.load` (MODEL and
DATA arguments), :mod:`~fastequiv.audit.cli`.
"""

from .measure import FIELDS, ROUNDING_REL, Audit, audit

__all__ = ["FIELDS", "ROUNDING_REL", "Audit", "audit"]

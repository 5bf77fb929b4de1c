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

Modules: :mod:`.data` (the clusters, ``--data`` files, the three sets), :mod:`.model`
(the transformer and its spec), :mod:`.training` (:func:`run`: the training loop, the EMA,
the evaluations, ``log.csv``), :mod:`.plots` (``decomposition.png``), :mod:`.cli` (the
command's options and what it prints). Its plot and progress bar need the ``demo`` extra
(``pip install "fastequiv[demo]"``: matplotlib, tqdm).
"""

from .cli import add_arguments, findings, main, missing_dependencies, summary
from .data import SPECIES, Datasets, ForceTask, datasets, load_structures, morse_energy, take
from .model import SPEC, PointTransformer
from .training import EMA, batches, run

__all__ = ["ForceTask", "PointTransformer", "SPEC", "SPECIES", "Datasets", "datasets", "load_structures",
           "morse_energy", "take", "batches", "EMA", "run", "add_arguments", "main", "summary", "findings",
           "missing_dependencies"]

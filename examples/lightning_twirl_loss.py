"""Training against equivariance error in Lightning, with the held-out decomposition logged.

The LightningModule's ``training_step`` returns ``fe.twirl_loss(..., equiv_weight=w)``:
K=2 rotated copies of the batch in one model call, the augmented loss ``L_total`` plus
``w * L_equiv`` (``w = 0`` is plain rotation augmentation). The training loop is
Lightning's own; ``fastequiv.lightning.EquivarianceCallback`` logs, through the trainer's
loggers (a CSVLogger here; TensorBoard or W&B alike), the decomposition of the validation
set at every validation (``equiv/total``, ``equiv/mean``, ``equiv/equiv``, ``equiv/pct``,
their standard errors) and of a slice of the training batch every few steps
(``equiv_train/...``).

The model is the demo's plain point-cloud transformer (``fastequiv.demo``), learning Morse
forces of small clusters; nothing is downloaded.

    python examples/lightning_twirl_loss.py --steps 300 --equiv-weight 1.0
"""

import argparse
import csv
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

import fastequiv as fe
from fastequiv.demo import SPEC, ForceTask, PointTransformer
from fastequiv.lightning import EquivarianceCallback


class ForceField(L.LightningModule):
    def __init__(self, width: int, layers: int, equiv_weight: float, lr: float):
        super().__init__()
        self.model = PointTransformer(width=width, heads=2, layers=layers)
        self.equiv_weight, self.lr = equiv_weight, lr

    def training_step(self, batch, batch_idx):
        inputs, forces = batch
        loss, d = fe.twirl_loss(self.model, inputs, forces, spec=SPEC, samples=2, equiv_weight=self.equiv_weight)
        self.log_dict({"loss": loss, "k2/pct": d.pct})  # K=2's decomposition of the batch comes free
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, forces = batch
        mask = inputs["mask"][..., None].to(forces.dtype)
        mse = (((self.model(**inputs) - forces) ** 2) * mask).sum() / (3 * mask.sum())
        self.log("val_mse", mse, batch_size=forces.shape[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def clusters(n: int, seed: int) -> list:
    inputs, forces = ForceTask(atoms=(5, 8)).batch(n, torch.Generator().manual_seed(seed))
    return [({k: v[i] for k, v in inputs.items()}, forces[i]) for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--held-out", type=int, default=256)
    p.add_argument("--equiv-weight", type=float, default=0.0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-every", type=int, default=100, help="training steps between validations")
    p.add_argument("--log-every", type=int, default=50, help="training steps between training-slice logs")
    p.add_argument("--out", default=None, help="log directory (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    train = torch.utils.data.DataLoader(clusters(args.train_size, args.seed), batch_size=args.batch, shuffle=True,
                                        drop_last=True)
    held_out = torch.utils.data.DataLoader(clusters(args.held_out, 10_000), batch_size=128)
    out = Path(args.out or tempfile.mkdtemp(prefix="fastequiv-lightning-"))
    callback = EquivarianceCallback(model="model", spec=SPEC, samples=8, every_n_steps=args.log_every)
    trainer = L.Trainer(max_steps=args.steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
                        log_every_n_steps=args.log_every, logger=CSVLogger(out, name="", version=""),
                        callbacks=[callback], accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ForceField(args.width, args.layers, args.equiv_weight, args.lr), train, held_out)

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    held = [r for r in rows if r.get("equiv/total")]
    print(f"{'step':>6} {'held-out L_total':>17} {'L_mean':>9} {'L_equiv':>9} {'pct':>7}")
    for r in held:
        print(f"{r['step']:>6} {float(r['equiv/total']):17.5f} {float(r['equiv/mean']):9.5f} "
              f"{float(r['equiv/equiv']):9.5f} {100 * float(r['equiv/pct']):6.2f}%")
    first, last = held[0], held[-1]
    train_pct = [float(r["equiv_train/pct"]) for r in rows if r.get("equiv_train/pct")]
    print(f"logs: {out / 'metrics.csv'}")
    print(f"RESULT validations={len(held)} first_pct={float(first['equiv/pct']):.10g} "
          f"last_total={float(last['equiv/total']):.10g} last_mean={float(last['equiv/mean']):.10g} "
          f"last_equiv={float(last['equiv/equiv']):.10g} last_pct={float(last['equiv/pct']):.10g} "
          f"last_total_stderr={float(last['equiv/total_stderr']):.10g} train_logs={len(train_pct)} "
          f"last_train_pct={train_pct[-1] if train_pct else float('nan'):.10g}")


if __name__ == "__main__":
    main()

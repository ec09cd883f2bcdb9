"""The training loop: steps, epochs, checkpoints, logs.

One training step = simulate a batch (seeded by epoch and step), build its targets (the task's),
forward, loss, finite check, backward, gradient clip, optimizer step. Per epoch: test loss and
localization metrics on a fixed seeded test set, adaptive channel-weight update, checkpoint,
``history.json`` and ``training_curves.png``; next to ``model.pt`` its card, ``model_card.json`` (the
training camera and the precision calibration of the latest evaluation, :mod:`decode_var.evaluation.model_card`).

What is trained comes from a :class:`~decode_var.training.tasks.Task` (six-channel or DECODE's
GMM), where the run stands from a process context (:class:`~decode_var.training.distributed.SingleProcess`
or a DDP rank's :class:`~decode_var.training.distributed.DistContext`), so the loop has neither
type probes nor single-process branches.

Resuming is exact on the CPU: every random draw of epoch ``e`` step ``s`` comes from seeds
derived from ``(VAR.seed, e, s)``, and the checkpoint holds the model, optimizer, LR schedule,
loss state (adaptive weights, schedule) and history, so 2 + 2 epochs give the weights of 4.
"""
from __future__ import annotations

import contextlib
import gc
import json
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from decode_var.core.atomic import atomic_write_text
from decode_var.core.channels import CHANNELS
from decode_var.core.errors import CheckpointError, DecodeVarError
from decode_var.core.log import note, warn
from decode_var.core.seeds import derive_seed
from decode_var.evaluation.crlb_scoring import precision_calibration
from decode_var.evaluation.model_card import update_card
from decode_var.evaluation.uncertainty import calibrate_sigma
from decode_var.evaluation.plots import plot_training_curves
from decode_var.training import checkpoint as ckpt_io
from decode_var.training.distributed import SingleProcess, wrap_model
from decode_var.training.ema import WeightAverage
from decode_var.training.prefetch import Prefetcher
from decode_var.training.schedules import TimeBudget, build_lr_scheduler, step_lr_scheduler
from decode_var.training.components import build
from decode_var.training.tasks import component_vector, predicts_sigma

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "EpochLog", "derive_seed"]


class TrainingDiverged(DecodeVarError, RuntimeError):
    """Too many non-finite batches in a row; the last good checkpoint is intact."""


class TrainingInterrupted(DecodeVarError, KeyboardInterrupt):
    """SIGINT / SIGTERM: training stopped; resume with the printed command.

    ``immediate`` is False after the first signal (the current step finished and a checkpoint of it
    was written) and True after a second one (stopped at once; the last complete checkpoint is intact).
    """

    def __init__(self, msg: str, exp_dir: Optional[Path] = None, immediate: bool = False):
        super().__init__(msg)
        self.exp_dir = exp_dir
        self.immediate = immediate


@dataclass
class EpochLog:
    """One entry of ``history.json`` (losses in the loss's units; metrics as DECODE names them, nm)."""

    epoch: int
    train_loss: float
    test_loss: float
    components: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    channel_weights: list = field(default_factory=list)
    scale_weights: list = field(default_factory=list)
    active_scales: int = 0
    teacher_forcing: float = 0.0
    lr: float = 0.0
    skipped_batches: int = 0
    seconds: float = 0.0


@dataclass
class EpochProgress:
    """Where an epoch stands: saved as ``partial_epoch`` by a mid-epoch checkpoint.

    ``sums``: per-step ``[total, p, phot, x, y, z, bg]`` losses summed over the good steps.
    """

    step: int = 0
    sums: Optional[list] = None
    n_ok: int = 0
    skipped: int = 0
    in_row: int = 0
    seconds: float = 0.0

    def add(self, vec: list[float]) -> None:
        self.sums = vec if self.sums is None else [a + b for a, b in zip(self.sums, vec)]
        self.n_ok += 1


@dataclass
class StepResult:
    """What one training step did: its per-element and mean loss, and why the batch was skipped."""

    loss_val: torch.Tensor
    loss: torch.Tensor
    stop: bool = False
    skip_reason: Optional[str] = None
    warn_every_rank: bool = False

    def skip(self, reason: str, every_rank: bool = False) -> None:
        self.skip_reason, self.warn_every_rank = reason, every_rank


class Trainer:
    """Builds every part from the param and runs the epochs.

    Args:
        param: loaded :class:`~decode_var.config.param.Param`.
        exp_dir: experiment folder (model.pt, ckpt.pt, param copies, history, plots).
        device: torch device string.
        log: write the history / TensorBoard logs.
        dist: :class:`~decode_var.training.distributed.DistContext` of a distributed run (DDP, per-sample
            seeds, rank 0 writes); None: a :class:`~decode_var.training.distributed.SingleProcess`.
    """

    def __init__(self, param, exp_dir: Path, device: str = "cpu", log: bool = True, tb_dir: Optional[Path] = None,
                 progress: bool = True, dist=None):
        self.proc = dist if dist is not None else SingleProcess()
        #: the loaded param, kept to be written with the model (checkpoints); the loop reads its parts, not it
        self.param = param
        self.device, self.log_enabled = torch.device(device), log and self.proc.is_main
        self.exp_dir = Path(exp_dir) if exp_dir is not None else None
        self.progress = progress and self.proc.is_main
        #: the run's parts from the composition root (the same build as the Predictor's); the model's initial
        #: weights drawn after seeding with ``VAR.seed``
        self.parts = build(param, seed_weights=True)
        self.settings = settings = self.parts.settings
        self.backend, self.loss, self.task = self.parts.backend, self.parts.loss, self.parts.task
        self.protocol = self.parts.protocol
        self.model = self.parts.model.to(self.device)
        self._ddp = None  # DDP wrapper of self.model in a distributed run, made by fit()
        opt_cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[settings.optimizer]
        self.optimizer = opt_cls(self.model.parameters(), **settings.opt_param)
        self.lr_scheduler = build_lr_scheduler(settings, self.optimizer)
        #: the weights' moving average for evaluation and model.pt (``VAR.train.ema``), or None
        self.ema = WeightAverage(self.model, settings.ema) if settings.ema else None
        self.simulator = self.parts.simulator
        self.frame_scale, self.matcher = self.parts.frame_scale, self.parts.matcher
        self.epoch = 0
        self.history: list[dict] = []
        self.nonfinite_total = 0
        self._stop_requested = 0
        self._partial: Optional[dict] = None  # progress inside an epoch, for a mid-epoch checkpoint
        #: the epochs a time budget planned (fit(minutes=...)); kept in the checkpoint
        self.planned_epochs: Optional[int] = None
        self._test = None
        #: (precision calibration, epochs trained) of the latest test-set evaluation, for the model card
        self._card_calibration: tuple = (None, None)
        self.tb = None
        if self.log_enabled and tb_dir is not None:
            self.open_tensorboard(tb_dir)

    def open_tensorboard(self, tb_dir: Path) -> None:
        """TensorBoard logging (DECODE's logger) when the tensorboard package is installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard is optional and slow to import

            self.tb = SummaryWriter(log_dir=str(tb_dir))
        except Exception:  # tensorboard is optional
            self.tb = None

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": ckpt_io.FORMAT,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "loss": self.task.loss_state(),
            "history": self.history,
            "nonfinite_total": self.nonfinite_total,
            "partial_epoch": self._partial,
            "planned_epochs": self.planned_epochs,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "param": self.param.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"The checkpoint does not fit the model / optimiser this param builds ({str(err).splitlines()[0][:200]}). "
                "Resume with the experiment's own param_run.yaml (architecture, channels_in, VAR.scales, VAR.model "
                "and the optimiser must match).") from None
        self.task.load_loss_state(state.get("loss") or {})
        if self.ema is not None:  # a checkpoint without one (the average switched on now): it starts here
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema = WeightAverage(self.model, self.settings.ema)
        self.epoch = int(state["epoch"])
        self.planned_epochs = state.get("planned_epochs")
        if self.planned_epochs and hasattr(self.lr_scheduler, "set_epochs"):
            self.lr_scheduler.set_epochs(self.planned_epochs)
        self.history = list(state.get("history", []))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self._partial = state.get("partial_epoch")

    def save(self) -> None:
        if not self.proc.is_main:
            return  # every rank holds the same state; rank 0 writes it
        ckpt_io.save_checkpoint(self.exp_dir / "ckpt.pt", self.state_dict())
        with self.averaged():  # model.pt: the weights evaluation scored
            ckpt_io.save_model(self.exp_dir / "model.pt", self.model, self.param)
        update_card(self.exp_dir / "model.pt", self.parts.camera_record, *self._card_calibration)

    # ------------------------------------------------------------------------------ data
    def batch(self, n: int, seed):
        """(Batch, frames on the device, targets on the device). ``seed``: one int for the batch, or one
        seed per sample (the distributed data path)."""
        batch = self.simulator.sample(n, seed) if isinstance(seed, int) else self.simulator.sample_seeded(seed)
        frames = self.frame_scale(batch.frames_NCHW).to(self.device)
        tgt = _to_device(self.task.make_targets(batch, n), self.device)
        return batch, frames, tgt

    def step_data_seed(self, step: int):
        """The data seed(s) of ``step`` of the current epoch on this process."""
        return self.proc.data_seed(self.settings.seed, self.epoch, step, self.settings.batch_size)

    def test_set(self):
        """The seeded test set of the evaluation protocol (:mod:`decode_var.evaluation.protocol`), made once:
        (Batch, frames on the device, targets on the device)."""
        if self._test is None:
            self._test = self.batch(self.protocol.size(), self.protocol.seed)
        return self._test

    # ------------------------------------------------------------------------------ loop
    def fit(self, epochs: Optional[int] = None, minutes: Optional[float] = None, clock=None) -> list[dict]:
        """Train until ``epochs`` (default ``HyperParameter.epochs``) have been completed.

        ``minutes``: a wall-clock budget instead (:class:`~decode_var.training.schedules.TimeBudget`): after
        the first epoch the number of epochs, and the cosine decay with it, is set to what fits; the plan is
        kept in the checkpoint, so a resumed run ends where it was planned to. A later epoch that would
        overrun the budget is not started. ``clock``: the budget's clock (tests).
        """
        epochs = self.planned_epochs or (self.settings.epochs if epochs is None else epochs)
        budget = TimeBudget(minutes, clock) if minutes else None
        if self.proc.active and self._ddp is None:
            self._ddp = wrap_model(self.model, self.proc)  # after any resume: starts from rank 0's weights
        if self.history and self.log_enabled:
            # a run killed between its checkpoint and its log files leaves them one epoch behind: the
            # checkpoint's history is the truth, also when nothing is left to train
            self._write_history()
        start_epoch = self.epoch
        with _graceful_stop(self):
            while self.epoch < epochs:
                entry = self.train_epoch()
                self.history.append(entry)
                self.epoch += 1
                if budget is not None:
                    epochs = self._follow_budget(budget, epochs)
                self.save()
                self._log_epoch(entry)
                # a stop that arrives during the last epoch changes nothing: the run is complete
                if self.epoch < epochs and self._any_rank(self._stop_requested):
                    raise TrainingInterrupted(f"stopped after epoch {self.epoch}; checkpoint written", self.exp_dir)
        if self.epoch > start_epoch and predicts_sigma(self.model):
            self._calibrate_sigma()
        return self.history

    def _calibrate_sigma(self) -> None:
        """The post-hoc factors of the predicted sigmas, fitted on held-out simulated sets once training is
        complete (:func:`decode_var.evaluation.uncertainty.calibrate_sigma`; every rank holds the same model
        and draws the same sets), saved in ``model.pt`` and the model card."""
        with self.averaged():  # the weights model.pt holds (the factors are no averaged weight)
            record = calibrate_sigma(self.parts, epoch=self.epoch)
        if self.proc.is_main and self.exp_dir is not None:
            self.save()
            update_card(self.exp_dir / "model.pt", self.parts.camera_record, sigma=record)
            cover = ", ".join(f"{axis} {'n/a' if c is None else f'{c:.2f}'}"
                              for axis, c in zip("xyz", (record.cover_x, record.cover_y, record.cover_z)))
            note(f"sigma calibration: factors x {record.scale_x:.3g}, y {record.scale_y:.3g}, z {record.scale_z:.3g}; "
                 f"within +-1 sigma {cover}")

    def _follow_budget(self, budget: TimeBudget, epochs: int) -> int:
        """The epochs to train in all after one more epoch under ``budget``: planned once per run (rank 0's
        plan for every rank), then cut short where the next epoch would overrun."""
        budget.epoch_done()
        if self.planned_epochs is None:
            planned = self.proc.broadcast(budget.plan(self.epoch))
            self.planned_epochs = planned
            if hasattr(self.lr_scheduler, "set_epochs"):
                self.lr_scheduler.set_epochs(planned)
            if self.proc.is_main:
                note(f"time budget {budget.seconds / 60:g} min: {budget.mean_epoch():.0f} s per epoch, "
                     f"{planned} epochs in all")
            return planned
        if self.epoch < epochs and not self.proc.broadcast(budget.fits_another()):
            if self.proc.is_main:
                note(f"time budget {budget.seconds / 60:g} min: stopping after epoch {self.epoch} of {epochs} "
                     f"({budget.elapsed():.0f} s spent, {budget.mean_epoch():.0f} s per epoch)")
            return self.epoch
        return epochs

    def train_epoch(self) -> dict:
        """One epoch (or the rest of one, after a mid-epoch resume). Returns its history entry."""
        t0 = time.perf_counter()
        tf = self.task.start_epoch(self.epoch)
        st = self.settings
        steps = max(st.pseudo_ds_size // (st.batch_size * self.proc.world_size), 1)
        part = EpochProgress(**self._partial) if self._partial else EpochProgress()
        self._partial = None
        self.model.train()
        with self._batches(range(part.step, steps)) as batches:
            bar = _progress(batches, f"epoch {self.epoch}", self.progress, steps - part.step)
            for step, data in bar:
                result = self.train_step(step, data)
                part.step = step + 1
                if result.skip_reason is not None:
                    self._skip(part, step, result)
                else:
                    part.in_row = 0
                    part.add(component_vector(float(result.loss.detach()), self.task.log(result.loss_val)[1]))
                    if self.progress and step % 10 == 0:
                        bar.set_postfix(loss=f"{float(result.loss.detach()):.4f}")
                if result.stop and part.step < steps:
                    self._stop_mid_epoch(part, step, t0)
        return self._finish_epoch(part, tf, t0)

    def _batches(self, steps: range):
        """``(step, (frames, targets))`` of the epoch's steps: made in a background thread during the
        previous step when ``VAR.train.prefetch`` asks for it (the batches are the same either way)."""
        bs = self.settings.batch_size

        def make(step):
            return self.batch(bs, self.step_data_seed(step))[1:]

        if self.prefetch:
            return Prefetcher(make, steps)
        return _Sequential(make, steps)

    @property
    def prefetch(self) -> bool:
        """``VAR.train.prefetch``: true, false, or auto (on when the model trains on a GPU); never with a
        simulator that draws from the global RNG (the ``decode`` backend's camera)."""
        choice = self.settings.prefetch
        wanted = self.device.type != "cpu" if choice == "auto" else bool(choice)
        return wanted and self.simulator.thread_safe

    def train_step(self, step: int, data) -> "StepResult":
        """One optimiser step of the current epoch (or a skipped batch, with the reason); ``data``: the
        step's (frames, targets), from :meth:`_batches`."""
        seed = self.proc.step_seed(self.settings.seed, self.epoch, step)
        torch.manual_seed(seed)  # dropout, and coins of models without a generator
        self.task.seed_step(seed)  # the model's own coins: a function of (seed, epoch, step, rank)
        frames, tgt = data
        self.optimizer.zero_grad(set_to_none=True)
        loss_val, out = self.task.train_forward(frames, tgt, model=self._ddp)
        result = StepResult(loss_val, loss_val.mean())
        bad_here = not torch.isfinite(result.loss)
        # ranks skip a batch and stop together: DDP's backward needs every rank
        bad_any, result.stop = self.proc.any(bad_here, self._stop_requested > 0)
        if result.stop and not self._stop_requested:
            self._stop_requested = 1
        if bad_here:
            result.skip("loss: " + "; ".join(self.task.nonfinite_report(out, tgt) or ["non-finite"]), every_rank=True)
        elif bad_any:
            result.skip("non-finite loss on another rank")
        else:
            result.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            if not torch.isfinite(gnorm):
                result.skip("gradient norm is not finite")
            else:
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
        return result

    def _skip(self, part: EpochProgress, step: int, result: "StepResult") -> None:
        """Count a skipped batch; too many in a row stop the run (the last good checkpoint stays)."""
        part.skipped += 1
        part.in_row += 1
        self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        if result.warn_every_rank or self.proc.is_main:
            warn(f"{self.proc.rank_tag}epoch {self.epoch} step {step}: skipped batch ({result.skip_reason})")
        if part.in_row >= self.settings.max_nonfinite_in_row:
            raise TrainingDiverged(
                f"{part.in_row} non-finite batches in a row (epoch {self.epoch}, step {step}); last: "
                f"{result.skip_reason}. Training stopped; the last good checkpoint {self.exp_dir / 'ckpt.pt'} is "
                "intact. Lower the learning rate or VAR.train.grad_clip, or check the simulation parameters.")

    def _stop_mid_epoch(self, part: EpochProgress, step: int, t0: float) -> None:
        """A stop request inside an epoch: checkpoint the progress (rank 0), then stop."""
        part.seconds += time.perf_counter() - t0
        self._partial = dict(asdict(part), sums=self._rank_mean(part.sums))
        if self.proc.is_main:
            ckpt_io.save_checkpoint(self.exp_dir / "ckpt.pt", self.state_dict())
        raise TrainingInterrupted(f"stopped in epoch {self.epoch} after step {step}; checkpoint written", self.exp_dir)

    def _finish_epoch(self, part: EpochProgress, tf: float, t0: float) -> dict:
        """Epoch means, test evaluation, adaptive-weight update, LR step: the history entry."""
        st = self.settings
        sums = self._rank_mean(part.sums)  # all ranks' losses, so the channel weights stay identical
        mean = [v / max(part.n_ok, 1) for v in sums] if sums is not None else [float("nan")] * 7
        entry = EpochLog(epoch=self.epoch, train_loss=mean[0], test_loss=float("nan"), teacher_forcing=tf,
                         active_scales=self.task.active_scales or 1, lr=self.optimizer.param_groups[0]["lr"],
                         skipped_batches=part.skipped)
        if (self.epoch + 1) % st.eval_every == 0 or self.epoch + 1 >= st.epochs:
            # rank 0's numbers everywhere: the LR schedule may depend on them
            entry.test_loss, entry.components, entry.metrics = self.proc.broadcast(self.evaluate())
        entry.channel_weights, entry.scale_weights = self.task.end_epoch(
            dict(zip(CHANNELS, mean[1:])) if part.n_ok else None)
        step_lr_scheduler(self.lr_scheduler, entry.test_loss, entry.train_loss)
        entry.seconds = part.seconds + time.perf_counter() - t0
        return entry.__dict__

    # ------------------------------------------------------------------------------ ranks
    def _any_rank(self, flag) -> bool:
        stop = self.proc.any(bool(flag))[0]
        if stop and not self._stop_requested:
            self._stop_requested = 1
        return stop

    def _rank_mean(self, sums):
        """Per-rank sums of the step losses -> their mean over the ranks (identity in one process)."""
        if sums is None:
            return sums
        return [v / self.proc.world_size for v in self.proc.all_reduce(sums)]

    def release_ddp(self) -> None:
        """Drop the DDP wrapper (before the process group ends); the trainer stays usable in this process."""
        if self._ddp is not None:
            self._ddp = None
            gc.collect()

    # ------------------------------------------------------------------------------ evaluation
    def averaged(self):
        """The model with the weights' moving average in place (``VAR.train.ema``); as it is without one."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext(self.model)

    def evaluate(self, batch_size: int = 64):
        """:meth:`_evaluate` with the weights that are saved (the moving average, ``VAR.train.ema``)."""
        with self.averaged():
            return self._evaluate(batch_size)

    @torch.no_grad()
    def _evaluate(self, batch_size: int = 64):
        """Test loss (all active scales), its components, and localization metrics of the finest scale.

        ``metrics['loss_fixed']``: the task's test loss of a definition that does not change during the
        run (six-channel models: the finest scale's eval output with unit channel weights), computed
        from the same eval outputs as the metrics, with no random draw.
        """
        batch, frames, tgt = self.test_set()
        test_loss, components = self._test_loss(frames, tgt, batch_size)
        self.model.eval()
        outs, fixed = [], []
        for i in range(0, frames.size(0), batch_size):
            out_b = self.task.physical_output(frames[i:i + batch_size])
            fixed.append(self.task.fixed_loss(out_b, _slice(tgt, slice(i, i + batch_size))))
            outs.append(out_b.cpu())
        self.model.train()
        metrics = {}
        em_out = self.task.postprocess(torch.cat(outs, 0))
        if em_out is not None:  # the protocol's score, CRLB ratios included (deterministic: no random draw)
            metrics, _ = self.protocol.score(self.backend, self.matcher, em_out, self.protocol.ground_truth(batch))
            self._card_calibration = (precision_calibration(metrics), self.epoch + 1)
        if fixed[0] is not None:  # the test loss of a fixed definition, next to the optimised one
            metrics["loss_fixed"] = float(torch.cat(fixed).mean())
        return test_loss, components, metrics

    def _test_loss(self, frames, tgt, batch_size: int):
        """The optimised loss on the test set (training mode, teacher forcing off), and its components."""
        n = frames.size(0)
        self.model.train()
        losses, comps = [], []
        with self.task.test_loss_mode():
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                loss_val, _ = self.task.train_forward(frames[sl], _slice(tgt, sl))
                total, comp = self.task.log(loss_val)
                losses.append(total * (min(n, i + batch_size) - i))
                comps.append(comp)
        components = {k: sum(c.get(k, 0.0) for c in comps) / len(comps) for k in comps[0]}
        return sum(losses) / n, components

    # ------------------------------------------------------------------------------ logging
    def _log_epoch(self, entry: dict) -> None:
        if not self.log_enabled:
            return
        self._write_history()
        m = entry.get("metrics", {})
        if self.progress:
            print(f"epoch {entry['epoch']}: train {entry['train_loss']:.4f} test {entry['test_loss']:.4f} "
                  f"(fixed-definition test loss {m.get('loss_fixed', float('nan')):.4f}) "
                  f"jac {m.get('jac', float('nan')):.3f} rmse_lat {m.get('rmse_lat', float('nan')):.1f} nm "
                  f"effcy_lat {m.get('effcy_lat', float('nan')):.3f} scales {entry['active_scales']} "
                  f"tf {entry['teacher_forcing']:.2f} chw {[round(w, 2) for w in entry['channel_weights']]} "
                  f"skipped {entry['skipped_batches']} ({entry['seconds']:.0f} s)", flush=True)
        if self.tb is not None:
            e = entry["epoch"]
            self.tb.add_scalar("learning/train_loss", entry["train_loss"], e)
            self.tb.add_scalar("learning/test_loss", entry["test_loss"], e)
            for k, v in {**entry["components"], **m}.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"eval/{k}", v, e)

    def _write_history(self) -> None:
        """history.json and training_curves.png from ``self.history`` (the checkpoint's, after a resume)."""
        atomic_write_text(self.exp_dir / "history.json", json.dumps(self.history, indent=1, default=float))
        if self.settings.plot:
            plot_training_curves(self.history, self.exp_dir / "training_curves.png")


def _to_device(tgt, device):
    if isinstance(tgt, torch.Tensor):
        return tgt.to(device)
    if isinstance(tgt, (list, tuple)):
        return type(tgt)(_to_device(t, device) for t in tgt)
    return tgt


def _slice(tgt, sl):
    if isinstance(tgt, torch.Tensor):
        return tgt[sl]
    if isinstance(tgt, (list, tuple)):
        return type(tgt)(_slice(t, sl) for t in tgt)
    return tgt


def _progress(it, desc, enabled, total=None):
    if not enabled:
        return it
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, total=total)


class _Sequential:
    """``(step, make(step))`` made when asked for: the plain counterpart of the Prefetcher."""

    def __init__(self, make, steps):
        self.make, self.steps = make, steps

    def __iter__(self):
        return ((step, self.make(step)) for step in self.steps)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _graceful_stop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. Second: stop now (last checkpoint intact)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.previous = {}

    def _handler(self, signum, frame):
        self.trainer._stop_requested += 1
        name = signal.Signals(signum).name
        if self.trainer._stop_requested == 1:
            warn(f"received {name}: finishing this step, writing a checkpoint, then stopping "
                 "(send it again to stop at once)")
            return
        # raised wherever the main thread is; an atomic write in progress is abandoned and the file it
        # would have replaced stays as it was
        raise TrainingInterrupted(f"second {name}: stopped at once; the last complete checkpoint is intact",
                                  self.trainer.exp_dir, immediate=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, h in self.previous.items():
            signal.signal(sig, h)
        return False

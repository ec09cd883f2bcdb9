"""The training engine: one loop, its devices, logging, checkpoints.

One training step = simulate a batch (seeded by epoch and step), build the per-scale targets,
forward, loss, finite check, backward, gradient clip, optimizer step. Per epoch: test loss and
localization metrics on a fixed seeded test set, adaptive channel-weight update, checkpoint,
``training_curves.png``.

Resuming is exact on the CPU: every random draw of epoch ``e`` step ``s`` comes from seeds
derived from ``(VAR.seed, e, s)``, and the checkpoint holds the model, optimizer, LR schedule,
loss state (adaptive weights, schedule) and history, so 2 + 2 epochs give the weights of 4.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from decode_var.training import checkpoint as ckpt_io
from decode_var.backend import get_backend
from decode_var.core.errors import DecodeVarError
from decode_var.nn.loss import unit_weight_loss
from decode_var.core.scales import ScaleSchedule
from decode_var.data.simulation import FrameScale
from decode_var.data.targets import MultiScaleTargets, TargetRescale

CHANNELS = ("p", "phot", "x", "y", "z", "bg")


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


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class WarmupCosine:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to ``min_factor`` at ``epochs`` (per epoch)."""

    def __init__(self, optimizer, epochs: int, warmup_epochs: int = 0, min_factor: float = 0.01):
        self.optimizer, self.epochs, self.warmup, self.min_factor = optimizer, max(int(epochs), 1), warmup_epochs, min_factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def factor(self, epoch: int) -> float:
        if self.warmup and epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        t = min(max(epoch - self.warmup, 0) / max(self.epochs - self.warmup, 1), 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    def _apply(self):
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * self.factor(self.last_epoch)

    def step(self, *_):
        self.last_epoch += 1
        self._apply()

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


def build_lr_scheduler(param, optimizer):
    hp = param.HyperParameter
    kw = hp.learning_rate_scheduler_param.to_dict() if hasattr(hp.learning_rate_scheduler_param, "to_dict") else {}
    if hp.learning_rate_scheduler == "cosine":
        return WarmupCosine(optimizer, hp.epochs, param.VAR.train.warmup_epochs, **kw)
    if hp.learning_rate_scheduler == "StepLR":
        kw.setdefault("step_size", 10)
        return torch.optim.lr_scheduler.StepLR(optimizer, **kw)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kw)


def teacher_forcing_prob(param, epoch: int) -> float:
    tf = param.VAR.teacher_forcing
    if tf.epochs <= 0:
        return float(tf.end)
    t = min(epoch / tf.epochs, 1.0)
    return float(tf.start + (tf.end - tf.start) * t)


@dataclass
class EpochLog:
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


def _param_for_model_scales(param, model):
    """The param with VAR.scales as the model predicts them (an ablation may predict fewer scales)."""
    sched = getattr(model, "schedule", None)
    if sched is None or list(sched.factors) == [float(f) for f in param.VAR.scales]:
        return param
    from decode_var.config.param import param_from_dict

    data = param.to_dict()
    data["VAR"]["scales"] = list(sched.factors)
    return param_from_dict(data)


class SixChannelTask:
    """Data, loss and post-processing for 6-channel models (VARMultiScale + AdaptivePPXYZB, ...)."""

    def __init__(self, param, backend, model, loss):
        self.param, self.backend, self.model, self.loss = param, backend, model, loss
        param = _param_for_model_scales(param, model)
        self.schedule = ScaleSchedule.parse(param)
        self.targets = MultiScaleTargets.parse(param, backend)
        self.rescale = TargetRescale.parse(param)
        self.post = backend.post_processing(param, self.schedule.finest)

    def make_targets(self, batch, n):
        return self.targets(batch.em, batch.bg_NHW, n)

    def train_forward(self, frames, tgt, n_active):
        targets, weights = tgt
        out = self.model(frames, targets=targets[:n_active], n_active=n_active)
        return self.loss(out, targets, weights), out

    def physical_output(self, frames) -> torch.Tensor:
        """Finest-scale output in photons, px offsets, nm, photons / px (p in 0..1)."""
        out = self.model(frames)
        return self.rescale.inverse(out.float(), self.schedule.finest.cell_size)

    def fixed_loss(self, out_phys_N6HW, tgt) -> torch.Tensor:
        """Per-sample loss ``(N,)`` of the finest scale with unit channel weights, from the eval output of
        :meth:`physical_output`: a definition that does not change during the run (training curves)."""
        targets, weights = tgt
        out_N6HW = self.rescale.forward(out_phys_N6HW, self.schedule.finest.cell_size)
        return unit_weight_loss(out_N6HW, targets[-1], weights[-1])

    def postprocess(self, out_phys):
        return self.post.forward(out_phys) if self.post is not None else None

    def nonfinite_report(self, out, tgt):
        return self.loss.nonfinite_report(out, tgt[0][:len(out)], tgt[1][:len(out)])


class Trainer:
    """Builds every part from the param and runs the epochs.

    Args:
        param: loaded :class:`~decode_var.config.param.Param`.
        exp_dir: experiment folder (model.pt, ckpt.pt, param copies, history, plots).
        device: torch device string.
        log: write the history / TensorBoard logs.
        dist: :class:`~decode_var.training.distributed.DistContext` of a distributed run (DDP, per-sample seeds,
            rank 0 writes); None: the single-process path.
    """

    def __init__(self, param, exp_dir: Path, device: str = "cpu", log: bool = True, tb_dir: Optional[Path] = None,
                 progress: bool = True, dist=None):
        from decode_var.registry import build_loss, build_model

        self.dist = dist
        is_main = dist is None or dist.is_main
        self.param, self.device, self.log_enabled = param, torch.device(device), log and is_main
        self.exp_dir = Path(exp_dir) if exp_dir is not None else None
        self.progress = progress and is_main
        hp, var = param.HyperParameter, param.VAR
        self.backend = get_backend(var.backend)
        torch.manual_seed(var.seed)
        self.model = build_model(param).to(self.device)
        self._ddp = None  # DDP wrapper of self.model in a distributed run, made by fit()
        self.loss = build_loss(_param_for_model_scales(param, self.model))
        self.task = self.backend.make_task(param, self.model, self.loss) if hasattr(self.backend, "make_task") \
            and not isinstance(self.loss, _six_channel_losses()) else SixChannelTask(param, self.backend, self.model,
                                                                                      self.loss)
        self._grad_clip = grad_clip_norm(param)
        opt_cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[hp.optimizer]
        self.optimizer = opt_cls(self.model.parameters(), **param.HyperParameter.opt_param.to_dict())
        self.lr_scheduler = build_lr_scheduler(param, self.optimizer)
        self.simulator = self.backend.simulator(param)
        self.frame_scale = FrameScale.parse(param)
        self.matcher = self.backend.matcher(param)
        self.epoch = 0
        self.history: list[dict] = []
        self.nonfinite_total = 0
        self._stop_requested = 0
        self._partial: Optional[dict] = None  # progress inside an epoch, for a mid-epoch checkpoint
        self._test = None
        self.tb = None
        if self.log_enabled and tb_dir is not None:
            self.open_tensorboard(tb_dir)

    def open_tensorboard(self, tb_dir: Path) -> None:
        """TensorBoard logging (DECODE's logger) when the tensorboard package is installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter

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
            "loss": self.loss.state_dict() if hasattr(self.loss, "state_dict") else {},
            "history": self.history,
            "nonfinite_total": self.nonfinite_total,
            "partial_epoch": self._partial,
            "param": self.param.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        from decode_var.core.errors import CheckpointError

        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"The checkpoint does not fit the model / optimiser this param builds ({str(err).splitlines()[0][:200]}). "
                "Resume with the experiment's own param_run.yaml (architecture, channels_in, VAR.scales, VAR.model "
                "and the optimiser must match).") from None
        if state.get("loss") and hasattr(self.loss, "load_state_dict"):
            self.loss.load_state_dict(state["loss"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self._partial = state.get("partial_epoch")

    def save(self) -> None:
        if self.dist is not None and not self.dist.is_main:
            return  # every rank holds the same state; rank 0 writes it
        ckpt_io.save_checkpoint(self.exp_dir / "ckpt.pt", self.state_dict())
        ckpt_io.save_model(self.exp_dir / "model.pt", self.model, self.param)

    # ------------------------------------------------------------------------------ data
    def _batch(self, n: int, seed):
        """``seed``: one int for the batch, or one seed per sample (the distributed data path)."""
        batch = self.simulator.sample(n, seed) if isinstance(seed, int) else self.simulator.sample_seeded(seed)
        frames = self.frame_scale(batch.frames_NCHW).to(self.device)
        tgt = self.task.make_targets(batch, n)
        tgt = _to_device(tgt, self.device)
        return batch, frames, tgt

    def test_set(self):
        if self._test is None:
            n = self.param.TestSet.test_size
            self._test = self._batch(n, derive_seed(self.param.VAR.test_seed, 0))
        return self._test

    # ------------------------------------------------------------------------------ loop
    def fit(self, epochs: Optional[int] = None) -> list[dict]:
        """Train until ``epochs`` (default ``HyperParameter.epochs``) have been completed."""
        epochs = self.param.HyperParameter.epochs if epochs is None else epochs
        if self.dist is not None and self.dist.active and self._ddp is None:
            from decode_var.training.distributed import wrap_model

            self._ddp = wrap_model(self.model, self.dist)  # after any resume: starts from rank 0's weights
        if self.history and self.log_enabled:
            # a run killed between its checkpoint and its log files leaves them one epoch behind: the
            # checkpoint's history is the truth, also when nothing is left to train
            self._write_history()
        with _graceful_stop(self):
            while self.epoch < epochs:
                entry = self.train_epoch()
                self.history.append(entry)
                self.epoch += 1
                self.save()
                self._log_epoch(entry)
                # a stop that arrives during the last epoch changes nothing: the run is complete
                if self.epoch < epochs and self._any_rank(self._stop_requested):
                    raise TrainingInterrupted(f"stopped after epoch {self.epoch}; checkpoint written", self.exp_dir)
        return self.history

    def _set_epoch_state(self):
        e = self.epoch
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(e)
        tf = teacher_forcing_prob(self.param, e)
        if hasattr(self.model, "teacher_forcing"):
            self.model.teacher_forcing = tf
        return tf

    def train_epoch(self) -> dict:
        """One epoch (or the rest of one, after a mid-epoch resume). Returns its history entry."""
        hp, var = self.param.HyperParameter, self.param.VAR
        t0 = time.perf_counter()
        tf = self._set_epoch_state()
        n_active = getattr(self.loss, "active_scales", None)
        steps = max(hp.pseudo_ds_size // (hp.batch_size * self._world_size), 1)
        part = self._partial or {"step": 0, "sums": None, "n_ok": 0, "skipped": 0, "in_row": 0, "seconds": 0.0}
        self._partial = None
        self.model.train()
        bar = _progress(range(part["step"], steps), f"epoch {self.epoch}", self.progress)
        for step in bar:
            torch.manual_seed(self._step_seed(step))  # dropout, and coins of models without a generator
            tf_gen = getattr(self.model, "tf_generator", None)
            if tf_gen is not None:  # teacher-forcing coins: a function of (seed, epoch, step, rank), so resume is exact
                tf_gen.manual_seed(self._step_seed(step) ^ 0x5DEECE66D)
            _, frames, tgt = self._batch(hp.batch_size, self._data_seed(step))
            self.optimizer.zero_grad(set_to_none=True)
            loss_val, out = self._train_forward(frames, tgt, n_active)
            loss = loss_val.mean()
            reason = None
            bad_here = not torch.isfinite(loss)
            # ranks skip a batch and stop together: DDP's backward needs every rank
            bad_any, stop_agreed = self._agree(bad_here)
            if bad_here:
                reason = "loss: " + "; ".join(self.task.nonfinite_report(out, tgt) or ["non-finite"])
            elif bad_any:
                reason = "non-finite loss on another rank"
            else:
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._grad_clip)
                if not torch.isfinite(gnorm):
                    reason = "gradient norm is not finite"
            part["step"] = step + 1
            if reason is not None:
                part["skipped"] += 1
                part["in_row"] += 1
                self.nonfinite_total += 1
                self.optimizer.zero_grad(set_to_none=True)
                if bad_here or self.dist is None or self.dist.is_main:
                    _warn(f"{self._rank_tag()}epoch {self.epoch} step {step}: skipped batch ({reason})")
                if part["in_row"] >= var.train.max_nonfinite_in_row:
                    raise TrainingDiverged(
                        f"{part['in_row']} non-finite batches in a row (epoch {self.epoch}, step {step}); last: "
                        f"{reason}. Training stopped; the last good checkpoint {self.exp_dir / 'ckpt.pt'} is intact. "
                        "Lower the learning rate or VAR.train.grad_clip, or check the simulation parameters.")
            else:
                part["in_row"] = 0
                self.optimizer.step()
                _, comp = self.loss.log(loss_val)
                vec = [float(loss.detach())] + [comp.get(c, 0.0) for c in CHANNELS]
                part["sums"] = vec if part["sums"] is None else [a + b for a, b in zip(part["sums"], vec)]
                part["n_ok"] += 1
                if hasattr(bar, "set_postfix") and step % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            stop = self._stop_requested if stop_agreed is None else stop_agreed
            if stop and part["step"] < steps:
                part["seconds"] += time.perf_counter() - t0
                self._partial = dict(part, sums=self._rank_mean(part["sums"]))
                if self.dist is None or self.dist.is_main:
                    ckpt_io.save_checkpoint(self.exp_dir / "ckpt.pt", self.state_dict())
                raise TrainingInterrupted(f"stopped in epoch {self.epoch} after step {step}; checkpoint written",
                                          self.exp_dir)
        n_ok = part["n_ok"]  # the same on every rank: batches are skipped by all ranks together
        sums = self._rank_mean(part["sums"])  # all ranks' losses, so the channel weights stay identical
        mean = [v / max(n_ok, 1) for v in sums] if sums is not None else [float("nan")] * 7
        train_components = dict(zip(CHANNELS, mean[1:]))
        entry = EpochLog(epoch=self.epoch, train_loss=mean[0], test_loss=float("nan"),
                         teacher_forcing=tf, active_scales=n_active or 1,
                         lr=self.optimizer.param_groups[0]["lr"], skipped_batches=part["skipped"])
        if (self.epoch + 1) % var.train.eval_every == 0 or self.epoch + 1 >= hp.epochs:
            test_loss, comp, metrics = self.evaluate()
            if self.dist is not None:  # rank 0's numbers everywhere: the LR schedule may depend on them
                test_loss, comp, metrics = self.dist.broadcast((test_loss, comp, metrics))
            entry.test_loss, entry.components, entry.metrics = test_loss, comp, metrics
        if hasattr(self.loss, "update_epoch") and n_ok:
            self.loss.update_epoch(train_components)
        if hasattr(self.loss, "channel_weights"):
            entry.channel_weights = [float(w) for w in self.loss.channel_weights]
        entry.scale_weights = [float(w) for w in getattr(self.loss, "scale_weights", [])]
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step(entry.test_loss if math.isfinite(entry.test_loss) else entry.train_loss)
        else:
            self.lr_scheduler.step()
        entry.seconds = part["seconds"] + time.perf_counter() - t0
        return entry.__dict__

    # ------------------------------------------------------------------------------ distributed
    @property
    def _world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    def _rank_tag(self) -> str:
        return f"rank {self.dist.rank}: " if self.dist is not None and self.dist.active else ""

    def _step_seed(self, step: int) -> int:
        """Seed of the global torch RNG in a step (teacher-forcing coins, dropout); rank-offset when distributed."""
        var = self.param.VAR
        if self.dist is None:
            return derive_seed(var.seed, self.epoch, step, 1)
        return derive_seed(var.seed, self.epoch, step, 1, self.dist.rank)

    def _data_seed(self, step: int):
        """One seed for the batch (single process), or one seed per sample of this rank's slice of the
        global batch: sample i of (epoch, step) is the same whichever rank simulates it."""
        var, b = self.param.VAR, self.param.HyperParameter.batch_size
        if self.dist is None:
            return derive_seed(var.seed, self.epoch, step, 2)
        from decode_var.training.distributed import sample_indices

        return [derive_seed(var.seed, self.epoch, step, 2, i) for i in sample_indices(self.dist.rank, b)]

    def _train_forward(self, frames, tgt, n_active):
        """The task's training forward through the DDP wrapper (gradients are averaged over the ranks)."""
        if self._ddp is None:
            return self.task.train_forward(frames, tgt, n_active)
        model, self.task.model = self.task.model, self._ddp
        try:
            return self.task.train_forward(frames, tgt, n_active)
        finally:
            self.task.model = model

    def _agree(self, bad_here: bool):
        """(non-finite on any rank, stop requested on any rank); single process: (bad_here, None)."""
        if self.dist is None or not self.dist.active:
            return bad_here, None
        bad_any, stop = self.dist.any(bad_here, self._stop_requested > 0)
        if stop and not self._stop_requested:
            self._stop_requested = 1
        return bad_any, stop

    def release_ddp(self) -> None:
        """Drop the DDP wrapper (before the process group ends); the trainer stays usable in this process."""
        if self._ddp is not None:
            import gc

            self._ddp = None
            gc.collect()

    def _any_rank(self, flag) -> bool:
        if self.dist is None or not self.dist.active:
            return bool(flag)
        stop = self.dist.any(bool(flag))[0]
        if stop and not self._stop_requested:
            self._stop_requested = 1
        return stop

    def _rank_mean(self, sums):
        """Per-rank sums of the step losses -> their mean over the ranks (identity in one process)."""
        if sums is None or self.dist is None:
            return sums
        return [v / self.dist.world_size for v in self.dist.all_reduce(sums)]

    @torch.no_grad()
    def evaluate(self, batch_size: int = 64):
        """Test loss (all active scales), its components, and localization metrics of the finest scale.

        ``metrics['loss_fixed']``: the task's test loss of a definition that does not change during the
        run (six-channel models: the finest scale's eval output with unit channel weights), computed
        from the same eval outputs as the metrics, with no random draw.
        """
        batch, frames, tgt = self.test_set()
        n = frames.size(0)
        n_active = getattr(self.loss, "active_scales", None)
        self.model.train()
        tf_saved = getattr(self.model, "teacher_forcing", None)
        if tf_saved is not None:
            self.model.teacher_forcing = 0.0
        losses, comps = [], []
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            loss_val, _ = self.task.train_forward(frames[sl], _slice(tgt, sl), n_active)
            total, comp = self.loss.log(loss_val)
            losses.append(total * (min(n, i + batch_size) - i))
            comps.append(comp)
        if tf_saved is not None:
            self.model.teacher_forcing = tf_saved
        test_loss = sum(losses) / n
        components = {k: sum(c.get(k, 0.0) for c in comps) / len(comps) for k in comps[0]}
        self.model.eval()
        outs, fixed = [], []
        for i in range(0, n, batch_size):
            out_b = self.task.physical_output(frames[i:i + batch_size])
            fixed.append(self.task.fixed_loss(out_b, _slice(tgt, slice(i, i + batch_size))))
            outs.append(out_b.cpu())
        self.model.train()
        out_phys = torch.cat(outs, 0)
        metrics = localization_metrics(self.task, self.backend, self.matcher, out_phys, batch,
                                       self.param.HyperParameter.emitter_label_photon_min)
        if fixed[0] is not None:  # the test loss of a fixed definition, next to the optimised one
            metrics["loss_fixed"] = float(torch.cat(fixed).mean())
        return test_loss, components, metrics

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
        from decode_var.core.atomic import atomic_write_text

        atomic_write_text(self.exp_dir / "history.json", json.dumps(self.history, indent=1, default=float))
        if self.param.VAR.train.plot:
            from decode_var.evaluation.plots import plot_training_curves

            plot_training_curves(self.history, self.exp_dir / "training_curves.png")


def localization_metrics(task, backend, matcher, out_phys, batch, photon_min) -> dict:
    """Post-process, match against the test set's emitters, compute DECODE's metrics."""
    em_out = task.postprocess(out_phys)
    if em_out is None:
        return {}
    gt = batch.em
    if photon_min is not None and len(gt):
        gt = gt[gt.phot >= photon_min]
    tp, fp, fn, tp_match = matcher.forward(em_out, gt)
    metrics = backend.evaluate(tp, fp, fn, tp_match)
    metrics["n_pred"], metrics["n_gt"] = len(em_out), len(gt)
    return {k: (float(v) if v is not None else float("nan")) for k, v in metrics.items()}


def _six_channel_losses():
    from decode_var.nn.loss import PPXYZBLoss

    return (PPXYZBLoss,)


def _to_device(tgt, device):
    if isinstance(tgt, torch.Tensor):
        return tgt.to(device)
    if isinstance(tgt, (list, tuple)):
        return type(tgt)(_to_device(t, device) for t in tgt)
    return tgt


DECODE_GRAD_MOD_NORM = 0.03  # the max-norm DECODE's train_val_impl.train clips to when HyperParameter.grad_mod is true


def grad_clip_norm(param) -> float:
    """Max gradient norm of a step: DECODE's 0.03 when ``HyperParameter.grad_mod`` is true (DECODE's
    flag, as its training loop reads it), else ``VAR.train.grad_clip`` (0 = no clipping)."""
    if getattr(param.HyperParameter, "grad_mod", None) is True:
        return DECODE_GRAD_MOD_NORM
    clip = param.VAR.train.grad_clip
    return clip if clip > 0 else float("inf")


def _slice(tgt, sl):
    if isinstance(tgt, torch.Tensor):
        return tgt[sl]
    if isinstance(tgt, (list, tuple)):
        return type(tgt)(_slice(t, sl) for t in tgt)
    return tgt


def _warn(msg: str) -> None:
    import sys

    print(f"[decode-var] {msg}", file=sys.stderr, flush=True)


def _progress(it, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm

        return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
    except ImportError:
        return it


class _graceful_stop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. Second: stop now (last checkpoint intact)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.previous = {}

    def _handler(self, signum, frame):
        self.trainer._stop_requested += 1
        name = signal.Signals(signum).name
        if self.trainer._stop_requested == 1:
            _warn(f"received {name}: finishing this step, writing a checkpoint, then stopping "
                  "(send it again to stop at once)")
            return
        # raised wherever the main thread is; an atomic write in progress is abandoned and the file it
        # would have replaced stays as it was
        raise TrainingInterrupted(f"second {name}: stopped at once; the last complete checkpoint is intact",
                                  self.trainer.exp_dir, immediate=True)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, h in self.previous.items():
            signal.signal(sig, h)
        return False

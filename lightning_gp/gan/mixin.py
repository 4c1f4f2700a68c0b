"""WGAN-GP as a LightningModule mixin: manual optimization, n_critic critic steps per generator step.

Why it runs under ``strategy="ddp"`` with default settings (the 0·θ term for idle parameters, the
penalty reaching ``.grad`` only through the ordinary backward): ``docs/design/wgan-ddp.md``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_gp._lightning.logging import over_ranks, should_log
from lightning_gp._lightning.private import merge_initial_hparams
from lightning_gp._lightning.setup_checks import sharded_training
from lightning_gp._lightning.trainer import attached_trainer, grad_scaler
from lightning_gp.functional._autograd import explained_double_backward
from lightning_gp.functional._checks import check_per_sample
from lightning_gp.functional._rng import forked_rng
from lightning_gp.gan._arguments import check_networks, checked_hparams, explained_unknown_argument
from lightning_gp.gan.regularizers import (
    PENALTIES,
    Method,
    Regularizer,
    apply_spectral_normalization,
    check_no_batch_norm,
    clip_weights_,
    critic_penalty,
)
from lightning_gp.step._batch import resolve_input
from lightning_gp.step._finite import StepValues, check_step, param_names
from lightning_gp.step._seed import RunSeed


class WGANGPMixin:
    """WGAN-GP training loop for a LightningModule: ``class MyGAN(WGANGPMixin, L.LightningModule)``.

    Set ``self.generator`` and ``self.critic``, define ``sample_latent(self, n)``. Each batch is one critic
    step on `real_samples`, every ``n_critic``-th also a generator step: critic loss E[D(x̃)] − E[D(x)] + λ·R,
    generator loss −E[D(G(z))]. Steps, randomness and resume: [WGAN-GP](../gan.md).

    Args:
        *args: passed on to the next class of the MRO (the LightningModule).
        n_critic: critic steps per generator step (the paper's 5).
        regularizer: one of `REGULARIZERS` ("gp", "gp_one_sided", "r1", "r2", "difference", ...).
        gp_weight: λ, the penalty's weight.
        clip_value: c of weight clipping.
        reg_every: lazy regularization: the penalty on every k-th critic step only, with weight λ·k.
        lr: Adam's learning rate for both networks (the paper's 1e-4); see ``configure_optimizers``.
        betas: Adam's betas for both networks (the paper's (0, 0.9)).
        method: "double_backward" or "finite_difference" (no gradient of a gradient) for gradient penalties.
        **kwargs: passed on to the next class of the MRO; forward yours so ``load_from_checkpoint`` works.

    Raises:
        ValueError, TypeError: a bad or unknown argument (the nearest named); FloatingPointError: a NaN/Inf update.

    Example:

        >>> import lightning as L
        >>> class ToyGAN(WGANGPMixin, L.LightningModule):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.generator, self.critic = torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)
        ...     def sample_latent(self, n):
        ...         return torch.randn(n, 4, device=self.device)
        >>> gan, trainer = ToyGAN(n_critic=2), L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
        ...                                              enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(gan, torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=8))
        >>> gan.critic_steps, gan.generator_steps, trainer.global_step  # 4 + 2 optimizer steps
        (4, 2, 6)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse the mixin after ``LightningModule`` in the bases, where Lightning's own ``training_step`` (which
        only says that none is defined) would hide the mixin's."""
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if pl.LightningModule in mro and mro.index(pl.LightningModule) < mro.index(WGANGPMixin):
            raise TypeError(
                f"{cls.__name__}: put WGANGPMixin before LightningModule in the class bases, "
                f"`class {cls.__name__}(WGANGPMixin, L.LightningModule)`. After it, LightningModule's own "
                f"`training_step` and `configure_optimizers` come first and hide the mixin's critic/generator loop."
            )

    def __init__(
        self,
        *args: Any,
        n_critic: int = 5,
        regularizer: Regularizer = "gp",
        gp_weight: float = 10.0,
        clip_value: float = 0.01,
        reg_every: int = 1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.0, 0.9),
        method: Method = "double_backward",
        **kwargs: Any,
    ) -> None:
        try:
            super().__init__(*args, **kwargs)
        except TypeError as err:
            raise explained_unknown_argument(type(self).__name__, err, kwargs) from None
        self.wgan_hparams = checked_hparams(n_critic=n_critic, regularizer=regularizer, gp_weight=gp_weight,
                                            clip_value=clip_value, reg_every=reg_every, lr=lr, betas=betas,
                                            method=method)
        self._merge_wgan_hparams()
        self.automatic_optimization = False
        self._wgan_critic_steps = 0
        self._wgan_generator_steps = 0
        self._wgan_seed = RunSeed()  # the base of the noise and interpolation draws: checkpointed
        self._wgan_touch_unused = False
        self._wgan_idle: dict[tuple[int, ...], list[Tensor]] = {}
        self._wgan_optimizers_checked = False

    # ----------------------------------------------------------------------------------------- user hooks
    def sample_latent(self, n: int) -> Tensor:
        """Return ``n`` latent vectors for the generator (on ``self.device``). Define it in your module."""
        raise NotImplementedError(
            f"{type(self).__name__} must define `sample_latent(self, n)` returning n latent vectors, "
            "e.g. `return torch.randn(n, self.latent_dim, device=self.device)`."
        )

    def real_samples(self, batch: Any) -> Tensor:
        """The real samples of a training batch, found as the callbacks find their input: the batch tensor,
        a tuple/list's first element, or a dict's ``"x"``, ``"input"`` or ``"inputs"`` (override otherwise)."""
        return resolve_input(batch, None, f"{type(self).__name__}.real_samples")[0]

    def sample_alpha(self, n: int) -> Tensor:
        """The per-sample interpolation weights α ~ U[0, 1] of x̂ = αx + (1 − α)x̃ (override to inject)."""
        return torch.rand(n, device=self.device)

    # ---------------------------------------------------------------------------------- state and setup
    @property
    def critic_steps(self) -> int:
        """Critic steps taken so far (checkpointed)."""
        return self._wgan_critic_steps

    @property
    def generator_steps(self) -> int:
        """Generator steps taken so far (checkpointed)."""
        return self._wgan_generator_steps

    def get_extra_state(self) -> dict[str, Any]:
        """The step counters and the RNG seed, saved in the module's ``state_dict``."""
        # In the state_dict (not in on_save_checkpoint) so a user's hook override cannot drop it.
        return {
            "critic_steps": self._wgan_critic_steps,
            "generator_steps": self._wgan_generator_steps,
            **self._wgan_seed.state_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `get_extra_state` saved (a resumed run continues its n_critic cycle)."""
        self._wgan_critic_steps = int(state.get("critic_steps", 0))
        self._wgan_generator_steps = int(state.get("generator_steps", 0))
        self._wgan_seed.load_state_dict(state)

    def _merge_wgan_hparams(self) -> None:
        # A user's own `save_hyperparameters()` replaces hparams; put the mixin's back (theirs win).
        merge_initial_hparams(self, self.wgan_hparams)

    def setup(self, stage: str) -> None:
        """Check the networks, and apply spectral normalization before the optimizers are built."""
        super_setup = getattr(super(), "setup", None)
        if super_setup is not None:
            super_setup(stage)
        check_networks(self, WGANGPMixin.sample_latent)
        check_no_batch_norm(self.critic)
        if self.wgan_hparams["regularizer"] == "spectral_normalization":
            apply_spectral_normalization(self.critic)
        trainer = attached_trainer(self)
        self._wgan_seed.setup(None if trainer is None else trainer.strategy)
        if trainer is not None and sharded_training(trainer):
            raise RuntimeError(
                f"{type(self).__name__} (WGANGPMixin) does not run under `ModelParallelStrategy` (FSDP2): its gradient "
                f"penalty differentiates the critic's gradient, and FSDP2's backward frees the all-gathered parameters "
                f"a second differentiation needs. Train the GAN with strategy='ddp' (or one device)."
            )
        self._wgan_touch_unused = trainer is not None and trainer.world_size > 1
        self._wgan_idle: dict[tuple[int, ...], list[Tensor]] = {}
        self._merge_wgan_hparams()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Adam(lr, betas) for the generator and for the critic, in that order."""
        lr, betas = self.wgan_hparams["lr"], self.wgan_hparams["betas"]
        return (
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(self.critic.parameters(), lr=lr, betas=betas),
        )

    @contextlib.contextmanager
    def _wgan_rng(self, stream: int) -> Iterator[None]:
        """Seed the global RNG from (seed, rank, critic step, stream) for the block, then restore it."""
        with forked_rng(self.device, seed=self._wgan_seed.mixed(self.global_rank, self._wgan_critic_steps, stream)):
            yield

    def _wgan_optimizers(self) -> tuple[Any, Any]:
        optimizers = self.optimizers()
        if not isinstance(optimizers, (list, tuple)) or len(optimizers) != 2:
            raise ValueError(
                "`configure_optimizers` of a WGANGPMixin module must return two optimizers, "
                f"(generator_opt, critic_opt), got {type(optimizers).__name__}."
            )
        opt_g, opt_c = optimizers
        if not self._wgan_optimizers_checked:
            critic_ids = {id(p) for p in self.critic.parameters()}
            in_critic_opt = {id(p) for group in opt_c.param_groups for p in group["params"]}
            if not critic_ids & in_critic_opt:
                raise ValueError(
                    "The second optimizer from `configure_optimizers` holds none of the critic's "
                    "parameters: return them in the order (generator_opt, critic_opt)."
                )
            self._wgan_optimizers_checked = True
        return opt_g, opt_c

    def _latent(self, n: int) -> Tensor:
        z = self.sample_latent(n)
        if not isinstance(z, Tensor) or z.ndim == 0 or z.shape[0] != n:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"`sample_latent({n})` must return {n} latent vectors (a tensor with leading dimension {n}), "
                f"got {shape}."
            )
        return z

    def _touch(self, *used: nn.Module) -> Tensor | int:
        """0 · Σ θ[0] over the parameters the step's loss does not reach (see the module docstring)."""
        if not self._wgan_touch_unused:
            return 0
        key = tuple(id(module) for module in used)
        idle = self._wgan_idle.get(key)
        if idle is None:  # the set of parameters is fixed once training runs: compute it once per step kind
            reached = {id(p) for module in used for p in module.parameters()}
            idle = [p for p in self.parameters() if p.requires_grad and id(p) not in reached]
            self._wgan_idle[key] = idle
        if not idle:
            return 0
        return torch.stack([p.reshape(-1)[0].float() for p in idle]).sum() * 0

    def _wgan_check_finite(self, optimizer: Any, which: str, real: Tensor | None,
                           losses: list[tuple[str, Tensor]], penalties: list[tuple[str, Tensor]]) -> None:
        """Raise before ``optimizer.step`` when the step is non-finite on any rank (:mod:`lightning_gp.step._finite`:
        the all-reduced gradients and this rank's loss and penalty, one host read, every rank raising)."""
        values = StepValues()
        for what, v in losses:
            values.add_loss(v, what=what)
        for name, v in penalties:
            values.add(f"WGANGPMixin(regularizer={self.wgan_hparams['regularizer']!r})", f"wgan/{name}", v)
        if real is not None:
            values.batches.append(real)
        trainer = attached_trainer(self)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        step = self._wgan_critic_steps if which == "critic" else self._wgan_generator_steps
        try:
            check_step(values, [p.grad for p in params], step=self.global_step,
                       strategy=getattr(trainer, "strategy", None),
                       scaled=grad_scaler(trainer) is not None, grad_names=functools.partial(param_names, self, params),
                       caller="WGANGPMixin", off_switch="")
        except FloatingPointError as err:
            raise FloatingPointError(f"WGANGPMixin, {which} step {step}: {err}") from None

    def _wgan_should_log(self) -> bool:
        # `self.log` costs about as much as a small critic step, so log only on the batches whose metrics
        # the Trainer writes to its loggers (every `log_every_n_steps`), as Lightning itself would.
        trainer = attached_trainer(self)
        return should_log(trainer) and not (trainer is not None and trainer.barebones)  # barebones forbids self.log

    def _log(self, values: dict[str, Tensor], n: int) -> None:
        """Log a step's values, each a mean over this rank's ``n`` samples, as one process would on every rank's
        samples together (the sample-weighted mean over the DDP ranks, one all-reduce for all of them)."""
        names = list(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
        trainer = attached_trainer(self)
        if trainer is not None:
            stacked = over_ranks(trainer, stacked, n)
        for name, value in zip(names, stacked, strict=True):
            self.log(f"wgan/{name}", value, on_step=True, on_epoch=False, prog_bar=False)

    # ------------------------------------------------------------------------------------------ the loop
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One critic step on this batch; a generator step after every ``n_critic``-th critic step."""
        opt_g, opt_c = self._wgan_optimizers()
        real = self.real_samples(batch)
        if not isinstance(real, Tensor):
            raise TypeError(
                f"`real_samples(batch)` must return a tensor of real samples, got {type(real).__name__}. "
                "Override `real_samples` for batches that are not a tensor or a (samples, ...) tuple."
            )
        self.critic_step(real, opt_c)
        if self._wgan_critic_steps % self.wgan_hparams["n_critic"] == 0:
            self.generator_step(real.shape[0], opt_g)

    def critic_step(self, real: Tensor, optimizer: Any) -> Tensor:
        """One critic update on ``real``; returns the critic loss (detached)."""
        hp = self.wgan_hparams
        n = real.shape[0]
        name = hp["regularizer"]
        regularize = name in PENALTIES and self._wgan_critic_steps % hp["reg_every"] == 0
        log = self._wgan_should_log()
        with self._wgan_rng(stream=0):
            z = self._latent(n)
            alphas = (self.sample_alpha(n), self.sample_alpha(n)) if regularize else (None, None)
        with torch.no_grad():  # the critic step trains the critic only: no graph through G
            fake = self.generator(z)
        if fake.shape != real.shape:
            raise ValueError(
                f"The generator's output has shape {tuple(fake.shape)} but the real samples have shape "
                f"{tuple(real.shape)}: `generator(sample_latent(n))` must produce samples like the data's."
            )
        d_real = check_per_sample(self.critic(real), n, "critic(real)")
        d_fake = check_per_sample(self.critic(fake), n, "critic(fake)")
        wasserstein = d_real.mean() - d_fake.mean()
        loss = -wasserstein
        logged = loss.detach()
        if regularize:
            term = critic_penalty(
                name,
                self.critic,
                real,
                fake,
                method=hp["method"],
                alpha=alphas[0],
                alpha2=alphas[1],
                track_grad_norm=log,
            )
            weight = hp["gp_weight"] * hp["reg_every"]
            loss = loss + weight * term.loss
            logged = logged + weight * term.value
        optimizer.zero_grad()
        with explained_double_backward():
            self.manual_backward(loss + self._touch(self.critic))
        self._wgan_check_finite(optimizer, "critic", real, [("the critic loss E[D(x̃)] − E[D(x)]", -wasserstein)],
                                [("penalty", term.value)] if regularize else [])
        optimizer.step()
        if name == "weight_clipping":
            clip_weights_(self.critic, hp["clip_value"])
        self._wgan_critic_steps += 1
        if log:
            values = {"critic_loss": logged, "wasserstein_estimate": wasserstein}
            if regularize:
                values["penalty"] = term.value
                if term.grad_norm is not None:
                    values["critic_grad_norm"] = term.grad_norm
            self._log(values, n)
        return logged

    def generator_step(self, n: int, optimizer: Any) -> Tensor:
        """One generator update on ``n`` fresh latent vectors; returns −E[D(G(z))] (detached)."""
        with self._wgan_rng(stream=1):
            z = self._latent(n)
        d_fake = check_per_sample(self.critic(self.generator(z)), n, "critic(generator(z))")
        loss = -d_fake.mean()
        optimizer.zero_grad()
        # The critic's parameters get gradients here too (DDP needs every parameter in every backward);
        # the critic optimizer zeroes them before its next step.
        self.manual_backward(loss + self._touch(self.generator, self.critic))
        self._wgan_check_finite(optimizer, "generator", None, [("the generator loss", loss)], [])
        optimizer.step()
        self._wgan_generator_steps += 1
        if self._wgan_should_log():
            self._log({"generator_loss": loss}, n)
        return loss.detach()


__all__ = ["WGANGPMixin"]

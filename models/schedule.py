"""Flow-matching schedule math shared by sampling and training. Pure functions, no model, no engine.

Conventions (rectified flow): x_t = (1 - sigma) * x0 + sigma * noise, the network's flow is
v = noise - x0, so x0 = x_t - sigma * v. Timesteps live on a 0..1000 scale, t = 1000 * sigma.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ConfigBase

__all__ = ["SamplingConfig", "SAMPLERS", "shifted_sigmas", "timestep_table", "warped_timesteps", "sigma_at",
           "flow_to_x0", "x0_to_flow", "add_noise", "euler_step", "cfg_combine", "Sampler", "FewStepSampler",
           "EulerSampler", "make_sampler"]


def shifted_sigmas(shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """sigma_i = shift*s / (1 + (shift-1)*s) for s = 1 - i/N, i = 0..N-1 (float32)."""
    s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def timestep_table(shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    return shifted_sigmas(shift, num_train_timesteps) * num_train_timesteps


def warped_timesteps(steps: list[float], shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Self-Forcing's warp: step k -> table[N - k] of the shifted table with a 0 appended at index N."""
    table = torch.cat([timestep_table(shift, num_train_timesteps), torch.zeros(1)])
    out = []
    for k in steps:
        i = num_train_timesteps - int(k)
        if not 0 <= i <= num_train_timesteps:
            raise ValueError(f"denoising step {k} is outside 0..{num_train_timesteps}")
        out.append(float(table[i]))
    return out


def sigma_at(t: float, shift: float, num_train_timesteps: int = 1000) -> float:
    """Sigma of the table entry whose timestep is closest to t (first minimum), as the reference looks it up."""
    table = timestep_table(shift, num_train_timesteps)
    i = int(torch.argmin((table - torch.tensor(float(t), dtype=torch.float32)).abs()))
    return float(shifted_sigmas(shift, num_train_timesteps)[i])


def flow_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x_t - sigma * v in float64, cast back to x_t's dtype. sigma: float or tensor broadcastable."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x_t.device)
    return (x_t.double() - s * v.double()).to(x_t.dtype)


def x0_to_flow(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x_t - x0) / sigma (sigma > 0)."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x_t.device)
    return ((x_t.double() - x0.double()) / s).to(x_t.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    return (1 - s) * x0.float() + s * noise.float()


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE dx/dsigma = v (the rule of diffusers' FlowMatchEulerDiscreteScheduler)."""
    return (x_t.float() + (sigma_next - sigma) * v.float()).to(x_t.dtype)


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass
class SamplingConfig(ConfigBase):
    """How a block is denoised.

    sampler "few_step": each step predicts x0 and re-noises it to the next timestep with fresh noise
    (Self-Forcing / CausVid). sampler "euler": a multi-step flow ODE with optional classifier-free
    guidance (guidance_scale > 1 runs a second, unconditional pass with the negative prompt).
    """
    denoising_steps: list = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp: bool = True
    shift: float = 5.0
    num_train_timesteps: int = 1000
    context_timestep: float = 0.0  # timestep of the commit pass that writes a clean block's K/V
    block_frames: int = 3
    sampler: str = "few_step"
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    independent_first_frame: bool = False  # the first block of a stream is a single latent frame (image-like)

    def __post_init__(self):
        if not self.denoising_steps:
            raise ValueError("denoising_steps must not be empty")
        if self.block_frames <= 0:
            raise ValueError(f"block_frames must be positive, got {self.block_frames}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        self.denoising_steps = [float(s) for s in self.denoising_steps]

    @property
    def timesteps(self) -> list[float]:
        """The timesteps actually fed to the model, one per denoising step."""
        if self.sampler == "euler":
            sig = self.euler_sigmas()[:-1]
            return [float(s) * self.num_train_timesteps for s in sig]
        if self.warp:
            return warped_timesteps(self.denoising_steps, self.shift, self.num_train_timesteps)
        return list(self.denoising_steps)

    def sigmas(self) -> list[float]:
        """Sigma per denoising step (the x_t noise level at which each step's input sits)."""
        if self.sampler == "euler":
            return self.euler_sigmas()[:-1]
        return [sigma_at(t, self.shift, self.num_train_timesteps) for t in self.timesteps]

    def euler_sigmas(self) -> list[float]:
        """Euler sigmas plus a final 0, spaced as diffusers' FlowMatchEulerDiscreteScheduler does: evenly from
        1 down to the smallest training sigma (already shifted), then shifted once more."""
        n, N, sh = len(self.denoising_steps), self.num_train_timesteps, self.shift
        s_min = sh * (1 / N) / (1 + (sh - 1) / N)
        s = torch.linspace(1.0, s_min, n, dtype=torch.float64)
        sig = sh * s / (1 + (sh - 1) * s)
        return [float(x) for x in sig] + [0.0]

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)


class Sampler:
    """How a block goes from noise to a clean estimate, step by step: one object per engine, chosen once from the
    SamplingConfig (``make_sampler``), so the block loop calls the same four things whichever sampler runs.

    A session's ``state`` is any object with ``x`` (the current step's input) and ``x0`` (the latest clean
    estimate). ``guided``: the sampler needs an unconditional prediction (negative prompt) beside the conditional
    one. Step 0 of a block always starts from the block's initial noise; the sampler says what follows.
    """
    guided = False

    def __init__(self, sampling: "SamplingConfig", prediction: str = "flow"):
        self.sigmas = sampling.sigmas()  # the noise level of each step's input
        self.prediction = prediction  # what the network predicts: "flow" (v) or "x0"

    def step_input(self, step: int, state, renoise) -> torch.Tensor:
        """The input of step ``step`` (> 0) from the session's state. ``renoise()`` draws the step's fresh noise;
        only a sampler that re-noises calls it, so the others leave the noise stream untouched."""
        raise NotImplementedError

    def output(self, x: torch.Tensor, pred: torch.Tensor, pred_uncond, steps: list) -> torch.Tensor:
        """What a batch [B, F, C, h, w] (row i at step ``steps[i]``) steps with, from its predictions (and the
        unconditional ones when ``guided``)."""
        raise NotImplementedError

    def advance(self, state, step: int, x: torch.Tensor, out: torch.Tensor, last: bool) -> None:
        """One row after step ``step`` (``last``: the block's last step), from its input ``x`` and its ``output``
        row: the clean estimate ``state.x0`` and, when the next input follows from it, ``state.x``."""
        raise NotImplementedError


class FewStepSampler(Sampler):
    """Few-step distilled sampling (Self-Forcing, CausVid): every step predicts the clean block, and the next step
    starts from that estimate re-noised to its own level with fresh noise. Guidance is not part of it."""

    def step_input(self, step: int, state, renoise) -> torch.Tensor:
        return add_noise(state.x0, renoise(), self.sigmas[step])

    def output(self, x: torch.Tensor, pred: torch.Tensor, pred_uncond, steps: list) -> torch.Tensor:
        return pred

    def advance(self, state, step: int, x: torch.Tensor, out: torch.Tensor, last: bool) -> None:
        if self.prediction == "x0":
            state.x0 = out
        else:
            sigma = torch.tensor([self.sigmas[step]], dtype=torch.float64, device=x.device)[:, None, None, None]
            state.x0 = flow_to_x0(x, out, sigma)


class EulerSampler(Sampler):
    """A multi-step flow ODE solved with Euler steps (diffusers' FlowMatchEulerDiscreteScheduler), with optional
    classifier-free guidance on the flow: the next input is the Euler step itself, no noise is drawn after the
    first step, and the last step's point is the clean block."""

    def __init__(self, sampling: "SamplingConfig", prediction: str = "flow"):
        super().__init__(sampling, prediction)
        self.euler_sigmas = sampling.euler_sigmas()
        self.scale = sampling.guidance_scale
        self.guided = self.scale != 1.0

    def step_input(self, step: int, state, renoise) -> torch.Tensor:
        return state.x

    def _flow(self, x, pred, sigma):
        return pred if self.prediction == "flow" else x0_to_flow(x, pred, sigma)

    def output(self, x: torch.Tensor, pred: torch.Tensor, pred_uncond, steps: list) -> torch.Tensor:
        """The flow of each row, guided (``cfg_combine``) when an unconditional prediction is given."""
        sigma = torch.tensor([self.sigmas[s] for s in steps], dtype=torch.float64,
                             device=x.device)[:, None, None, None, None]
        v = self._flow(x, pred, sigma)
        if pred_uncond is not None:
            v = cfg_combine(v, self._flow(x, pred_uncond, sigma), self.scale)
        return v

    def advance(self, state, step: int, x: torch.Tensor, out: torch.Tensor, last: bool) -> None:
        sig, sig_next = self.euler_sigmas[step], self.euler_sigmas[step + 1]
        state.x = euler_step(x, out, sig, sig_next)
        state.x0 = state.x if last else flow_to_x0(x, out, sig)


def make_sampler(sampling: "SamplingConfig", prediction: str = "flow") -> Sampler:
    """The sampler object a SamplingConfig names, for a network predicting ``prediction`` ("flow" or "x0")."""
    return (EulerSampler if sampling.sampler == "euler" else FewStepSampler)(sampling, prediction)


SAMPLERS = {"few_step", "euler"}

SAMPLING_PRESETS = {
    "self_forcing": SamplingConfig(),
    "causvid": SamplingConfig(denoising_steps=[1000.0, 757.0, 522.0], warp=False, shift=8.0),
}

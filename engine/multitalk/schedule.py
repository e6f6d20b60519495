"""Flow-matching Euler schedule with the resolution's shift (ENGINE.md §4.3).

MultiTalk: wan/multitalk.py:92-101, 594-599, 713-718. u_i = linspace(1, 0.001, steps),
sigma_i = s*u_i / (1 + (s-1)*u_i), a final sigma of 0, model timestep t_i = 1000*sigma_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIGMA_MIN_UNSHIFTED = 0.001
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Schedule:
    sigmas: tuple[float, ...]  # steps + 1 values, decreasing, last 0

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep(self, i: int) -> float:
        return NUM_TRAIN_TIMESTEPS * self.sigmas[i]


def shifted_sigmas(steps: int, shift: float) -> np.ndarray:
    """(steps + 1,) float64: shifted sigmas of linspace(1, 0.001, steps), then 0."""
    u = np.linspace(1.0, SIGMA_MIN_UNSHIFTED, steps, dtype=np.float64)
    sigmas = shift * u / (1.0 + (shift - 1.0) * u)
    return np.append(sigmas, 0.0)


def make_schedule(steps: int, shift: float) -> Schedule:
    return Schedule(tuple(float(s) for s in shifted_sigmas(steps, shift)))


def euler_step(latent: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v, computed in fp32."""
    return (latent.float() + (sigma_next - sigma) * velocity.float()).to(latent.dtype)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow-matching interpolation (1 - sigma) * x0 + sigma * eps."""
    return (1.0 - sigma) * clean + sigma * noise


def diffusers_sigmas(steps: int, shift: float) -> np.ndarray:
    """The same schedule through diffusers' FlowMatchEulerDiscreteScheduler (for cross-checking)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, SIGMA_MIN_UNSHIFTED, steps))
    return scheduler.sigmas.double().numpy()

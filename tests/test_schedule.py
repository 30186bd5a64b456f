"""Flow-matching math against diffusers' FlowMatchEulerDiscreteScheduler and the reference fixture's table."""
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from inferix.models.schedule import (SAMPLING_PRESETS, SamplingConfig, add_noise, euler_step, flow_to_x0,
                                     sigma_at, warped_timesteps)


def test_self_forcing_warped_timesteps_match_reference(self_forcing_tiny):
    loop = json.loads((self_forcing_tiny / "config.json").read_text())["loop"]
    got = warped_timesteps(loop["denoising_step_list"], loop["timestep_shift"])
    assert got == loop["warped_timesteps_used"]  # bit-exact float32 values
    assert SAMPLING_PRESETS["self_forcing"].sigmas() == loop["sigma_at_each_step"]


def test_causvid_steps_are_used_unwarped():
    c = SAMPLING_PRESETS["causvid"]
    assert c.timesteps == [1000.0, 757.0, 522.0] and c.shift == 8.0
    # sigma of an unwarped step comes from the shift-8 table entry closest to it
    assert abs(c.sigmas()[1] - 0.757) < 2e-3


@pytest.mark.parametrize("shift,steps", [(5.0, 4), (3.0, 8), (1.0, 6)])
def test_euler_sampler_matches_diffusers(shift, steps):
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    ours = SamplingConfig(denoising_steps=[0.0] * steps, sampler="euler", shift=shift, warp=False)
    assert torch.allclose(torch.tensor(ours.euler_sigmas(), dtype=torch.float64), sch.sigmas.double(), atol=1e-6)
    assert torch.allclose(torch.tensor(ours.timesteps, dtype=torch.float64), sch.timesteps.double(), atol=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for i, t in enumerate(sch.timesteps):
        v = torch.randn(2, 3, 4, 4, generator=g)
        ref = sch.step(v, t, x).prev_sample
        mine = euler_step(x, v, ours.euler_sigmas()[i], ours.euler_sigmas()[i + 1])
        assert torch.allclose(ref, mine, atol=1e-6)
        x = ref


def test_x0_flow_roundtrip_and_noising():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sig = sigma_at(833.3333, 5.0)
    xt = add_noise(x0, noise, sig)
    v = noise - x0
    assert torch.allclose(flow_to_x0(xt, v, sig), x0, atol=1e-6)


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown sampling config keys: \\['steps'\\]"):
        SamplingConfig.from_dict({"steps": 4}, what="sampling config")
    with pytest.raises(ValueError, match="sampler"):
        SamplingConfig(sampler="ddim")
    with pytest.raises(ValueError, match="denoising step 1200.0 is outside"):
        warped_timesteps([1200.0], 5.0)

"""Small builders shared by the engine tests: tiny seeded models that run in milliseconds on CPU."""
import torch

from inferix.engine import Engine
from inferix.models.bundle import ModelBundle
from inferix.models.schedule import SamplingConfig
from inferix.models.text_encoder import HashTextEncoder
from inferix.models.wan_dit import CausalWanDiT, WanDiTConfig


def tiny_bundle(seed=0, *, block_frames=3, num_actions=0, sampling=None, decoder=None, latent=4, dim=32):
    torch.manual_seed(seed)
    cfg = WanDiTConfig(dim=dim, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, text_len=8,
                       num_actions=num_actions)
    dit = CausalWanDiT(cfg).eval()
    # make every parameter matter (default init leaves biases near zero): spread weights like the fixture does
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if "modulation" in n:
                p.copy_(0.5 * torch.randn_like(p))
            elif n.endswith("norm_q.weight") or n.endswith("norm_k.weight") or n.endswith("norm3.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    sampling = sampling or SamplingConfig(block_frames=block_frames)
    return ModelBundle(name="test-tiny", dit=dit, sampling=sampling, decoder=decoder,
                       text_encoder=HashTextEncoder(text_dim=16, text_len=8, seed=seed).eval(),
                       height=latent * 8, width=latent * 8)


def tiny_engine(seed=0, *, window=None, sink=0, kv_pages=64, block_frames=3, positions="auto", **kw):
    b = tiny_bundle(seed, block_frames=block_frames, **{k: kw.pop(k) for k in list(kw) if k in
                                                       ("num_actions", "sampling", "decoder", "latent")})
    return Engine(b, window=window, sink=sink, kv_pages=kv_pages, positions=positions, keep_latents=True, **kw)


def run_latents(engine, prompt="a red ball", frames=9, seed=0, **kw):
    s = engine.open_session(prompt, num_frames=frames, seed=seed, **kw)
    for _ in s:
        pass
    return torch.cat(s.latents)

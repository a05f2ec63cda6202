"""What several host tests read off a real ComfyUI: the weights it loads, a denoised estimate, how far two
tensors are apart; and adapters moved off their identity init so that applying them changes something."""

from __future__ import annotations

import torch


def loaded_state(patcher, keys=None) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes for ``patcher`` when it loads it to sample (patches applied, cast back
    to the model dtype); every key, or copies of ``keys``."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    state = patcher.model.state_dict()
    return state if keys is None else {k: state[k].detach().clone() for k in keys}


def denoised(model, positive, x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """ComfyUI's denoised estimate x̂0 of ``x0`` noised at ``sigma`` with ``noise``, through a Guider with
    ``positive`` as its conds."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler

    out = {}

    class Probe(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise_in, latent_image=None, *_, **__):
            sampling = model_wrap.inner_model.model_sampling
            s = sigmas[:1].expand(x0.shape[0])
            with torch.no_grad():
                out["x0"] = model_wrap(sampling.noise_scaling(s, noise, x0, False), s, **extra_args).float()
            return latent_image

    guider = comfy_extras.nodes_custom_sampler.Guider_Basic(model)
    guider.set_conds(positive)
    with torch.inference_mode(False):
        guider.sample(torch.zeros_like(x0), x0, Probe(), torch.tensor([sigma, 0.0]), seed=0)
    return out["x0"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def nudge_(adapter, seed: int) -> None:
    """Move an adapter off its identity init: noise on every parameter; SODA's rotations stay orthogonal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            if name.startswith("rotation."):
                p.copy_(p @ torch.linalg.matrix_exp(noise - noise.T))
            else:
                p.add_(noise)

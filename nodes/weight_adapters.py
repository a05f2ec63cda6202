"""TLoRA and SODA as ComfyUI weight adapters, so ComfyUI's own LoRA loading and patching
(Load LoRA, the bypass loaders, LoRA stacks, hooks, lowvram, offloading and prefetch) handles
this pack's files.

``load`` finds a module's tensor group in a file (the keys each adapter class declares in
``tlora/adapters``) and keeps it as ComfyUI keeps any adapter: ``loaded_keys`` and, in that order,
a tuple of tensors (``weights``), which the host's offloading and prefetch walk and rebuild as
``type(adapter)(loaded_keys, weights)``. ``calculate_weight`` rebuilds the core adapter, computes
``W' − W`` in fp32 and adds ``strength · (W' − W)``; ``bypass_forward`` runs the same adapted layer
around the frozen one without merging (quantized base weights).

TLoRA-family layers loaded from one file share a :class:`~tlora.batched_merge.GroupedMerge`: the
first merge of a group of same-shaped layers builds the factors of the next ones in one batched
pass. ComfyUI hands every ``load`` of one file the same dict: layers loaded one after another
from the same dict share one (held by the layers only: no file outlives its model here).

A module whose group fails the core's checks (``tlora.validate``: keys, shapes, ranks against the
layer, finite values) is refused with that message in the log and left unpatched, at each of the
three steps: no raw exception reaches the loader or the sampler.
"""

from __future__ import annotations

import logging
import weakref

import torch
from comfy import weight_adapter
from comfy.weight_adapter.base import WeightAdapterBase

from ..tlora.adapters import SODA, Adapter, ConvArgs, TLoRA
from ..tlora.batched_merge import GroupedMerge
from ..tlora.format import build_adapter, checked_delta
from ..tlora.validate import AdapterFileError, check_finite, check_group

log = logging.getLogger("comfyui-tlora")
_loading: tuple[int, weakref.ref, weakref.ref] | None = None  # the file dict's id, its first tensor, its GroupedMerge


class _TensorGroupAdapter(WeightAdapterBase):
    """One module's adapter tensors, rebuilt per weight shape and device."""

    name = "tlora"
    adapter_class: type[Adapter]  # whose file keys a module's group has
    multiplier = 1.0  # the strength, set by ComfyUI's bypass hook
    kw_dict: dict = {}  # noqa: RUF012 (ComfyUI's bypass hook sets it per instance)
    merge: GroupedMerge | None = None  # shared with the file's other layers (set by ``load``)

    def __init__(self, loaded_keys: tuple[str, ...], weights: tuple[torch.Tensor, ...]):
        self.loaded_keys = tuple(loaded_keys)
        self.weights = tuple(weights)
        mark = next(k for k in self.loaded_keys if k.endswith("." + self.adapter_class.file_mark))
        self.module = mark[: -len(self.adapter_class.file_mark) - 1]
        self.suffixes = tuple(k[len(self.module) + 1 :] for k in self.loaded_keys)
        self._built: dict[tuple, Adapter] = {}
        self._refused = False  # bypass_forward refused this module: the layer runs as the base one
        self._output_checked = False  # bypass_forward checked its first output

    @property
    def group(self) -> dict[str, torch.Tensor]:
        """``suffix → tensor`` of the current ``weights`` (the host may move or replace them)."""
        return {s: _from_host(s, w) for s, w in zip(self.suffixes, self.weights, strict=True)}

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        group = cls.adapter_class.file_group(lora, x)
        if group is None:
            return None
        try:
            check_group(group, None, x)
            check_finite(group, x)
        except AdapterFileError as err:
            log.error("%s: refused (not applied): %s", cls.name, err)
            return None
        keys = tuple(f"{x}.{suffix}" for suffix in group)
        if loaded_keys is not None:
            loaded_keys.update(keys)
        adapter = cls(keys, tuple(_to_host(t) for t in group.values()))
        if cls.adapter_class is TLoRA:
            adapter.join(_file_merge(lora), group)
        return adapter

    def join(self, merge: GroupedMerge, group: dict[str, torch.Tensor]) -> None:
        """Merge with the file's same-shaped layers (the merge holds this layer weakly)."""
        method = weakref.WeakMethod(self.adapter_for)

        def build(shape, device) -> Adapter | None:
            adapter_for = method()
            return None if adapter_for is None else adapter_for(shape, device)

        self.merge = merge
        merge.add(id(self), tuple((suffix, tuple(t.shape)) for suffix, t in group.items()), build)

    def adapter_for(self, shape: tuple[int, ...], device: torch.device) -> Adapter:
        key = (tuple(shape), device)
        if key not in self._built:
            self._built[key] = build_adapter(key[0], self.group, self.module).to(device)
        return self._built[key]

    def prepare(self, adapter: Adapter, weight: torch.Tensor) -> None:
        """Anything an adapter needs from the weight before merging (SODA: its SVD)."""

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        if strength == 0:
            return weight
        try:
            with torch.no_grad():
                delta = self.merge.delta(id(self), weight) if self.merge is not None else None
                if delta is None:  # this layer merges on its own path
                    adapter = self.adapter_for(weight.shape, weight.device)
                    self.prepare(adapter, weight)
                    delta = adapter.delta_weight(weight)
                delta = checked_delta(delta, weight, self.module).reshape(weight.shape).mul_(strength)  # a fresh buffer
                weight += function(delta.to(weight.dtype))
        except (ValueError, RuntimeError) as err:
            log.error("%s: %s not patched: %s", self.name, key, err)
        return weight

    def bypass_forward(self, org_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The adapted layer at strength ``multiplier`` around the frozen layer's own forward
        (``tlora.adapters.Adapter.bypass``); the base weight is read only where the method needs it."""
        if self._refused:
            return org_forward(x, *args, **kwargs)
        module = org_forward.__self__
        weight = module.weight
        conv = ConvArgs(**self.kw_dict) if self.kw_dict else None
        try:
            adapter = self.adapter_for(weight.shape, x.device)  # frozen: gradients reach x only
        except (ValueError, RuntimeError) as err:
            return self._refuse(err, org_forward, x, *args, **kwargs)
        y = adapter.bypass(
            x,
            lambda u: org_forward(u, *args, **kwargs),
            lambda: weight.detach().to(x.device, torch.float32),
            conv,
            float(self.multiplier),
        )
        if not self._output_checked:  # once (one host sync): finite factors can still overflow here
            self._output_checked = True
            if bool(torch.isfinite(x).all()) and not bool(torch.isfinite(y).all()):
                return self._refuse("its output is not finite on this layer", org_forward, x, *args, **kwargs)
        return y

    def _refuse(self, why, org_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Log why this module is not adapted, once, and run the layer as the base one from now on."""
        log.error("%s: %s not adapted (runs as the base layer): %s", self.name, self.module, why)
        self._refused = True
        return org_forward(x, *args, **kwargs)

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Only the residual alone is additive (``m·s·x·Δᵀ``); a transform or SODA's rotation
        acts inside the frozen layer, so ComfyUI's bypass hook calls :meth:`bypass_forward`."""
        raise NotImplementedError(f"{self.name} adapters act inside the layer: use bypass_forward")


def _file_merge(lora: dict) -> GroupedMerge:
    """The GroupedMerge of the file being loaded: the same dict (alive, with the same first
    tensor) as the last ``load``'s, else a new one. Files that share tensors stay apart."""
    global _loading
    first = next(iter(lora.values()))
    if _loading is not None and _loading[0] == id(lora) and _loading[1]() is first:
        merge = _loading[2]()
        if merge is not None:
            return merge
    merge = GroupedMerge()
    _loading = (id(lora), weakref.ref(first), weakref.ref(merge))
    return merge


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor (SODA's int64 fingerprint) as its bytes in float32, 0..255 each: ComfyUI's
    bypass hook casts every adapter tensor to the layer's float dtype, and bytes survive any such cast."""
    return t if t.is_floating_point() else t.reshape(1).view(torch.uint8).float()


def _from_host(suffix: str, t: torch.Tensor) -> torch.Tensor:
    if suffix != SODA.file_mark:
        return t
    return t.float().round().to(torch.uint8).cpu().view(torch.int64).reshape(())


class TLoRAWeightAdapter(_TensorGroupAdapter):
    """The TLoRA family (TLoRA, TLoRA*, transform-only, residual-only): ``tlora.*`` keys."""

    name = "tlora"
    adapter_class = TLoRA


class SODAWeightAdapter(_TensorGroupAdapter):
    """SODA / SVDiff: ``soda.*`` keys. The SVD is taken of the weight being patched; a weight
    other than the one trained on (another checkpoint, or one already patched by an earlier
    LoRA in a stack) only warns here: Apply TLoRA checks the model's own weights strictly."""

    name = "soda"
    adapter_class = SODA

    def prepare(self, adapter, weight: torch.Tensor) -> None:
        adapter.bind(weight, on_mismatch="warn")


ADAPTERS = (TLoRAWeightAdapter, SODAWeightAdapter)


def register() -> None:
    """Append this pack's adapters to ComfyUI's registry (once)."""
    for cls in ADAPTERS:
        if not any(a.__name__ == cls.__name__ for a in weight_adapter.adapters):
            weight_adapter.adapters.append(cls)

"""The adapter file: round trip, atomic writes, and clear errors for bad files (fuzzed)."""

import random

import pytest
import torch

from tlora import METHODS as METHOD_CLASSES
from tlora import PRESETS, SODA, soda_preset
from tlora.adapters import ADAPTER_CLASSES
from tlora.format import (
    AdapterFileError,
    build_adapter,
    group_by_module,
    load_adapter_file,
    save_adapters,
)

SHAPES = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (320, 768),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0": (320, 320),
    "diffusion_model.input_blocks.1.0.in_layers.2": (320, 320, 3, 3),
}


METHODS = [*sorted(PRESETS), "soda", "svdiff"]


def trained(method, shape, seed=0):
    if method in ("soda", "svdiff"):
        adapter = SODA(shape, soda_preset(method))
        adapter.bind(torch.randn(shape, generator=torch.Generator().manual_seed(100)))
    else:
        adapter = METHOD_CLASSES[method](shape, PRESETS[method])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return adapter


@pytest.fixture(params=METHODS)
def saved(request, tmp_path):
    adapters = {m: trained(request.param, s) for m, s in SHAPES.items()}
    path = save_adapters(tmp_path / "a.safetensors", adapters, {"tlora.method": request.param})
    return path, adapters


def test_round_trip_rebuilds_every_module_exactly(saved):
    path, adapters = saved
    loaded = load_adapter_file(path)
    assert sorted(loaded.modules) == sorted(SHAPES) and loaded.stray_keys == []
    for module, group in loaded.modules.items():
        weight = torch.randn(SHAPES[module], generator=torch.Generator().manual_seed(100))
        rebuilt = build_adapter(weight.shape, group)
        torch.testing.assert_close(rebuilt.merged_weight(weight), adapters[module].merged_weight(weight))
        torch.testing.assert_close(rebuilt.delta_weight(weight), rebuilt.merged_weight(weight) - weight)
        assert not any(p.requires_grad for p in rebuilt.parameters())  # for merging: matmuls take the fast path


def test_suffixes_are_unambiguous(saved):
    path, adapters = saved
    keys = load_adapter_file(path).modules[next(iter(SHAPES))]
    method = next(iter(adapters.values())).method
    if method == "lora":
        assert set(keys) == {"lora_up.weight", "lora_down.weight", "alpha"}  # any LoRA loader reads it
    else:  # nothing a stock loader would half-apply
        assert all(k.startswith("soda." if method in ("soda", "svdiff") else "tlora.") for k in keys)


def test_metadata_and_version(saved):
    path, _ = saved
    meta = load_adapter_file(path).metadata
    assert meta["tlora.format_version"] == "1" and "tlora.checksum" in meta


def test_no_silent_overwrite_and_atomic(tmp_path):
    adapters = {"m": trained("tlora", (8, 8))}
    path = save_adapters(tmp_path / "x.safetensors", adapters)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_adapters(path, {"m": trained("tlora", (8, 8), seed=1)})
    assert path.read_bytes() == before
    save_adapters(path, {"m": trained("tlora", (8, 8), seed=1)}, overwrite=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temporary left behind


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter_file(tmp_path / "nope.safetensors")


def test_not_an_adapter_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(AdapterFileError, match="not an adapter file"):
        load_adapter_file(tmp_path / "ckpt.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, I am not a tensor file")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_adapter_file(tmp_path / "text.safetensors")


def test_groups_split_on_longest_module_name():
    tensors = {
        "a.to_out.0.tlora.scale": torch.tensor(1.0),
        "a.to_out.0.tlora.transform.0": torch.zeros(1),
        "a.to_out.tlora.scale": torch.tensor(1.0),
        "stray.weight": torch.zeros(1),
    }
    groups = group_by_module(tensors)
    assert sorted(groups["a.to_out.0"]) == ["tlora.scale", "tlora.transform.0"]
    assert sorted(groups["a.to_out"]) == ["tlora.scale"]
    assert sorted(groups[""]) == ["stray.weight"]


def test_fuzz_truncation_and_byte_flips(tmp_path):
    """Never a crash, never a silently different adapter: either the file loads unchanged or
    an AdapterFileError names the problem."""
    adapters = {m: trained("tlora", s) for m, s in list(SHAPES.items())[:2]}
    good = save_adapters(tmp_path / "good.safetensors", adapters, {"tlora.method": "tlora"}).read_bytes()
    reference = load_adapter_file(tmp_path / "good.safetensors").modules
    rng = random.Random(0)
    bad = tmp_path / "bad.safetensors"
    outcomes = {"error": 0, "intact": 0}
    for trial in range(300):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(len(data)) if trial % 3 == 1 else rng.randrange(min(len(data), 600))
                data[pos] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        try:
            loaded = load_adapter_file(bad)
        except AdapterFileError as err:
            assert "bad.safetensors" in str(err)
            outcomes["error"] += 1
            continue
        assert loaded.modules.keys() == reference.keys()
        for module, group in loaded.modules.items():
            assert group.keys() == reference[module].keys()
            assert all(torch.equal(group[k], reference[module][k]) for k in group)
        outcomes["intact"] += 1
    assert outcomes["error"] > 250


def test_probing_a_module_finds_its_whole_group(saved):
    path, adapters = saved
    from safetensors.torch import load_file

    tensors = load_file(path)
    module = next(iter(SHAPES))
    own = type(next(iter(adapters.values())))
    expected = load_adapter_file(path).modules[module]
    for cls in ADAPTER_CLASSES:
        group = cls.file_group(tensors, module)
        if cls is not own:
            assert group is None, cls  # another family's marker is absent
            continue
        assert group.keys() == expected.keys() and all(torch.equal(group[k], expected[k]) for k in group)
        assert cls.file_group(tensors, "diffusion_model.nothing") is None

"""Export to a plain LoRA (tlora.export): exact at full rank, the SVD tail at a low rank, conv shapes,
bake keys, the metadata, and the CLI reading base weights from a checkpoint."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tlora import PRESETS, SODA, TLoRA, soda_preset
from tlora.__main__ import main
from tlora.export import export_adapter, export_tensors, low_rank
from tlora.format import build_adapter, load_adapter_file, read_metadata, save_adapters

SHAPES = {
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (32, 32),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (32, 48),
    "diffusion_model.input_blocks.1.0.in_layers.2": (16, 8, 3, 3),
}


def randomized(method, shape, weight, seed=0):
    if method in ("soda", "svdiff"):
        adapter = SODA(shape, soda_preset(method))
        adapter.bind(weight)
    else:
        adapter = TLoRA(shape, PRESETS[method])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(p @ torch.linalg.matrix_exp(noise - noise.T)) if name.startswith("rotation.") else p.add_(noise)
    return adapter


@pytest.fixture(scope="module")
def base():
    gen = torch.Generator().manual_seed(1)
    return {m: torch.randn(shape, generator=gen) for m, shape in SHAPES.items()}


def saved(tmp_path, method, base, name="adapter"):
    adapters = {m: randomized(method, w.shape, w, seed=i) for i, (m, w) in enumerate(base.items())}
    path = save_adapters(tmp_path / f"{name}.safetensors", adapters, {"tlora.method": method})
    return load_adapter_file(path), adapters


def lora_delta(tensors, module, shape):
    up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
    scale = float(tensors[f"{module}.alpha"]) / down.shape[0]
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "soda"])
def test_full_rank_export_reproduces_delta(tmp_path, base, method):
    file, adapters = saved(tmp_path, method, base)
    report = export_adapter(file, base, tmp_path / "out.safetensors", rank=10_000)
    tensors = load_file(str(report.path))
    for module, w in base.items():
        expected = adapters[module].delta_weight(w).detach()
        got = lora_delta(tensors, module, w.shape)
        assert float((got - expected).norm() / expected.norm()) < 1e-4, module
        # and the exported file reads back as a LoRA through the pack's own loader
        rebuilt = build_adapter(tuple(w.shape), file_group(tensors, module))
        assert torch.allclose(rebuilt.delta_weight(w), expected, atol=1e-4)
    assert report.error < 1e-5 and report.max_error < 1e-5
    assert {layer.module: layer.rank for layer in report.layers} == dict(zip(SHAPES, [32, 32, 16], strict=True))
    meta = read_metadata(report.path)
    assert meta["tlora.exported_from"] == "adapter.safetensors"
    assert meta["tlora.export_rank"] == "10000" and float(meta["tlora.export_error"]) < 1e-5
    assert load_adapter_file(report.path).method == "lora"  # checksum intact, plain LoRA groups


def file_group(tensors, module):
    return {k[len(module) + 1 :]: v for k, v in tensors.items() if k.startswith(module + ".")}


def test_low_rank_error_is_the_svd_tail(tmp_path, base):
    file, adapters = saved(tmp_path, "tlora", base)
    rank = 3
    tensors, report = export_tensors(file, base, rank)
    total_tail, total = 0.0, 0.0
    for layer in report.layers:
        delta = adapters[layer.module].delta_weight(base[layer.module]).detach().reshape(layer.shape[0], -1)
        s = torch.linalg.svdvals(delta.double())
        tail = float((s[rank:] ** 2).sum() / (s**2).sum())
        assert layer.rank == rank
        assert layer.error == pytest.approx(math.sqrt(tail), rel=1e-3)
        got = lora_delta(tensors, layer.module, layer.shape).reshape(delta.shape)
        assert float((delta - got).norm() / delta.norm()) == pytest.approx(layer.error, rel=1e-3)
        total_tail += float((s[rank:] ** 2).sum())
        total += float((s**2).sum())
    assert report.error == pytest.approx(math.sqrt(total_tail / total), rel=1e-3)
    assert "overall" in report.table()


def test_conv_shapes_and_alpha(tmp_path, base):
    file, _ = saved(tmp_path, "tlora", base)
    tensors, _ = export_tensors(file, base, 4)
    conv = "diffusion_model.input_blocks.1.0.in_layers.2"
    assert tensors[f"{conv}.lora_up.weight"].shape == (16, 4, 1, 1)
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 8, 3, 3)
    linear = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    assert tensors[f"{linear}.lora_up.weight"].shape == (32, 4)
    assert tensors[f"{linear}.lora_down.weight"].shape == (4, 48)
    assert float(tensors[f"{linear}.alpha"]) == 4.0


def test_bake_keys(tmp_path, base):
    file, adapters = saved(tmp_path, "soda", base)
    report = export_adapter(file, base, tmp_path / "baked.safetensors", rank=1, mode="bake")
    tensors = load_file(str(report.path))
    assert sorted(tensors) == sorted(f"{m}.diff" for m in base)
    for module, w in base.items():
        torch.testing.assert_close(tensors[f"{module}.diff"], adapters[module].delta_weight(w).detach())
    assert report.error == 0 and read_metadata(report.path)["tlora.export_mode"] == "bake"


def test_low_rank_randomized_path():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2048, 6, generator=gen) @ torch.randn(6, 2048, generator=gen)
    up, down = low_rank(a, 8)  # small rank of a big matrix: svd_lowrank
    assert up.shape == (2048, 8) and down.shape == (8, 2048)
    assert float((up @ down - a).norm() / a.norm()) < 1e-4


def test_errors(tmp_path, base):
    file, _ = saved(tmp_path, "tlora", base)
    with pytest.raises(ValueError, match="rank"):
        export_tensors(file, base, 0)
    with pytest.raises(ValueError, match="no base weight"):
        export_tensors(file, dict(list(base.items())[:1]), 4)
    wrong = {m: torch.randn(64, 64) for m in base}
    with pytest.raises(ValueError, match="does not fit"):
        export_tensors(file, wrong, 4)
    export_adapter(file, base, tmp_path / "x.safetensors", 4)
    with pytest.raises(FileExistsError):
        export_adapter(file, base, tmp_path / "x.safetensors", 4)
    export_adapter(file, base, tmp_path / "x.safetensors", 4, overwrite=True)


def test_cli_reads_base_weights_from_checkpoint(tmp_path, base, capsys):
    file, adapters = saved(tmp_path, "tlora_star", base)
    ckpt = {f"model.{m}.weight": w for m, w in base.items()}
    ckpt["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    save_file(ckpt, str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "cli.safetensors"
    argv = ["export", str(file.path), "--checkpoint", str(tmp_path / "ckpt.safetensors"), "--output", str(out)]
    assert main([*argv, "--rank", "64"]) == 0
    printed = capsys.readouterr().out
    assert "overall (3 layers, lora, rank 64)" in printed
    tensors = load_file(str(out))
    for module, w in base.items():
        expected = adapters[module].delta_weight(w).detach()
        assert float((lora_delta(tensors, module, w.shape) - expected).norm() / expected.norm()) < 1e-4
    assert main([*argv, "--rank", "2"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--bake", "--overwrite"]) == 0
    assert all(k.endswith(".diff") for k in load_file(str(out)))
    save_file({"model.other.weight": torch.zeros(2, 2)}, str(tmp_path / "wrong.safetensors"))
    argv[3] = str(tmp_path / "wrong.safetensors")
    assert main([*argv, "--overwrite"]) == 2
    assert "no base weight" in capsys.readouterr().err

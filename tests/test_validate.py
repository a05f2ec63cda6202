"""One validation pass before anything is built (issue 17): each hostile file of the report is refused
with an AdapterFileError naming the file, the module and the problem, by the loader and by the
header-only check alike, and cheaply (no adapter is built for a rank it cannot afford)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench.fuzz_files import LAYERS, good_file, serialized
from tlora import TLoRA
from tlora.adapters import ADAPTER_CLASSES, SODA
from tlora.format import AdapterFileError, build_adapter, describe, inspect_adapter_file, load_adapter_file
from tlora.validate import MAX_HEADER_BYTES, all_finite, check_group, layout_of

Q, K, CONV = LAYERS  # module names: to_q (16, 16), to_k (16, 24), conv (8, 4, 3, 3)
RANK_0 = torch.zeros(0, 16)  # a rank-0 LoRA factor (its scale alpha / 0 was a ZeroDivisionError)


def write(tmp_path, name, tensors, metadata, **kw):
    path = tmp_path / name
    path.write_bytes(serialized(tensors, metadata, **kw))
    return path


def raw_file(tmp_path, header: bytes, data: bytes = b"") -> object:
    path = tmp_path / "raw.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def refusals(path) -> list[str]:
    """The messages of both ways of checking a file (the loader's and the route's)."""
    messages = []
    for check in (load_adapter_file, inspect_adapter_file):
        with pytest.raises(AdapterFileError) as err:
            check(path)
        messages.append(str(err.value))
    return messages


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (b"[1, 2]", "header is a JSON list, not an object"),
        (b'"x"', "header is a JSON str, not an object"),
        (b'{"a":' * 20_000 + b"{}" + b"}" * 20_000, "nested too deeply"),
        (b'{"a": {"a": {"a": {}}}}', "expected an object with"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "appears twice"),
        (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "do not hold [2] of F32"),
        (b'{"__metadata__": {"tlora.steps": 3}}', "__metadata__ must map names to strings"),
    ],
)
def test_a_hostile_header_is_refused_with_its_problem(tmp_path, header, problem):
    for message in refusals(raw_file(tmp_path, header, b"\0" * 4)):
        assert message.startswith("raw.safetensors is not a readable safetensors file") and problem in message


def test_header_size_is_bounded(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b" " * (MAX_HEADER_BYTES + 16))
    assert "header size" in refusals(path)[0]


def mutated(method, change):
    tensors, metadata, _ = good_file(method)
    tensors = dict(tensors)
    change(tensors)
    return tensors, metadata


@pytest.mark.parametrize(
    ("method", "change", "problem"),
    [  # each a case of the report (issue 17, items 3–5), saved with a valid checksum
        ("tlora", lambda t: t.update({f"{Q}.tlora.lora_mid": torch.zeros(4)}), "unexpected key tlora.lora_mid"),
        ("lora", lambda t: t.update({f"{Q}.lora_mid.weight": torch.zeros(4, 4)}), "unexpected key lora_mid.weight"),
        ("tlora", lambda t: t.update({f"{Q}.tlora.lora_up": torch.zeros(16, 2)}), "tlora.lora_up cannot be combined"),
        ("tlora", lambda t: t.pop(f"{Q}.tlora.residual_in.1"), "missing tlora.residual_in.1"),
        ("residual", lambda t: t.pop(f"{Q}.tlora.residual_in.2"), "3 tlora.residual_out cores but 2"),
        (
            "lora",
            lambda t: t.update({f"{Q}.lora_up.weight": torch.zeros(16, 0), f"{Q}.lora_down.weight": RANK_0}),
            "lora_up.weight is empty (shape [16, 0])",
        ),
        ("soda", lambda t: t.update({f"{Q}.soda.base_fingerprint": torch.tensor(7.0).half()}), "dtype torch.float16"),
        ("tlora", lambda t: t.update({f"{Q}.tlora.scale": torch.tensor(float("nan"))}), "tlora.scale holds 1 NaN"),
        ("lora", lambda t: t[f"{K}.lora_down.weight"].__setitem__((0, 3), float("inf")), "lora_down.weight holds 1"),
        ("soda", lambda t: t.update({f"{Q}.soda.delta": torch.full((16,), float("nan"))}), "soda.delta holds 16 NaN"),
        ("tlora", lambda t: t.update({f"{Q}.tlora.transform.1": torch.zeros(2, 2, 2)}), "expected [I, I, Rt, Rt]"),
        ("tlora_star", lambda t: t.update({f"{Q}.tlora.lora_up": torch.zeros(16, 40)}), "are not [out, r] and [r, in]"),
        ("transform", lambda t: t.update({f"{Q}.tlora.scale": torch.zeros(2)}), "tlora.scale must be a scalar"),
        ("soda", lambda t: t.update({f"{Q}.soda.cayley.0": torch.eye(4)}), "soda.cayley cannot be combined"),
    ],
)
def test_a_hostile_group_is_refused_naming_file_module_and_problem(tmp_path, method, change, problem):
    path = write(tmp_path, "hostile.safetensors", *mutated(method, change))
    for message in refusals(path):
        assert message.startswith("hostile.safetensors: diffusion_model.block.") and problem in message, message


def test_a_zero_size_core_of_ring_rank_1500_costs_nothing(tmp_path, monkeypatch):
    """The report's memory bomb: a core of rank 1500 and size 0 made every loader allocate GBs."""
    monkeypatch.setattr(TLoRA, "from_state", lambda *a, **k: pytest.fail("built before it was checked"))
    bomb = lambda t: t.update({f"{Q}.tlora.residual_out.0": torch.zeros(0, 1500, 1500)})  # noqa: E731
    tensors, metadata = mutated("tlora", bomb)
    path = write(tmp_path, "bomb.safetensors", tensors, metadata)
    start = time.perf_counter()
    assert "tlora.residual_out.0 is empty (shape [0, 1500, 1500])" in refusals(path)[0]
    group = {k[len(Q) + 1 :]: v for k, v in tensors.items() if k.startswith(Q + ".")}
    with pytest.raises(AdapterFileError, match="is empty"):
        build_adapter(LAYERS[Q], group)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("rank", [17, 40, 1500])
def test_ranks_beyond_the_layer_width_are_refused_before_building(monkeypatch, rank):
    monkeypatch.setattr(TLoRA, "from_state", lambda *a, **k: pytest.fail("built before it was checked"))
    cores = {f"tlora.residual_out.{d}": torch.empty(n, rank, rank) for d, n in enumerate((1, 1, 16))}
    cores.update({f"tlora.residual_in.{d}": torch.empty(n, rank, rank) for d, n in enumerate((1, 1, 16))})
    group = {"tlora.scale": torch.tensor(1.0), **cores}
    with pytest.raises(AdapterFileError, match=rf"m: residual ring rank {rank} is outside 1\.\.16"):
        build_adapter((16, 16), group, "m")


def test_a_group_for_another_layer_is_refused_by_build(tmp_path):
    tensors, metadata, _ = good_file("tlora")
    file = load_adapter_file(write(tmp_path, "ok.safetensors", tensors, metadata))
    with pytest.raises(AdapterFileError, match=r"x: input widths disagree: tlora.transform 16, .*the layer 24"):
        build_adapter(LAYERS[K], file.modules[Q], "x")


def test_finite_but_overflowing_weights_are_refused_when_merged(tmp_path):
    from tlora.format import finite_delta

    huge = lambda t: t.update({k: t[k].sign() * 1e38 for k in (f"{Q}.lora_up.weight", f"{Q}.lora_down.weight")})  # noqa: E731
    tensors, metadata = mutated("lora", huge)
    file = load_adapter_file(write(tmp_path, "huge.safetensors", tensors, metadata))  # finite: accepted
    adapter = build_adapter(LAYERS[Q], file.modules[Q])
    with pytest.raises(AdapterFileError, match="weight change is not finite"):
        finite_delta(adapter, torch.randn(LAYERS[Q]))


@pytest.mark.parametrize("method", ["tlora", "tlora_star", "transform", "residual", "lora", "soda", "svdiff"])
def test_valid_files_pass_and_describe_alike(tmp_path, method):
    path = write(tmp_path, "ok.safetensors", *good_file(method)[:2])
    loaded, header = load_adapter_file(path), inspect_adapter_file(path)
    assert describe(loaded) == describe(header) and describe(header)["modules"] == 3
    for module, group in loaded.modules.items():
        assert check_group(group, LAYERS[module]) is check_group(header.modules[module], LAYERS[module])


def test_every_layout_uses_declared_keys_only():
    for cls in ADAPTER_CLASSES:
        declared = set(cls.file_fixed) | set(cls.file_indexed)
        assert cls.file_layouts and all(set(layout) <= declared for layout in cls.file_layouts), cls
        for layout in cls.file_layouts:  # each layout is what layout_of finds for exactly its keys
            keys = [cls.file_mark] + [cls.file_prefix + (f"{n}.0" if n in cls.file_indexed else n) for n in layout]
            assert layout_of(cls, keys) == layout


def test_indices_must_be_canonical_and_contiguous():
    with pytest.raises(ValueError, match=r"unexpected key soda\.rotation\.01"):
        layout_of(SODA, ["soda.base_fingerprint", "soda.delta", "soda.rotation.01"])
    with pytest.raises(ValueError, match=r"missing soda.rotation.1 \(have indices \[0, 2\]\)"):
        layout_of(SODA, ["soda.base_fingerprint", "soda.delta", "soda.rotation.0", "soda.rotation.2"])


def test_stray_non_finite_tensors_are_refused_too(tmp_path):
    tensors, metadata, _ = good_file("lora")
    path = write(tmp_path, "stray.safetensors", {**tensors, "some.diff": torch.tensor([float("nan")])}, metadata)
    for message in refusals(path):
        assert message.startswith("stray.safetensors: some.diff holds 1 NaN")


def test_the_streamed_checksum_is_the_checksum(tmp_path):
    """inspect_adapter_file hashes the file region by region; one flipped data byte shows."""
    tensors, metadata, _ = good_file("soda")
    path = write(tmp_path, "s.safetensors", tensors, metadata)
    inspect_adapter_file(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    assert all("checksum does not match" in m for m in refusals(path))


def test_all_finite_is_one_reduction_that_sees_nan_and_inf():
    ok = [torch.randn(3, 3), torch.full((2,), 3e38), torch.zeros(0)]
    assert all_finite(ok)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not all_finite([*ok, torch.tensor([1.0, bad]).bfloat16()])


def test_metadata_values_stay_strings(tmp_path):
    header = json.dumps({"__metadata__": {"a": "1"}, "x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}})
    path = raw_file(tmp_path, header.encode(), b"\0" * 4)
    assert "holds no TLoRA, SODA or LoRA tensors" in refusals(path)[0]

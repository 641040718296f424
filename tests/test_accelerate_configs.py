"""Every shipped accelerate config loads with accelerate's own parser and says what it is for."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {
    "cpu.yaml": DistributedType.MULTI_GPU,  # torchrun-style launcher; gloo on CPU tensors
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "multi_node.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
}


def test_one_config_per_hardware_shape():
    assert sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_is_commented(name):
    path = REPO / "accelerate_configs" / name
    config = load_config_from_file(str(path))
    assert config.distributed_type == EXPECTED[name]
    assert path.read_text().lstrip().startswith("#"), "each config opens with a comment saying when to use it"
    if name == "multi_node.yaml":
        assert config.num_machines > 1
    if name == "cpu.yaml":
        assert config.use_cpu

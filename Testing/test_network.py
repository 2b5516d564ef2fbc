"""The Attention U-Net: the paper's structure, attention coefficients, gradients and size."""

import pytest
import torch

from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig, count_parameters

PAPER = NetworkConfig(in_channels=1, num_classes=2, feature_scale=4, gates_per_level=2, deep_supervision=True)


def test_paper_configuration_has_about_6_4_million_parameters():
    # Oktay et al. report about 6.4 M parameters for the multi-gate CT model with deep supervision.
    assert count_parameters(AttentionUNet3D(PAPER)) == 6_470_832
    assert AttentionUNet3D(PAPER).config.filters == [16, 32, 64, 128, 256]


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig(feature_scale=16),
        NetworkConfig(feature_scale=16, gates_per_level=1, deep_supervision=False),
        NetworkConfig(feature_scale=16, norm="instance", num_classes=3, in_channels=2),
    ],
)
def test_logits_and_attention_shapes(config):
    network = AttentionUNet3D(config).eval()
    x = torch.randn(1, config.in_channels, 32, 48, 64)
    with torch.no_grad():
        logits, alphas = network(x, return_attention=True)
    assert logits.shape == (1, config.num_classes, 32, 48, 64)
    assert sorted(alphas) == [2, 3, 4]
    for level, alpha in alphas.items():
        scale = 2 ** (level - 1)  # level k's skip is 2**(k-1) times coarser than the input
        assert alpha.shape == (1, config.gates_per_level, 32 // scale, 48 // scale, 64 // scale)
        assert 0.0 <= float(alpha.min()) and float(alpha.max()) <= 1.0


def test_attention_is_returned_only_when_asked():
    network = AttentionUNet3D(NetworkConfig(feature_scale=16)).eval()
    with torch.no_grad():
        out = network(torch.randn(1, 1, 16, 16, 16))
    assert isinstance(out, torch.Tensor)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    network = AttentionUNet3D(NetworkConfig(feature_scale=16)).train()
    logits = network(torch.randn(2, 1, 32, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (2, 32, 32, 32))).backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gates_change_the_skip_features():
    """Zeroing a gate's psi bias towards -inf closes the gate: the output must change."""
    torch.manual_seed(0)
    network = AttentionUNet3D(NetworkConfig(feature_scale=16)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = network(x)
        for block in network.attention.values():
            for gate in block.gates:
                gate.psi.bias.fill_(-50.0)
        after, alphas = network(x, return_attention=True)
    assert float(max(a.max() for a in alphas.values())) < 1e-6
    assert not torch.allclose(before, after)


def test_eval_forward_is_deterministic():
    network = AttentionUNet3D(NetworkConfig(feature_scale=16)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(network(x), network(x))


def test_config_round_trip_and_validation():
    assert NetworkConfig.from_dict(PAPER.to_dict()) == PAPER
    with pytest.raises(ValueError):
        NetworkConfig(norm="group")
    with pytest.raises(ValueError):
        NetworkConfig.from_dict({"width": 3})
    with pytest.raises(ValueError):
        NetworkConfig(deep_width=0)


def test_deep_width_widens_only_the_coarse_levels_and_older_model_files_read_as_width_one():
    wide = NetworkConfig(feature_scale=8, deep_width=2)
    assert wide.filters == [8, 16, 64, 128, 256]
    assert count_parameters(AttentionUNet3D(wide)) == 6_298_984  # 3.9x the 1.62 M of width 1
    settings = wide.to_dict()
    del settings["deep_width"]  # as in the metadata of model files written before the setting existed
    assert NetworkConfig.from_dict(settings).filters == [8, 16, 32, 64, 128]

"""Tests of weight normalization, its removal and its data-dependent initialization."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from normlab import nn as nlnn
from normlab.nn import factory
from normlab.nn.weightnorm import WeightNorm

# (layer factory, input shape, weight dimension of the output units)
LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5), 0),
    "linear-sequence": (lambda: nn.Linear(5, 4), (3, 7, 5), 0),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 9), 0),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6), 0),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 6, 6), 0),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4), 0),
    "conv-transpose2d": (
        lambda: nn.ConvTranspose2d(3, 4, 3, stride=2),
        (2, 3, 4, 4),
        1,
    ),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(3, 5, 2), (2, 3, 6), 1),
}


def make_layer(key):
    torch.manual_seed(0)
    build, input_shape, unit_dim = LAYERS[key]
    return build(), torch.randn(input_shape), unit_dim


def get_weight_norm(layer: nn.Module) -> WeightNorm:
    return layer.parametrizations.weight[0]


def unit_norms(weight: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """Return the norm of each output unit's slice along unit_dim."""
    dims = [d for d in range(weight.dim()) if d != unit_dim]
    return torch.linalg.vector_norm(weight, dim=dims)


# weight_norm ------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_weight_norm_keeps_function(key):
    layer, x, _ = make_layer(key)
    weight = layer.weight.detach().clone()
    expected = layer(x)
    assert nlnn.weight_norm(layer) is layer
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.weight, weight)


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_weight_norm_g_is_unit_norm(key):
    layer, _, unit_dim = make_layer(key)
    weight = layer.weight.detach().clone()
    nlnn.weight_norm(layer)
    wn = get_weight_norm(layer)
    assert wn.dim == unit_dim
    assert wn.g.shape == (weight.size(unit_dim),)
    torch.testing.assert_close(wn.g.detach(), unit_norms(weight, unit_dim))
    assert torch.equal(wn.v.detach(), weight)


def test_weight_norm_parameter_names():
    layer = nlnn.weight_norm(nn.Conv2d(3, 4, 3))
    names = sorted(name for name, _ in layer.named_parameters())
    assert names == [
        "bias",
        "parametrizations.weight.0.g",
        "parametrizations.weight.0.v",
    ]
    assert sorted(layer.state_dict()) == names
    assert isinstance(layer, nn.Conv2d)


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_weight_norm_length_follows_g(key):
    layer, _, unit_dim = make_layer(key)
    nlnn.weight_norm(layer)
    wn = get_weight_norm(layer)
    with torch.no_grad():
        wn.g.copy_(torch.linspace(-2.0, 3.0, wn.g.numel()))
    # Each output unit's weight has length |g| and the direction of v.
    norms = unit_norms(layer.weight.detach(), unit_dim)
    torch.testing.assert_close(norms, wn.g.detach().abs())


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_weight_norm_matches_torch_parametrization(key):
    ours, x, unit_dim = make_layer(key)
    theirs = copy.deepcopy(ours)
    nlnn.weight_norm(ours)
    parametrizations.weight_norm(theirs, dim=unit_dim)
    torch.manual_seed(1)
    with torch.no_grad():
        theirs.parametrizations.weight.original0.uniform_(0.5, 2.0)
        theirs.parametrizations.weight.original1.normal_()
        wn = get_weight_norm(ours)
        wn.g.copy_(theirs.parametrizations.weight.original0.flatten())
        wn.v.copy_(theirs.parametrizations.weight.original1)

    grad_output = torch.randn_like(theirs(x))
    outputs = []
    grads = []
    for layer in (ours, theirs):
        inp = x.clone().requires_grad_(True)
        output = layer(inp)
        output.backward(grad_output)
        outputs.append(output)
        grads.append((inp.grad, layer.bias.grad))

    their_g = theirs.parametrizations.weight.original0
    their_v = theirs.parametrizations.weight.original1
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(wn.g.grad, their_g.grad.flatten())
    torch.testing.assert_close(wn.v.grad, their_v.grad)


def test_weight_norm_explicit_dim():
    layer = nn.Linear(5, 4)
    weight = layer.weight.detach().clone()
    nlnn.weight_norm(layer, dim=-1)
    wn = get_weight_norm(layer)
    assert wn.dim == 1
    torch.testing.assert_close(wn.g.detach(), unit_norms(weight, 1))
    torch.testing.assert_close(layer.weight.detach(), weight)


def test_weight_norm_other_parameter_name():
    layer = nn.Bilinear(3, 4, 5)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 4)
    expected = layer(x1, x2)
    nlnn.weight_norm(layer, name="weight")
    torch.testing.assert_close(layer(x1, x2), expected)
    assert get_weight_norm(layer).g.shape == (5,)


def test_weight_norm_keeps_frozen_weight_frozen():
    layer = nn.Linear(3, 2)
    layer.weight.requires_grad_(False)
    nlnn.weight_norm(layer)
    wn = get_weight_norm(layer)
    assert not wn.g.requires_grad
    assert not wn.v.requires_grad


def test_weight_norm_assignment_resets_g_and_v():
    layer = nlnn.weight_norm(nn.Linear(3, 2))
    new_weight = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    layer.weight = new_weight
    wn = get_weight_norm(layer)
    torch.testing.assert_close(wn.g.detach(), torch.tensor([5.0, 2.0]))
    torch.testing.assert_close(wn.v.detach(), new_weight)
    torch.testing.assert_close(layer.weight.detach(), new_weight)


def test_weight_norm_state_dict_round_trip():
    torch.manual_seed(0)
    source = nlnn.weight_norm(nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        get_weight_norm(source).g.mul_(3.0)
    target = nlnn.weight_norm(nn.Conv2d(3, 4, 3))
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(target(x), source(x))


def test_weight_norm_deepcopy_and_dtype():
    layer = nlnn.weight_norm(nn.Linear(4, 3))
    clone = copy.deepcopy(layer).double()
    x = torch.randn(2, 4)
    assert get_weight_norm(clone).g.dtype == torch.float64
    assert clone.weight.dtype == torch.float64
    torch.testing.assert_close(clone(x.double()).float(), layer(x))
    assert get_weight_norm(clone).g is not get_weight_norm(layer).g


def test_weight_norm_optimizer_step_moves_g_and_v():
    torch.manual_seed(0)
    layer = nlnn.weight_norm(nn.Linear(4, 3))
    wn = get_weight_norm(layer)
    g_before = wn.g.detach().clone()
    v_before = wn.v.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 4)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(wn.g.detach(), g_before)
    assert not torch.equal(wn.v.detach(), v_before)


def test_weight_norm_rejects_missing_parameter():
    with pytest.raises(ValueError, match="parameter named 'kernel'"):
        nlnn.weight_norm(nn.Linear(3, 2), name="kernel")


def test_weight_norm_rejects_second_wrap():
    layer = nlnn.weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="Linear.weight is already parametrized"):
        nlnn.weight_norm(layer)


def test_weight_norm_rejects_torch_parametrization():
    layer = parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="already parametrized"):
        nlnn.weight_norm(layer)


def test_weight_norm_rejects_vector():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nlnn.weight_norm(nn.BatchNorm1d(3))


@pytest.mark.parametrize("dim", [2, -3])
def test_weight_norm_rejects_bad_dim(dim):
    with pytest.raises(ValueError, match=rf"dim must be in \[-2, 2\).*got {dim}"):
        nlnn.weight_norm(nn.Linear(3, 2), dim=dim)


def test_weight_norm_rejects_grouped_transpose_auto_dim():
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        nlnn.weight_norm(layer)
    nlnn.weight_norm(layer, dim=1)
    assert get_weight_norm(layer).g.shape == (3,)
    with pytest.raises(ValueError, match="with groups=2 does not have"):
        nlnn.init_weight_norm_(layer, torch.randn(2, 4, 3, 3))


def test_weight_norm_class_checks_dim():
    with pytest.raises(ValueError, match=r"dim must be in \[0, 2\)"):
        WeightNorm(torch.randn(3, 2), dim=2)


# remove_weight_norm -------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_remove_weight_norm_keeps_function(key):
    layer, x, _ = make_layer(key)
    nlnn.weight_norm(layer)
    with torch.no_grad():
        get_weight_norm(layer).g.mul_(2.0)
    expected = layer(x).detach()
    weight = layer.weight.detach().clone()
    assert nlnn.remove_weight_norm(layer) is layer
    assert type(layer) is type(make_layer(key)[0])
    assert isinstance(layer.weight, nn.Parameter)
    assert layer.weight.requires_grad
    assert not parametrize.is_parametrized(layer)
    torch.testing.assert_close(layer.weight.detach(), weight)
    torch.testing.assert_close(layer(x), expected)
    assert sorted(name for name, _ in layer.named_parameters()) == ["bias", "weight"]


def test_remove_weight_norm_rejects_plain_layer():
    with pytest.raises(ValueError, match="Linear.weight has no weight normalization"):
        nlnn.remove_weight_norm(nn.Linear(3, 2))


def test_remove_weight_norm_rejects_torch_parametrization():
    layer = parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no weight normalization"):
        nlnn.remove_weight_norm(layer)


# wrap_layer and the factory entry ----------------------------------------------------


def test_wrap_layer_weightnorm_applies_weight_norm():
    layer = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 5)
    expected = layer(x)
    wrapped = factory.wrap_layer(layer, "weightnorm")
    assert wrapped is layer
    assert isinstance(get_weight_norm(layer), WeightNorm)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm", "none"])
def test_wrap_layer_other_norms_leave_layer(norm):
    layer = nn.Linear(3, 2)
    assert factory.wrap_layer(layer, norm) is layer
    assert not parametrize.is_parametrized(layer)


# init_weight_norm_ --------------------------------------------------------------------


def record_outputs(model: nn.Module, layer_types) -> tuple[dict, list]:
    """Register hooks that store the output of every layer of layer_types by name."""
    outputs = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, layer_types):

            def hook(module, args, output, name=name):
                outputs[name] = output.detach()

            handles.append(module.register_forward_hook(hook))
    return outputs, handles


def assert_standardized(output: torch.Tensor, unit_dim: int, zero_mean: bool = True):
    per_unit = output.movedim(unit_dim, 0).flatten(1)
    var, mean = torch.var_mean(per_unit, dim=1, correction=0)
    if zero_mean:
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-4, rtol=0)


def weight_normed(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nlnn.weight_norm(module)
    return model


def test_init_weight_norm_standardizes_mlp():
    torch.manual_seed(0)
    model = weight_normed(
        nn.Sequential(
            nn.Linear(10, 32),
            nn.ReLU(),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
    )
    batch = torch.randn(256, 10) * 3 + 1
    v_before = [get_weight_norm(model[i]).v.detach().clone() for i in (0, 2, 4)]
    assert nlnn.init_weight_norm_(model, batch) is model

    outputs, handles = record_outputs(model, nn.Linear)
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    assert sorted(outputs) == ["0", "2", "4"]
    for name, output in outputs.items():
        assert_standardized(output, unit_dim=-1)
    for index, v in zip((0, 2, 4), v_before):
        assert torch.equal(get_weight_norm(model[index]).v.detach(), v)


def test_init_weight_norm_standardizes_cnn():
    torch.manual_seed(0)
    model = weight_normed(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 4, 2, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 7),
        )
    )
    batch = torch.randn(32, 3, 7, 7) + 0.5
    nlnn.init_weight_norm_(model, batch)

    outputs, handles = record_outputs(model, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    assert sorted(outputs) == ["0", "2", "4", "7"]
    for name in ("0", "2", "4"):
        assert_standardized(outputs[name], unit_dim=1)
    assert_standardized(outputs["7"], unit_dim=-1)


def test_init_weight_norm_sequence_input():
    torch.manual_seed(0)
    layer = nlnn.weight_norm(nn.Linear(6, 4))
    batch = torch.randn(8, 5, 6) * 2
    nlnn.init_weight_norm_(layer, batch)
    with torch.no_grad():
        assert_standardized(layer(batch), unit_dim=-1)


def test_init_weight_norm_without_bias_scales_only():
    torch.manual_seed(0)
    layer = nlnn.weight_norm(nn.Linear(6, 4, bias=False))
    batch = torch.randn(64, 6) + 3.0
    nlnn.init_weight_norm_(layer, batch)
    with torch.no_grad():
        output = layer(batch)
    assert_standardized(output, unit_dim=-1, zero_mean=False)
    assert output.mean(dim=0).abs().min() > 0.1


def test_init_weight_norm_output_matches_recomputed():
    # The hook hands later layers the recomputed output, as a new forward would.
    torch.manual_seed(0)
    model = weight_normed(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    batch = torch.randn(50, 4)
    captured = {}
    model.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    nlnn.init_weight_norm_(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(captured["out"], model(batch))


def test_init_weight_norm_shared_layer_once():
    torch.manual_seed(0)
    layer = nlnn.weight_norm(nn.Linear(4, 4))
    model = nn.Sequential(layer, nn.Tanh(), layer)
    batch = torch.randn(64, 4)
    nlnn.init_weight_norm_(model, batch)
    with torch.no_grad():
        assert_standardized(layer(batch), unit_dim=-1)


def test_init_weight_norm_keeps_gradients_off():
    model = weight_normed(nn.Sequential(nn.Linear(4, 3)))
    nlnn.init_weight_norm_(model, torch.randn(16, 4))
    wn = get_weight_norm(model[0])
    assert wn.g.grad is None
    assert wn.g.requires_grad


def test_init_weight_norm_rejects_plain_model():
    with pytest.raises(ValueError, match="found no layer wrapped by weight_norm"):
        nlnn.init_weight_norm_(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3))


def test_init_weight_norm_rejects_single_value_per_unit():
    layer = nlnn.weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="more than 1 value per output unit"):
        nlnn.init_weight_norm_(layer, torch.randn(1, 3))


def test_init_weight_norm_rejects_input_dim_norm():
    layer = nlnn.weight_norm(nn.Linear(3, 2), dim=1)
    expected = r"Linear \(the model\) must use dim=0, got dim=1"
    with pytest.raises(ValueError, match=expected):
        nlnn.init_weight_norm_(layer, torch.randn(8, 3))


def test_init_weight_norm_rejects_unsupported_layer():
    embedding = nlnn.weight_norm(nn.Embedding(10, 4))
    with pytest.raises(TypeError, match=r"got Embedding \(the model\)"):
        nlnn.init_weight_norm_(embedding, torch.arange(5))


def test_init_weight_norm_warns_about_unused_layer():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nlnn.weight_norm(nn.Linear(3, 2))
            self.unused = nlnn.weight_norm(nn.Linear(3, 2))

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    g_before = get_weight_norm(model.unused).g.detach().clone()
    with pytest.warns(UserWarning, match=r"did not call them: \['unused'\]"):
        nlnn.init_weight_norm_(model, torch.randn(16, 3))
    assert torch.equal(get_weight_norm(model.unused).g.detach(), g_before)


def test_init_weight_norm_removes_hooks():
    layer = nlnn.weight_norm(nn.Linear(3, 2))
    nlnn.init_weight_norm_(layer, torch.randn(16, 3))
    assert len(layer._forward_hooks) == 0
    with pytest.raises(ValueError):
        nlnn.init_weight_norm_(layer, torch.randn(1, 3))
    assert len(layer._forward_hooks) == 0

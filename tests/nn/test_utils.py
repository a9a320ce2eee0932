"""nn.utils: eval_mode restores every submodule's flag; set_submodule replaces by dotted path."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_struct.nn import eval_mode, set_submodule


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.ReLU(), nn.Linear(2, 3)))


def test_eval_mode_restores_each_flag_even_on_error() -> None:
    model = _model().train()
    model[1].eval()  # e.g. a frozen BatchNorm
    before = [m.training for m in model.modules()]
    with eval_mode(model) as m:
        assert m is model and not any(x.training for x in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_set_submodule_replaces_and_returns_the_old_module() -> None:
    model = _model()
    old_lin, old_conv = model[2][1], model[0]
    new = nn.Linear(2, 3)
    assert set_submodule(model, "2.1", new) is old_lin and model[2][1] is new
    assert set_submodule(model, "0", nn.Identity()) is old_conv and isinstance(model[0], nn.Identity)
    assert "2.1.weight" in model.state_dict()


def test_set_submodule_names_the_children_where_the_path_breaks() -> None:
    model = _model()
    with pytest.raises(AttributeError, match=r"Sequential\.2 has no child 'fc'; its children: \['0', '1'\]"):
        set_submodule(model, "2.fc", nn.Identity())
    with pytest.raises(AttributeError, match=r"no submodule 'head'.*its children: \['0', '1', '2'\]"):
        set_submodule(model, "head", nn.Identity())
    with pytest.raises(ValueError, match="empty layer name"):
        set_submodule(model, "", nn.Identity())

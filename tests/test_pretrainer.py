"""Which modalities a step encodes: what the objectives read, not every tower by default."""

from __future__ import annotations

from types import SimpleNamespace

from mmpt.pretrainer import encoded_modalities


def _objective(modalities: tuple[str, ...] | None) -> SimpleNamespace:
    return SimpleNamespace(modalities=modalities)


def test_objectives_that_encode_their_own_inputs_encode_nothing_else() -> None:
    # masked modelling runs the tower itself: a full unmasked forward as well would double the step's cost
    model = SimpleNamespace(modalities=["image", "text"])
    assert encoded_modalities(model, [_objective(())]) == []
    assert encoded_modalities(model, [_objective(()), _objective(("text",))]) == ["text"]
    assert encoded_modalities(model, [_objective(("text", "image")), _objective(("image",))]) == ["text", "image"]


def test_an_objective_that_does_not_say_gets_every_modality() -> None:
    model = SimpleNamespace(modalities=["image", "text"])
    assert encoded_modalities(model, [_objective(None), _objective(("text",))]) == ["image", "text"]
    assert encoded_modalities(model, []) == ["image", "text"]

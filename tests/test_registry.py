"""The one registry: registering, the one error, metadata, constraints."""
import pytest

from dlas_search import registry
from dlas_search.errors import BadInput
from dlas_search.registry import Registry


@pytest.fixture
def colours():
    reg = Registry("test.colour", "colour", instantiate=True)
    yield reg
    registry.REGISTRIES.pop("test.colour")


def test_register_lookup_and_the_one_error(colours):
    @colours.register("red", label="bright red")
    class Red:
        """Warm."""

    @colours.register("blue")
    class Blue:
        label = "deep blue"

        def infeasible(self, config):
            return "blue needs a sky" if not config.get("sky") else None

    assert colours.names() == ["red", "blue"] and list(colours) == ["red", "blue"]
    assert isinstance(colours.lookup("red"), Red) and colours["red"].name == "red"
    assert "red" in colours and "green" not in colours and len(colours) == 2
    with pytest.raises(BadInput, match=r"test\.colour: 'rde' is not allowed \(did you mean "
                                       r"'red'\?\); allowed: red, blue"):
        colours.lookup("rde")
    with pytest.raises(BadInput, match=r"^space\.yaml: test\.colour: 'x'"):
        colours.lookup("x", where="space.yaml: ")
    assert colours.label("red") == "bright red" and colours.label("blue") == "deep blue"
    assert colours.describe() == [("red", "Warm."), ("blue", "deep blue")]
    with pytest.raises(ValueError, match="registered twice"):
        colours.register("red", object())


def test_constraints_are_asked_of_the_chosen_entries(colours):
    @colours.register("blue")
    class Blue:
        def infeasible(self, config):
            return "blue needs a sky" if not config.get("sky") else None

    colours.register("red", object())
    params = {"test.colour": "blue", "other.key": 3}
    assert registry.infeasible(params, {"sky": False}) == "blue needs a sky"
    assert registry.infeasible(params, {"sky": True}) is None
    assert registry.infeasible({"test.colour": "red"}, {}) is None


def test_functions_register_with_metadata(colours):
    plain = Registry("test.loader", "loader")
    try:
        @plain.register("digits", check=len)
        def load():
            return 1
        assert plain.lookup("digits") is load and plain.meta("digits")["check"] is len
        assert plain.attr("digits", "check") is len and plain.attr("digits", "nope", 5) == 5
    finally:
        registry.REGISTRIES.pop("test.loader")


def test_constraints_declare_what_they_read(colours):
    @colours.register("blue", infeasible=lambda config: None, reads=("test.sky",))
    class Blue:
        pass

    colours.register("red", object())
    names = registry.constrained()
    assert names.index("test.colour") + 1 == names.index("test.sky")
    # the shipped ones: PyTorch eager is constrained by the target
    assert {"compiler.backend", "hw.target"} <= set(names)


def test_every_choice_a_space_names_is_registered():
    import dlas_search.space  # noqa: F401  (imports every layer)
    assert {"data.name", "model.family", "compiler.backend", "compiler.tuner",
            "sampler"} <= set(registry.REGISTRIES)


def test_shipped_constraints_are_decided_when_a_configuration_is_made(workdir):
    """PyTorch eager runs where the device kind says it can (the local CPU, not a board behind
    a tracker); the space pins a configuration and it comes back ruled out, with why."""
    from conftest import write_space
    from dlas_search.space import load_space
    path = write_space(workdir, """\
        study: constraints
        targets:
          board: {device: rpc, tracker: "127.0.0.1:9190", key: board}
        space:
          hw: {target: [local, board]}
        """)
    space = load_space(path)
    eager_local = space.pin({"compiler.backend": "torch"}).defaults()
    eager_board = space.pin({"compiler.backend": "torch", "hw.target": "board"}).defaults()
    tvm_board = space.pin({"hw.target": "board"}).defaults()
    assert eager_local.ruled_out is None and tvm_board.ruled_out is None
    assert eager_board.ruled_out == (
        "compiler.backend torch runs PyTorch eager on the local CPU only; hw.target board is "
        "a rpc device (use compiler.backend tvm there)")

"""One recorded call of a module (its inputs, output and the gradients at them), and the checks on records."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lightning_gp.functional._torch_private import tensor_version, tree_flatten


def layer_label(name: str) -> str:
    """A module's name as the norms are keyed: ``"_root"`` for the model itself."""
    return name or "_root"


class LayerCall:
    """One recorded call of a module: its inputs and output, and (filled during backward) the output gradients.

    Attributes:
        args, kwargs: what the module was called with.
        output: what it returned.
        outputs: the returned tensors that require grad, at positions ``out_index`` of the flattened output.
        grads: ``{position: gradient}`` of those outputs, filled by the backward.
        input_grads: ``{position: gradient}`` of the positional inputs that require grad (with ``input_grads=True``
            on the recorder), the first backward's.
    """

    def __init__(self, args: tuple, kwargs: dict, output: object) -> None:
        self.args, self.kwargs, self.output = args, kwargs, output
        flat, self.out_spec = tree_flatten(output)
        self.out_index = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        self.outputs = [flat[i] for i in self.out_index]
        self.grads: dict[int, Tensor] = {}
        self.input_grads: dict[int, Tensor] = {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        self.versions = [tensor_version(t) for t in inputs]  # tensor_versions((args, kwargs)), flattened once
        self.unbatched = False  # a call whose inputs are provably not the batch's (see GradNormRecorder)
        #: fed by no tensor that requires grad (a first layer, an embedding): a backward to its outputs passes
        #: every layer whose input descends from them
        self.source = not any(t.requires_grad for t in inputs)

    def release(self) -> None:
        """Drop the records (inputs, outputs, gradients) once this call's norms are computed: they hold activations
        that autograd would otherwise free during the backward."""
        self.args, self.kwargs, self.output, self.outputs = (), {}, None, []
        self.grads, self.versions = {}, []

    @property
    def received(self) -> bool:
        """Whether every output that requires grad got its gradient."""
        return len(self.grads) == len(self.out_index)

    def store(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self.grads[i] = grad.detach()

        return hook

    def store_input(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self.input_grads.setdefault(i, grad.detach())

        return hook


def tensor_versions(collection: object) -> list[int]:
    """The version counters of the tensors in ``collection`` (any pytree), in order."""
    return [tensor_version(t) for t in tree_flatten(collection)[0] if isinstance(t, Tensor)]


def check_versions(uses: dict[str, list[LayerCall]]) -> None:
    """Raise if a recorded module input was modified in place after the module ran."""
    for name, us in uses.items():
        for use in us:
            if tensor_versions((use.args, use.kwargs)) != use.versions:
                raise RuntimeError(
                    f"An input of module '{layer_label(name)}' was modified in place after the module ran, so its "
                    f"recorded activations are stale. Avoid in-place ops on layer inputs (e.g. `x += ...`)."
                )

"""The one error type of the converters: a user mistake or an unsupported checkpoint."""
from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, tensor or config field.

    Raised for an unsupported architecture (naming ``architectures`` / ``model_type`` and
    the feature our model cannot represent), a tensor missing from the weight files
    (naming the tensor and the files searched), and a tensor whose shape does not match
    what the config implies.
    """


def unsupported(model_type: str, architectures, feature: str, where: str = "config.json") -> ConversionError:
    """'unsupported: <feature>' for a checkpoint, naming its model_type and architectures."""
    arch = ", ".join(architectures) if architectures else "?"
    return ConversionError(f"{where}: unsupported checkpoint (model_type={model_type!r}, "
                           f"architectures=[{arch}]): {feature}")


def check_shape(name: str, tensor_shape, expected, source: str, why: str = "") -> None:
    """Raise a ConversionError when `tensor_shape` differs from `expected`."""
    got, want = tuple(tensor_shape), tuple(expected)
    if got != want:
        hint = f" ({why})" if why else ""
        raise ConversionError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(want)}{hint}")

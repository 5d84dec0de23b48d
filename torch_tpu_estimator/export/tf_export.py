"""The TF SavedModel variant of an export, for TF Serving and anything else that loads one.

Its `serving_default` signature takes named inputs with any number of rows and returns named
outputs. Inside the graph the rows are padded to the smallest traced batch size that holds them,
or to a multiple of the largest (then run chunk by chunk), run through the StableHLO functions by
XlaCallModule, and the padding is stripped. tensorflow-cpu is the optional `tf` extra.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from .signature import ExportSignature

if TYPE_CHECKING:
    from torch_xla import stablehlo


def import_tensorflow() -> Any:
    """tensorflow, or an ImportError that says how to get it."""
    try:
        import tensorflow
    except ImportError as error:
        raise ImportError(
            "as_tf_saved_model=True needs TensorFlow: pip install 'torch_tpu_estimator[tf]' "
            f"(tensorflow-cpu) ({error})") from error
    return tensorflow


def _pad_rows(tf: Any, tensor: Any, rows: Any) -> Any:
    padding = tf.concat([[[0, rows - tf.shape(tensor)[0]]],
                         tf.zeros([tf.rank(tensor) - 1, 2], tf.int32)], axis=0)
    return tf.pad(tensor, padding)


def save_tf_saved_model(program: stablehlo.StableHLOGraphModule, signature: ExportSignature,
                        path: str) -> None:
    """Writes `program`'s functions, one per batch size, as a SavedModel at `path`."""
    tf = import_tensorflow()
    from ..runtime import xla_compat

    bundle = copy.deepcopy(xla_compat.bundle_of(program))
    bundle.state_dict = {name: tf.Variable(value, trainable=False,
                                           name=xla_compat.tf_variable_name(name))
                         for name, value in bundle.state_dict.items()}
    bundle.additional_constants = [tf.Variable(value, trainable=False)
                                   for value in bundle.additional_constants]
    by_name = {function.meta.name: function for function in bundle.stablehlo_funcs}
    sizes = list(signature.batch_sizes)
    functions = [xla_compat.tf_function_of(by_name[signature.function_name(size)], bundle)
                 for size in sizes]
    output_specs = tuple(tf.TensorSpec(None, tf.as_dtype(spec.dtype))
                         for spec in signature.outputs)

    def at_batch_size(index: int, inputs: list) -> Any:
        size = sizes[index]

        def run() -> list:
            rows = tf.shape(inputs[0])[0]
            chunks = (rows + size - 1) // size
            stacked = tuple(
                tf.reshape(_pad_rows(tf, value, chunks * size),
                           tf.concat([[chunks, size], tf.shape(value)[1:]], axis=0))
                for value in inputs)
            results = tf.map_fn(lambda chunk: tuple(functions[index](*chunk)), stacked,
                                fn_output_signature=output_specs)
            return [tf.reshape(result, tf.concat([[chunks * size], tf.shape(result)[2:]], 0))[:rows]
                    for result in results]
        return run

    def serve(*inputs: Any) -> dict:
        rows = tf.shape(inputs[0])[0]
        smallest_that_holds = tf.reduce_sum(tf.cast(tf.constant(sizes[:-1]) < rows, tf.int32))
        results = tf.switch_case(smallest_that_holds,
                                 [at_batch_size(index, list(inputs)) for index in range(len(sizes))])
        return {spec.name: result for spec, result in zip(signature.outputs, results, strict=True)}

    module = tf.Module()
    module._variables = list(bundle.state_dict.values()) + bundle.additional_constants
    module.serve = tf.function(serve, input_signature=[
        tf.TensorSpec([None, *spec.shape], tf.as_dtype(spec.dtype), name=spec.name)
        for spec in signature.inputs])
    tf.saved_model.save(module, path, signatures={
        "serving_default": module.serve.get_concrete_function()})

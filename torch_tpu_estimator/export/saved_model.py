"""Export for serving: model_fn in PREDICT mode, traced with torch.export at each serving batch
size, lowered to StableHLO by torch_xla, and written to a new timestamped directory.

Shapes are static, as on TPU serving: one program per batch size, and a server pads each request
up to the smallest size that holds it (serving.py does). Everything is traced and lowered in
memory first, then written to a hidden temporary directory that is renamed into place only when
complete, so a failed or killed export never leaves a directory that looks like an export.

    <export_dir_base>/<unix seconds>/
        signature.json        inputs, outputs, batch sizes, checkpoint and step (signature.py)
        stablehlo/            torch_xla's StableHLO bundle: functions/batch_<n>.*, data/ (weights)
        xla_hlo/batch_<n>.pb  the same programs as XLA HloModuleProtos, which load_exported runs
        assets.extra/         the files given as assets_extra
        tf_saved_model/       with as_tf_saved_model=True (tf_export.py)
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch_xla import stablehlo

from ..common.paths import is_number_name, is_url
from ..runtime import xla_compat
from ..state.files import creation_mode, fsync_path
from ..state.locking import hold_directory, remove_if_abandoned
from ..state.stores import store_for
from ..step.context import ModeContext
from .signature import (
    ASSETS_EXTRA_DIR,
    HLO_DIR,
    SIGNATURE_NAME,
    STABLEHLO_DIR,
    TENSOR_PREDICTIONS,
    TF_SAVED_MODEL_DIR,
    ExportSignature,
    TensorSpec,
    hlo_path,
)

logger = logging.getLogger("torch_tpu_estimator")
_TEMP_PREFIX = ".tmp-export-"


class _ServingModule(torch.nn.Module):
    """model_fn in PREDICT mode as a module of positional tensors, which torch.export traces.

    Its outputs are the spec's `export_outputs`, else its `predictions`, named as in the dict
    model_fn gave (or `predictions` for one tensor); `params["batch_size"]` is the traced batch.
    """

    def __init__(self, ctx: ModeContext, model: torch.nn.Module, input_names: Sequence[str],
                 features_is_dict: bool):
        super().__init__()
        self.model = model
        self._ctx = ctx
        self._input_names = list(input_names)
        self._features_is_dict = features_is_dict

    def named_outputs(self, tensors: Sequence[torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], bool]:
        """model_fn's outputs by name, and whether model_fn gave a dict."""
        features = dict(zip(self._input_names, tensors, strict=True)) \
            if self._features_is_dict else tensors[0]
        spec = self._ctx.call_model_fn(self.model, features, None,
                                       self._ctx.model_params(batch_size=tensors[0].shape[0]))
        outputs = spec.export_outputs if spec.export_outputs is not None else spec.predictions
        is_dict = isinstance(outputs, Mapping)
        named = dict(outputs) if is_dict else {TENSOR_PREDICTIONS: outputs}
        for name, value in named.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise TypeError(f"model_fn's export outputs must map str names to tensors, got "
                                f"{name!r}: {type(value).__name__}")
        return named, is_dict

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.named_outputs(tensors)[0].values())


def _checked_outputs(module: _ServingModule, inputs: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], bool]:
    """Runs model_fn once, eagerly, on the example features: a mismatch shows here, clearly."""
    rows = next(iter(inputs.values())).shape[0]
    described = ", ".join(TensorSpec.of_rows(name, value).describe()
                          for name, value in inputs.items())
    try:
        with torch.no_grad():
            outputs, is_dict = module.named_outputs(list(inputs.values()))
    except Exception as error:
        raise ValueError(f"model_fn fails in PREDICT mode on the example features ({described}): "
                         f"{type(error).__name__}: {error}") from error
    for name, value in outputs.items():
        if value.dim() == 0 or value.shape[0] != rows:
            raise ValueError(
                f"model_fn's export output {name!r} has shape {tuple(value.shape)} for a batch of "
                f"{rows}: every output needs the batch as its first axis, to strip padding")
    return outputs, is_dict


def _check_tf_names(names: Sequence[str]) -> None:
    """TF signatures rename or refuse names that are not identifiers; refuse them here first."""
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"{name!r} cannot name a TF SavedModel input or output (TF would "
                             "rename or refuse it): use identifiers with as_tf_saved_model=True")


def serving_weights(model: torch.nn.Module, weights_dtype: torch.dtype | None) -> torch.nn.Module:
    """The model with its floating weights in the serving dtype: `weights_dtype` when given,
    else float32 for bfloat16 weights (torch_xla 2.9's exporter stores weights as NumPy arrays,
    which have no bfloat16) and the others unchanged."""
    if weights_dtype is not None:
        return model.to(weights_dtype)
    if any(tensor.dtype == torch.bfloat16 for tensor in [*model.parameters(), *model.buffers()]):
        logger.info("Exporting the model's bfloat16 weights as float32 (export_saved_model's "
                    "weights_dtype picks another)")
        return model.to(torch.float32)
    return model


def _tiled(inputs: dict[str, torch.Tensor], batch_size: int) -> tuple[torch.Tensor, ...]:
    """The example rows repeated to fill `batch_size` rows: tracing inputs of the right shape."""
    tiled = []
    for value in inputs.values():
        repeats = -(-batch_size // value.shape[0])
        tiled.append(value.repeat(repeats, *([1] * (value.dim() - 1)))[:batch_size].contiguous())
    return tuple(tiled)


def _lowered(module: _ServingModule, args: tuple[torch.Tensor, ...], with_weights: bool
             ) -> tuple[stablehlo.StableHLOGraphModule, bytes]:
    """model_fn traced at one batch size, as StableHLO and as the HLO module of the same trace.

    torch_xla 2.9's exported_program_to_stablehlo keeps its traced tensors to itself; the HLO is
    read from them as it asks for their StableHLO, so both hold one graph with one parameter
    order (the StableHLO function's input_locations). serving.py runs the HLO, which torch_xla
    compiles once per shape; it has no cache for StableHLO runs.
    """
    try:
        exported = torch.export.export(module, args)
    except Exception as error:
        raise ValueError(f"torch.export could not trace model_fn in PREDICT mode at batch size "
                         f"{args[0].shape[0]} (exports need static control flow): "
                         f"{type(error).__name__}: {str(error).partition(chr(10))[0]}") from error
    options = stablehlo.StableHLOExportOptions(override_tracing_arguments=args,
                                               export_weights=with_weights)
    with xla_compat.capturing_hlo() as hlo:
        program = stablehlo.exported_program_to_stablehlo(exported, options)
    if len(hlo) != 1:
        raise RuntimeError("torch_xla's exported_program_to_stablehlo no longer lowers through "
                           "xm.get_stablehlo_bytecode; xla_compat.py must follow it (pinned 2.9.0)")
    return program, hlo[0]


def _check_traced_outputs(program: stablehlo.StableHLOGraphModule, size: int,
                          outputs: Sequence[TensorSpec]) -> None:
    """Each traced output has `size` rows and the example run's dtype and row shape: an output
    that drops or fixes the batch axis would otherwise serve wrong rows without a word."""
    traced = xla_compat.bundle_of(program).stablehlo_funcs[0].meta.output_signature
    for spec, signature in zip(outputs, traced, strict=True):
        if (signature.shape[:1] != [size] or tuple(signature.shape[1:]) != spec.shape
                or signature.dtype != spec.dtype):
            raise ValueError(
                f"model_fn's export output {spec.name!r} traced at batch size {size} is "
                f"{signature.dtype}{signature.shape}, not {spec.describe()} with batch {size}: "
                "every output must keep the batch as its first axis")


def _one_bundle(programs: dict[int, stablehlo.StableHLOGraphModule]
                ) -> stablehlo.StableHLOGraphModule:
    """The per-batch-size programs as one StableHLO bundle: the weights of the first (the only
    one that exported them), one function per batch size, named by ExportSignature."""
    merged = None
    for size, program in sorted(programs.items()):
        bundle = xla_compat.bundle_of(program)
        function = bundle.stablehlo_funcs[0]
        function.meta.name = ExportSignature.function_name(size)
        if merged is None:
            merged = stablehlo.StableHLOModelBundle(
                state_dict=bundle.state_dict, additional_constants=[], stablehlo_funcs=[])
        offset = len(merged.additional_constants)
        for location in function.meta.input_locations:
            if location.type_ == stablehlo.VariableType.CONSTANT:
                location.position += offset
        merged.additional_constants.extend(bundle.additional_constants)
        merged.stablehlo_funcs.append(function)
    return stablehlo.StableHLOGraphModule(merged)


def _copy_assets(directory: str, assets_extra: Mapping[str, str]) -> None:
    """Copies each source file to its path under assets.extra/."""
    for name, source in assets_extra.items():
        destination = os.path.join(directory, ASSETS_EXTRA_DIR, name)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.copyfile(source, destination)


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in [*files, "."]:
            fsync_path(os.path.join(root, name))


def _publish_to_store(export_dir_base: str, write: Callable[[str], None]) -> str:
    """An export into a bucket: written locally as always (_publish), then uploaded under a
    `<unix seconds>` name later than every export there, claimed by a conditional create (two
    exporters never share one), its signature last: a reader takes a folder for an export once
    its signature is there, so a killed upload is never read."""
    store = store_for(export_dir_base)
    with tempfile.TemporaryDirectory() as staging:
        local = _publish(staging, write)
        stamps = [int(name) for name in store.listdir(export_dir_base) if is_number_name(name)]
        stamp = max([int(os.path.basename(local)), *[stamp + 1 for stamp in stamps]])
        while not store.create_new(store.join(store.join(export_dir_base, str(stamp)),
                                              _CLAIM_NAME), b""):
            stamp += 1
        final = store.join(export_dir_base, str(stamp))
        store.upload(local, final, last=SIGNATURE_NAME)
    return final


_CLAIM_NAME = ".claimed"  # in a bucket's export: taken by one exporter before it uploads


def _publish(export_dir_base: str, write: Callable[[str], None]) -> str:
    """Runs write(temporary_dir), then renames it to a new `<unix seconds>` name, later than
    every export already there (so the newest is the largest even if the clock went back).

    The temporary folder is flock-ed while it is written: a killed exporter's folder is free,
    and the next export removes it; a running exporter's is left alone."""
    created_base = not os.path.exists(export_dir_base)
    os.makedirs(export_dir_base, exist_ok=True)
    for name in os.listdir(export_dir_base):
        if name.startswith(_TEMP_PREFIX):
            remove_if_abandoned(os.path.join(export_dir_base, name))
    temporary = tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=export_dir_base)
    held = hold_directory(temporary)  # marks it in use: a later export leaves it alone
    try:
        os.chmod(temporary, creation_mode(directory=True))  # mkdtemp's 0700 hides it
        write(temporary)
        _fsync_tree(temporary)
        while True:
            stamps = [int(name) for name in os.listdir(export_dir_base)
                      if is_number_name(name)]
            final = os.path.join(export_dir_base, str(max([int(time.time()), *[
                stamp + 1 for stamp in stamps]])))
            try:
                os.rename(temporary, final)
                break
            except OSError as error:  # another export took the name first
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if created_base and not os.listdir(export_dir_base):
            os.rmdir(export_dir_base)
        raise
    finally:
        os.close(held)
    fsync_path(export_dir_base)
    return final


def export_model(
    ctx: ModeContext,
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    features_is_dict: bool,
    batch_sizes: Sequence[int],
    export_dir_base: str,
    checkpoint_path: str,
    global_step: int,
    assets_extra: Mapping[str, str],
    as_tf_saved_model: bool,
) -> str:
    """Traces, lowers and writes one export of `model` (restored, in eval mode, its weights in
    the serving dtype) for example features `inputs` (signature.named_rows's form); `ctx` is the
    PREDICT binding of the job."""
    module = _ServingModule(ctx, model, list(inputs), features_is_dict).eval()
    outputs, predictions_is_dict = _checked_outputs(module, inputs)
    output_specs = tuple(TensorSpec.of_rows(name, value) for name, value in outputs.items())
    if as_tf_saved_model:
        _check_tf_names([*inputs, *outputs])
    started = time.time()
    lowered = {}
    for number, size in enumerate(batch_sizes, 1):
        logger.info("export: lowering model_fn at batch size %d (%d of %d)", size, number,
                    len(batch_sizes))
        lowered[size] = _lowered(module, _tiled(inputs, size), with_weights=not lowered)
        _check_traced_outputs(lowered[size][0], size, output_specs)
    program = _one_bundle({size: programs[0] for size, programs in lowered.items()})
    logger.info("Lowered model_fn to StableHLO at batch sizes %s in %.1f s", list(batch_sizes),
                time.time() - started)
    signature = ExportSignature(
        inputs=tuple(TensorSpec.of_rows(name, value) for name, value in inputs.items()),
        outputs=output_specs,
        features_is_dict=features_is_dict,
        predictions_is_dict=predictions_is_dict,
        batch_sizes=tuple(batch_sizes),
        checkpoint=os.path.abspath(checkpoint_path),
        global_step=global_step,
        tf_saved_model=as_tf_saved_model,
        assets_extra=tuple(sorted(assets_extra)),
    )

    def write(directory: str) -> None:
        program.save(os.path.join(directory, STABLEHLO_DIR))
        os.makedirs(os.path.join(directory, HLO_DIR))
        for size, (_, hlo_module) in lowered.items():
            with open(hlo_path(directory, size), "wb") as handle:
                handle.write(hlo_module)
        _copy_assets(directory, assets_extra)
        if as_tf_saved_model:
            from .tf_export import save_tf_saved_model
            save_tf_saved_model(program, signature, os.path.join(directory, TF_SAVED_MODEL_DIR))
        with open(os.path.join(directory, SIGNATURE_NAME), "w") as handle:
            handle.write(signature.to_json())

    path = (_publish_to_store if is_url(export_dir_base) else _publish)(export_dir_base, write)
    logger.info("Exported the model of step %d to %s", global_step, path)
    return path

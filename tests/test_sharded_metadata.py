"""A sharded checkpoint's tensors.json (DCP's metadata, kept as JSON so that reading it never
unpickles) is checked field by field: a crafted file naming a path out of the checkpoint, or
malformed, is a ValueError naming the file before any shard is opened."""

from __future__ import annotations

import copy
import json

import pytest

from torch_tpu_estimator.state.sharded import FORMAT, metadata_from_json

VALID = {
    "format": FORMAT, "version": "1.0.0",
    "tensors": {"w": {"dtype": "float32", "size": [4],
                      "chunks": [{"offsets": [0], "sizes": [2]}, {"offsets": [2], "sizes": [2]}]}},
    "storage": [{"fqn": "w", "offset": [0], "index": 0, "file": "__0_0.distcp", "start": 0,
                 "length": 8, "transforms": []},
                {"fqn": "w", "offset": [2], "index": 0, "file": "__1_0.distcp", "start": 0,
                 "length": 8, "transforms": []}],
}


def test_a_well_formed_metadata_file_reads_as_dcp_metadata():
    metadata = metadata_from_json(json.dumps(VALID), "ckpt/tensors.json")
    assert list(metadata.state_dict_metadata["w"].size) == [4]
    assert sorted(info.relative_path for info in metadata.storage_data.values()) == [
        "__0_0.distcp", "__1_0.distcp"]


def _crafted(change):
    fields = copy.deepcopy(VALID)
    change(fields)
    return json.dumps(fields)


@pytest.mark.parametrize("text", [
    _crafted(lambda f: f["storage"][0].update(file="../outside.distcp")),
    _crafted(lambda f: f["storage"][0].update(file="/etc/passwd")),
    _crafted(lambda f: f["storage"][0].update(file="shards/__0_0.distcp")),
    _crafted(lambda f: f["storage"][0].update(file="..")),
    _crafted(lambda f: f["storage"][0].update(start=-1)),
    _crafted(lambda f: f["storage"][0].update(length="8")),
    _crafted(lambda f: f["storage"][0].pop("file")),
    _crafted(lambda f: f["tensors"]["w"].update(dtype="os.system")),
    _crafted(lambda f: f["tensors"]["w"].update(size=[-4])),
    _crafted(lambda f: f.update(format="pickle")),
    json.dumps([VALID]),
    "not json",
], ids=["parent", "absolute", "subfolder", "dotdot", "negative_start", "length_not_int",
        "no_file", "not_a_dtype", "negative_size", "other_format", "not_an_object", "not_json"])
def test_a_crafted_or_malformed_metadata_file_is_a_value_error_naming_it(text):
    with pytest.raises(ValueError, match=r"ckpt/tensors\.json"):
        metadata_from_json(text, "ckpt/tensors.json")

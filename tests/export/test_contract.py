"""The graph contract: one set of names and one KV geometry for every side."""

from __future__ import annotations

import subprocess
import sys

from transformers import LlamaConfig

from adalora_deploy.export.contract import KVGeometry, kv_names, present_for_past


def test_kv_geometry_reads_a_config_and_its_json_alike():
    # head_dim left out: hidden // heads (64 / 4 = 16); kv heads 2 (grouped-query attention)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                         intermediate_size=128, vocab_size=300)
    expected = KVGeometry(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, hidden=64, vocab=300)
    assert KVGeometry.of(config) == expected
    assert KVGeometry.of(config.to_dict()) == expected
    assert KVGeometry.of({"text_config": config.to_dict()}) == expected  # a multimodal wrapper's config.json


def test_kv_names_pair_each_past_with_its_present():
    past, present = kv_names(2)
    assert past == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                    "past_key_values.1.value"]
    assert [present_for_past(name) for name in past] == present


def test_contract_imports_only_the_standard_library():
    code = ("import sys, adalora_deploy.export.contract; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""Hugging Face import and export: a Hub-format model directory <-> a torch_dist checkpoint, streaming.

- `files`: config.json, safetensors shards and their index, read and written one tensor at a time;
- `rules`: how HF tensors fuse into one megatron tensor (QKV grouping, gate/up, Conv1D transpose) and back;
- `families`: one mapping table per family (Llama, Mistral, Qwen2, Qwen3, Nemotron, GPT-2, Qwen3-MoE, Mixtral):
  config fields, options, tensor names;
- `importer.import_hf` and `exporter.export_hf`: the two directions (CLI: `minitron import-hf`, `export-hf`).
"""

from megatron_minitron.hf.files import HFError

__all__ = ["HFError"]

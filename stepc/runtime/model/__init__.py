"""The model: the runtime's LlamaForCausalLM with its chunked loss (llama.py), built on the meta
device and filled shard by shard (materialise.py), grown from the previous stage's export
(growth.py), its old layers frozen behind ReLoRA adapters (lora.py), the optimizer state that
survives a growth (carry.py), and the stage's merged Hugging Face export with its seal
(export.py, export_seal.py)."""

"""Data: preparation and reading. `stepc data prepare` (prepare.py) reads the spec's files
(documents.py), tokenises them once (tokenizer.py) into memory-mapped token shards (shards.py) and
writes the run's data index; the ranks open those shards (prepared.py), draw each step's blocks
(sampler.py: held-out split, blends) and copy them to the device one micro-batch ahead
(batches.py); evaluations walk the same blocks in a fixed order (evalsets.py). Method "sft" reads instruction
examples instead (instructions.py: tokenised before torchrun with init_from's tokenizer, one padded
(input_ids, labels) row per example)."""

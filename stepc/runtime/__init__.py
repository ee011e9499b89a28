"""The FSDP2 runtime that executes one stage of a compiled run (launched by stage-<i>.sh through torchrun)."""

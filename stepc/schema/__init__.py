"""The manifest format: what the compiler writes and the runtime reads.

`spec.Spec` (the validated TOML spec), `plan.Plan`/`StagePlan` (the solved layout and schedule),
`manifest.Manifest` (both, read back from manifest.json) and `units` (byte sizes); for method "sft",
`conversations` (instruction data read and checked line by line) and `templates` (the prompt
templates training and `stepc generate` share). The compiler and the runtime both import this
package and nothing of each other.
"""

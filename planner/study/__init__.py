"""The decoder study on one GPU (bench/gpu_study.py): for each real decoder, profile once per objective, plan every
budget from the cached profiles, build the uniform and QLoRA arms, measure every arm's KL before fine-tuning, give
every arm the same fine-tune, and judge claims (a)-(e) with their numbers.

Modules: `settings` (what one study run is), `calls` (every `lqplan` command the study runs, one function each),
`arms` (QLoRA's bits, the uniform plans), `runner` (processes in parallel under a deadline and a GPU-memory
budget), `claims`, `report` (table, plots, environment), `tasks` (one model's task graph), `run` (the whole study:
environment, every model's tasks, outputs), `stage` (laying the wheels and the CPU-assembled model files out in
pieces for the GPU machine) and `install` (checking and installing them there)."""

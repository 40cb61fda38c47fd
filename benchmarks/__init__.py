"""``segsynth bench``: scenarios that measure segsynth side by side in one run.

Absolute numbers on shared machines are noisy, so every report names the machine, warms
up, repeats, and prints ratios computed inside the same run (pipeline / infer alone,
segsynth / ffmpeg CLI, ...). See benchmarks/RESULTS.md for the latest tables.
"""

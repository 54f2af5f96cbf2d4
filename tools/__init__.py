"""Development tools, kept out of the installed `tinyinfer` package and run from the repository root:
benchmarks (`python -m tools.bench NAME`), the GPU check and kernel tuning (`make gpu-check`,
`make gpu-tune`: gpu_check.py, gpu_tune.py, gpu_tune_sweeps.py) and the server load generator
(loadgen.py). They import tinyinfer; tinyinfer never imports them."""

"""Command-line tools, one module each with `main(argv=None) -> int`: `benchmark` (the op against the peer),
`profiling` (per-kernel device times), `bench_model` (training-step throughput of the zoo), `bench_decode`
(decoding throughput of one attention layer), `bench_generate` (the zoo's `generate`, eager and compiled),
`bench_packed` (packed documents: segment ids vs FlexAttention and SDPA with a mask), `bench_hopper` (the Hopper
backward in Gluon against the Triton one), `sweep` (wandb sweep files run locally), `report` (run records ->
tables and figures). `scripts/*.py` are their entry points.

The library (`cosformer`, `cosformer.train`, `cosformer.t2i`) imports nothing from here and parses no command
lines; only these tools do."""
